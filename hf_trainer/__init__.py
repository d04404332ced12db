"""SNGM for the Hugging Face `Trainer`: `TrainingArguments(optim="sngm")`.

Importing this package registers the name (see `register`):

    import hf_trainer  # noqa: F401  (registers optim="sngm")
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        "out", optim="sngm", optim_args="momentum=0.9", learning_rate=0.5, max_grad_norm=0
    )
    Trainer(model=model, args=args, train_dataset=train_dataset).train()

Unmodified scripts that parse `TrainingArguments` run with the name registered through
`python -m hf_trainer SCRIPT ARGS...` (see `hf_trainer.__main__`). To use SNGM without
registering anything, pass `hf_trainer_optim.get_sngm_cls_and_kwargs(args)` to
`Trainer(optimizer_cls_and_kwargs=...)` and do not import this package.
"""

from hf_trainer.callback import SNGMMonitorCallback, add_sngm_monitor
from hf_trainer.comm_hook import AllreduceNormsCallback, add_allreduce_norms
from hf_trainer.registration import OPTIM_NAME, is_registered, register, sngm_optimizer_name
from hf_trainer_optim import ACCEPTED_OPTIM_ARGS, get_sngm_cls_and_kwargs, parse_sngm_optim_args

__all__ = [
    "ACCEPTED_OPTIM_ARGS",
    "OPTIM_NAME",
    "AllreduceNormsCallback",
    "SNGMMonitorCallback",
    "add_allreduce_norms",
    "add_sngm_monitor",
    "get_sngm_cls_and_kwargs",
    "is_registered",
    "parse_sngm_optim_args",
    "register",
    "sngm_optimizer_name",
]

register()
