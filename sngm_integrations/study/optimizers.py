"""The optimizers the study compares, each the published implementation.

MSGD is ``torch.optim.SGD`` and LARS is timm's ``timm.optim.Lars``: baselines as people
use them, not re-implementations. All get the same momentum, weight decay (on every
parameter) and learning-rate schedule; only the learning rate is tuned per optimizer.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.optim import Optimizer

from sngm_integrations.sngm import SNGM

__all__ = ["ADAMW_WEIGHT_DECAY", "LARS_TRUST_COEFFICIENT", "build_optimizer"]

# LARS (You et al., 2017) scales each layer's step by trust_coefficient * ||w|| / ||g||;
# 0.001 is the paper's and timm's default.
LARS_TRUST_COEFFICIENT = 1e-3
# AdamW's decay is decoupled from the gradient, so the L2 strength the others share does
# not carry over; 0.05 is a common choice for vision models.
ADAMW_WEIGHT_DECAY = 0.05


def build_optimizer(
    name: str,
    params: Iterable[torch.nn.Parameter],
    lr: float,
    momentum: float,
    weight_decay: float,
) -> Optimizer:
    """Make optimizer ``name`` (``msgd``, ``lars``, ``sngm`` or ``adamw``).

    Args:
        name: Which optimizer.
        params: The model's parameters.
        lr: Learning rate.
        momentum: Momentum factor (AdamW uses it as ``beta1``).
        weight_decay: L2 penalty, folded into the gradient (ignored by AdamW, which uses
            `ADAMW_WEIGHT_DECAY`).
    """
    if name == "msgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "sngm":
        return SNGM(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "lars":
        from timm.optim.lars import Lars

        return Lars(
            params,
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            trust_coeff=LARS_TRUST_COEFFICIENT,
        )
    if name == "adamw":
        return torch.optim.AdamW(
            params, lr=lr, betas=(momentum, 0.999), weight_decay=ADAMW_WEIGHT_DECAY
        )
    raise ValueError(f"Invalid optimizer: optimizer={name!r} (choose msgd, lars, sngm or adamw)")
