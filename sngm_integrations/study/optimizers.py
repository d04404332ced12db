"""The optimizers the study compares, each as the field uses it.

MSGD is `torch.optim.SGD`; LARS is timm's `timm.optim.Lars` (trust coefficient 0.001,
You et al., 2017) with its parameters grouped as timm's `create_optimizer_v2` groups
them, so 1-d tensors (BatchNorm, biases) are neither trust-ratio adapted nor decayed;
SNGM is the paper's (one global norm over all parameters, weight decay folded into the
gradient). All three get the same weight-decay groups, momentum and schedule; only the
learning rate is tuned per optimizer.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch.optim import Optimizer

from sngm_integrations.sngm import SNGM

__all__ = [
    "ADAMW_WEIGHT_DECAY",
    "LARS_TRUST_COEFFICIENT",
    "build_optimizer",
    "weight_decay_groups",
]

# LARS (You et al., 2017) scales each layer's step by trust_coefficient * ||w|| / ||g||;
# 0.001 is the paper's and timm's default.
LARS_TRUST_COEFFICIENT = 1e-3
# AdamW's decay is decoupled from the gradient, so the L2 strength the others share does
# not carry over; 0.05 is a common choice for vision models.
ADAMW_WEIGHT_DECAY = 0.05


def weight_decay_groups(
    params: Iterable[torch.nn.Parameter], weight_decay: float, decay_norm_and_bias: bool
) -> list[dict[str, Any]]:
    """Parameter groups: tensors of 2 or more dims decayed, 1-d tensors (norms, biases) not.

    With `decay_norm_and_bias` every tensor is decayed (one group).
    """
    params = [p for p in params if p.requires_grad]
    if decay_norm_and_bias:
        return [{"params": params, "weight_decay": weight_decay}]
    return [
        {"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
    ]


def build_optimizer(
    name: str,
    params: Iterable[torch.nn.Parameter],
    lr: float,
    momentum: float,
    weight_decay: float,
    decay_norm_and_bias: bool = False,
) -> Optimizer:
    """Make optimizer `name` (`msgd`, `lars`, `sngm` or `adamw`).

    Args:
        name: Which optimizer.
        params: The model's parameters.
        lr: Learning rate.
        momentum: Momentum factor (AdamW uses it as `beta1`).
        weight_decay: L2 penalty, folded into the gradient (AdamW uses `ADAMW_WEIGHT_DECAY`
            instead, decoupled).
        decay_norm_and_bias: Decay (and, for LARS, adapt) 1-d tensors too, as timm's
            `Lars` built on all parameters does; off by default, as the field uses them.
    """
    if name == "adamw":
        groups = weight_decay_groups(params, ADAMW_WEIGHT_DECAY, decay_norm_and_bias)
        return torch.optim.AdamW(groups, lr=lr, betas=(momentum, 0.999))
    groups = weight_decay_groups(params, weight_decay, decay_norm_and_bias)
    if name == "msgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    if name == "sngm":
        return SNGM(groups, lr=lr, momentum=momentum)
    if name == "lars":
        from timm.optim.lars import Lars

        # timm adapts a group only if it is decayed or has always_adapt: the first group
        # (the decayed tensors) is adapted even at weight_decay 0, the 1-d group is not.
        for group in groups:
            group["always_adapt"] = group is groups[0]
        return Lars(groups, lr=lr, momentum=momentum, trust_coeff=LARS_TRUST_COEFFICIENT)
    raise ValueError(f"Invalid optimizer: optimizer={name!r} (choose msgd, lars, sngm or adamw)")
