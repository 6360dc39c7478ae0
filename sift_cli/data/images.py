"""Image classification data: scikit-learn's digits (offline), CIFAR-10, any folder of class subfolders.

Each builder returns an ImageData. Its training batches are a pure function of (seed, step, rank):
`train_batch` takes the sample indices from sift_cli.data.order and draws each sample's augmentation
from a seed fixed by (seed, step, row), so a batch is the same in any process, in any order of calls
and with any number of DataLoader workers. Batches are {"images": float [B, 3, S, S], "labels": long [B]}
on the CPU; the trainer moves them to the device.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, TensorDataset
from torchvision.datasets import CIFAR10, ImageFolder
from torchvision.transforms import v2

from sift_cli.config import ConfigError, first_line
from sift_cli.data import (cache_root, make_known_answer, order, resolve_workers, worker_context,
                           worker_signals)

CIFAR_FILES = "cifar-10-batches-py/ with data_batch_1..5, test_batch and batches.meta"


class View(Dataset):
    """The samples `indices` of `dataset`, each image through `transform` to a uint8 [3, S, S] tensor."""

    def __init__(self, dataset: Dataset, indices: Sequence[int], transform: Callable):
        self.dataset, self.indices, self.transform = dataset, list(indices), transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        image, label = self.dataset[self.indices[i]]
        return self.transform(image), int(label)

    def shard(self, rank: int, world: int) -> "View":
        return View(self.dataset, self.indices[rank::world], self.transform)


def per_sample(*transforms) -> v2.Compose:
    """PIL image or uint8 tensor -> uint8 tensor; normalising waits for the whole batch (one op, not B)."""
    return v2.Compose([v2.ToImage(), *transforms])


def collate(images: Sequence[Tensor], labels: Tensor, mean: Sequence[float], std: Sequence[float]) -> dict:
    pixels = torch.stack([image.as_subclass(Tensor) for image in images])
    floats = v2.functional.to_dtype(pixels, torch.float32, scale=True)
    return {"images": v2.functional.normalize(floats, list(mean), list(std)), "labels": labels}


def collate_samples(samples: Sequence[tuple[Tensor, int]], mean: Sequence[float], std: Sequence[float]) -> dict:
    """A DataLoader's collate_fn: (image, label) pairs -> a normalised batch."""
    images, labels = zip(*samples)
    return collate(images, torch.tensor(labels, dtype=torch.long), mean, std)


def noisy_labels(labels: Tensor, known: order.KnownAnswer, num_classes: int, seed: int) -> Tensor:
    """`labels` with each noisy sample's label replaced by one of the other classes, fixed per sample."""
    if not known.is_noisy.any():
        return labels
    if num_classes < 2:
        raise ConfigError(f"data.noise_fraction needs at least 2 classes to draw a wrong label from, not {num_classes}")
    # a shift of 1..C-1 is uniform over the other classes
    shift = torch.randint(1, num_classes, labels.shape, generator=order.seeded(seed, "label-noise"))
    return torch.where(known.is_noisy, (labels + shift) % num_classes, labels)


def stratified_split(labels: Sequence[int], val_fraction: float, split_seed: int) -> tuple[list, list]:
    """Train and validation indices with every class in the same proportion on both sides."""
    if not 0 < val_fraction < 1:
        raise ConfigError(f"data.val_fraction={val_fraction} must lie in (0, 1)")
    try:
        train, val = train_test_split(np.arange(len(labels)), test_size=val_fraction, random_state=split_seed,
                                      stratify=labels)
    except ValueError as err:  # a class too small to appear on both sides
        raise ConfigError(f"data.val_fraction={val_fraction} cannot split {len(labels)} images with every class "
                          f"on both sides ({first_line(err)}); use more images per class or data.val_root") from None
    return sorted(train), sorted(val)


def check_image_size(image_size: int) -> None:
    if image_size < 8:  # smaller leaves the ResNet's last stage nothing to pool
        raise ConfigError(f"data.image_size={image_size} is too small; use at least 8 px")


class ImageData:
    """Training images served by step (`train_batch`), validation images by rank (`val_batches`).

    `labels` are the training labels in the order of `train`. The known-answer settings (duplicates,
    noisy labels; seeded by split_seed) change the training set only, never the validation set.
    """

    task = "image"

    def __init__(self, name: str, train: View, labels: Sequence[int], val: View, num_classes: int, image_size: int,
                 mean: Sequence[float], std: Sequence[float], num_workers: Union[int, str], split_seed: int,
                 duplicate_fraction: float, duplicate_pool: int, noise_fraction: float):
        if len(train) == 0 or len(val) == 0:
            raise ConfigError(f"{name} gives {len(train)} training and {len(val)} validation images; "
                              "both must be non-empty")
        for key, values in (("mean", mean), ("std", std)):  # every image reaches the model in 3 channels
            if len(values) != 3 or (key == "std" and min(values) <= 0):
                raise ConfigError(f"data.{key}={list(values)} is not allowed; give 3 values, one per channel (RGB)"
                                  f"{', all positive' if key == 'std' else ''}")
        self.name, self.train, self.val = name, train, val
        self.num_workers = resolve_workers(num_workers)
        self.num_train = len(train)
        self.model_args = {"num_classes": num_classes, "image_size": image_size}
        self.setting = {"duplicate_fraction": duplicate_fraction, "duplicate_pool": duplicate_pool,
                        "noise_fraction": noise_fraction}
        self.known = make_known_answer(self.num_train, duplicate_fraction, duplicate_pool, noise_fraction,
                                       split_seed, "images")
        # sample i shows the image and label of known.source[i], noisy ones with a wrong label
        labels = torch.as_tensor(labels, dtype=torch.long)[self.known.source]
        self.labels = noisy_labels(labels, self.known, num_classes, split_seed)
        self.mean, self.std = list(mean), list(std)

    def train_batch(self, step: int, batch_size: int, seed: int, rank: int = 0, world: int = 1) -> dict[str, Tensor]:
        """Rank `rank`'s rows of global batch `step`: the same tensors whoever asks, whenever."""
        rows = order.shard(batch_size, rank, world)
        indices = order.global_batch(self.num_train, batch_size, seed, step)[rows]
        images = []
        # v2 transforms draw from torch's global CPU generator: seed it per sample, and give the
        # caller's state (dropout's) back untouched; torch.manual_seed would reseed CUDA as well
        with torch.random.fork_rng(devices=[]):
            for row, source in zip(range(rows.start, rows.stop), self.known.source[indices].tolist()):
                torch.default_generator.manual_seed(order.seed_of(seed, "augment", step, row))
                images.append(self.train[source][0])
        return collate(images, self.labels[indices], self.mean, self.std)

    def val_batches(self, batch_size: int, rank: int = 0, world: int = 1) -> DataLoader:
        """Rank `rank`'s share of the validation images (every world-th one), fixed, in batches, read anew at
        each evaluation: a large folder's validation images (ImageNet's: 30 GB at 224 px) fit in no memory."""
        workers = self.num_workers
        return DataLoader(self.val.shard(rank, world), batch_size, num_workers=workers, persistent_workers=workers > 0,
                          worker_init_fn=worker_signals if workers else None,
                          multiprocessing_context=worker_context() if workers else None,
                          collate_fn=functools.partial(collate_samples, mean=self.mean, std=self.std))

    def describe(self) -> str:
        size, dup, noisy = self.model_args["image_size"], len(self.known.duplicated), len(self.known.noisy)
        pool = self.setting["duplicate_pool"]
        changed = "; ".join(text for count, text in [(dup, f"{dup:,} copies of {pool} images"),
                                                     (noisy, f"{noisy:,} wrong labels")] if count)
        return (f"{self.name}: {self.num_train:,} training{f' ({changed})' if changed else ''} and {len(self.val):,} "
                f"validation images of {size}x{size} px, {self.model_args['num_classes']} classes")


def digits(image_size: int, val_fraction: float, split_seed: int, mean: Sequence[float], std: Sequence[float],
           num_workers: Union[int, str], max_val_samples: Optional[int], duplicate_fraction: float,
           duplicate_pool: int, noise_fraction: float) -> ImageData:
    """scikit-learn's 1,797 handwritten 8x8 digits (shipped with the package), upscaled, grey in 3 channels."""
    check_image_size(image_size)
    raw = load_digits()
    pixels = torch.from_numpy(raw.images * (255 / 16)).round().to(torch.uint8).unsqueeze(1)  # 0..16 -> 0..255
    # upscaled once here, not per sample; 3 channels because that is what a ResNet stem takes
    images = v2.functional.resize(pixels, [image_size, image_size], antialias=True).expand(-1, 3, -1, -1)
    samples = TensorDataset(images, torch.from_numpy(raw.target))
    train, val = stratified_split(raw.target, val_fraction, split_seed)
    # random crops only: a flipped digit is another glyph (or no digit at all)
    augment = v2.RandomCrop(image_size, padding=image_size // 8)
    return ImageData("digits", View(samples, train, per_sample(augment)), raw.target[train],
                     View(samples, order.validation_subset(val, max_val_samples, split_seed), per_sample()),
                     num_classes=10, image_size=image_size, mean=mean, std=std, num_workers=num_workers,
                     split_seed=split_seed, duplicate_fraction=duplicate_fraction, duplicate_pool=duplicate_pool,
                     noise_fraction=noise_fraction)


class UnverifiedCIFAR10(CIFAR10):
    """CIFAR-10 in its on-disk format, files required but not compared with the official md5 sums.

    torchvision refuses any copy whose bytes differ from the official archive's; this accepts a copy
    the user wrote (a subset, a re-export), and only when they ask for it with data.verify=false.
    """

    train_list = [[name, None] for name, _ in CIFAR10.train_list]
    test_list = [[name, None] for name, _ in CIFAR10.test_list]
    meta = {**CIFAR10.meta, "md5": None}


def cifar10(root: Optional[str], download: bool, verify: bool, mean: Sequence[float], std: Sequence[float],
            num_workers: Union[int, str], max_val_samples: Optional[int], split_seed: int,
            duplicate_fraction: float, duplicate_pool: int, noise_fraction: float) -> ImageData:
    """CIFAR-10: the 50,000 training images, validated on the 10,000 test images; root null: the cache."""
    root = str(Path(root).expanduser()) if root else str(cache_root() / "cifar10")
    dataset = CIFAR10 if verify else UnverifiedCIFAR10
    try:
        train_set = dataset(root, train=True, download=download)
        test_set = dataset(root, train=False)
    except (RuntimeError, OSError) as err:  # files absent or not the official ones, or the download failed
        why = f"the download failed: {first_line(err)}" if download else "data.download=true fetches it (170 MB)"
        own_copy = " (data.verify=false accepts a copy of your own)" if verify else ""
        raise ConfigError(f"data.root={root} holds no usable CIFAR-10 copy: expected {CIFAR_FILES}{own_copy}; "
                          f"{why}") from None
    augment = (v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip())
    val = order.validation_subset(range(len(test_set)), max_val_samples, split_seed)
    return ImageData("cifar10", View(train_set, range(len(train_set)), per_sample(*augment)), train_set.targets,
                     View(test_set, val, per_sample()), num_classes=len(train_set.classes), image_size=32,
                     mean=mean, std=std, num_workers=num_workers, split_seed=split_seed,
                     duplicate_fraction=duplicate_fraction, duplicate_pool=duplicate_pool,
                     noise_fraction=noise_fraction)


def _folder(key: str, root: str) -> ImageFolder:
    if not Path(root).expanduser().is_dir():
        raise ConfigError(f"{key}={root} is not a folder; expected one subfolder of images per class "
                          f"({root}/<class>/<image>.png)")
    try:
        return ImageFolder(Path(root).expanduser())  # its loader converts every image to RGB
    except FileNotFoundError as err:  # no class subfolders, or a class with no images
        raise ConfigError(f"{key}={root} holds no images to train on ({first_line(err).rstrip('.')}); expected "
                          f"one subfolder of images per class ({root}/<class>/<image>.png)") from None


def image_folder(root: str, val_root: Optional[str], val_fraction: float, split_seed: int, image_size: int,
                 hflip: bool, mean: Sequence[float], std: Sequence[float], num_workers: Union[int, str],
                 max_val_samples: Optional[int], duplicate_fraction: float, duplicate_pool: int,
                 noise_fraction: float) -> ImageData:
    """Any folder of class subfolders; validated on val_root (same classes) or a stratified split of root."""
    check_image_size(image_size)
    train_set = _folder("data.root", root)
    if val_root:
        val_set = _folder("data.val_root", val_root)
        if val_set.classes != train_set.classes:
            differ = sorted(set(val_set.classes) ^ set(train_set.classes))
            raise ConfigError(f"data.val_root={val_root} and data.root differ in the classes {', '.join(differ)}; "
                              "both need the same class subfolders")
        train, val = range(len(train_set)), range(len(val_set))
    else:
        val_set = train_set
        train, val = stratified_split(train_set.targets, val_fraction, split_seed)
    augment = [v2.RandomResizedCrop(image_size)] + ([v2.RandomHorizontalFlip()] if hflip else [])
    evaluation = per_sample(v2.Resize(image_size), v2.CenterCrop(image_size))
    return ImageData(f"image_folder {root}", View(train_set, train, per_sample(*augment)),
                     [train_set.targets[i] for i in train],
                     View(val_set, order.validation_subset(val, max_val_samples, split_seed), evaluation),
                     num_classes=len(train_set.classes), image_size=image_size, mean=mean, std=std,
                     num_workers=num_workers, split_seed=split_seed, duplicate_fraction=duplicate_fraction,
                     duplicate_pool=duplicate_pool, noise_fraction=noise_fraction)
