"""SNGM's optimizer class and keyword arguments for the Hugging Face `Trainer`, unpatched.

Importing this package changes nothing in `transformers`. The pair it builds goes to
`Trainer(optimizer_cls_and_kwargs=...)` (transformers 4.47 and later), with the same
weight-decay parameter groups and `optim_args` parsing as `optim="sngm"`:

    from hf_trainer_optim import get_sngm_cls_and_kwargs
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments("out", learning_rate=0.1, max_grad_norm=0)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        optimizer_cls_and_kwargs=get_sngm_cls_and_kwargs(args, momentum=0.9),
    )

`hf_trainer` uses the same functions for `TrainingArguments(optim="sngm")`.
"""

from hf_trainer_optim.optim_args import (
    ACCEPTED_OPTIM_ARGS,
    accepted_keys_text,
    check_sngm_options,
    parse_sngm_optim_args,
)
from hf_trainer_optim.trainer_kwargs import (
    ADAMW_LIKE_LR,
    LEARNING_RATE_GUIDE,
    check_sngm_training_args,
    get_sngm_cls_and_kwargs,
)

__all__ = [
    "ACCEPTED_OPTIM_ARGS",
    "ADAMW_LIKE_LR",
    "LEARNING_RATE_GUIDE",
    "accepted_keys_text",
    "check_sngm_options",
    "check_sngm_training_args",
    "get_sngm_cls_and_kwargs",
    "parse_sngm_optim_args",
]
