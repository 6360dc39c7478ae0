"""Image classification data: scikit-learn's digits (offline), CIFAR-10, any folder of class subfolders.

Each builder returns an ImageData: a training and a validation view of the images, each through its
own torchvision transforms v2 pipeline (augmentation for training only), served by a DataLoader as
{"images": float [B, 3, S, S], "labels": long [B]} on the CPU; the trainer moves them to the device.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, TensorDataset
from torchvision.datasets import CIFAR10, ImageFolder
from torchvision.transforms import v2

from sift_cli.config import ConfigError, first_line

CIFAR_FILES = "cifar-10-batches-py/ with data_batch_1..5, test_batch and batches.meta"


class View(Dataset):
    """The samples `indices` of `dataset`, each image through `transform`: a train or validation view."""

    def __init__(self, dataset: Dataset, indices: Sequence[int], transform: Callable):
        self.dataset, self.indices, self.transform = dataset, list(indices), transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        image, label = self.dataset[self.indices[i]]
        return self.transform(image), label


def pipeline(*augment, mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    """PIL image or uint8 tensor -> augmented, normalised float tensor."""
    return v2.Compose([v2.ToImage(), *augment, v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(list(mean), list(std))])


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


def capped(indices: Sequence[int], max_samples: Optional[int], seed: int) -> list:
    """At most max_samples of the indices, the same ones on every run."""
    if max_samples is None or max_samples >= len(indices):
        return list(indices)
    return sorted(np.random.default_rng(seed).choice(indices, max_samples, replace=False).tolist())


class ImageData:
    task = "image"

    def __init__(self, name: str, train: Dataset, val: Dataset, num_classes: int, image_size: int,
                 num_workers: int):
        if len(train) == 0 or len(val) == 0:
            raise ConfigError(f"{name} gives {len(train)} training and {len(val)} validation images; "
                              "both must be non-empty")
        self.name, self.train, self.val, self.num_workers = name, train, val, num_workers
        self.num_train = len(train)
        self.model_args = {"num_classes": num_classes, "image_size": image_size}

    def _loader(self, dataset: Dataset, batch_size: int, **kwargs) -> DataLoader:
        return DataLoader(dataset, batch_size, num_workers=self.num_workers,
                          pin_memory=torch.cuda.is_available(), **kwargs)

    def train_batches(self, batch_size: int, seed: int) -> Iterator[dict[str, Tensor]]:
        """Endless shuffled epochs of full batches; the seed fixes the order (and the workers' augmentation)."""
        loader = self._loader(self.train, batch_size, shuffle=True, drop_last=True,
                              generator=torch.Generator().manual_seed(seed),
                              persistent_workers=self.num_workers > 0)
        while True:
            for images, labels in loader:
                yield {"images": images, "labels": labels}

    def val_batches(self, batch_size: int) -> list[dict[str, Tensor]]:
        return [{"images": images, "labels": labels} for images, labels in self._loader(self.val, batch_size)]

    def describe(self) -> str:
        size = self.model_args["image_size"]
        return (f"{self.name}: {len(self.train):,} training and {len(self.val):,} validation images of "
                f"{size}x{size} px, {self.model_args['num_classes']} classes")


def digits(image_size: int, val_fraction: float, split_seed: int, mean: Sequence[float], std: Sequence[float],
           num_workers: int, max_val_samples: Optional[int]) -> ImageData:
    """scikit-learn's 1,797 handwritten 8x8 digits (shipped with the package), upscaled, grey in 3 channels."""
    check_image_size(image_size)
    raw = load_digits()
    pixels = torch.from_numpy(raw.images * (255 / 16)).round().to(torch.uint8).unsqueeze(1)  # 0..16 -> 0..255
    # upscaled once here, not per sample; 3 channels because that is what a ResNet stem takes
    images = v2.functional.resize(pixels, [image_size, image_size], antialias=True).expand(-1, 3, -1, -1)
    labels = torch.from_numpy(raw.target)
    samples = TensorDataset(images, labels)
    train, val = stratified_split(raw.target, val_fraction, split_seed)
    # random crops only: a flipped digit is another glyph (or no digit at all)
    augment = v2.RandomCrop(image_size, padding=image_size // 8)
    return ImageData("digits", View(samples, train, pipeline(augment, mean=mean, std=std)),
                     View(samples, capped(val, max_val_samples, split_seed), pipeline(mean=mean, std=std)),
                     num_classes=10, image_size=image_size, num_workers=num_workers)


class UnverifiedCIFAR10(CIFAR10):
    """CIFAR-10 in its on-disk format, files required but not compared with the official md5 sums.

    torchvision refuses any copy whose bytes differ from the official archive's; this accepts a copy
    the user wrote (a subset, a re-export), and only when they ask for it with data.verify=false.
    """

    train_list = [[name, None] for name, _ in CIFAR10.train_list]
    test_list = [[name, None] for name, _ in CIFAR10.test_list]
    meta = {**CIFAR10.meta, "md5": None}


def cifar10(root: str, download: bool, verify: bool, mean: Sequence[float], std: Sequence[float],
            num_workers: int, max_val_samples: Optional[int], split_seed: int) -> ImageData:
    """CIFAR-10: the 50,000 training images, validated on the 10,000 test images."""
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
    val = capped(range(len(test_set)), max_val_samples, split_seed)
    return ImageData("cifar10", View(train_set, range(len(train_set)), pipeline(*augment, mean=mean, std=std)),
                     View(test_set, val, pipeline(mean=mean, std=std)),
                     num_classes=len(train_set.classes), image_size=32, num_workers=num_workers)


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
                 hflip: bool, mean: Sequence[float], std: Sequence[float], num_workers: int,
                 max_val_samples: Optional[int]) -> ImageData:
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
    evaluation = pipeline(v2.Resize(image_size), v2.CenterCrop(image_size), mean=mean, std=std)
    return ImageData(f"image_folder {root}", View(train_set, train, pipeline(*augment, mean=mean, std=std)),
                     View(val_set, capped(val, max_val_samples, split_seed), evaluation),
                     num_classes=len(train_set.classes), image_size=image_size, num_workers=num_workers)
