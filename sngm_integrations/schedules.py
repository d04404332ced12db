"""Learning-rate warmup, decay and batch-size scaling for large-batch training.

Large batches mean few optimizer steps, so schedules here are sized in optimizer steps,
not epochs. Every integration (Lightning, Accelerate, the study) builds on these.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

__all__ = [
    "SCALING_RULES",
    "SCHEDULES",
    "WarmupDecay",
    "check_scaling_rule",
    "check_schedule",
    "scale_lr",
    "warmup_decay_schedule",
]

SCHEDULES = ("constant", "cosine", "linear", "poly")
SCALING_RULES = ("none", "linear", "sqrt")


def check_schedule(schedule: str, argument: str = "schedule") -> None:
    """Raise a ValueError naming ``argument`` unless ``schedule`` is one of `SCHEDULES`."""
    if schedule not in SCHEDULES:
        raise ValueError(f"Invalid {argument}: {argument}={schedule!r} (choose one of {SCHEDULES})")


def check_scaling_rule(rule: str, argument: str = "rule") -> None:
    """Raise a ValueError naming ``argument`` unless ``rule`` is one of `SCALING_RULES`."""
    if rule not in SCALING_RULES:
        raise ValueError(f"Invalid {argument}: {argument}={rule!r} (choose one of {SCALING_RULES})")


@dataclass(frozen=True)
class WarmupDecay:
    """Multiplier of the base learning rate at optimizer step ``step``.

    Linear warmup from ``1/warmup_steps`` to 1 over ``warmup_steps`` steps, then one of:
    ``constant`` (stays 1), ``cosine`` (half cosine), ``linear`` or ``poly``
    (``(1 - progress) ** power``), each ending at ``final_fraction`` after ``total_steps``.
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


def warmup_decay_schedule(
    optimizer: Optimizer,
    total_steps: int,
    warmup_steps: int = 0,
    schedule: str = "cosine",
    *,
    power: float = 2.0,
    final_fraction: float = 0.0,
) -> LambdaLR:
    """A ``LambdaLR`` with linear warmup and the chosen decay, stepped once per optimizer step."""
    return LambdaLR(
        optimizer, WarmupDecay(total_steps, warmup_steps, schedule, power, final_fraction)
    )


def scale_lr(lr: float, batch_size: int, reference_batch_size: int, rule: str = "none") -> float:
    """Scale a learning rate tuned at ``reference_batch_size`` to ``batch_size``.

    ``linear`` multiplies by ``batch_size / reference_batch_size``, ``sqrt`` by its square
    root, ``none`` returns ``lr``. ``linear`` is the usual rule for MSGD. For SNGM, whose
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
