"""Learning-rate warmup, decay and batch-size scaling for large-batch training.

Large batches mean few optimizer steps, so schedules here are sized in optimizer steps,
not epochs. Every integration (Lightning, Accelerate, the study) builds on these.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

__all__ = [
    "SCALING_RULES",
    "SCHEDULES",
    "WarmupDecay",
    "WarmupDecayLR",
    "check_scaling_rule",
    "check_schedule",
    "scale_lr",
    "warmup_decay_schedule",
]

SCHEDULES = ("constant", "cosine", "linear", "poly")
SCALING_RULES = ("none", "linear", "sqrt")


def check_schedule(schedule: str, argument: str = "schedule") -> None:
    """Raise a ValueError naming `argument` unless `schedule` is one of `SCHEDULES`."""
    if schedule not in SCHEDULES:
        raise ValueError(f"Invalid {argument}: {argument}={schedule!r} (choose one of {SCHEDULES})")


def check_scaling_rule(rule: str, argument: str = "rule") -> None:
    """Raise a ValueError naming `argument` unless `rule` is one of `SCALING_RULES`."""
    if rule not in SCALING_RULES:
        raise ValueError(f"Invalid {argument}: {argument}={rule!r} (choose one of {SCALING_RULES})")


@dataclass(frozen=True)
class WarmupDecay:
    """Multiplier of the base learning rate at optimizer step `step`.

    Linear warmup from `1/warmup_steps` to 1 over `warmup_steps` steps, then one of:
    `constant` (stays 1), `cosine` (half cosine), `linear` or `poly`
    (`(1 - progress) ** power`), each ending at `final_fraction` after `total_steps`.
    A picklable callable, so schedulers built on it can be saved and restored.
    """

    total_steps: int
    warmup_steps: int = 0
    schedule: str = "cosine"
    power: float = 2.0
    final_fraction: float = 0.0

    def __post_init__(self) -> None:
        check_schedule(self.schedule)
        if self.total_steps < 1:
            raise ValueError(f"Invalid total_steps: total_steps={self.total_steps} (must be >= 1)")
        if not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(
                f"Invalid warmup_steps: warmup_steps={self.warmup_steps} "
                f"(must be in [0, total_steps={self.total_steps}])"
            )
        if not 0.0 <= self.final_fraction <= 1.0:
            raise ValueError(
                f"Invalid final_fraction: final_fraction={self.final_fraction} (must be in [0, 1])"
            )
        if self.power <= 0:
            raise ValueError(f"Invalid power: power={self.power} (must be > 0)")

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        decay_steps = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        if self.schedule == "constant":
            remaining = 1.0
        elif self.schedule == "cosine":
            remaining = 0.5 * (1.0 + math.cos(math.pi * progress))
        elif self.schedule == "linear":
            remaining = 1.0 - progress
        else:
            remaining = (1.0 - progress) ** self.power
        return self.final_fraction + (1.0 - self.final_fraction) * remaining


class WarmupDecayLR(LRScheduler):
    """Linear warmup, then a decay, as a learning-rate scheduler stepped per optimizer step.

    Each group's lr is its base lr times `WarmupDecay` at the step count. Call `step()`
    after every optimizer step: `total_steps` and `warmup_steps` count calls to it.

    A group added to the optimizer later (`optimizer.add_param_group`, as Lightning's
    `BaseFinetuning` does when it unfreezes) joins the schedule where it stands: the lr
    it was added with is its lr at the current step, and from there it warms up and
    decays with the other groups. An lr that something else writes into a group between
    two steps is taken up the same way, and scheduled on from the value written.

    Under LightningCLI, `--lr_scheduler WarmupDecayLR` is stepped once per epoch, so its
    steps are epochs there; `lightning_callbacks.StepScheduleCLI` steps it per optimizer
    step.

    `load_state_dict` refuses the state of a different schedule (another `total_steps`,
    warmup or decay, or other base learning rates) with a ValueError: continuing it would
    run the saved schedule while the new run was configured for another.

    Args:
        optimizer: The optimizer whose learning rates are set.
        total_steps: Optimizer steps in the whole run (>= 1).
        warmup_steps: Steps of linear warmup, in `[0, total_steps]`.
        schedule: Decay after warmup: `constant`, `cosine`, `linear` or `poly`.
        power: Exponent of the `poly` decay.
        final_fraction: The lr at the end of the decay, as a fraction of the base lr.
        last_epoch: Index of the last step taken; `-1` starts the schedule.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        total_steps: int,
        warmup_steps: int = 0,
        schedule: str = "cosine",
        power: float = 2.0,
        final_fraction: float = 0.0,
        last_epoch: int = -1,
    ) -> None:
        self.multiplier = WarmupDecay(total_steps, warmup_steps, schedule, power, final_fraction)
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[Any]:
        """Each group's base lr times the multiplier at the current step."""
        previous_lrs = getattr(self, "_last_lr", None)
        # None on the first step, where LRScheduler has set every group's initial_lr.
        if previous_lrs is not None and (previous_factor := self.multiplier(self.last_epoch - 1)):
            for index, group in enumerate(self.optimizer.param_groups):
                if index >= len(previous_lrs) or group["lr"] != previous_lrs[index]:
                    group["initial_lr"] = group["lr"] / previous_factor
        factor = self.multiplier(self.last_epoch)
        return [group["initial_lr"] * factor for group in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        """The scheduler's state, with the schedule as a plain dict (loads with weights_only)."""
        state = super().state_dict()
        state["multiplier"] = asdict(self.multiplier)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue from a saved state; a ValueError if it was saved by another schedule."""
        saved = WarmupDecay(**state_dict["multiplier"])
        if not _same_multipliers(saved, self.multiplier) or state_dict["base_lrs"] != self.base_lrs:
            raise ValueError(
                f"Cannot continue a different learning-rate schedule: the saved state has "
                f"{saved} with base lrs {state_dict['base_lrs']}, this run has "
                f"{self.multiplier} with base lrs {self.base_lrs}. A schedule continues only "
                "the run it was sized for: another batch size, gradient accumulation, number "
                "of processes, run length or lr changes its length or its rate. Resume with "
                "the saved settings, or start a new run from the saved weights."
            )
        super().load_state_dict({**state_dict, "multiplier": self.multiplier})


def _same_multipliers(a: WarmupDecay, b: WarmupDecay) -> bool:
    """Whether two schedules give the same multiplier at every step."""
    if a.schedule == b.schedule == "constant":
        return a.warmup_steps == b.warmup_steps
    return a == b


def warmup_decay_schedule(
    optimizer: Optimizer,
    total_steps: int,
    warmup_steps: int = 0,
    schedule: str = "cosine",
    *,
    power: float = 2.0,
    final_fraction: float = 0.0,
) -> WarmupDecayLR:
    """A `WarmupDecayLR` with linear warmup and the chosen decay, stepped per optimizer step."""
    return WarmupDecayLR(optimizer, total_steps, warmup_steps, schedule, power, final_fraction)


def scale_lr(lr: float, batch_size: int, reference_batch_size: int, rule: str = "none") -> float:
    """Scale a learning rate tuned at `reference_batch_size` to `batch_size`.

    `linear` multiplies by `batch_size / reference_batch_size`, `sqrt` by its square
    root, `none` returns `lr`. `linear` is the usual rule for MSGD. For SNGM, whose
    step length does not grow with the gradient, no rule holds across models: measure
    (docs/learning-rate.md and docs/accelerate.md record runs where each helped).
    """
    check_scaling_rule(rule)
    if batch_size < 1 or reference_batch_size < 1:
        raise ValueError(
            f"batch sizes must be >= 1, got batch_size={batch_size}, "
            f"reference_batch_size={reference_batch_size}"
        )
    ratio = batch_size / reference_batch_size
    if rule == "linear":
        return lr * ratio
    if rule == "sqrt":
        return lr * math.sqrt(ratio)
    return lr
