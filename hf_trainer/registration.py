"""Registering ``optim="sngm"`` with the Hugging Face ``Trainer``.

Two things in ``transformers`` decide which optimizers exist:

* ``transformers.training_args.OptimizerNames``, the Enum that ``TrainingArguments``
  converts ``optim`` to (an unknown name is a ``ValueError``) and that
  ``HfArgumentParser`` builds its ``--optim`` choices from;
* ``Trainer.get_optimizer_cls_and_kwargs(args, model)``, a staticmethod that maps the
  name to a class and keyword arguments (a handler table in transformers 5.2+, an if/elif
  chain before).

`register` adds the member ``OptimizerNames.SNGM = "sngm"`` and wraps the lookup:
``"sngm"`` gives `sngm_integrations.SNGM`; every other name goes to the original,
whichever of the two designs it uses.
"""

from __future__ import annotations

import functools
import threading
import warnings
from typing import Any

from transformers import Trainer, TrainingArguments
from transformers.training_args import OptimizerNames

from hf_trainer._enum import add_str_enum_member
from hf_trainer.optim_args import parse_sngm_optim_args
from sngm_integrations import SNGM

__all__ = ["OPTIM_NAME", "get_sngm_cls_and_kwargs", "is_registered", "register"]

OPTIM_NAME = "sngm"
"""The value of ``TrainingArguments.optim`` that selects SNGM."""

_MEMBER_NAME = "SNGM"
_WRAPPED_MARKER = "__sngm_wraps__"
_lock = threading.Lock()


def get_sngm_cls_and_kwargs(args: TrainingArguments) -> tuple[type[SNGM], dict[str, Any]]:
    """The optimizer class and keyword arguments for ``optim="sngm"``.

    ``lr`` comes from ``args.learning_rate`` and the rest from ``args.optim_args``; weight
    decay is not a keyword here because ``Trainer.create_optimizer`` puts
    ``args.weight_decay`` (or 0 for biases and norm layers) into each parameter group.

    Args:
        args: The Trainer's arguments.

    Raises:
        ValueError: ``args.optim_args`` holds an unknown key or a bad value.
    """
    kwargs: dict[str, Any] = {"lr": args.learning_rate}
    kwargs.update(parse_sngm_optim_args(args.optim_args))
    if args.max_grad_norm is not None and args.max_grad_norm > 0:
        warnings.warn(
            f"max_grad_norm={args.max_grad_norm} clips gradients that SNGM then divides by "
            "their norm: the clipping changes no step (except for how gradients weigh "
            "against weight_decay, which SNGM adds before normalizing) and costs an extra "
            "pass over the gradients. Set max_grad_norm=0 (--max_grad_norm 0) with "
            "optim='sngm'.",
            UserWarning,
            stacklevel=2,
        )
    return SNGM, kwargs


def _wrap_optimizer_lookup(original: Any) -> Any:
    @functools.wraps(original)
    def get_optimizer_cls_and_kwargs(
        args: TrainingArguments, model: Any = None
    ) -> tuple[Any, dict[str, Any]]:
        if args.optim == OPTIM_NAME:
            return get_sngm_cls_and_kwargs(args)
        return original(args, model)

    setattr(get_optimizer_cls_and_kwargs, _WRAPPED_MARKER, original)
    return get_optimizer_cls_and_kwargs


def is_registered() -> bool:
    """Whether ``"sngm"`` is a known optimizer name and the Trainer maps it to SNGM."""
    lookup = Trainer.__dict__["get_optimizer_cls_and_kwargs"].__func__
    return OPTIM_NAME in OptimizerNames._value2member_map_ and hasattr(lookup, _WRAPPED_MARKER)


def register() -> None:
    """Make ``TrainingArguments(optim="sngm")`` select `sngm_integrations.SNGM`.

    Runs when ``hf_trainer`` is imported. Safe to call again, from any thread, and after
    ``importlib.reload(hf_trainer)``: the Enum member is added once and the lookup is
    wrapped once (the checks look at ``transformers`` itself, not at a flag here).

    Register before building ``TrainingArguments`` or an ``HfArgumentParser`` (whose
    ``--optim`` choices are fixed when it is built), and before unpickling a
    ``training_args.bin`` that holds ``optim="sngm"``.
    """
    with _lock:
        add_str_enum_member(OptimizerNames, _MEMBER_NAME, OPTIM_NAME)
        current = Trainer.__dict__["get_optimizer_cls_and_kwargs"]
        if not hasattr(current.__func__, _WRAPPED_MARKER):
            Trainer.get_optimizer_cls_and_kwargs = staticmethod(  # type: ignore[method-assign]
                _wrap_optimizer_lookup(current.__func__)
            )
