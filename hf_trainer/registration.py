"""Registering `optim="sngm"` with the Hugging Face `Trainer`.

Three things in `transformers` decide which optimizers exist and when they are checked:

* `transformers.training_args.OptimizerNames`, the Enum that `TrainingArguments`
  converts `optim` to (an unknown name is a `ValueError`) and that
  `HfArgumentParser` builds its `--optim` choices from;
* `TrainingArguments.__post_init__`, which checks the arguments when they are built;
* `Trainer.get_optimizer_cls_and_kwargs(args, model)`, a staticmethod that maps the
  name to a class and keyword arguments (a handler table in transformers 5.2+, an if/elif
  chain before).

`register` adds the member `OptimizerNames.SNGM = "sngm"`, makes `__post_init__`
check SNGM's `optim_args` and learning rate as soon as `optim="sngm"` arguments are
built, and wraps the lookup: `"sngm"` gives `sngm_integrations.SNGM`; every other name
goes to the original, whichever of the two designs it uses.

The member pickles as a call to `sngm_optimizer_name`, so unpickling a
`training_args.bin` that holds `optim="sngm"` imports `hf_trainer` (registering
the name) instead of failing with "sngm is not a valid OptimizerNames".
"""

from __future__ import annotations

import functools
import threading
from enum import Enum
from typing import Any

from transformers import Trainer, TrainingArguments
from transformers.training_args import OptimizerNames

from hf_trainer._enum import add_str_enum_member
from hf_trainer_optim import check_sngm_training_args, get_sngm_cls_and_kwargs

__all__ = ["OPTIM_NAME", "is_registered", "register", "sngm_optimizer_name"]

OPTIM_NAME = "sngm"
"""The value of `TrainingArguments.optim` that selects SNGM."""

_MEMBER_NAME = "SNGM"
_WRAPPED_MARKER = "__sngm_wraps__"
_lock = threading.Lock()


def sngm_optimizer_name() -> Enum:
    """`OptimizerNames.SNGM`, registered first if need be (what its pickle calls)."""
    register()
    return OptimizerNames(OPTIM_NAME)


def _reduce_sngm_member(protocol: int) -> tuple[Any, tuple[()]]:
    return sngm_optimizer_name, ()


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


def _wrap_post_init(original: Any) -> Any:
    @functools.wraps(original)
    def __post_init__(self: TrainingArguments) -> None:
        original(self)
        if self.optim == OPTIM_NAME:
            check_sngm_training_args(self)

    setattr(__post_init__, _WRAPPED_MARKER, original)
    return __post_init__


def is_registered() -> bool:
    """Whether `"sngm"` is a known optimizer name and the Trainer maps it to SNGM."""
    lookup = Trainer.__dict__["get_optimizer_cls_and_kwargs"].__func__
    return OPTIM_NAME in OptimizerNames._value2member_map_ and hasattr(lookup, _WRAPPED_MARKER)


def register() -> None:
    """Make `TrainingArguments(optim="sngm")` select `sngm_integrations.SNGM`.

    Runs when `hf_trainer` is imported. Safe to call again, from any thread, and after
    `importlib.reload(hf_trainer)`: the Enum member is added once and the lookup is
    wrapped once (the checks look at `transformers` itself, not at a flag here).

    Register before building `TrainingArguments` or an `HfArgumentParser` (whose
    `--optim` choices are fixed when it is built). A `training_args.bin` written with
    the name registered registers it again when it is unpickled.
    """
    with _lock:
        member = add_str_enum_member(OptimizerNames, _MEMBER_NAME, OPTIM_NAME)
        # pickle and copy look __reduce_ex__ up on the member itself first.
        member.__reduce_ex__ = _reduce_sngm_member  # type: ignore[method-assign,assignment]
        current = Trainer.__dict__["get_optimizer_cls_and_kwargs"]
        if not hasattr(current.__func__, _WRAPPED_MARKER):
            Trainer.get_optimizer_cls_and_kwargs = staticmethod(  # type: ignore[method-assign]
                _wrap_optimizer_lookup(current.__func__)
            )
        post_init = TrainingArguments.__dict__["__post_init__"]
        if not hasattr(post_init, _WRAPPED_MARKER):
            TrainingArguments.__post_init__ = _wrap_post_init(post_init)  # type: ignore[method-assign]
