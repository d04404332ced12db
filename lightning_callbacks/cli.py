"""A LightningCLI that steps `WarmupDecayLR`, given as `--lr_scheduler`, every optimizer step."""

from __future__ import annotations

from typing import Any

from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LightningCLI, LRSchedulerTypeUnion
from torch.optim import Optimizer

from sngm_integrations.schedules import WarmupDecayLR

__all__ = ["StepScheduleCLI"]


class StepScheduleCLI(LightningCLI):
    """`LightningCLI` with `WarmupDecayLR` stepped per optimizer step, as it is sized.

    `LightningCLI` steps the scheduler it builds from `--lr_scheduler` once per epoch.
    This subclass returns a `WarmupDecayLR` with `interval="step"` instead, so its
    `total_steps` and `warmup_steps` count optimizer steps (after gradient
    accumulation); any other scheduler is configured exactly as `LightningCLI` does:

        StepScheduleCLI(MyModel, MyDataModule)  # in main.py, after importing sngm_integrations

        python main.py fit --optimizer SNGM --optimizer.lr 0.1 \\
            --lr_scheduler WarmupDecayLR --lr_scheduler.total_steps 2000 \\
            --lr_scheduler.warmup_steps 100
    """

    @staticmethod
    def configure_optimizers(
        lightning_module: LightningModule,
        optimizer: Optimizer,
        lr_scheduler: LRSchedulerTypeUnion | None = None,
    ) -> Any:
        """`LightningCLI.configure_optimizers`, with `WarmupDecayLR` stepped per step."""
        if isinstance(lr_scheduler, WarmupDecayLR):
            return {
                "optimizer": optimizer,
                "lr_scheduler": {"scheduler": lr_scheduler, "interval": "step", "frequency": 1},
            }
        return LightningCLI.configure_optimizers(lightning_module, optimizer, lr_scheduler)
