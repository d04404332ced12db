"""A Trainer callback that logs what SNGM did, for watching large-batch runs."""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from sngm_integrations import SNGM
from sngm_integrations.distributed import global_squared_norm
from sngm_integrations.sharding import norm_group

__all__ = ["SNGMMonitorCallback", "add_sngm_monitor"]

PREFIX = "sngm/"


def _unwrap_sngm(optimizer: Any) -> SNGM | None:
    """The SNGM inside Accelerate's (or another) optimizer wrapper, or None."""
    while optimizer is not None and not isinstance(optimizer, SNGM):
        optimizer = getattr(optimizer, "optimizer", None)
    return optimizer


class SNGMMonitorCallback(TrainerCallback):
    """Adds SNGM's own measurements to every training log of the Trainer.

    At each logging step, for the optimizer step just taken, it adds:

    * ``sngm/grad_norm``: the global norm :math:`\\lVert d\\rVert` SNGM divided by (the
      gradient with weight decay folded in; ``inf`` or ``nan`` for a skipped step). The
      Trainer's own ``grad_norm`` is the norm before clipping and is absent with
      ``max_grad_norm=0``.
    * ``sngm/update_norm``: the length of the step, :math:`\\lVert \\eta\\, u\\rVert`
      (0 for a skipped step). Logged for ``nesterov=False`` (the paper's SNGM), where it is
      exactly the change of the weights.
    * ``sngm/effective_lr``: :math:`\\eta / \\lVert d\\rVert`, the learning rate momentum
      SGD would need on the raw gradient for the same step (0 for a skipped step).
    * ``sngm/skipped_steps``: steps skipped so far because the gradient norm was not finite.

    The values go into ``trainer.state.log_history`` and to every logger that runs after
    this callback. The reporting callbacks (TensorBoard, ...) are added by the Trainer
    before the ones passed in ``callbacks=[...]``, so use `add_sngm_monitor` to get
    the values into TensorBoard as well.

    Reading the values synchronises the host with the device once per logging step; the
    optimizer steps in between are untouched.
    """

    def __init__(self) -> None:
        self._step_lrs: list[float] = []
        self._warned_not_sngm = False

    def on_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Remember the learning rates of the step (the scheduler changes them next)."""
        optimizer = _unwrap_sngm(kwargs.get("optimizer"))
        if optimizer is not None:
            self._step_lrs = [float(group["lr"]) for group in optimizer.param_groups]

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        """Add the SNGM measurements to a training log (one with a ``loss``)."""
        if logs is None or "loss" not in logs:
            return
        optimizer = _unwrap_sngm(kwargs.get("optimizer"))
        if optimizer is None:
            if not self._warned_not_sngm:
                warnings.warn(
                    "SNGMMonitorCallback: the Trainer's optimizer is not SNGM "
                    f"(optim={args.optim!r}); nothing is logged",
                    UserWarning,
                    stacklevel=2,
                )
                self._warned_not_sngm = True
            return
        if optimizer.last_grad_norm is None or not self._step_lrs:
            return
        measurements = self.measure(optimizer, self._step_lrs)
        logs.update(measurements)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            # Trainer.log appends a copy of the logs before the callbacks run.
            state.log_history[-1].update(measurements)

    @staticmethod
    def measure(optimizer: SNGM, step_lrs: list[float]) -> dict[str, float]:
        """The ``sngm/*`` values of ``optimizer``'s last step, taken with ``step_lrs``.

        Args:
            optimizer: An SNGM that has taken at least one step.
            step_lrs: The learning rate of each parameter group in that step.
        """
        assert optimizer.last_grad_norm is not None
        grad_norm = float(optimizer.last_grad_norm)
        skipped = not math.isfinite(grad_norm)
        groups = optimizer.param_groups
        eps = groups[0]["eps"]
        measurements = {
            PREFIX + "grad_norm": grad_norm,
            PREFIX + "effective_lr": 0.0 if skipped else step_lrs[0] / max(grad_norm, eps),
            PREFIX + "skipped_steps": float(optimizer.skipped_steps),
        }
        if not any(group["nesterov"] for group in groups):
            measurements[PREFIX + "update_norm"] = (
                0.0 if skipped else _momentum_step_norm(optimizer, step_lrs)
            )
        return measurements


def _momentum_step_norm(optimizer: SNGM, step_lrs: list[float]) -> float:
    """:math:`\\lVert \\eta\\,u \\rVert` over all groups, each with its own learning rate."""
    squared = torch.zeros((), dtype=torch.float64)
    for group, lr in zip(optimizer.param_groups, step_lrs, strict=True):
        buffers = [
            optimizer.state[p]["momentum_buffer"]
            for p in group["params"]
            if "momentum_buffer" in optimizer.state.get(p, {})
        ]
        if buffers:
            group_squared = global_squared_norm(buffers, norm_group(optimizer))
            squared += lr**2 * group_squared.double().cpu()
    return math.sqrt(float(squared))


def add_sngm_monitor(trainer: Trainer) -> SNGMMonitorCallback:
    """Add a `SNGMMonitorCallback` to ``trainer`` ahead of its reporting callbacks.

    Placed first, the callback adds its values to the logs before TensorBoard, Weights &
    Biases and the console printer see them.

    Args:
        trainer: The Trainer to monitor.

    Returns:
        The callback that was added.
    """
    callback = SNGMMonitorCallback()
    trainer.callback_handler.callbacks.insert(0, callback)
    return callback
