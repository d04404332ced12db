"""`configure_optimizers` for SNGM, built from a LightningModule's hyperparameters.

Everything is computed from `self.hparams` and the trainer each time
`configure_optimizers` runs, and nothing is mutated: after a resume, Lightning calls it
again, gets the same optimizer and schedule, then loads their saved state. A batch-size
scaling rule is therefore applied exactly once, however often the run is resumed. A
resume whose settings give another lr or schedule length (a different effective batch
size, `max_epochs` or `lr`) stops with the ValueError of `WarmupDecayLR`'s
`load_state_dict` instead of continuing the saved schedule under the new settings.
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch.distributed as dist
from lightning.pytorch.callbacks import GradientAccumulationScheduler
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.types import OptimizerLRSchedulerConfig
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler
from torch.utils.data import DataLoader

from lightning_callbacks._clipping import warn_if_norm_clipping
from lightning_callbacks.param_groups import weight_decay_param_groups
from sngm_integrations import SNGM
from sngm_integrations.comm_hooks import BucketSquaredNorms, squared_norm_allreduce_hook
from sngm_integrations.schedules import (
    WarmupDecayLR,
    check_scaling_rule,
    check_schedule,
    scale_lr,
)

__all__ = ["SNGMHyperparameters", "SNGMMixin"]

if TYPE_CHECKING:
    _MixinBase = pl.LightningModule
else:
    _MixinBase = object


@dataclass(frozen=True)
class SNGMHyperparameters:
    """The hyperparameters `SNGMMixin` reads from `self.hparams`.

    Give any of these names to your module's `__init__` and call
    `self.save_hyperparameters()`; names you leave out take the defaults below.

    Attributes:
        lr: Learning rate (required; `learning_rate`, the name Lightning's examples use,
            is accepted instead). With `lr_scaling`, the rate at `reference_batch_size`.
        momentum: SNGM's momentum `beta`.
        weight_decay: L2 penalty, folded into the gradient before the norm.
        nesterov: Nesterov momentum.
        normalize: `"global"` (the paper's one norm) or `"layer"`.
        warmup_steps: Optimizer steps of linear warmup.
        warmup_fraction: Warmup as a fraction of all optimizer steps (instead of
            `warmup_steps`).
        schedule: Decay after warmup: `constant`, `cosine`, `linear` or `poly`.
        power: Exponent of the `poly` schedule.
        final_lr_fraction: Learning rate at the end of the decay, as a fraction of `lr`.
        lr_scaling: `none`, `linear` or `sqrt`: scale `lr` from
            `reference_batch_size` to the effective batch size.
        reference_batch_size: The batch size `lr` was tuned at.
        decay_bias_and_norm: Also decay biases and normalization-layer parameters.
    """

    lr: float
    momentum: float = 0.9
    weight_decay: float = 0.0
    nesterov: bool = False
    normalize: str = "global"
    warmup_steps: int = 0
    warmup_fraction: float = 0.0
    schedule: str = "constant"
    power: float = 2.0
    final_lr_fraction: float = 0.0
    lr_scaling: str = "none"
    reference_batch_size: int | None = None
    decay_bias_and_norm: bool = False

    def __post_init__(self) -> None:
        check_schedule(self.schedule)
        check_scaling_rule(self.lr_scaling, "lr_scaling")
        if self.lr_scaling != "none" and (
            self.reference_batch_size is None or self.reference_batch_size < 1
        ):
            raise ValueError(
                f"lr_scaling={self.lr_scaling!r} needs reference_batch_size >= 1 (the batch "
                f"size lr was tuned at), got reference_batch_size={self.reference_batch_size}"
            )
        if self.warmup_steps < 0:
            raise ValueError(
                f"Invalid warmup_steps: warmup_steps={self.warmup_steps} (must be >= 0)"
            )
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ValueError(
                f"Invalid warmup_fraction: warmup_fraction={self.warmup_fraction} "
                "(must be in [0, 1))"
            )
        if self.warmup_steps and self.warmup_fraction:
            raise ValueError(
                f"Give warmup_steps or warmup_fraction, not both: got warmup_steps="
                f"{self.warmup_steps} and warmup_fraction={self.warmup_fraction}"
            )

    @classmethod
    def from_hparams(cls, hparams: Mapping[str, Any]) -> SNGMHyperparameters:
        """Pick the known names out of a module's `hparams`; other names are ignored.

        `learning_rate` is read as `lr` when there is no `lr`.
        """
        if "lr" in hparams and "learning_rate" in hparams:
            raise ValueError(
                f"Give lr or learning_rate, not both: got lr={hparams['lr']} and "
                f"learning_rate={hparams['learning_rate']}"
            )
        if "lr" not in hparams and "learning_rate" not in hparams:
            raise ValueError(
                "SNGMMixin needs an `lr` (or `learning_rate`) hyperparameter: give your "
                "LightningModule's __init__ an `lr` argument and call self.save_hyperparameters()"
            )
        names = {field.name for field in fields(cls)}
        values = {key: value for key, value in hparams.items() if key in names}
        values.setdefault("lr", hparams.get("learning_rate"))
        return cls(**values)

    def warmup_steps_for(self, total_steps: int) -> int:
        """Warmup length in optimizer steps for a run of `total_steps` steps."""
        if self.warmup_fraction:
            return round(self.warmup_fraction * total_steps)
        return min(self.warmup_steps, total_steps)


class SNGMMixin(_MixinBase):
    """Adds `configure_optimizers` with SNGM, warmup and decay to a LightningModule.

    Put it before `LightningModule` in the bases; the hyperparameters are those of
    `SNGMHyperparameters`, read from `self.hparams`:

        class Net(SNGMMixin, L.LightningModule):
            def __init__(self, lr=0.5, momentum=0.9, weight_decay=5e-4, warmup_fraction=0.1,
                         schedule="cosine"):
                super().__init__()
                self.save_hyperparameters()

    `configure_optimizers` returns the dict form with a scheduler stepped every optimizer
    step. Each choice is a small method a subclass can override without copying the rest:
    `sngm_hyperparameters`, `sngm_param_groups`, `sngm_optimizer`,
    `sngm_process_group`, `sngm_allreduce_norms`, `sngm_per_device_batch_size`,
    `sngm_learning_rate` and `sngm_lr_scheduler`.

    The hyperparameters are checked when `self.save_hyperparameters()` runs, so a bad
    value fails when the module is built, before the Trainer or the data do any work.
    """

    def save_hyperparameters(
        self,
        *args: Any,
        ignore: Sequence[str] | str | None = None,
        frame: types.FrameType | None = None,
        logger: bool = True,
    ) -> None:
        """Lightning's `save_hyperparameters`, then a check of `sngm_hyperparameters`."""
        # Lightning reads the __init__ arguments from its caller's frame: pass it the caller's.
        caller = frame or getattr(inspect.currentframe(), "f_back", None)
        super().save_hyperparameters(*args, ignore=ignore, frame=caller, logger=logger)
        self.sngm_hyperparameters()

    def configure_optimizers(self) -> OptimizerLRSchedulerConfig:
        """SNGM over `sngm_param_groups`, with the step-interval schedule."""
        hparams = self.sngm_hyperparameters()
        self._check_fixed_accumulation(hparams)
        lr = self.sngm_learning_rate(hparams)
        optimizer = self.sngm_optimizer(self.sngm_param_groups(hparams), lr, hparams)
        warn_if_norm_clipping(self.trainer, optimizer)
        scheduler = self.sngm_lr_scheduler(optimizer, hparams)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1},
        }

    def sngm_hyperparameters(self) -> SNGMHyperparameters:
        """The optimizer's hyperparameters; by default read from `self.hparams`.

        Also called by `save_hyperparameters`: an override must work from there on.
        """
        return SNGMHyperparameters.from_hparams(self.hparams)

    def _check_fixed_accumulation(self, hparams: SNGMHyperparameters) -> None:
        """Refuse a changing `accumulate_grad_batches` where the lr or schedule depend on it."""
        sized_by_steps = hparams.schedule != "constant" or hparams.warmup_fraction
        if not sized_by_steps and hparams.lr_scaling == "none":
            return
        for callback in self.trainer.callbacks:  # type: ignore[attr-defined]
            if isinstance(callback, GradientAccumulationScheduler):
                raise ValueError(
                    f"GradientAccumulationScheduler(scheduling={callback.scheduling}) changes "
                    "the samples per optimizer step during the run, but SNGMMixin sizes "
                    f"schedule={hparams.schedule!r} and warmup_fraction="
                    f"{hparams.warmup_fraction} in optimizer steps and scales lr "
                    f"(lr_scaling={hparams.lr_scaling!r}) for one accumulate_grad_batches. Use "
                    "Trainer(accumulate_grad_batches=N), or schedule='constant', warmup_steps "
                    "and lr_scaling='none'"
                )

    def sngm_param_groups(self, hparams: SNGMHyperparameters) -> list[dict[str, Any]]:
        """Parameter groups: by default no weight decay on biases and normalization layers."""
        return weight_decay_param_groups(
            self, hparams.weight_decay, decay_bias_and_norm=hparams.decay_bias_and_norm
        )

    def sngm_optimizer(
        self, param_groups: list[dict[str, Any]], lr: float, hparams: SNGMHyperparameters
    ) -> Optimizer:
        """Build the optimizer. Override to compare with another one on the same groups."""
        return SNGM(
            param_groups,
            lr=lr,
            momentum=hparams.momentum,
            weight_decay=hparams.weight_decay,
            nesterov=hparams.nesterov,
            normalize=hparams.normalize,
            process_group=self.sngm_process_group(),
            allreduce_norms=self.sngm_allreduce_norms(),
        )

    def sngm_process_group(self) -> dist.ProcessGroup | None:
        """The group over which SNGM sums the squared norms of flat parameter shards.

        None: SNGM recognises FSDP1's and DeepSpeed's shards, and their group, by itself
        (and DTensor parameters, replicated DDP gradients need none). Override it under
        FSDP1's hybrid sharding to return the intra-node shard group, which SNGM cannot see.
        """
        return None

    def sngm_allreduce_norms(self) -> BucketSquaredNorms | None:
        """The norms the DDP all-reduce measures, when the strategy all-reduces through
        `squared_norm_allreduce_hook`: SNGM then takes its norm from them.

        That is `DDPStrategy(ddp_comm_state=BucketSquaredNorms(),
        ddp_comm_hook=squared_norm_allreduce_hook)`. Lightning registers DDP comm hooks on
        CUDA devices only; on the others this registers the strategy's hook itself.
        """
        strategy = self.trainer.strategy
        if not isinstance(strategy, DDPStrategy):
            return None
        norms = strategy._ddp_comm_state
        if strategy._ddp_comm_hook is not squared_norm_allreduce_hook or not isinstance(
            norms, BucketSquaredNorms
        ):
            return None
        model = strategy.model
        if strategy.root_device.type != "cuda" and isinstance(model, DistributedDataParallel):
            model.register_comm_hook(norms, squared_norm_allreduce_hook)
        return norms

    def sngm_per_device_batch_size(self) -> int:
        """Samples per device per forward pass: `hparams.batch_size`, else the loader's."""
        if "batch_size" in self.hparams:
            return int(self.hparams["batch_size"])
        trainer = self.trainer
        if trainer.train_dataloader is None:
            trainer.fit_loop.setup_data()
        loader = trainer.train_dataloader
        batch_size = None
        if isinstance(loader, DataLoader):
            batch_size = loader.batch_size or getattr(loader.batch_sampler, "batch_size", None)
        if batch_size is None:
            raise ValueError(
                f"Cannot read the per-device batch size from the train dataloader {loader!r}: "
                "give your module a `batch_size` hyperparameter or override "
                "sngm_per_device_batch_size()"
            )
        return int(batch_size)

    def sngm_effective_batch_size(self) -> int:
        """Samples per optimizer step: per-device batch x accumulation x world size."""
        trainer = self.trainer
        return (
            self.sngm_per_device_batch_size() * trainer.accumulate_grad_batches * trainer.world_size
        )

    def sngm_learning_rate(self, hparams: SNGMHyperparameters) -> float:
        """`lr` after the batch-size scaling rule, from the hyperparameters alone."""
        if hparams.lr_scaling == "none":
            return hparams.lr
        assert hparams.reference_batch_size is not None  # checked by SNGMHyperparameters
        batch_size = self.sngm_effective_batch_size()
        lr = scale_lr(hparams.lr, batch_size, hparams.reference_batch_size, hparams.lr_scaling)
        rank_zero_info(
            f"SNGMMixin: lr {hparams.lr:g} at batch size {hparams.reference_batch_size} scaled "
            f"({hparams.lr_scaling}) to {lr:g} for the effective batch size {batch_size} "
            f"(per device x accumulate_grad_batches={self.trainer.accumulate_grad_batches} "
            f"x world_size={self.trainer.world_size})"
        )
        return lr

    def sngm_lr_scheduler(self, optimizer: Optimizer, hparams: SNGMHyperparameters) -> LRScheduler:
        """Linear warmup, then the chosen decay, over the trainer's optimizer steps."""
        estimated = self.trainer.estimated_stepping_batches
        if estimated == float("inf"):
            if hparams.schedule != "constant" or hparams.warmup_fraction:
                raise ValueError(
                    f"schedule={hparams.schedule!r} and warmup_fraction need a known number "
                    "of steps: set Trainer(max_steps=...) or Trainer(max_epochs=...)"
                )
            total_steps = max(1, hparams.warmup_steps)
        else:
            total_steps = max(1, int(estimated))
        warmup_steps = hparams.warmup_steps_for(total_steps)
        decays = hparams.schedule != "constant"
        if hparams.warmup_steps > total_steps or (decays and hparams.warmup_steps == total_steps):
            rank_zero_warn(
                f"SNGMMixin: warmup_steps={hparams.warmup_steps} is not shorter than the run's "
                f"{total_steps} optimizer steps: the lr warms up for all {warmup_steps} of them "
                "and the run ends at the peak lr"
                + (f", with no {hparams.schedule} decay" if decays else "")
                + ". Give fewer warmup_steps, or warmup_fraction (e.g. 0.1)"
            )
        return WarmupDecayLR(
            optimizer,
            total_steps,
            warmup_steps,
            hparams.schedule,
            power=hparams.power,
            final_fraction=hparams.final_lr_fraction,
        )
