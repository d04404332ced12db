"""An unmodified-style training script: it parses TrainingArguments with HfArgumentParser.

It never imports `hf_trainer`; run through `python -m hf_trainer train_tiny.py ...` it
accepts `--optim sngm`. It writes what the Trainer built to `--report_file` (one JSON
file per process) and exits with `--exit_code`.
"""

import json
import sys
from dataclasses import dataclass, field

import torch
from tiny_text_task import build_dataset, build_tiny_model
from transformers import HfArgumentParser, Trainer, TrainingArguments


@dataclass
class ScriptArguments:
    report_file: str = field(metadata={"help": "JSON file to write; {rank} is replaced"})
    exit_code: int = field(default=0, metadata={"help": "status to exit with after training"})


def main() -> int:
    parser = HfArgumentParser((TrainingArguments, ScriptArguments))
    training_args, script_args = parser.parse_args_into_dataclasses()
    trainer = Trainer(
        model=build_tiny_model(),
        args=training_args,
        train_dataset=build_dataset(),
    )
    trainer.train()
    trainer.save_model()
    optimizer = trainer.optimizer
    while hasattr(optimizer, "optimizer"):  # Accelerate's wrapper
        optimizer = optimizer.optimizer
    group = {k: v for k, v in optimizer.param_groups[0].items() if k != "params"}
    parameters = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
    report = {
        "optimizer": type(optimizer).__name__,
        "group": group,
        "world_size": training_args.world_size,
        "global_step": trainer.state.global_step,
        "allreduce_norm_steps": getattr(optimizer, "allreduce_norm_steps", None),
        "parameters": parameters.tolist(),
    }
    path = script_args.report_file.format(rank=training_args.process_index)
    with open(path, "w") as f:
        json.dump(report, f, default=str)
    return script_args.exit_code


if __name__ == "__main__":
    sys.exit(main())
