"""Run a training script with `optim="sngm"` registered.

Usage:

    python -m hf_trainer [--sngm-monitor] [--sngm-comm-hook] SCRIPT [ARGS...]
    python -m hf_trainer [--sngm-monitor] [--sngm-comm-hook] -m MODULE [ARGS...]
    accelerate launch -m hf_trainer SCRIPT [ARGS...]

The script runs as `__main__` with `sys.argv = [SCRIPT, *ARGS]` and its directory first
on `sys.path`, as `python SCRIPT ARGS` would run it, so an unmodified Hugging Face
example (`run_glue.py`, `run_clm.py`, ...) accepts `--optim sngm`. Its exit status
(`sys.exit(n)` or an exception) becomes this command's.

`--sngm-monitor` (or the environment variable `SNGM_MONITOR=1`) adds
`hf_trainer.SNGMMonitorCallback` to every `Trainer` the script builds, ahead of its
reporters, and says at the start of training at which steps the `sngm/*` values will
be logged. `--sngm-comm-hook` adds `hf_trainer.AllreduceNormsCallback`, which
all-reduces DDP gradients through `squared_norm_allreduce_hook` (see that callback for
when SNGM takes its norm from it).
"""

from __future__ import annotations

import functools
import os
import runpy
import sys
from collections.abc import Callable
from typing import Any

from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

import hf_trainer  # importing registers optim="sngm"
from hf_trainer_optim import ACCEPTED_OPTIM_ARGS

USAGE = (
    "usage: python -m hf_trainer [--sngm-monitor] [--sngm-comm-hook] SCRIPT [ARGS...]  |  "
    "python -m hf_trainer [--sngm-monitor] [--sngm-comm-hook] -m MODULE [ARGS...]"
)
MONITOR_FLAG = "--sngm-monitor"
MONITOR_ENV = "SNGM_MONITOR"
COMM_HOOK_FLAG = "--sngm-comm-hook"


def help_text() -> str:
    """The `--help` text: usage, the options of this launcher and SNGM's `optim_args`."""
    keys = "\n".join(f"  {key:<14} {arg.kind}" for key, arg in ACCEPTED_OPTIM_ARGS.items())
    return (
        f"{USAGE}\n\n{(__doc__ or '').strip()}\n\n"
        f"options (before SCRIPT):\n"
        f"  {MONITOR_FLAG}    add the SNGM monitor to every Trainer (also: {MONITOR_ENV}=1)\n"
        f"  {COMM_HOOK_FLAG}  all-reduce every Trainer's DDP gradients through "
        "squared_norm_allreduce_hook\n\n"
        f"--optim_args keys for --optim sngm (comma-separated key=value):\n{keys}\n"
        "Set the learning rate with --learning_rate (an SNGM step length; transformers' "
        "default 5e-05 is an AdamW rate and warns) and weight decay with --weight_decay."
    )


class MonitorScheduleNotice(TrainerCallback):
    """Says when training starts at which steps the SNGM monitor will log."""

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Print the steps of the first `sngm/*` log, or why there will be none."""
        if not state.is_world_process_zero:
            return
        strategy = str(getattr(args.logging_strategy, "value", args.logging_strategy))
        if strategy == "no":
            when = "never: logging_strategy='no' (pass --logging_strategy steps)"
        elif strategy == "epoch":
            when = "at the end of every epoch (logging_strategy='epoch')"
        elif state.logging_steps > state.max_steps:
            when = (
                f"never in this run: logging_steps={state.logging_steps:g} is more than its "
                f"{state.max_steps} steps (pass --logging_steps {max(1, state.max_steps // 4)})"
            )
        else:
            when = (
                f"every {state.logging_steps:g} steps (logging_steps), first at step "
                f"{state.logging_steps:g} of {state.max_steps}"
            )
        print(f"SNGM monitor: sngm/* values are added to the training logs {when}", flush=True)


def _add_to_every_trainer(name: str, add: Callable[[Trainer], object]) -> None:
    """Make every `Trainer` built in this process call `add(trainer)` once built; adding
    the same `name` again does nothing."""
    marker = f"__sngm_{name}_wraps__"
    original = Trainer.__init__
    if hasattr(original, marker):  # functools.wraps carries inner wrappers' markers outward
        return

    @functools.wraps(original)
    def __init__(self: Trainer, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        add(self)

    setattr(__init__, marker, original)
    Trainer.__init__ = __init__  # type: ignore[method-assign]


def _add_monitor(trainer: Trainer) -> None:
    hf_trainer.add_sngm_monitor(trainer)
    trainer.add_callback(MonitorScheduleNotice())


def enable_monitor() -> None:
    """Make every `Trainer` built in this process add the SNGM monitor; safe to call again."""
    _add_to_every_trainer("monitor", _add_monitor)


def enable_comm_hook() -> None:
    """Make every `Trainer` built in this process add an `AllreduceNormsCallback`."""
    _add_to_every_trainer("comm_hook", hf_trainer.add_allreduce_norms)


def main(argv: list[str]) -> None:
    """Run `argv[0]` (a script path, or `-m MODULE`) as `__main__`, SNGM registered.

    Args:
        argv: The command line after `python -m hf_trainer`.
    """
    if not argv or argv[0] in ("-h", "--help"):
        print(help_text(), file=sys.stderr if not argv else sys.stdout)
        raise SystemExit(2 if not argv else 0)
    monitor = os.environ.get(MONITOR_ENV, "").lower() in ("1", "true", "yes")
    comm_hook = False
    while argv and argv[0] in (MONITOR_FLAG, COMM_HOOK_FLAG):
        flag, argv = argv[0], argv[1:]
        monitor |= flag == MONITOR_FLAG
        comm_hook |= flag == COMM_HOOK_FLAG
        if not argv:
            raise SystemExit(f"{USAGE}\nerror: {flag} needs a SCRIPT or -m MODULE")
    if monitor:
        enable_monitor()
    if comm_hook:
        enable_comm_hook()
    if argv[0] == "-m":
        if len(argv) < 2:
            raise SystemExit(f"{USAGE}\nerror: -m needs a module name")
        sys.argv = argv[1:]
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        return
    script = argv[0]
    if not os.path.isfile(script):
        raise SystemExit(f"{USAGE}\nerror: SCRIPT={script!r} is not a file")
    sys.argv = list(argv)
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
