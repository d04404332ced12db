"""A callback that logs, per optimizer step, what the optimizer did and the gradient noise
scale."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, LearningRateMonitor
from lightning.pytorch.utilities import rank_zero_warn
from torch.optim import Optimizer
from torch.utils.data import DataLoader
from torch.utils.hooks import RemovableHandle

from lightning_callbacks._clipping import warn_if_norm_clipping
from sngm_integrations.monitoring import StepMeasurement, noise_scale_metrics
from sngm_integrations.noise_scale import GradientNoiseScaleMeter

__all__ = ["SNGMMonitor"]


class SNGMMonitor(Callback):
    """Logs, for each logged optimizer step, the gradient norm, the step and the noise scale.

    Metrics, under `prefix` (`sngm/` by default), defined in `sngm_integrations.monitoring`
    and the same as the Hugging Face monitor's:

    * `grad_norm`: for SNGM, the global norm `||d||` of the weight-decayed gradient it
      normalized by (reduced over ranks by SNGM); for another optimizer, the norm of the
      accumulated gradient before the step.
    * `update_norm`: `||w_{t+1} - w_t||` over the optimizer's parameters (one copy of the
      parameters on each logged step).
    * `effective_lr` (SNGM): `lr / ||d||`.
    * `lr`: the first parameter group's learning rate, unless a `LearningRateMonitor` in
      the Trainer logs it already.
    * `skipped_steps`: steps that left the weights unchanged because the gradient was not
      finite, counted by SNGM and, under `16-mixed`, by the GradScaler (which then does
      not call the optimizer at all).
    * `noise_scale`: the gradient noise scale `B_simple = tr(Σ)/|G|²` in examples (see
      `sngm_integrations.noise_scale`), with `noise_scale/small_batch_sq_norm`,
      `noise_scale/big_batch_sq_norm`, `noise_scale/trace_sigma` and `noise_scale/grad_sq`.
      Measured from the micro-batches (`accumulate_grad_batches > 1`) and the ranks of a
      data-parallel run; absent when there is one of each. Compare it with the global
      batch `micro_batch_size * accumulate_grad_batches * world_size`.
    * with `per_layer=True`: `grad_norm/<parameter name>` and `update_norm/<parameter name>`.

    Values are measured only on the steps Lightning writes to the loggers
    (`Trainer(log_every_n_steps=...)`), so other steps cost one Python call per parameter
    and backward pass (the noise-scale hook returning) and no synchronisation. The noise
    scale's running averages therefore advance once per logged step. With several
    optimizers (manual optimization), each gets `optimizer_<i>/` after the prefix.

    Args:
        per_layer: Also log the norms of each parameter tensor.
        log_update_norm: Log `update_norm` (turn off to save the parameter copy).
        prefix: Prefix of every metric name.
        noise_scale: Measure the gradient noise scale.
        micro_batch_size: Examples per batch on one device, for the noise scale; read from
            the training DataLoader's `batch_size` when None.
        noise_scale_ema_decay: Weight of the past in the noise scale's running averages,
            per logged step.
    """

    def __init__(
        self,
        per_layer: bool = False,
        log_update_norm: bool = True,
        prefix: str = "sngm/",
        noise_scale: bool = True,
        micro_batch_size: int | None = None,
        noise_scale_ema_decay: float = 0.95,
    ) -> None:
        if micro_batch_size is not None and micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be at least 1, got {micro_batch_size!r}")
        self.per_layer = per_layer
        self.log_update_norm = log_update_norm
        self.prefix = prefix
        self.noise_scale = noise_scale
        self.micro_batch_size = micro_batch_size
        self.noise_scale_ema_decay = noise_scale_ema_decay
        self.scaler_skipped_steps = 0
        self.meter: GradientNoiseScaleMeter | None = None
        self._meter_state: dict[str, object] | None = None
        self._log_lr = True
        self._records: dict[int, tuple[bool, StepMeasurement]] = {}
        self._hooks: list[RemovableHandle] = []
        self._param_names: dict[int, str] = {}

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            per_layer=self.per_layer,
            log_update_norm=self.log_update_norm,
            prefix=self.prefix,
            noise_scale=self.noise_scale,
        )

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"scaler_skipped_steps": self.scaler_skipped_steps}
        if self.meter is not None:
            state["noise_scale"] = self.meter.estimator.state_dict()
        elif self._meter_state is not None:
            state["noise_scale"] = self._meter_state
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.scaler_skipped_steps = int(state_dict["scaler_skipped_steps"])
        self._meter_state = state_dict.get("noise_scale")
        if self.meter is not None and self._meter_state is not None:
            self.meter.estimator.load_state_dict(self._meter_state)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._param_names = {id(p): name for name, p in pl_module.named_parameters()}
        self._log_lr = not any(isinstance(cb, LearningRateMonitor) for cb in trainer.callbacks)  # type: ignore[attr-defined]
        for optimizer in trainer.optimizers:
            warn_if_norm_clipping(trainer, optimizer)
            self._hooks.append(optimizer.register_step_post_hook(self._after_optimizer_step))
        if self.noise_scale and trainer.accumulate_grad_batches * trainer.world_size > 1:
            self.meter = GradientNoiseScaleMeter(
                pl_module.parameters(), ema_decay=self.noise_scale_ema_decay
            )
            if self._meter_state is not None:
                self.meter.estimator.load_state_dict(self._meter_state)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        self._records.clear()
        if self.meter is not None:
            self.meter.remove()
            self._meter_state = self.meter.estimator.state_dict()
            self.meter = None

    @staticmethod
    def _logs_next_step(trainer: pl.Trainer) -> bool:
        """Whether Lightning writes the metrics of the optimizer step being prepared."""
        return (trainer.global_step + 1) % trainer.log_every_n_steps == 0 or trainer.should_stop  # type: ignore[attr-defined]

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.meter is not None and not self.meter.armed and self._logs_next_step(trainer):
            self.meter.arm()

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        log = self._logs_next_step(trainer)
        record = StepMeasurement(
            optimizer, update_norm=self.log_update_norm, per_tensor=self.per_layer
        )
        self._records[id(optimizer)] = (log, record)
        if not log:
            return
        record.before_step()
        if self.meter is not None and optimizer is trainer.optimizers[0]:
            # The precision plugin unscaled `.grad` before this hook; the hooked
            # micro-batch gradients still carry the loss scale.
            scaler = getattr(trainer.precision_plugin, "scaler", None)
            grad_scale = scaler.get_scale() if scaler is not None else 1.0
            micro_batch_size = self._micro_batch_size(trainer)
            if micro_batch_size is not None:
                self.meter.measure(micro_batch_size, grad_scale)

    def _micro_batch_size(self, trainer: pl.Trainer) -> int | None:
        """`micro_batch_size`, else the training DataLoader's; None (noise scale off) when
        neither is known."""
        if self.micro_batch_size is not None:
            return self.micro_batch_size
        loader = trainer.train_dataloader
        self.micro_batch_size = loader.batch_size if isinstance(loader, DataLoader) else None
        if self.micro_batch_size is None and self.meter is not None:
            rank_zero_warn(
                "SNGMMonitor: the training DataLoader has no batch_size; pass "
                "SNGMMonitor(micro_batch_size=...) to measure the noise scale",
                category=UserWarning,
            )
            self.meter.remove()
            self.meter = None
        return self.micro_batch_size

    def _after_optimizer_step(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        entry = self._records.get(id(optimizer))
        if entry is None:  # a step Lightning did not announce, e.g. a raw optimizer.step()
            return
        log, record = entry
        if log:
            record.after_step()
        record.ran = True

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        for index, optimizer in enumerate(trainer.optimizers):
            entry = self._records.pop(id(optimizer), None)
            if entry is None:
                continue
            log, record = entry
            if not record.ran:
                self.scaler_skipped_steps += 1
            if not log:
                continue
            prefix = self.prefix
            if len(trainer.optimizers) > 1:
                prefix = f"{prefix}optimizer_{index}/"
            metrics = record.metrics(
                prefix, self._param_names, self.scaler_skipped_steps, lr=self._log_lr
            )
            if index == 0 and self.meter is not None:
                metrics.update(noise_scale_metrics(self.meter, prefix))
            pl_module.log_dict(metrics, on_step=True, on_epoch=False)
