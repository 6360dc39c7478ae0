"""Which samples a step trains on: a pure function of (seed, step, rank), shared by every data family; and
which validation samples every evaluation scores.

Nothing here holds iterator state. Epoch e of the training set is a permutation seeded by
(seed, e); global batch s is the slice of that permutation it owns; rank r of `world` processes
takes rows [r*B/world, (r+1)*B/world) of it. A checkpoint therefore needs the step number only,
and processes agree on the global batch without talking. Random choices made per sample (masking,
augmentation) draw from `seeded(seed, ...)` keyed by the step and the row, never from a stream
that carries over between steps.
"""

from __future__ import annotations

import functools
import hashlib
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor


def seed_of(seed: int, *key) -> int:
    """A 63-bit seed fixed by (seed, *key) alone: independent streams for independent purposes."""
    digest = hashlib.blake2b(repr((int(seed), *key)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def seeded(seed: int, *key, device="cpu") -> torch.Generator:
    """A generator whose stream is fixed by (seed, *key) alone."""
    return torch.Generator(device).manual_seed(seed_of(seed, *key))


@functools.lru_cache(maxsize=2)  # the current epoch and, across its boundary, the next
def epoch_permutation(num_samples: int, seed: int, epoch: int) -> Tensor:
    return torch.randperm(num_samples, generator=seeded(seed, "epoch", epoch))


def global_batch(num_samples: int, batch_size: int, seed: int, step: int) -> Tensor:
    """Sample indices of global batch `step` (0-based): full batches only, each epoch reshuffled."""
    per_epoch = num_samples // batch_size
    if per_epoch == 0:
        raise ValueError(f"a batch of {batch_size} needs at least that many samples, not {num_samples}")
    epoch, slot = divmod(step, per_epoch)
    return epoch_permutation(num_samples, seed, epoch)[slot * batch_size:(slot + 1) * batch_size]


def validation_subset(indices: Sequence[int], max_samples: Optional[int], seed: int) -> list[int]:
    """At most max_samples of the indices, the same ones on every run, drawn from the whole split: its first
    ones can be all of one kind (a corpus's first documents, one package's docstrings)."""
    if max_samples is None or max_samples >= len(indices):
        return list(indices)
    return sorted(indices[i] for i in np.random.default_rng(seed).choice(len(indices), max_samples, replace=False))


def shard(batch_size: int, rank: int, world: int) -> slice:
    """The rows of a global batch that `rank` owns; `world` divides `batch_size` (checked in config)."""
    local = batch_size // world
    return slice(rank * local, (rank + 1) * local)


class KnownAnswer:
    """Known-answer variants of a training set: duplicates of a small pool, and unlearnable samples.

    A fixed `duplicate_fraction` of the training samples (chosen with `seed`) is replaced by copies
    of `duplicate_pool` other training samples, and a fixed, disjoint `noise_fraction` is marked
    noisy (the data family makes those unlearnable: random tokens, random labels). The validation
    set never passes through here. Exactly round(fraction * N) samples are changed by each option.
    """

    def __init__(self, num_samples: int, duplicate_fraction: float = 0.0, duplicate_pool: int = 4,
                 noise_fraction: float = 0.0, seed: int = 0):
        n_dup, n_noise = round(duplicate_fraction * num_samples), round(noise_fraction * num_samples)
        if n_dup + n_noise + (duplicate_pool if n_dup else 0) > num_samples:
            raise ValueError("duplicate_fraction + noise_fraction leave no room for the duplicate pool")
        order = torch.randperm(num_samples, generator=seeded(seed, "known-answer"))
        pool = order[:duplicate_pool] if n_dup else order[:0]
        start = len(pool)
        self.duplicated = order[start:start + n_dup].sort().values
        self.noisy = order[start + n_dup:start + n_dup + n_noise].sort().values
        self.source = torch.arange(num_samples)  # sample i shows the content of sample source[i]
        if n_dup:
            self.source[self.duplicated] = pool[torch.arange(n_dup) % len(pool)]
        self.is_noisy = torch.zeros(num_samples, dtype=torch.bool)
        self.is_noisy[self.noisy] = True

    def __call__(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        """(the samples whose content to load, which of them to make unlearnable) for these indices."""
        return self.source[indices], self.is_noisy[indices]
