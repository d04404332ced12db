"""What one optimizer step did, measured the same way for every framework's monitor.

`StepMeasurement.before_step` runs after the gradients are final (accumulated, all-reduced,
unscaled) and `after_step` once the optimizer stepped; `metrics` then names the values.
The Hugging Face and Lightning monitors both call these, so `grad_norm` and `update_norm`
mean the same in either:

* `grad_norm`: for SNGM, the global norm `||d||` of the weight-decayed gradient it
  divided by (`optimizer.last_grad_norm`, reduced over ranks by SNGM); for another
  optimizer, the norm of the gradients before the step.
* `update_norm`: `||w_{t+1} - w_t||` over the optimizer's parameters, the step actually
  taken (one copy of the parameters on each measured step), for any optimizer.
* `effective_lr` (SNGM only): `lr / ||d||`, the learning rate momentum SGD would need on
  the raw gradient for the same step; 0 for a skipped step.
* `lr`: the first parameter group's learning rate in the step.
* `skipped_steps`: steps SNGM skipped because the gradient was not finite, plus the
  steps the caller counted (e.g. those a GradScaler skipped without calling the optimizer).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.optim import Optimizer

from sngm_integrations.distributed import global_squared_norm, per_tensor_squared_norms
from sngm_integrations.noise_scale import GradientNoiseScaleMeter
from sngm_integrations.sharding import norm_group
from sngm_integrations.sngm import SNGM

__all__ = ["StepMeasurement", "innermost_optimizer", "noise_scale_metrics"]


def innermost_optimizer(optimizer: Optimizer) -> Optimizer:
    """The optimizer inside Accelerate's (or Lightning's, ...) wrappers.

    Wrappers that hold the real optimizer in `.optimizer` are followed to the end.
    """
    inner: object = optimizer
    while getattr(inner, "optimizer", None) is not None:
        inner = inner.optimizer  # type: ignore[attr-defined]
    if not isinstance(inner, Optimizer):
        raise TypeError(f"optimizer wraps {type(inner).__name__}, not a torch.optim.Optimizer")
    return inner


@dataclass
class StepMeasurement:
    """One optimizer step's measurements; device tensors until they are read.

    Args:
        optimizer: The optimizer that steps (unwrapped, see `innermost_optimizer`).
        update_norm: Measure `update_norm` (one copy of the parameters).
        per_tensor: Also measure each tensor's gradient and update norms.
    """

    optimizer: Optimizer
    update_norm: bool = True
    per_tensor: bool = False
    params: list[Tensor] = field(default_factory=list)
    ran: bool = False
    lr: float = 0.0
    grad_norm: Tensor | None = None
    step_norm: Tensor | None = None
    tensor_grad_norms: list[Tensor] = field(default_factory=list)
    tensor_update_norms: list[Tensor] = field(default_factory=list)
    _before: list[Tensor] = field(default_factory=list)

    def before_step(self) -> None:
        """Read the gradients (and copy the parameters) the step is about to use."""
        optimizer = self.optimizer
        self.lr = float(optimizer.param_groups[0]["lr"])
        self.params = [
            p for group in optimizer.param_groups for p in group["params"] if p.grad is not None
        ]
        if not self.params:
            return
        grads = [p.grad for p in self.params if p.grad is not None]
        if self.per_tensor:
            self.tensor_grad_norms = [n.sqrt() for n in per_tensor_squared_norms(grads)]
        if not isinstance(optimizer, SNGM):
            self.grad_norm = global_squared_norm(grads).sqrt()
        if self.update_norm:
            self._before = [p.detach().clone() for p in self.params]

    def after_step(self) -> None:
        """Measure the step the optimizer took."""
        self.ran = True
        optimizer = self.optimizer
        if isinstance(optimizer, SNGM):
            self.grad_norm = optimizer.last_grad_norm
        if not self._before:
            return
        updates = [p.detach() - b for p, b in zip(self.params, self._before, strict=True)]
        self._before = []
        self.step_norm = global_squared_norm(updates, norm_group(optimizer)).sqrt()
        if self.per_tensor:
            self.tensor_update_norms = [n.sqrt() for n in per_tensor_squared_norms(updates)]

    def metrics(
        self,
        prefix: str,
        tensor_names: dict[int, str] | None = None,
        extra_skipped_steps: int = 0,
        lr: bool = True,
    ) -> dict[str, float | Tensor]:
        """The measured values, named `prefix + name`.

        Args:
            prefix: Prefix of every name, e.g. `"sngm/"`.
            tensor_names: The name of each parameter by `id`, for the per-tensor norms
                (`grad_norm/<name>`, `update_norm/<name>`).
            extra_skipped_steps: Skipped steps counted outside the optimizer.
            lr: Include `lr` (leave it out where the framework logs it already).
        """
        optimizer = self.optimizer
        skipped = extra_skipped_steps
        if isinstance(optimizer, SNGM):
            skipped += optimizer.skipped_steps
        metrics: dict[str, float | Tensor] = {f"{prefix}skipped_steps": float(skipped)}
        if not self.ran:
            return metrics
        if lr:
            metrics[f"{prefix}lr"] = self.lr
        if self.grad_norm is not None:
            metrics[f"{prefix}grad_norm"] = self.grad_norm
            if isinstance(optimizer, SNGM):
                eps = optimizer.param_groups[0]["eps"]
                finite = torch.isfinite(self.grad_norm)
                effective = self.lr / self.grad_norm.clamp(min=eps)
                metrics[f"{prefix}effective_lr"] = torch.where(
                    finite, effective, torch.zeros_like(effective)
                )
        if self.step_norm is not None:
            metrics[f"{prefix}update_norm"] = self.step_norm
        names = tensor_names or {}
        for kind, norms in (
            ("grad_norm", self.tensor_grad_norms),
            ("update_norm", self.tensor_update_norms),
        ):
            for p, norm in zip(self.params, norms, strict=False):
                name = names.get(id(p), f"param_{id(p)}")
                metrics[f"{prefix}{kind}/{name}"] = norm
        return metrics


def noise_scale_metrics(meter: GradientNoiseScaleMeter, prefix: str) -> dict[str, Tensor]:
    """`noise_scale` (`B_simple`, in examples) and what it came from, named `prefix + name`.

    `noise_scale/small_batch_sq_norm` and `noise_scale/big_batch_sq_norm` are the last
    measured step's `|G_b|²` and `|G_B|²`; `noise_scale/trace_sigma` and
    `noise_scale/grad_sq` the running averages of `tr Σ` and `|G|²` whose ratio
    `noise_scale` is. Empty before the first measured step.
    """
    estimator = meter.estimator
    if (
        meter.small_sq is None
        or meter.big_sq is None
        or estimator.noise_scale is None
        or estimator.trace_sigma is None
        or estimator.true_grad_sq is None
    ):
        return {}
    return {
        f"{prefix}noise_scale": estimator.noise_scale,
        f"{prefix}noise_scale/small_batch_sq_norm": meter.small_sq,
        f"{prefix}noise_scale/big_batch_sq_norm": meter.big_sq,
        f"{prefix}noise_scale/trace_sigma": estimator.trace_sigma,
        f"{prefix}noise_scale/grad_sq": estimator.true_grad_sq,
    }
