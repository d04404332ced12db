"""Study data: uint8 image tensors split into train / validation / test, kept on the device.

Images stay uint8 on the device; each batch is augmented (random crop with zero padding,
horizontal flip) and normalized there, so no data loader or host copy is in the loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from sngm_integrations.study.config import RunConfig, StudyConfig

__all__ = [
    "SplitData",
    "StudyData",
    "augment_batch",
    "load_study_data",
    "split_data",
    "synthetic_dataset",
]

CIFAR10_CACHE = Path.home() / ".cache" / "sngm-integrations"


@dataclass
class StudyData:
    """A dataset as uint8 `(N, C, H, W)` images and int64 labels, with its normalization."""

    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_padding: int
    num_classes: int = 10

    @property
    def in_channels(self) -> int:
        return self.train_images.shape[1]


@dataclass
class SplitData:
    """The train / validation / test split of one study, on one device."""

    train_images: Tensor
    train_labels: Tensor
    val_images: Tensor
    val_labels: Tensor
    test_images: Tensor
    test_labels: Tensor
    mean: Tensor  # (1, C, 1, 1) float32
    std: Tensor
    crop_padding: int
    num_classes: int

    @property
    def in_channels(self) -> int:
        return self.train_images.shape[1]

    def normalize(self, images: Tensor) -> Tensor:
        """uint8 images to normalized float32."""
        return (images.float().div_(255.0) - self.mean) / self.std


def synthetic_dataset(
    train: int = 512, test: int = 256, size: int = 12, noise: float = 40.0, seed: int = 0
) -> StudyData:
    """A small learnable dataset for plumbing checks: 10 random class prototypes plus noise.

    The prototypes are smooth (3x3 random patterns, upsampled), so a shifted or flipped
    image still looks like its class.
    """
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(10, 1, 3, 3, generator=generator) * 255.0
    prototypes = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear")

    def sample(n: int) -> tuple[Tensor, Tensor]:
        labels = torch.randint(0, 10, (n,), generator=generator)
        images = prototypes[labels] + noise * torch.randn(n, 1, size, size, generator=generator)
        return images.clamp_(0, 255).to(torch.uint8), labels

    train_images, train_labels = sample(train)
    test_images, test_labels = sample(test)
    return StudyData(
        train_images, train_labels, test_images, test_labels, (0.5,), (0.25,), crop_padding=1
    )


def _fashion_mnist(root: str | None) -> StudyData:
    from sngm_integrations.vision import load_fashion_mnist

    data = load_fashion_mnist(root)
    return StudyData(
        data.train_images.unsqueeze(1),
        data.train_labels,
        data.test_images.unsqueeze(1),
        data.test_labels,
        mean=(0.2860,),
        std=(0.3530,),
        crop_padding=2,
    )


def _cifar10(root: str | None) -> StudyData:
    try:
        from torchvision.datasets import CIFAR10
    except ImportError as err:
        raise RuntimeError(
            "dataset='cifar10' needs torchvision (pip install torchvision) and, the first "
            "time, network access to download it"
        ) from err
    folder = str(root or CIFAR10_CACHE)
    try:
        train = CIFAR10(folder, train=True, download=True)
        test = CIFAR10(folder, train=False, download=True)
    except Exception as err:  # no network, a proxy, a full disk: all end the same way
        raise RuntimeError(
            f"CIFAR-10 is neither in {folder} nor downloadable ({err}); "
            "pass --data-root to a folder holding cifar-10-batches-py"
        ) from err

    def images(split: CIFAR10) -> Tensor:
        return torch.from_numpy(split.data).permute(0, 3, 1, 2).contiguous()

    return StudyData(
        images(train),
        torch.tensor(train.targets),
        images(test),
        torch.tensor(test.targets),
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
        crop_padding=4,
    )


def load_study_data(config: StudyConfig) -> StudyData:
    """Load the study's dataset on the CPU (`synthetic` makes one, the others read files)."""
    if config.dataset == "fashion-mnist":
        return _fashion_mnist(config.data_root)
    if config.dataset == "cifar10":
        return _cifar10(config.data_root)
    return synthetic_dataset()


def split_data(data: StudyData, run: RunConfig, device: torch.device | str) -> SplitData:
    """Cut the validation split from the training set and move everything to `device`.

    Images are resized to `run.image_size` when it is below the dataset's (the crop
    padding shrinks with them).

    The split depends on `run.split_seed` only, so every run of a study validates on the
    same images; subsets (`train_size`, `test_size`) are drawn the same way.
    """
    generator = torch.Generator().manual_seed(run.split_seed)
    available = len(data.train_labels)
    train_size = available - run.val_size if run.train_size is None else run.train_size
    if train_size < 1 or train_size + run.val_size > available:
        raise ValueError(
            f"Invalid train_size/val_size: train_size={run.train_size}, val_size={run.val_size} "
            f"for a training set of {available} images"
        )
    order = torch.randperm(available, generator=generator)
    val_index, train_index = order[: run.val_size], order[run.val_size : run.val_size + train_size]
    test_count = len(data.test_labels)
    if run.test_size is not None and run.test_size > test_count:
        raise ValueError(
            f"Invalid test_size: test_size={run.test_size} for a test set of {test_count} images"
        )
    test_index = torch.randperm(test_count, generator=generator)[: run.test_size or test_count]
    channels = data.in_channels
    height = data.train_images.shape[-1]
    size = run.image_size if run.image_size is not None and run.image_size < height else height

    def to(images: Tensor) -> Tensor:
        if size < height:  # area average, rounded back to uint8
            resized = torch.nn.functional.interpolate(images.float(), (size, size), mode="area")
            images = resized.round_().to(torch.uint8)
        return images.to(device)

    return SplitData(
        to(data.train_images[train_index]),
        data.train_labels[train_index].to(device),
        to(data.train_images[val_index]),
        data.train_labels[val_index].to(device),
        to(data.test_images[test_index]),
        data.test_labels[test_index].to(device),
        mean=torch.tensor(data.mean).view(1, channels, 1, 1).to(device),
        std=torch.tensor(data.std).view(1, channels, 1, 1).to(device),
        crop_padding=max(1, round(data.crop_padding * size / height)),
        num_classes=data.num_classes,
    )


def augment_batch(images: Tensor, padding: int, generator: torch.Generator) -> Tensor:
    """Random crop with `padding` zero pixels per side and a random horizontal flip.

    Works on a whole `(B, C, H, W)` batch on its device, one crop offset and one coin
    flip per image drawn from `generator`.
    """
    batch, channels, height, width = images.shape
    device = images.device
    if padding > 0:
        padded = torch.nn.functional.pad(images, (padding,) * 4)
        offsets = torch.randint(0, 2 * padding + 1, (2, batch), generator=generator, device=device)
        rows = offsets[0, :, None] + torch.arange(height, device=device)  # (B, H)
        cols = offsets[1, :, None] + torch.arange(width, device=device)  # (B, W)
        images = padded[
            torch.arange(batch, device=device)[:, None, None, None],
            torch.arange(channels, device=device)[None, :, None, None],
            rows[:, None, :, None],
            cols[:, None, None, :],
        ]
    flip = torch.rand(batch, generator=generator, device=device) < 0.5
    return torch.where(flip[:, None, None, None], images.flip(3), images)
