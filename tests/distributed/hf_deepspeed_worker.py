"""Runs under `torchrun --nproc_per_node 2`: the HF Trainer with `optim="sngm"` under a
DeepSpeed config on CPU (gloo), as a user would run it, for tests/test_sharded_engines.py.

The dataset is one global batch (8 examples, 4 per rank), so every step sees all of it,
as one process with a batch of 8 does. Rank 0 saves the optimizer chain the Trainer built,
the trained weights, SNGM's last norm and DeepSpeed's own global norm to OUT/hf_zero<S>.pt.
Usage: python -m torch.distributed.run --nproc_per_node 2 hf_deepspeed_worker.py OUT STAGE
"""

from __future__ import annotations

import sys
from pathlib import Path

import deepspeed  # noqa: F401  (imported for its comm module, patched below)
import torch
from hf_fixtures.tiny_text_task import TINY_RUN_ARGS, build_dataset, build_tiny_model
from teardown import finish
from transformers import Trainer, TrainingArguments

import hf_trainer  # noqa: F401  (registers optim="sngm")

STEPS = 3
EXAMPLES = 8


def main() -> None:
    out, stage = Path(sys.argv[1]), int(sys.argv[2])
    # The shared-memory op is JIT-compiled with g++ (minutes); gloo does not need it.
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None  # type: ignore[attr-defined]
    config = {
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "zero_optimization": {"stage": stage},
    }
    run_args = TINY_RUN_ARGS | dict(
        per_device_train_batch_size=EXAMPLES // 2, max_steps=STEPS, weight_decay=0.0
    )
    args = TrainingArguments(
        output_dir=str(out / "trainer"), optim="sngm", deepspeed=config, **run_args
    )
    trainer = Trainer(model=build_tiny_model(), args=args, train_dataset=build_dataset(EXAMPLES))
    trainer.train()
    chain = []
    optimizer = trainer.optimizer
    while optimizer is not None:
        chain.append(type(optimizer).__name__)
        optimizer = getattr(optimizer, "optimizer", None)
    sngm = trainer.optimizer.optimizer.optimizer
    if torch.distributed.get_rank() == 0:
        model = trainer.model_wrapped
        torch.save(
            {
                "chain": chain,
                "engine": type(model).__name__,
                "global_step": trainer.state.global_step,
                "params": torch.cat([p.detach().flatten() for p in model.module.parameters()]),
                "norm": sngm.last_grad_norm,
                "deepspeed_norm": float(model.get_global_grad_norm()),
            },
            out / f"hf_zero{stage}.pt",
        )
    finish()


if __name__ == "__main__":
    main()
