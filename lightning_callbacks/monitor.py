"""A callback that logs, per optimizer step, what SNGM did: norms, learning rate, skips."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from lightning_callbacks._clipping import warn_if_norm_clipping
from sngm_integrations import SNGM
from sngm_integrations.distributed import global_squared_norm, per_tensor_squared_norms
from sngm_integrations.sharding import norm_group

__all__ = ["SNGMMonitor"]


@dataclass
class _StepRecord:
    """What one optimizer step measured; device tensors until they are logged."""

    log: bool
    params: list[Tensor] = field(default_factory=list)
    before: list[Tensor] = field(default_factory=list)
    ran: bool = False
    lr: float | Tensor = 0.0
    grad_norm: Tensor | None = None
    update_norm: Tensor | None = None
    layer_grad_norms: list[Tensor] = field(default_factory=list)
    layer_update_norms: list[Tensor] = field(default_factory=list)


class SNGMMonitor(Callback):
    """Logs, for each optimizer step, the gradient norm SNGM divided by and what it did.

    Metrics, under ``prefix`` (``sngm/`` by default):

    * ``grad_norm``: the global norm :math:`\\lVert d_t \\rVert` of the weight-decayed
      gradient that SNGM normalized by, read from ``optimizer.last_grad_norm`` after the
      step. SNGM reduces it over ranks, so it is the whole model's norm under DDP, FSDP2
      (DTensor) and flat-sharded strategies alike. For another optimizer, the norm of the
      accumulated gradient before the step (correct for DDP and DTensor parameters).
    * ``update_norm``: :math:`\\lVert w_{t+1} - w_t \\rVert` over all the optimizer's
      parameters (costs one copy of the parameters on each logged step).
    * ``lr``: the learning rate of the first parameter group for this step.
    * ``skipped_steps``: steps that left the weights unchanged because the gradient was not
      finite, counted by SNGM itself and, under ``16-mixed``, by the GradScaler (which
      then does not call the optimizer at all).
    * with ``per_layer=True``: ``grad_norm/<parameter name>`` (before the step, after
      gradient accumulation and AMP unscaling) and ``update_norm/<parameter name>``.

    Values are measured only on the steps Lightning writes to the loggers
    (``Trainer(log_every_n_steps=...)``), so the callback costs nothing on other steps.
    With several optimizers (manual optimization), each gets ``optimizer_<i>/`` after the
    prefix.

    Args:
        per_layer: Also log the norms of each parameter tensor.
        log_update_norm: Log ``update_norm`` (turn off to save the parameter copy).
        prefix: Prefix of every metric name.
    """

    def __init__(
        self, per_layer: bool = False, log_update_norm: bool = True, prefix: str = "sngm/"
    ) -> None:
        self.per_layer = per_layer
        self.log_update_norm = log_update_norm
        self.prefix = prefix
        self.scaler_skipped_steps = 0
        self._records: dict[int, _StepRecord] = {}
        self._hooks: list[RemovableHandle] = []
        self._param_names: dict[int, str] = {}

    def state_dict(self) -> dict[str, Any]:
        return {"scaler_skipped_steps": self.scaler_skipped_steps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.scaler_skipped_steps = int(state_dict["scaler_skipped_steps"])

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._param_names = {id(p): name for name, p in pl_module.named_parameters()}
        for optimizer in trainer.optimizers:
            warn_if_norm_clipping(trainer, optimizer)
            self._hooks.append(optimizer.register_step_post_hook(self._after_optimizer_step))

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        self._records.clear()

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        # The same test Lightning applies before writing step metrics to the loggers.
        record = _StepRecord(log=trainer._logger_connector.should_update_logs)
        self._records[id(optimizer)] = record
        if not record.log:
            return
        record.params = [
            p for group in optimizer.param_groups for p in group["params"] if p.grad is not None
        ]
        if not record.params:
            return
        grads = [p.grad for p in record.params if p.grad is not None]
        if self.per_layer:
            record.layer_grad_norms = [n.sqrt() for n in per_tensor_squared_norms(grads)]
        if not isinstance(optimizer, SNGM):
            record.grad_norm = global_squared_norm(grads).sqrt()
        if self.log_update_norm:
            record.before = [p.detach().clone() for p in record.params]

    def _after_optimizer_step(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        record = self._records.get(id(optimizer))
        if record is None:  # a step Lightning did not announce, e.g. a raw optimizer.step()
            return
        record.ran = True
        if not record.log:
            return
        record.lr = optimizer.param_groups[0]["lr"]
        if isinstance(optimizer, SNGM):
            record.grad_norm = optimizer.last_grad_norm
        if record.before:
            updates = [p.detach() - b for p, b in zip(record.params, record.before, strict=True)]
            record.update_norm = global_squared_norm(updates, norm_group(optimizer)).sqrt()
            if self.per_layer:
                record.layer_update_norms = [n.sqrt() for n in per_tensor_squared_norms(updates)]
            record.before = []

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        for index, optimizer in enumerate(trainer.optimizers):
            record = self._records.pop(id(optimizer), None)
            if record is None:
                continue
            if not record.ran:
                self.scaler_skipped_steps += 1
            if record.log:
                prefix = self.prefix
                if len(trainer.optimizers) > 1:
                    prefix = f"{prefix}optimizer_{index}/"
                pl_module.log_dict(
                    self._metrics(optimizer, record, prefix), on_step=True, on_epoch=False
                )

    def _metrics(
        self, optimizer: Optimizer, record: _StepRecord, prefix: str
    ) -> dict[str, float | Tensor]:
        skipped = self.scaler_skipped_steps
        if isinstance(optimizer, SNGM):
            skipped += optimizer.skipped_steps
        metrics: dict[str, float | Tensor] = {f"{prefix}skipped_steps": float(skipped)}
        if not record.ran:
            return metrics
        metrics[f"{prefix}lr"] = float(record.lr)
        if record.grad_norm is not None:
            metrics[f"{prefix}grad_norm"] = record.grad_norm
        if record.update_norm is not None:
            metrics[f"{prefix}update_norm"] = record.update_norm
        for kind, norms in (
            ("grad_norm", record.layer_grad_norms),
            ("update_norm", record.layer_update_norms),
        ):
            if not norms:
                continue
            for p, norm in zip(record.params, norms, strict=True):
                name = self._param_names.get(id(p), f"param_{id(p)}")
                metrics[f"{prefix}{kind}/{name}"] = norm
        return metrics
