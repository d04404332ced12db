"""SNGM's class and keyword arguments for a `Trainer`, from its `TrainingArguments`."""

from __future__ import annotations

import threading
import warnings
from typing import Any

from hf_trainer_optim.optim_args import check_sngm_options, parse_sngm_optim_args
from sngm_integrations import SNGM

__all__ = [
    "ADAMW_LIKE_LR",
    "LEARNING_RATE_GUIDE",
    "check_sngm_training_args",
    "get_sngm_cls_and_kwargs",
]

ADAMW_LIKE_LR = 1e-3
"""Learning rates below this look like AdamW rates (transformers' default is 5e-5)."""

LEARNING_RATE_GUIDE = (
    "https://github.com/sngm-integrations/sngm-integrations/blob/main/docs/learning-rate.md"
)

_warned_learning_rates: set[float] = set()
_warned_lock = threading.Lock()


def _warn_once_if_adamw_like(learning_rate: float) -> None:
    if learning_rate >= ADAMW_LIKE_LR:
        return
    with _warned_lock:
        if learning_rate in _warned_learning_rates:
            return
        _warned_learning_rates.add(learning_rate)
    warnings.warn(
        f"learning_rate={learning_rate:g} with optim='sngm' looks like an AdamW learning rate "
        "(transformers' default is 5e-05). An SNGM learning rate is a step length: every "
        f"step moves the weights by about lr * ||u||, whatever the gradient's size, so a rate "
        f"below {ADAMW_LIKE_LR:g} barely moves them (fine-tuning all-MiniLM-L6-v2 on movie "
        "reviews trained best at --learning_rate 0.1 of 0.05, 0.1, 0.2, 0.5); see the "
        "learning-rate guide: "
        f"{LEARNING_RATE_GUIDE}",
        UserWarning,
        stacklevel=3,
    )


def check_sngm_training_args(args: Any) -> dict[str, Any]:
    """Check the SNGM settings of `TrainingArguments`; return the parsed `optim_args`.

    Warns once per learning rate when `args.learning_rate` looks like an AdamW rate.

    Args:
        args: The Trainer's arguments (`TrainingArguments` or a subclass).

    Raises:
        ValueError: `args.optim_args` holds an unknown key or a bad or out-of-range value.
    """
    parsed = parse_sngm_optim_args(args.optim_args)
    _warn_once_if_adamw_like(args.learning_rate)
    return parsed


def get_sngm_cls_and_kwargs(args: Any, **options: Any) -> tuple[type[SNGM], dict[str, Any]]:
    """The optimizer class and keyword arguments for SNGM under `args`.

    `lr` comes from `args.learning_rate`, the rest from `args.optim_args` and then
    `options`. Weight decay is not a keyword here: `Trainer.create_optimizer` puts
    `args.weight_decay` (or 0 for biases and norm layers) into each parameter group,
    for `optim="sngm"` and for `Trainer(optimizer_cls_and_kwargs=...)` alike:

        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=train_dataset,
            optimizer_cls_and_kwargs=get_sngm_cls_and_kwargs(args, momentum=0.9),
        )

    Args:
        args: The Trainer's arguments.
        **options: SNGM keyword arguments (the keys of `ACCEPTED_OPTIM_ARGS`); they
            override the same keys of `args.optim_args`.

    Raises:
        ValueError: `args.optim_args` or `options` hold an unknown key or a bad value.
    """
    kwargs: dict[str, Any] = {"lr": args.learning_rate}
    kwargs.update(check_sngm_training_args(args))
    kwargs.update(check_sngm_options(options))
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
