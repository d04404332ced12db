"""A Trainer callback that logs what the optimizer did and the gradient noise scale."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch.optim import Optimizer
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import IntervalStrategy

from sngm_integrations.monitoring import StepMeasurement, innermost_optimizer, noise_scale_metrics
from sngm_integrations.noise_scale import GradientNoiseScaleMeter

__all__ = ["SNGMMonitorCallback", "add_sngm_monitor"]

PREFIX = "sngm/"


class SNGMMonitorCallback(TrainerCallback):
    """Adds the optimizer's step measurements and the noise scale to the Trainer's logs.

    At each logging step, for the optimizer step just taken, it adds (defined in
    `sngm_integrations.monitoring`, the same as Lightning's `SNGMMonitor`):

    * `sngm/grad_norm`: for SNGM, the global norm `||d||` it divided by (the gradient
      with weight decay folded in; `inf` or `nan` for a skipped step); for another
      optimizer, the norm of the gradient before the step. The Trainer's own `grad_norm`
      is the norm before clipping and is absent with `max_grad_norm=0`.
    * `sngm/update_norm`: `||w_{t+1} - w_t||`, the step taken (one copy of the parameters
      on each logged step).
    * `sngm/effective_lr` (SNGM): `lr / ||d||`, the learning rate momentum SGD would need
      on the raw gradient for the same step (0 for a skipped step).
    * `sngm/skipped_steps` (SNGM): steps skipped because the gradient norm was not finite.
    * `sngm/noise_scale`: the gradient noise scale `B_simple = tr(Σ)/|G|²` in examples
      (see `sngm_integrations.noise_scale`), with `sngm/noise_scale/small_batch_sq_norm`,
      `.../big_batch_sq_norm`, `.../trace_sigma` and `.../grad_sq`; measured from the
      micro-batches (`gradient_accumulation_steps > 1`) and the processes of a
      distributed run, absent with one of each. Compare it with the global batch
      `per_device_train_batch_size * gradient_accumulation_steps * world_size`. With
      `max_grad_norm > 0` it is measured after clipping, which biases it when clipping
      acts.

    The learning rate is the Trainer's own `learning_rate`. Works with any optimizer.

    The values go into `trainer.state.log_history` and to every logger that runs after
    this callback. The reporting callbacks (TensorBoard, ...) are added by the Trainer
    before the ones passed in `callbacks=[...]`, so use `add_sngm_monitor` to get the
    values into TensorBoard as well.

    Only the steps that are logged are measured; on them reading the values synchronises
    the host with the device once. Other steps cost one Python call per parameter and
    backward pass (the noise-scale hook returning).

    Args:
        noise_scale: Measure the gradient noise scale.
        noise_scale_ema_decay: Weight of the past in the noise scale's running averages,
            per logged step.
    """

    def __init__(self, noise_scale: bool = True, noise_scale_ema_decay: float = 0.95) -> None:
        self.noise_scale = noise_scale
        self.noise_scale_ema_decay = noise_scale_ema_decay
        self.meter: GradientNoiseScaleMeter | None = None
        self._record: StepMeasurement | None = None

    @staticmethod
    def _logs_step(args: TrainingArguments, state: TrainerState, step: int) -> bool:
        """Whether the Trainer logs after optimizer step number `step` (from 1)."""
        if args.logging_strategy == IntervalStrategy.NO:
            return False
        if args.logging_strategy != IntervalStrategy.STEPS:
            return True
        if step == 1 and args.logging_first_step:
            return True
        return bool(state.logging_steps) and step % int(state.logging_steps) == 0

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        model = kwargs.get("model")
        batches = args.gradient_accumulation_steps * args.world_size
        if not self.noise_scale or model is None or batches < 2 or self.meter is not None:
            return
        self.meter = GradientNoiseScaleMeter(
            model.parameters(), ema_decay=self.noise_scale_ema_decay
        )
        if args.max_grad_norm:
            warnings.warn(
                f"SNGMMonitorCallback: max_grad_norm={args.max_grad_norm} clips the gradient "
                "before the noise scale reads it, which biases the noise scale when clipping "
                "acts; set max_grad_norm=0 for an unbiased measurement",
                UserWarning,
                stacklevel=2,
            )

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.meter is not None:
            self.meter.remove()
            self.meter = None

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.meter is not None and self._logs_step(args, state, state.global_step + 1):
            self.meter.arm()

    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Read the gradients of a step that will be logged, before it is taken."""
        wrapped: Optimizer | None = kwargs.get("optimizer")
        if wrapped is None or not self._logs_step(args, state, state.global_step + 1):
            self._record = None
            return
        self._record = StepMeasurement(innermost_optimizer(wrapped))
        self._record.before_step()
        if self.meter is not None:
            self.meter.measure(args.per_device_train_batch_size, _unscaled_by(wrapped, args))

    def on_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self._record is not None:
            self._record.after_step()

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        """Add the measurements to a training log (one with a `loss`)."""
        record, self._record = self._record, None
        if logs is None or "loss" not in logs or record is None or not record.ran:
            return
        metrics = record.metrics(PREFIX, lr=False)
        if self.meter is not None:
            metrics.update(noise_scale_metrics(self.meter, PREFIX))
        measurements = {name: float(value) for name, value in metrics.items()}
        logs.update(measurements)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            # Trainer.log appends a copy of the logs before the callbacks run.
            state.log_history[-1].update(measurements)


def _unscaled_by(optimizer: Optimizer, args: TrainingArguments) -> float:
    """The AMP loss scale the hooked micro-batch gradients carry and `.grad` no longer does.

    Accelerate's `clip_grad_norm_` unscales `.grad` before the step: the Trainer calls it
    when it clips, and, in the versions that log the norm without clipping
    (`Trainer._get_grad_norm`), on every step.
    """
    scaler: torch.amp.GradScaler | None = getattr(optimizer, "scaler", None)
    if scaler is None or not (args.max_grad_norm or hasattr(Trainer, "_get_grad_norm")):
        return 1.0
    return float(scaler.get_scale())


def add_sngm_monitor(trainer: Trainer, **kwargs: Any) -> SNGMMonitorCallback:
    """Add a `SNGMMonitorCallback` to `trainer` ahead of its reporting callbacks.

    Placed first, the callback adds its values to the logs before TensorBoard, Weights &
    Biases and the console printer see them.

    Args:
        trainer: The Trainer to monitor.
        **kwargs: Passed to `SNGMMonitorCallback`.

    Returns:
        The callback that was added.
    """
    callback = SNGMMonitorCallback(**kwargs)
    trainer.callback_handler.callbacks.insert(0, callback)
    return callback
