"""Small vision data and models shared by the study, the examples and the benchmarks.

Depends on torch alone; torchvision is imported only to download data when the
offline copy is missing.
"""

from sngm_integrations.vision.fashion_mnist import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIRS,
    FashionMNISTUnavailable,
    load_fashion_mnist,
)
from sngm_integrations.vision.resnet import ResNet, resnet20

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIRS",
    "FashionMNISTUnavailable",
    "ResNet",
    "load_fashion_mnist",
    "resnet20",
]
