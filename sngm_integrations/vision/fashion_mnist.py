"""Fashion-MNIST as uint8 tensors, read from the original IDX files.

Looked for, in order: `root` if given, the `FASHION_MNIST_DIR` environment variable,
the Debian package `dataset-fashion-mnist` (`/usr/share/datasets/fashion-mnist`),
and torchvision's cache under `~/.cache/sngm-integrations`. If none holds the files
and `download` is true, torchvision downloads them (this needs the network).
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIRS",
    "FashionMNIST",
    "FashionMNISTUnavailable",
    "load_fashion_mnist",
]

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
FASHION_MNIST_DIRS = (
    Path("/usr/share/datasets/fashion-mnist"),
    Path.home() / ".cache" / "sngm-integrations" / "FashionMNIST" / "raw",
)
_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_HOW_TO_GET_IT = (
    "Fashion-MNIST was not found. Install it offline with "
    "`apt-get install dataset-fashion-mnist` (Debian/Ubuntu; files land in "
    "/usr/share/datasets/fashion-mnist), or point FASHION_MNIST_DIR (or root=) at a folder "
    "holding the four original *-ubyte(.gz) files, or allow the download through "
    "torchvision (pip install torchvision, network access)."
)


class FashionMNISTUnavailable(RuntimeError):
    """Raised when Fashion-MNIST can be neither found nor downloaded."""


class FashionMNIST(NamedTuple):
    """Images as uint8 `(N, 28, 28)` tensors, labels as int64 `(N,)` tensors."""

    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor


def _read_idx(path: Path) -> Tensor:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[0:4], "big")
    if magic >> 8 != 0x08:  # 0x08: unsigned bytes
        raise ValueError(f"{path} is not an IDX file of unsigned bytes (magic {magic:#x})")
    ndim = magic & 0xFF
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    return torch.frombuffer(bytearray(data[offset:]), dtype=torch.uint8).reshape(shape)


def _find_file(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def _candidate_dirs(root: str | os.PathLike[str] | None) -> list[Path]:
    if root is not None:
        return [Path(root), Path(root) / "FashionMNIST" / "raw"]
    dirs = list(FASHION_MNIST_DIRS)
    if os.environ.get("FASHION_MNIST_DIR"):
        dirs.insert(0, Path(os.environ["FASHION_MNIST_DIR"]))
    return dirs


def _download(target: Path) -> None:
    try:
        from torchvision.datasets import FashionMNIST as TorchvisionFashionMNIST
    except ImportError as err:
        raise FashionMNISTUnavailable(_HOW_TO_GET_IT) from err
    try:
        TorchvisionFashionMNIST(str(target.parent.parent), train=True, download=True)
        TorchvisionFashionMNIST(str(target.parent.parent), train=False, download=True)
    except Exception as err:  # no network, a proxy, a full disk: all end the same way
        raise FashionMNISTUnavailable(f"{_HOW_TO_GET_IT} (download failed: {err})") from err


def load_fashion_mnist(
    root: str | os.PathLike[str] | None = None, *, download: bool = True
) -> FashionMNIST:
    """Load Fashion-MNIST's 60,000 training and 10,000 test images.

    Args:
        root: A folder with the four original files (gzipped or not). Without it, the
            standard places listed in this module's docstring are searched.
        download: Download with torchvision when no local copy is found.

    Raises:
        FashionMNISTUnavailable: with instructions, when no copy is found or downloaded.
    """
    for folder in _candidate_dirs(root):
        paths = {key: _find_file(folder, stem) for key, stem in _FILES.items()}
        if all(paths.values()):
            tensors = {key: _read_idx(path) for key, path in paths.items() if path}
            return FashionMNIST(
                tensors["train_images"],
                tensors["train_labels"].long(),
                tensors["test_images"],
                tensors["test_labels"].long(),
            )
    if not download:
        raise FashionMNISTUnavailable(_HOW_TO_GET_IT)
    target = FASHION_MNIST_DIRS[-1]
    _download(target)
    return load_fashion_mnist(target, download=False)
