"""A Trainer callback that all-reduces DDP gradients through `squared_norm_allreduce_hook`."""

from __future__ import annotations

from typing import Any

from torch.nn.parallel import DistributedDataParallel
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.utils import logging

from sngm_integrations import SNGM
from sngm_integrations.comm_hooks import BucketSquaredNorms, squared_norm_allreduce_hook
from sngm_integrations.monitoring import innermost_optimizer

__all__ = ["AllreduceNormsCallback", "add_allreduce_norms"]

logger = logging.get_logger(__name__)


def gradients_rewritten_by(trainer: Trainer) -> str | None:
    """What in this Trainer writes every gradient between the all-reduce and the step."""
    if trainer.args.max_grad_norm and trainer.args.max_grad_norm > 0:
        return f"max_grad_norm={trainer.args.max_grad_norm} clips them"
    if hasattr(Trainer, "_get_grad_norm"):
        return (
            "this transformers logs the gradient norm through clip_grad_norm_(max_norm=inf), "
            "which multiplies every gradient by 1"
        )
    return None


class AllreduceNormsCallback(TrainerCallback):
    """Registers `squared_norm_allreduce_hook` on the Trainer's DDP model as training begins.

    `norms` (a `BucketSquaredNorms`) then holds, after each synchronising backward pass,
    the squared norms of this process's gradient and of the all-reduced one. SNGM takes
    its norm from them (`SNGM(allreduce_norms=...)`) when the Trainer leaves the gradients
    as the all-reduce wrote them: with `max_grad_norm=0`, and in transformers releases
    that do not log the gradient norm through `clip_grad_norm_`; otherwise the callback
    says why not, once, and SNGM measures the norm itself. Without DDP (one process,
    FSDP, DeepSpeed) it logs that there is nothing to hook.

    Args:
        trainer: The Trainer whose wrapped model to hook (`trainer.model_wrapped`).
    """

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        self.norms = BucketSquaredNorms()
        self.hooked: DistributedDataParallel | None = None
        """The DDP model the hook is registered on (None before training begins)."""
        self.sngm: SNGM | None = None

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        model = self.trainer.model_wrapped
        if not isinstance(model, DistributedDataParallel):
            logger.warning(
                "AllreduceNormsCallback: the model is not wrapped in DistributedDataParallel "
                f"(got {type(model).__name__}): no all-reduce to measure"
            )
            return
        if self.hooked is not model:  # a later train() may wrap the model anew
            model.register_comm_hook(self.norms, squared_norm_allreduce_hook)
            self.hooked = model
        optimizer = self.trainer.optimizer
        sngm = None if optimizer is None else innermost_optimizer(optimizer)
        if not isinstance(sngm, SNGM):
            return
        rewritten = gradients_rewritten_by(self.trainer)
        if rewritten is None:
            sngm.allreduce_norms = self.norms
            self.sngm = sngm
        else:
            logger.warning(
                "AllreduceNormsCallback: SNGM measures its gradient norm itself: the Trainer "
                f"writes every gradient after the all-reduce ({rewritten})"
            )

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.sngm is not None and state.is_world_process_zero:
            logger.info(
                f"AllreduceNormsCallback: SNGM took its norm from the all-reduce on "
                f"{self.sngm.allreduce_norm_steps} of {state.global_step} steps"
            )


def add_allreduce_norms(trainer: Trainer) -> AllreduceNormsCallback:
    """Add an `AllreduceNormsCallback` for `trainer` and return it (its `norms` fill up
    once training has begun)."""
    callback = AllreduceNormsCallback(trainer)
    trainer.add_callback(callback)
    return callback
