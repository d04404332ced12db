"""Large-batch Fashion-MNIST with Lightning: SNGM against momentum SGD (MSGD).

Trains a ResNet-20 (`sngm_integrations.vision.resnet20`) with SNGM and with
`torch.optim.SGD` (MSGD) for the same number of epochs at the same large batch, then
prints the test accuracy of both. Both runs use the same module (`SNGMMixin`
supplies warmup, cosine decay and weight-decay groups; MSGD only swaps the optimizer),
Lightning's progress bar, a CSV log under `--log-dir` and `SNGMMonitor`. Before
testing, BatchNorm statistics are recomputed on the training images
(`torch.optim.swa_utils.update_bn`): after a few dozen steps the running averages still
lag behind the weights, for both optimizers alike.

The defaults are sized for a CPU: a narrow network (width 8 instead of 16) and an
8,192-image training subset, so that both runs finish in about six minutes on two cores. The
full setting is a flag away:

    python examples/lightning_image_classification.py                      # CPU defaults
    python examples/lightning_image_classification.py --train-subset 0 --width 16 \\
        --epochs 30 --batch-size 4096 --accelerator auto                    # full data

MSGD's learning rate follows the linear scaling rule from 0.1 at batch 128, the usual
practice; SNGM's is used as given, since its step length does not grow with the batch.
Fashion-MNIST is read offline from Debian's `dataset-fashion-mnist` package
(`/usr/share/datasets/fashion-mnist`) or `FASHION_MNIST_DIR`; otherwise torchvision
downloads it, and without either the script says what to install.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.swa_utils import update_bn
from torch.utils.data import DataLoader, TensorDataset

from lightning_callbacks import SNGMHyperparameters, SNGMMixin, SNGMMonitor
from sngm_integrations.vision import FashionMNISTUnavailable, load_fashion_mnist, resnet20

# Mean and standard deviation of Fashion-MNIST's training pixels, in [0, 1] units.
PIXEL_MEAN, PIXEL_STD = 0.2860, 0.3530


def _as_inputs(images: Tensor) -> Tensor:
    return ((images.float() / 255.0 - PIXEL_MEAN) / PIXEL_STD).unsqueeze(1)


class FashionMNISTData(pl.LightningDataModule):
    """Fashion-MNIST as in-memory tensors, optionally a fixed random training subset.

    Args:
        batch_size: Per-device training batch size.
        train_subset: Training images to use (0: all 60,000), drawn once with `seed`.
        test_subset: Test images to use (0: all 10,000), the first ones.
        seed: Seed of the subset and of the shuffling.
        root: Folder with the original files; the standard places are searched without it.
    """

    def __init__(
        self,
        batch_size: int = 1024,
        train_subset: int = 8192,
        test_subset: int = 0,
        seed: int = 0,
        root: str | None = None,
    ) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.train_subset = train_subset
        self.test_subset = test_subset
        self.seed = seed
        self.root = root

    def setup(self, stage: str) -> None:
        data = load_fashion_mnist(self.root)
        train_images, train_labels = data.train_images, data.train_labels
        if self.train_subset:
            generator = torch.Generator().manual_seed(self.seed)
            chosen = torch.randperm(len(train_labels), generator=generator)[: self.train_subset]
            train_images, train_labels = train_images[chosen], train_labels[chosen]
        test_count = self.test_subset or len(data.test_labels)
        self.train_set = TensorDataset(_as_inputs(train_images), train_labels)
        self.test_set = TensorDataset(
            _as_inputs(data.test_images[:test_count]), data.test_labels[:test_count]
        )

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.train_set, self.batch_size, shuffle=True, generator=generator)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=2048)


class FashionClassifier(SNGMMixin, pl.LightningModule):
    """ResNet-20 trained with SNGM (`optimizer="sngm"`) or momentum SGD (`"msgd"`)."""

    def __init__(
        self,
        optimizer: str = "sngm",
        lr: float = 1.0,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        warmup_fraction: float = 0.1,
        schedule: str = "cosine",
        lr_scaling: str = "none",
        reference_batch_size: int | None = None,
        width: int = 8,
    ) -> None:
        super().__init__()
        if optimizer not in ("sngm", "msgd"):
            raise ValueError(f"Invalid optimizer: optimizer={optimizer!r} (choose sngm or msgd)")
        self.save_hyperparameters()
        self.model = resnet20(width=width)

    def forward(self, images: Tensor) -> Tensor:
        return self.model(images)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, labels = batch
        logits = self(images)
        loss = nn.functional.cross_entropy(logits, labels)
        accuracy = (logits.argmax(dim=1) == labels).float().mean()
        self.log_dict({"train_loss": loss, "train_acc": accuracy}, prog_bar=True)
        return loss

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        images, labels = batch
        accuracy = (self(images).argmax(dim=1) == labels).float().mean()
        self.log("test_acc", accuracy, batch_size=len(labels))

    def sngm_optimizer(
        self, param_groups: list[dict[str, Any]], lr: float, hparams: SNGMHyperparameters
    ) -> Optimizer:
        if self.hparams["optimizer"] == "msgd":
            return torch.optim.SGD(
                param_groups, lr=lr, momentum=hparams.momentum, nesterov=hparams.nesterov
            )
        return super().sngm_optimizer(param_groups, lr, hparams)


def train_and_test(optimizer: str, lr: float, args: argparse.Namespace) -> dict[str, float | str]:
    """Train one model and return its test accuracy and where its log went."""
    pl.seed_everything(args.seed, verbose=False)
    data = FashionMNISTData(args.batch_size, args.train_subset, args.test_subset, args.seed)
    scaling = {"lr_scaling": "linear", "reference_batch_size": 128} if optimizer == "msgd" else {}
    model = FashionClassifier(optimizer, lr, width=args.width, **scaling)  # type: ignore[arg-type]
    logger = CSVLogger(args.log_dir, name=optimizer)
    trainer = pl.Trainer(
        accelerator=args.accelerator,
        devices=1,
        max_epochs=args.epochs,
        logger=logger,
        callbacks=[SNGMMonitor()],
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=data)
    # After a few dozen large steps, BatchNorm's running averages still mix in statistics of
    # much earlier weights; recompute them on the training images before testing.
    update_bn(data.train_dataloader(), model)
    (result,) = trainer.test(model, datamodule=data, verbose=False)
    return {"test_acc": float(result["test_acc"]), "log": logger.log_dir}


def main(argv: list[str] | None = None) -> dict[str, dict[str, float | str]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--train-subset", type=int, default=8192, help="0: all 60,000")
    parser.add_argument("--test-subset", type=int, default=0, help="0: all 10,000")
    parser.add_argument("--width", type=int, default=8, help="ResNet-20 width (16: standard)")
    parser.add_argument("--sngm-lr", type=float, default=1.0)
    parser.add_argument("--msgd-lr", type=float, default=0.1, help="at batch 128, scaled linearly")
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-dir", default="lightning_logs/fashion_mnist")
    args = parser.parse_args(argv)

    try:
        results = {
            "SNGM": train_and_test("sngm", args.sngm_lr, args),
            "MSGD": train_and_test("msgd", args.msgd_lr, args),
        }
    except FashionMNISTUnavailable as err:
        sys.exit(str(err))
    train_size = args.train_subset or 60000
    print(
        f"\nFashion-MNIST, ResNet-20 width {args.width}, {train_size} training images, "
        f"batch {args.batch_size}, {args.epochs} epochs\n"
    )
    print("| optimizer | test accuracy | CSV log |")
    print("|---|---|---|")
    for name, result in results.items():
        print(f"| {name} | {result['test_acc']:.4f} | {result['log']} |")
    return results


if __name__ == "__main__":
    main()
