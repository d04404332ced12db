"""SNGMMixin and SNGMMonitor under the real Lightning Trainer, on CPU."""

from __future__ import annotations

import csv
import re
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins import MixedPrecision
from lightning.pytorch.strategies import DDPStrategy
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from lightning_callbacks import SNGMHyperparameters, SNGMMixin, SNGMMonitor
from lightning_callbacks.param_groups import weight_decay_param_groups
from sngm_integrations import SNGM
from sngm_integrations.comm_hooks import BucketSquaredNorms, squared_norm_allreduce_hook

sys.path.insert(0, str(Path(__file__).parent / "distributed"))
import noise_scale_worker as noise_problem  # noqa: E402

SAMPLES = 32


def make_dataset() -> TensorDataset:
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(SAMPLES, 6, generator=generator)
    targets = torch.randn(SAMPLES, 3, generator=generator)
    return TensorDataset(inputs, targets)


def make_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 3))


class TinyRegression(SNGMMixin, pl.LightningModule):
    """A small MLP regression whose optimizer comes from SNGMMixin."""

    def __init__(
        self,
        lr: float = 0.5,
        momentum: float = 0.9,
        weight_decay: float = 0.01,
        warmup_steps: int = 0,
        warmup_fraction: float = 0.0,
        schedule: str = "constant",
        lr_scaling: str = "none",
        reference_batch_size: int | None = None,
        nan_at_batch: int = -1,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = make_net()

    def forward(self, inputs: Tensor) -> Tensor:
        return self.net(inputs)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        inputs, targets = batch
        if batch_idx == self.hparams["nan_at_batch"]:
            inputs = inputs * float("nan")
        loss = nn.functional.mse_loss(self(inputs), targets)
        self.log("loss", loss)
        return loss


class PlainRegression(pl.LightningModule):
    """The same model without configure_optimizers, for LightningCLI's --optimizer."""

    def __init__(self) -> None:
        super().__init__()
        self.net = make_net()

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        inputs, targets = batch
        return nn.functional.mse_loss(self.net(inputs), targets)


class TinyData(pl.LightningDataModule):
    def __init__(self, batch_size: int = 4) -> None:
        super().__init__()
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        dataset = make_dataset()
        sampler = None
        if self.trainer is not None and self.trainer.world_size > 1:
            # Lightning's own DistributedSampler always shuffles training data.
            sampler = DistributedSampler(
                dataset, self.trainer.world_size, self.trainer.global_rank, shuffle=False
            )
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler)


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


def manual_sngm_run(
    steps: int,
    batch_size: int,
    lr: float = 0.5,
    weight_decay: float = 0.01,
    autocast_dtype: torch.dtype | None = None,
) -> tuple[nn.Module, SNGM]:
    """Plain PyTorch: `steps` SNGM steps over consecutive batches of `batch_size`."""
    net = make_net()
    optimizer = SNGM(weight_decay_param_groups(net, weight_decay), lr=lr, momentum=0.9)
    inputs, targets = make_dataset().tensors
    for step in range(steps):
        chunk = slice(step * batch_size, (step + 1) * batch_size)
        optimizer.zero_grad()
        with torch.autocast(
            "cpu", dtype=autocast_dtype or torch.float32, enabled=bool(autocast_dtype)
        ):
            loss = nn.functional.mse_loss(net(inputs[chunk]), targets[chunk])
        loss.backward()
        optimizer.step()
    return net, optimizer


def read_metrics(logger: CSVLogger) -> list[dict[str, str]]:
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        return list(csv.DictReader(f))


def assert_same_weights(a: nn.Module, b: nn.Module, **tolerance: float) -> None:
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, msg=lambda m, name=name: f"{name}: {m}", **tolerance)


# --- SNGMMixin ---------------------------------------------------------------------------


def test_param_groups_exempt_biases_and_norm_layers() -> None:
    model = TinyRegression()
    decayed, exempt = weight_decay_param_groups(model, 0.01)
    net = model.net
    assert {id(p) for p in decayed["params"]} == {id(net[0].weight), id(net[3].weight)}
    assert {id(p) for p in exempt["params"]} == {
        id(net[0].bias),
        id(net[1].weight),
        id(net[1].bias),
        id(net[3].bias),
    }
    assert (decayed["weight_decay"], exempt["weight_decay"]) == (0.01, 0.0)
    (everything,) = weight_decay_param_groups(model, 0.01, decay_bias_and_norm=True)
    assert len(everything["params"]) == len(list(model.parameters()))


@pytest.mark.parametrize(
    ("hparams", "message"),
    [
        ({"momentum": 0.9}, "needs an `lr` (or `learning_rate`) hyperparameter"),
        ({"lr": 1.0, "schedule": "step"}, "schedule='step'"),
        ({"lr": 1.0, "lr_scaling": "cubic"}, "lr_scaling='cubic'"),
        ({"lr": 1.0, "lr_scaling": "sqrt"}, "reference_batch_size=None"),
        ({"lr": 1.0, "warmup_steps": 5, "warmup_fraction": 0.1}, "not both"),
        ({"lr": 1.0, "warmup_fraction": 1.5}, "warmup_fraction=1.5"),
    ],
)
def test_bad_hyperparameters_name_the_argument(hparams: dict, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        SNGMHyperparameters.from_hparams(hparams)


@pytest.mark.parametrize(("rule", "factor"), [("none", 1.0), ("linear", 4.0), ("sqrt", 2.0)])
def test_lr_scaling_uses_the_effective_batch(tmp_path: Path, rule: str, factor: float) -> None:
    # Effective batch = 4 per device x 2 accumulated x 1 process = 8; reference 2.
    model = TinyRegression(lr=0.25, lr_scaling=rule, reference_batch_size=2, warmup_fraction=0.5)
    trainer = make_trainer(tmp_path, max_epochs=1, accumulate_grad_batches=2)
    trainer.fit(model, datamodule=TinyData(batch_size=4))
    optimizer = trainer.optimizers[0]
    assert isinstance(optimizer, SNGM)
    assert [g["initial_lr"] for g in optimizer.param_groups] == [0.25 * factor] * 2
    scheduler = trainer.lr_scheduler_configs[0]
    assert scheduler.interval == "step"
    # 32 samples / 8 per step = 4 steps, half of them warmup.
    assert scheduler.scheduler.multiplier.warmup_steps == 2  # type: ignore[attr-defined]
    assert trainer.global_step == 4


def test_load_from_checkpoint_restores_hparams_and_weights(tmp_path: Path) -> None:
    model = TinyRegression(lr=0.3, schedule="cosine", warmup_steps=2)
    trainer = make_trainer(tmp_path, max_steps=3)
    trainer.fit(model, datamodule=TinyData())
    trainer.save_checkpoint(tmp_path / "model.ckpt")
    loaded = TinyRegression.load_from_checkpoint(tmp_path / "model.ckpt")
    assert loaded.sngm_hyperparameters() == model.sngm_hyperparameters()
    assert_same_weights(loaded, model, rtol=0, atol=0)


# --- The Trainer's precision and accumulation paths ----------------------------------


def test_accumulated_gradient_gives_one_manual_sngm_step(tmp_path: Path) -> None:
    """32-bit, accumulate_grad_batches=2: each step equals SNGM on the 8-sample batch."""
    model = TinyRegression()
    logger = CSVLogger(tmp_path)
    trainer = make_trainer(
        tmp_path,
        max_steps=3,
        accumulate_grad_batches=2,
        logger=logger,
        log_every_n_steps=1,
        callbacks=[SNGMMonitor(per_layer=True)],
    )
    trainer.fit(model, datamodule=TinyData(batch_size=4))
    assert trainer.global_step == 3

    reference, reference_optimizer = manual_sngm_run(steps=3, batch_size=8)
    assert_same_weights(model.net, reference, rtol=1e-5, atol=1e-6)

    rows = [row for row in read_metrics(logger) if row.get("sngm/grad_norm")]
    assert [int(row["step"]) for row in rows] == [0, 1, 2]
    assert reference_optimizer.last_grad_norm is not None
    assert float(rows[-1]["sngm/grad_norm"]) == pytest.approx(
        float(reference_optimizer.last_grad_norm), rel=1e-5
    )
    # The first step moves the weights by lr * ||d/||d|||| = 0.5 (momentum starts at 0).
    assert float(rows[0]["sngm/update_norm"]) == pytest.approx(0.5, rel=1e-5)
    assert float(rows[0]["sngm/lr"]) == 0.5
    assert float(rows[-1]["sngm/skipped_steps"]) == 0.0
    assert "sngm/grad_norm/net.0.weight" in rows[0]
    assert "sngm/update_norm/net.3.bias" in rows[0]


def test_monitor_honours_log_every_n_steps(tmp_path: Path) -> None:
    logger = CSVLogger(tmp_path)
    trainer = make_trainer(
        tmp_path, max_steps=6, logger=logger, log_every_n_steps=3, callbacks=[SNGMMonitor()]
    )
    trainer.fit(TinyRegression(), datamodule=TinyData())
    logged = [int(row["step"]) for row in read_metrics(logger) if row.get("sngm/grad_norm")]
    assert logged == [2, 5]


def test_non_finite_step_is_skipped_and_counted(tmp_path: Path) -> None:
    logger = CSVLogger(tmp_path)
    model = TinyRegression(nan_at_batch=1)
    trainer = make_trainer(
        tmp_path, max_steps=3, logger=logger, log_every_n_steps=1, callbacks=[SNGMMonitor()]
    )
    trainer.fit(model, datamodule=TinyData())
    rows = [row for row in read_metrics(logger) if row.get("sngm/skipped_steps")]
    assert [float(row["sngm/skipped_steps"]) for row in rows] == [0.0, 1.0, 1.0]
    assert float(rows[1]["sngm/update_norm"]) == 0.0
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_bf16_mixed_matches_a_manual_autocast_step(tmp_path: Path) -> None:
    model = TinyRegression()
    trainer = make_trainer(tmp_path, max_steps=3, precision="bf16-mixed")
    trainer.fit(model, datamodule=TinyData(batch_size=8))
    reference, _ = manual_sngm_run(steps=3, batch_size=8, autocast_dtype=torch.bfloat16)
    assert_same_weights(model.net, reference, rtol=1e-5, atol=1e-6)


def count_clipping_warnings(caught: list[warnings.WarningMessage]) -> int:
    return sum("clips by norm, which does nothing for SNGM" in str(w.message) for w in caught)


@pytest.mark.parametrize("gradient_clip_val", [None, 1e-3])
def test_16_mixed_with_grad_scaler_matches_unscaled_step(
    tmp_path: Path, gradient_clip_val: float | None
) -> None:
    """fp16 autocast through an explicit MixedPrecision plugin and a CPU GradScaler.

    Lightning turns `precision="16-mixed"` into bf16 on CPU, but accepts the plugin. The
    loss scale cancels in SNGM's g/||g||, and so does norm clipping (warned about once)
    when there is no weight decay (with it, clipping shrinks g relative to the decay).
    """
    model = TinyRegression(weight_decay=0.0)
    plugin = MixedPrecision("16-mixed", device="cpu")
    trainer = make_trainer(
        tmp_path,
        max_steps=3,
        plugins=[plugin],
        gradient_clip_val=gradient_clip_val,
        callbacks=[SNGMMonitor()],
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, datamodule=TinyData(batch_size=8))
    assert count_clipping_warnings(caught) == (1 if gradient_clip_val else 0)
    assert plugin.scaler is not None and plugin.scaler.get_scale() > 1.0
    reference, _ = manual_sngm_run(
        steps=3, batch_size=8, weight_decay=0.0, autocast_dtype=torch.float16
    )
    assert_same_weights(model.net, reference, rtol=1e-4, atol=1e-5)


def test_value_clipping_is_not_warned_about(tmp_path: Path) -> None:
    trainer = make_trainer(
        tmp_path, max_steps=1, gradient_clip_val=0.1, gradient_clip_algorithm="value"
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(TinyRegression(), datamodule=TinyData())
    assert count_clipping_warnings(caught) == 0


def test_16_mixed_overflow_is_counted_as_skipped(tmp_path: Path) -> None:
    model = TinyRegression(nan_at_batch=1)
    monitor = SNGMMonitor()
    trainer = make_trainer(
        tmp_path, max_steps=3, plugins=[MixedPrecision("16-mixed", "cpu")], callbacks=[monitor]
    )
    trainer.fit(model, datamodule=TinyData())
    assert monitor.scaler_skipped_steps == 1
    assert monitor.state_dict() == {"scaler_skipped_steps": 1}
    assert all(torch.isfinite(p).all() for p in model.parameters())


# --- Resume ------------------------------------------------------------------------------


class RecordLearningRates(Callback):
    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


def test_resume_from_checkpoint_continues_exactly(tmp_path: Path) -> None:
    """Two epochs straight equal one epoch, a checkpoint, and a resumed second epoch.

    Under 16-mixed with one overflowing batch per epoch, linear lr scaling, warmup and
    cosine decay: the weights, the learning rates, the GradScaler and the monitor's count
    all continue, and the lr scaling is applied once only.
    """
    hparams = dict(
        lr=0.2,
        lr_scaling="linear",
        reference_batch_size=4,
        warmup_steps=2,
        schedule="cosine",
        nan_at_batch=1,
    )

    def run(callbacks: list[Callback], ckpt_path: Path | None = None) -> pl.Trainer:
        trainer = make_trainer(
            tmp_path,
            max_epochs=2,
            accumulate_grad_batches=2,
            plugins=[MixedPrecision("16-mixed", "cpu")],
            enable_checkpointing=True,
            callbacks=callbacks,
        )
        trainer.fit(TinyRegression(**hparams), datamodule=TinyData(), ckpt_path=ckpt_path)
        return trainer

    straight_lrs, straight_monitor = RecordLearningRates(), SNGMMonitor()
    checkpoints = ModelCheckpoint(tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    straight = run([checkpoints, straight_lrs, straight_monitor])

    (first_epoch,) = (tmp_path / "ckpt").glob("epoch=0-*.ckpt")
    resumed_lrs, resumed_monitor = RecordLearningRates(), SNGMMonitor()
    resumed = run([resumed_lrs, resumed_monitor], ckpt_path=first_epoch)

    assert resumed.global_step == straight.global_step == 8
    assert resumed_lrs.lrs == straight_lrs.lrs[len(straight_lrs.lrs) // 2 :]
    # Effective batch 8 = 2 x reference: lr 0.4, scaled once (0.8 would be twice).
    assert [g["initial_lr"] for g in resumed.optimizers[0].param_groups] == [0.4, 0.4]
    assert resumed_monitor.scaler_skipped_steps == straight_monitor.scaler_skipped_steps == 2
    assert_same_weights(resumed.lightning_module, straight.lightning_module, rtol=0, atol=0)


# --- LightningCLI ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model_class", "args", "expected_lr"),
    [
        (PlainRegression, ["--optimizer", "sngm_integrations.SNGM", "--optimizer.lr", "0.5"], 0.5),
        (PlainRegression, ["--optimizer", "SNGM", "--optimizer.lr", "0.7"], 0.7),
        (TinyRegression, ["--model.lr", "0.3", "--model.schedule", "cosine"], 0.3),
    ],
)
def test_lightning_cli_selects_sngm(
    tmp_path: Path, model_class: type, args: list[str], expected_lr: float
) -> None:
    trainer_args = [
        "--trainer.accelerator=cpu",
        "--trainer.max_steps=2",
        "--trainer.logger=false",
        "--trainer.enable_checkpointing=false",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={tmp_path}",
    ]
    cli = LightningCLI(
        model_class, TinyData, args=["fit", *args, *trainer_args], save_config_callback=None
    )
    optimizer = cli.trainer.optimizers[0]
    assert isinstance(optimizer, SNGM)
    assert (
        optimizer.param_groups[0].get("initial_lr", optimizer.param_groups[0]["lr"]) == expected_lr
    )
    assert cli.trainer.global_step == 2


# --- Two processes -----------------------------------------------------------------------


class SaveFinalState(Callback):
    """Each rank saves its weights and the gradient norm the monitor logged last."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        state = {
            "weights": {k: v.detach().clone() for k, v in pl_module.state_dict().items()},
            "logged_grad_norm": trainer.callback_metrics["sngm/grad_norm"].clone(),
            "lr": trainer.optimizers[0].param_groups[0]["initial_lr"],
            "allreduce_norm_steps": trainer.optimizers[0].allreduce_norm_steps,
        }
        torch.save(state, self.folder / f"rank{trainer.global_rank}.pt")


def test_ddp_spawn_ranks_match_one_process_on_the_global_batch(tmp_path: Path) -> None:
    """2 processes x 4 samples (gloo, CPU) against 1 process x 8 samples, 3 steps.

    An unshuffled DistributedSampler gives rank r the samples r, r+2, ..., so each pair of
    rank batches is the single process's batch. The sqrt lr rule must see world_size=2 for
    the lrs to agree; the monitor's norm must be the norm of the averaged gradient.
    """
    hparams = dict(lr_scaling="sqrt", reference_batch_size=4, warmup_steps=1, schedule="cosine")
    options = dict(max_steps=3, log_every_n_steps=1)
    single = make_trainer(
        tmp_path, callbacks=[SNGMMonitor(), SaveFinalState(tmp_path / "single")], **options
    )
    single.fit(TinyRegression(**hparams), datamodule=TinyData(batch_size=8))
    ddp = make_trainer(
        tmp_path,
        strategy="ddp_spawn",
        devices=2,
        use_distributed_sampler=False,
        callbacks=[SNGMMonitor(), SaveFinalState(tmp_path / "ddp")],
        **options,
    )
    ddp.fit(TinyRegression(**hparams), datamodule=TinyData(batch_size=4))

    expected = torch.load(tmp_path / "single" / "rank0.pt")
    ranks = [torch.load(tmp_path / "ddp" / f"rank{rank}.pt") for rank in (0, 1)]
    assert expected["lr"] == pytest.approx(0.5 * 2**0.5)
    for state in ranks:
        assert state["lr"] == expected["lr"]
        torch.testing.assert_close(
            state["logged_grad_norm"], expected["logged_grad_norm"], rtol=1e-5, atol=0
        )
        for name, value in expected["weights"].items():
            assert torch.equal(state["weights"][name], ranks[0]["weights"][name]), name
            torch.testing.assert_close(state["weights"][name], value, rtol=1e-5, atol=1e-6)


def test_ddp_comm_hook_gives_sngm_its_norm_and_the_same_steps(tmp_path: Path) -> None:
    """DDPStrategy(ddp_comm_hook=squared_norm_allreduce_hook) on 2 CPU processes: SNGM
    takes every step's norm from the all-reduce and ends where it ends without the hook."""
    hparams = dict(weight_decay=0.0)
    runs = {
        "plain": DDPStrategy(start_method="spawn"),
        "hooked": DDPStrategy(
            start_method="spawn",
            ddp_comm_state=BucketSquaredNorms(),
            ddp_comm_hook=squared_norm_allreduce_hook,
        ),
    }
    for name, strategy in runs.items():
        trainer = make_trainer(
            tmp_path,
            strategy=strategy,
            devices=2,
            max_steps=3,
            log_every_n_steps=1,
            callbacks=[SNGMMonitor(noise_scale=False), SaveFinalState(tmp_path / name)],
        )
        trainer.fit(TinyRegression(**hparams), datamodule=TinyData(batch_size=4))
    for rank in (0, 1):
        plain = torch.load(tmp_path / "plain" / f"rank{rank}.pt")
        hooked = torch.load(tmp_path / "hooked" / f"rank{rank}.pt")
        assert (plain["allreduce_norm_steps"], hooked["allreduce_norm_steps"]) == (0, 3)
        torch.testing.assert_close(hooked["logged_grad_norm"], plain["logged_grad_norm"])
        for name, value in plain["weights"].items():
            torch.testing.assert_close(hooked["weights"][name], value, rtol=1e-6, atol=1e-6)


# --- SNGMMonitor with any optimizer, the noise scale, several monitors -------------------


class LinearRegressionAtZero(pl.LightningModule):
    """The noise-scale ground truth (tests/distributed/noise_scale_worker.py) under
    Lightning: SGD with lr 0 keeps the weights at 0."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(noise_problem.DIM, 1, bias=False)
        nn.init.zeros_(self.linear.weight)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        inputs, targets = batch
        return 0.5 * (self.linear(inputs).squeeze(1) - targets).square().mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


def linear_regression_loader(steps: int, micro_batch: int, accumulation: int) -> DataLoader:
    generator = torch.Generator().manual_seed(5)
    samples = steps * micro_batch * accumulation
    inputs = torch.randn(samples, noise_problem.DIM, generator=generator)
    targets = inputs @ noise_problem.w_star() + torch.randn(samples, generator=generator)
    return DataLoader(TensorDataset(inputs, targets), batch_size=micro_batch)


@pytest.mark.slow
def test_noise_scale_of_sgd_under_accumulation_matches_ground_truth(tmp_path: Path) -> None:
    logger = CSVLogger(tmp_path)
    trainer = make_trainer(
        tmp_path,
        max_steps=300,
        accumulate_grad_batches=4,
        logger=logger,
        log_every_n_steps=1,
        callbacks=[SNGMMonitor(noise_scale_ema_decay=0.99)],
    )
    trainer.fit(LinearRegressionAtZero(), linear_regression_loader(300, 16, 4))
    rows = [row for row in read_metrics(logger) if row.get("sngm/noise_scale")]
    assert len(rows) == 300
    truth = noise_problem.true_noise_scale(1.0)
    assert float(rows[-1]["sngm/noise_scale"]) == pytest.approx(truth, rel=0.15)
    # grad_norm of SGD is the norm of the accumulated gradient (`-mean(x y)`, about |w*|).
    assert float(rows[-1]["sngm/grad_norm"]) == pytest.approx(1.0, abs=0.5)
    assert float(rows[-1]["sngm/update_norm"]) == 0.0
    for name in ("small_batch_sq_norm", "big_batch_sq_norm", "trace_sigma", "grad_sq"):
        assert f"sngm/noise_scale/{name}" in rows[-1]


def test_noise_scale_reaches_tensorboard(tmp_path: Path) -> None:
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path)
    trainer = make_trainer(
        tmp_path,
        max_steps=4,
        accumulate_grad_batches=2,
        logger=logger,
        log_every_n_steps=2,
        callbacks=[SNGMMonitor()],
    )
    trainer.fit(TinyRegression(), datamodule=TinyData())
    events = EventAccumulator(logger.log_dir)
    events.Reload()
    noise = events.Scalars("sngm/noise_scale")
    assert [event.step for event in noise] == [1, 3]
    assert all(torch.isfinite(torch.tensor(event.value)) for event in noise)
    assert "sngm/noise_scale/big_batch_sq_norm" in events.Tags()["scalars"]


def test_no_noise_scale_with_one_batch_size(tmp_path: Path) -> None:
    logger = CSVLogger(tmp_path)
    monitor = SNGMMonitor()
    trainer = make_trainer(
        tmp_path, max_steps=2, logger=logger, log_every_n_steps=1, callbacks=[monitor]
    )
    trainer.fit(TinyRegression(), datamodule=TinyData())
    assert monitor.meter is None
    assert not any(row.get("sngm/noise_scale") for row in read_metrics(logger))


def test_two_monitors_in_one_trainer_checkpoint_and_resume(tmp_path: Path) -> None:
    def monitors() -> list[Callback]:
        return [SNGMMonitor(), SNGMMonitor(per_layer=True, prefix="layers/")]

    first = monitors()
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = make_trainer(
        tmp_path,
        max_steps=2,
        accumulate_grad_batches=2,
        logger=CSVLogger(tmp_path),
        log_every_n_steps=1,
        enable_checkpointing=True,
        callbacks=[*first, checkpoint],
    )
    trainer.fit(TinyRegression(), datamodule=TinyData())
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["callbacks"]
    keys = {first[0].state_key, first[1].state_key}
    assert len(keys) == 2 and keys <= saved.keys()
    assert first[0].state_key != first[1].state_key

    second = monitors()
    resumed = make_trainer(
        tmp_path,
        max_steps=3,
        accumulate_grad_batches=2,
        log_every_n_steps=1,
        enable_checkpointing=True,
        callbacks=[*second, ModelCheckpoint(dirpath=tmp_path / "ckpt2")],
    )
    resumed.fit(TinyRegression(), datamodule=TinyData(), ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    for before, after in zip(first, second, strict=True):
        assert isinstance(before, SNGMMonitor) and isinstance(after, SNGMMonitor)
        assert after.state_dict()["noise_scale"]["updates"] == (
            before.state_dict()["noise_scale"]["updates"] + 1
        )


@pytest.mark.parametrize("with_lr_monitor", [False, True])
def test_lr_is_logged_once(tmp_path: Path, with_lr_monitor: bool) -> None:
    from lightning.pytorch.callbacks import LearningRateMonitor

    logger = CSVLogger(tmp_path)
    callbacks: list[Callback] = [SNGMMonitor()]
    if with_lr_monitor:
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    trainer = make_trainer(
        tmp_path, max_steps=2, logger=logger, log_every_n_steps=1, callbacks=callbacks
    )
    trainer.fit(TinyRegression(), datamodule=TinyData())
    rows = read_metrics(logger)
    has_sngm_lr = any(row.get("sngm/lr") for row in rows)
    has_monitor_lr = any(row.get(key) for row in rows for key in row if key.startswith("lr-"))
    assert has_sngm_lr is not with_lr_monitor
    assert has_monitor_lr is with_lr_monitor


def test_noise_scale_under_16_mixed_is_on_the_unscaled_gradients(tmp_path: Path) -> None:
    """The GradScaler's loss scale (about 65536) does not reach the squared norms."""
    measured = []
    for plugins in ([], [MixedPrecision("16-mixed", device="cpu")]):
        monitor = SNGMMonitor()
        trainer = make_trainer(
            tmp_path,
            max_steps=1,
            accumulate_grad_batches=2,
            log_every_n_steps=1,
            plugins=plugins,
            callbacks=[monitor],
        )
        trainer.fit(TinyRegression(weight_decay=0.0), datamodule=TinyData())
        assert monitor.meter is None and monitor.state_dict()["noise_scale"]["updates"] == 1
        measured.append(monitor)
    full, mixed = (m._meter_state for m in measured)
    assert full is not None and mixed is not None
    for key in ("trace_sigma", "true_grad_sq"):
        assert float(mixed[key]) == pytest.approx(float(full[key]), rel=1e-2)
