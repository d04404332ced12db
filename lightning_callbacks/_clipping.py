"""The run-time warning about norm clipping, shared by the mixin and the monitor."""

from __future__ import annotations

import weakref

import lightning.pytorch as pl
from lightning.pytorch.utilities import GradClipAlgorithmType, rank_zero_warn
from torch.optim import Optimizer

from sngm_integrations import SNGM

# Trainers already warned, so that the mixin and the monitor together warn once per trainer.
_warned_trainers: weakref.WeakSet[pl.Trainer] = weakref.WeakSet()


def warn_if_norm_clipping(trainer: pl.Trainer, optimizer: Optimizer) -> None:
    """Warn once per trainer when `gradient_clip_val` clips by norm for an SNGM optimizer.

    SNGM divides the gradient by its norm, so multiplying the gradient by the clipping
    factor leaves the step unchanged; with weight decay it only shrinks the gradient
    relative to the decay term, which is rarely what clipping was meant to do.
    """
    if not isinstance(optimizer, SNGM) or trainer in _warned_trainers:
        return
    clip_val = trainer.gradient_clip_val
    algorithm = GradClipAlgorithmType(trainer.gradient_clip_algorithm or "norm")
    if not clip_val or algorithm != GradClipAlgorithmType.NORM:
        return
    _warned_trainers.add(trainer)
    rank_zero_warn(
        f"Trainer(gradient_clip_val={clip_val}) clips by norm, which does nothing for SNGM: "
        "SNGM divides the gradient by its norm, so every step already has length lr; with "
        "weight decay, clipping only shrinks the gradient relative to the decay term. Remove "
        "gradient_clip_val (gradient_clip_algorithm='value' does change the direction).",
        category=UserWarning,
    )
