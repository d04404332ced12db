"""SNGM as a named optimizer of timm: `create_optimizer_v2(model, opt="sngm", ...)`.

Importing this package registers the name in timm's default optimizer registry (see
`register`):

    import timm
    import timm_optim  # noqa: F401  (registers opt="sngm")
    from timm.optim import create_optimizer_v2

    model = timm.create_model("resnet18")
    optimizer = create_optimizer_v2(model, opt="sngm", lr=0.5, weight_decay=5e-5)

timm's factory puts biases and normalization weights (every 1-d parameter, and the names
in `model.no_weight_decay()`) into a group without weight decay, sets `momentum=0.9`
unless given, and passes `eps` (`--opt-eps`) and `foreach` through. The name also
works with timm's prefixes, such as `opt="lookahead_sngm"`.

timm's `train.py` builds its optimizer in its own process, so the name must be
registered there: run it through a launcher that imports this package first (see the
timm page of the documentation).
"""

from __future__ import annotations

import threading

from timm.optim import OptimInfo, get_optimizer_info, list_optimizers
from timm.optim._optim_factory import default_registry

from sngm_integrations import SNGM

__all__ = ["OPT_NAME", "SNGM_OPTIM_INFO", "is_registered", "register"]

OPT_NAME = "sngm"
"""The value of timm's `opt` (`--opt`) that selects SNGM."""

SNGM_OPTIM_INFO = OptimInfo(
    name=OPT_NAME,
    opt_class=SNGM,
    description="SNGM: momentum SGD on the gradient divided by its global norm (large batches)",
    has_eps=True,
    has_momentum=True,
)
"""SNGM's entry in timm's optimizer registry."""

_lock = threading.Lock()


def is_registered() -> bool:
    """Whether timm's default registry maps `"sngm"` to `sngm_integrations.SNGM`."""
    return OPT_NAME in list_optimizers() and get_optimizer_info(OPT_NAME).opt_class is SNGM


def register() -> None:
    """Add `"sngm"` to timm's default optimizer registry; safe to call again.

    Runs when `timm_optim` is imported.
    """
    with _lock:
        if not is_registered():
            default_registry.register(SNGM_OPTIM_INFO)


register()
