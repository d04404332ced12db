"""SNGMMixin's schedule, checks and LightningCLI routes under the real Lightning Trainer, on CPU.

Lightning's own callbacks (BackboneFinetuning, GradientAccumulationScheduler,
LearningRateMonitor, ModelCheckpoint) and the real LightningCLI are used throughout.
"""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import (
    BackboneFinetuning,
    Callback,
    GradientAccumulationScheduler,
    LearningRateMonitor,
)
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_callbacks import SNGMMixin, StepScheduleCLI
from sngm_integrations import SNGM
from sngm_integrations.schedules import WarmupDecay, WarmupDecayLR


def regression_loader(batch_size: int = 4, samples: int = 32) -> DataLoader:
    generator = torch.Generator().manual_seed(2)
    inputs = torch.randn(samples, 6, generator=generator)
    targets = torch.randn(samples, 3, generator=generator)
    return DataLoader(TensorDataset(inputs, targets), batch_size=batch_size)


class Regression(pl.LightningModule):
    """A backbone and a head; its loaders are the module's own."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Tanh())
        self.head = nn.Linear(8, 3)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        inputs, targets = batch
        return nn.functional.mse_loss(self.head(self.backbone(inputs)), targets)

    def train_dataloader(self) -> DataLoader:
        return regression_loader(int(self.hparams.get("batch_size", 4)))


class MixinRegression(SNGMMixin, Regression):
    def __init__(
        self,
        lr: float = 0.4,
        weight_decay: float = 0.01,
        warmup_steps: int = 0,
        schedule: str = "constant",
        final_lr_fraction: float = 0.0,
        lr_scaling: str = "none",
        reference_batch_size: int | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()


class LearningRateNamedLikeLightning(SNGMMixin, Regression):
    """Lightning's examples call the rate `learning_rate`."""

    def __init__(self, learning_rate: float = 0.3, schedule: str = "constant") -> None:
        super().__init__()
        self.save_hyperparameters()


def make_trainer(tmp_path: Path, **kwargs: object) -> pl.Trainer:
    options: dict[str, object] = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    options.update(kwargs)
    return pl.Trainer(**options)  # type: ignore[arg-type]


class RecordGroupLearningRates(Callback):
    """The lr of every group, as each optimizer step uses it."""

    def __init__(self) -> None:
        self.steps: list[list[float]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:  # type: ignore[no-untyped-def]
        self.steps.append([group["lr"] for group in optimizer.param_groups])


# --- Groups added mid-run ---------------------------------------------------------------


def test_backbone_finetuning_groups_follow_the_schedule(tmp_path: Path) -> None:
    """BackboneFinetuning unfreezes the backbone at epoch 1 with add_param_group.

    8 steps per epoch, 3 epochs, cosine down to 0.1 of the peak. The backbone group joins
    the schedule: within an epoch (BackboneFinetuning resets its lr at each epoch start)
    it keeps its ratio to the head's lr, and it ends decayed like every other group.
    """
    model = MixinRegression(warmup_steps=2, schedule="cosine", final_lr_fraction=0.1)
    record = RecordGroupLearningRates()
    finetuning = BackboneFinetuning(unfreeze_backbone_at_epoch=1, lambda_func=lambda epoch: 1.5)
    trainer = make_trainer(tmp_path, max_epochs=3, callbacks=[finetuning, record])
    trainer.fit(model)

    assert trainer.global_step == 24
    names = [group.get("name") for group in trainer.optimizers[0].param_groups]
    assert names == ["decay", "no_decay", None]
    assert [len(lrs) for lrs in record.steps] == [2] * 8 + [3] * 16
    schedule = WarmupDecay(24, 2, "cosine", final_fraction=0.1)
    assert [lrs[0] for lrs in record.steps] == pytest.approx([0.4 * schedule(t) for t in range(24)])
    for epoch in (1, 2):
        steps = record.steps[8 * epoch : 8 * (epoch + 1)]
        ratios = [backbone / head for head, _, backbone in steps]
        assert ratios == pytest.approx([ratios[0]] * 8, rel=1e-9)
    # Epoch 1 starts the backbone at 0.1 x the head's lr (BackboneFinetuning's default ratio).
    assert record.steps[8][2] == pytest.approx(0.1 * record.steps[8][0])
    # And the schedule has decayed it over the run, as it has the head.
    last_head, _, last_backbone = record.steps[-1]
    assert last_backbone / record.steps[16][2] == pytest.approx(last_head / record.steps[16][0])
    assert last_head < 0.15 * 0.4


# --- Warmup longer than the run ---------------------------------------------------------


def test_warmup_longer_than_the_run_warns_with_the_numbers(tmp_path: Path) -> None:
    record = RecordGroupLearningRates()
    trainer = make_trainer(tmp_path, max_epochs=1, callbacks=[record])
    with pytest.warns(UserWarning, match=r"warmup_steps=100 .* 8 optimizer steps.* no cosine"):
        trainer.fit(MixinRegression(warmup_steps=100, schedule="cosine"))
    # What the warning says: the run ends at the peak.
    assert record.steps[-1][0] == pytest.approx(0.4)


def test_warmup_shorter_than_the_run_does_not_warn(
    tmp_path: Path, recwarn: pytest.WarningsRecorder
) -> None:
    make_trainer(tmp_path, max_epochs=1).fit(MixinRegression(warmup_steps=2, schedule="cosine"))
    assert not [w for w in recwarn if "warmup_steps" in str(w.message)]


# --- The effective batch changing -------------------------------------------------------


def first_run_checkpoint(tmp_path: Path, **hparams: object) -> tuple[Path, dict[str, object]]:
    """Two epochs at accumulate_grad_batches=2 (8 steps), and their checkpoint."""
    hparams = {"warmup_steps": 2, "schedule": "cosine", **hparams}
    trainer = make_trainer(
        tmp_path / "first", max_epochs=2, accumulate_grad_batches=2, enable_checkpointing=True
    )
    trainer.fit(MixinRegression(**hparams))  # type: ignore[arg-type]
    checkpoint = tmp_path / "two_epochs.ckpt"
    trainer.save_checkpoint(checkpoint)
    return checkpoint, hparams


def test_resume_with_another_effective_batch_is_refused(tmp_path: Path) -> None:
    """accumulate_grad_batches 2 -> 8 on resume, with sqrt lr scaling from batch 4."""
    checkpoint, hparams = first_run_checkpoint(tmp_path, lr_scaling="sqrt", reference_batch_size=4)
    resumed = make_trainer(tmp_path / "resumed", max_epochs=3, accumulate_grad_batches=8)
    saved_lr, new_lr = 0.4 * math.sqrt(8 / 4), 0.4 * math.sqrt(32 / 4)
    message = (
        "saved state has WarmupDecay(total_steps=8, warmup_steps=2, schedule='cosine', "
        f"power=2.0, final_fraction=0.0) with base lrs {[saved_lr] * 2}, this run has "
        "WarmupDecay(total_steps=3, warmup_steps=2, schedule='cosine', power=2.0, "
        f"final_fraction=0.0) with base lrs {[new_lr] * 2}"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        resumed.fit(MixinRegression(**hparams), ckpt_path=checkpoint)  # type: ignore[arg-type]


def test_resume_with_a_longer_run_is_refused_for_a_decaying_schedule(tmp_path: Path) -> None:
    checkpoint, hparams = first_run_checkpoint(tmp_path)
    resumed = make_trainer(tmp_path / "resumed", max_epochs=4, accumulate_grad_batches=2)
    with pytest.raises(ValueError, match=r"this run has WarmupDecay\(total_steps=16"):
        resumed.fit(MixinRegression(**hparams), ckpt_path=checkpoint)  # type: ignore[arg-type]


def test_resume_with_a_longer_run_continues_a_constant_schedule(tmp_path: Path) -> None:
    checkpoint, hparams = first_run_checkpoint(tmp_path, schedule="constant")
    record = RecordGroupLearningRates()
    resumed = make_trainer(
        tmp_path / "resumed", max_epochs=4, accumulate_grad_batches=2, callbacks=[record]
    )
    resumed.fit(MixinRegression(**hparams), ckpt_path=checkpoint)  # type: ignore[arg-type]
    assert resumed.global_step == 16
    assert record.steps == [[0.4, 0.4]] * 8


def test_gradient_accumulation_scheduler_is_refused_with_a_decay(tmp_path: Path) -> None:
    accumulation = GradientAccumulationScheduler({0: 1, 1: 4})
    trainer = make_trainer(tmp_path, max_epochs=2, callbacks=[accumulation])
    with pytest.raises(
        ValueError, match=r"GradientAccumulationScheduler\(scheduling=\{0: 1, 1: 4\}"
    ):
        trainer.fit(MixinRegression(schedule="cosine"))


def test_gradient_accumulation_scheduler_runs_a_constant_schedule(tmp_path: Path) -> None:
    record = RecordGroupLearningRates()
    accumulation = GradientAccumulationScheduler({0: 1, 1: 4})
    trainer = make_trainer(tmp_path, max_epochs=2, callbacks=[accumulation, record])
    trainer.fit(MixinRegression(warmup_steps=2))
    assert trainer.global_step == 8 + 2
    assert [lrs[0] for lrs in record.steps] == [0.2] + [0.4] * 9


# --- Checks when the module is built ----------------------------------------------------


def test_bad_hyperparameter_fails_when_the_module_is_built() -> None:
    with pytest.raises(ValueError, match=re.escape("Invalid schedule: schedule='bogus'")):
        MixinRegression(schedule="bogus")


def test_learning_rate_is_read_as_lr(tmp_path: Path) -> None:
    model = LearningRateNamedLikeLightning(learning_rate=0.3)
    assert model.sngm_hyperparameters().lr == 0.3
    trainer = make_trainer(tmp_path, max_steps=2)
    trainer.fit(model)
    optimizer = trainer.optimizers[0]
    assert isinstance(optimizer, SNGM)
    assert [group["lr"] for group in optimizer.param_groups] == [0.3, 0.3]


class CountingTrainer(pl.Trainer):
    built = 0

    def __init__(self, *args: object, **kwargs: object) -> None:
        CountingTrainer.built += 1
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]


CLI_TRAINER_ARGS = [
    "--trainer.accelerator=cpu",
    "--trainer.logger=false",
    "--trainer.enable_checkpointing=false",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]


def test_cli_bad_schedule_fails_before_the_trainer_is_built(tmp_path: Path) -> None:
    CountingTrainer.built = 0
    args = ["fit", "--model.schedule", "bogus", *CLI_TRAINER_ARGS, "--trainer.max_steps=2"]
    with pytest.raises(ValueError, match=re.escape("schedule='bogus'")):
        LightningCLI(
            MixinRegression, trainer_class=CountingTrainer, args=args, save_config_callback=None
        )
    assert CountingTrainer.built == 0


# --- Parameter group names --------------------------------------------------------------


def test_learning_rate_monitor_names_the_groups(tmp_path: Path) -> None:
    logger = CSVLogger(tmp_path)
    trainer = make_trainer(
        tmp_path,
        max_steps=4,
        logger=logger,
        log_every_n_steps=1,
        callbacks=[LearningRateMonitor(logging_interval="step")],
    )
    trainer.fit(MixinRegression(warmup_steps=2))
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    decay = [float(row["lr-SNGM/decay"]) for row in rows if row.get("lr-SNGM/decay")]
    no_decay = [float(row["lr-SNGM/no_decay"]) for row in rows if row.get("lr-SNGM/no_decay")]
    assert decay == no_decay == pytest.approx([0.2, 0.4, 0.4, 0.4])


# --- LightningCLI with --optimizer and --lr_scheduler -----------------------------------


class PlainRegression(Regression):
    """No configure_optimizers: LightningCLI's --optimizer supplies one."""


@pytest.mark.parametrize(
    ("cli_class", "interval"), [(StepScheduleCLI, "step"), (LightningCLI, "epoch")]
)
def test_cli_warmup_decay_lr_interval(
    tmp_path: Path, cli_class: type[LightningCLI], interval: str
) -> None:
    """`--lr_scheduler WarmupDecayLR`: per optimizer step under StepScheduleCLI only."""
    record = RecordGroupLearningRates()

    class RecordingCLI(cli_class):  # type: ignore[valid-type, misc]
        def instantiate_trainer(self, **kwargs: object) -> pl.Trainer:
            return super().instantiate_trainer(callbacks=[record], **kwargs)

    args = [
        "fit",
        "--optimizer=SNGM",
        "--optimizer.lr=0.4",
        "--lr_scheduler=WarmupDecayLR",
        "--lr_scheduler.total_steps=4",
        "--lr_scheduler.warmup_steps=2",
        "--lr_scheduler.schedule=linear",
        *CLI_TRAINER_ARGS,
        "--trainer.max_steps=4",
    ]
    cli = RecordingCLI(PlainRegression, args=args, save_config_callback=None)
    (config,) = cli.trainer.lr_scheduler_configs
    assert isinstance(config.scheduler, WarmupDecayLR)
    assert config.interval == interval
    lrs = [lrs[0] for lrs in record.steps]
    if interval == "step":
        assert lrs == pytest.approx([0.2, 0.4, 0.4, 0.2])
    else:  # 4 steps fit in the first epoch (8 batches): the warmup's first value throughout
        assert lrs == pytest.approx([0.2] * 4)
