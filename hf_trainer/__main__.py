"""Run a training script with `optim="sngm"` registered.

Usage:

    python -m hf_trainer [--sngm-monitor] SCRIPT [ARGS...]
    python -m hf_trainer [--sngm-monitor] -m MODULE [ARGS...]
    accelerate launch -m hf_trainer SCRIPT [ARGS...]

The script runs as `__main__` with `sys.argv = [SCRIPT, *ARGS]` and its directory first
on `sys.path`, as `python SCRIPT ARGS` would run it, so an unmodified Hugging Face
example (`run_glue.py`, `run_clm.py`, ...) accepts `--optim sngm`. Its exit status
(`sys.exit(n)` or an exception) becomes this command's.

`--sngm-monitor` (or the environment variable `SNGM_MONITOR=1`) adds
`hf_trainer.SNGMMonitorCallback` to every `Trainer` the script builds, ahead of its
reporters, and says at the start of training at which steps the `sngm/*` values will
be logged.
"""

from __future__ import annotations

import functools
import os
import runpy
import sys
from typing import Any

from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

import hf_trainer  # importing registers optim="sngm"
from hf_trainer_optim import ACCEPTED_OPTIM_ARGS

USAGE = (
    "usage: python -m hf_trainer [--sngm-monitor] SCRIPT [ARGS...]  |  "
    "python -m hf_trainer [--sngm-monitor] -m MODULE [ARGS...]"
)
MONITOR_FLAG = "--sngm-monitor"
MONITOR_ENV = "SNGM_MONITOR"
_MONITOR_WRAPPED_MARKER = "__sngm_monitor_wraps__"


def help_text() -> str:
    """The `--help` text: usage, the options of this launcher and SNGM's `optim_args`."""
    keys = "\n".join(f"  {key:<14} {arg.kind}" for key, arg in ACCEPTED_OPTIM_ARGS.items())
    return (
        f"{USAGE}\n\n{(__doc__ or '').strip()}\n\n"
        f"options (before SCRIPT):\n"
        f"  {MONITOR_FLAG}  add the SNGM monitor to every Trainer (also: {MONITOR_ENV}=1)\n\n"
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


def enable_monitor() -> None:
    """Make every `Trainer` built in this process add the SNGM monitor; safe to call again."""
    original = Trainer.__init__
    if hasattr(original, _MONITOR_WRAPPED_MARKER):
        return

    @functools.wraps(original)
    def __init__(self: Trainer, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        hf_trainer.add_sngm_monitor(self)
        self.add_callback(MonitorScheduleNotice())

    setattr(__init__, _MONITOR_WRAPPED_MARKER, original)
    Trainer.__init__ = __init__  # type: ignore[method-assign]


def main(argv: list[str]) -> None:
    """Run `argv[0]` (a script path, or `-m MODULE`) as `__main__`, SNGM registered.

    Args:
        argv: The command line after `python -m hf_trainer`.
    """
    if not argv or argv[0] in ("-h", "--help"):
        print(help_text(), file=sys.stderr if not argv else sys.stdout)
        raise SystemExit(2 if not argv else 0)
    monitor = os.environ.get(MONITOR_ENV, "").lower() in ("1", "true", "yes")
    if argv[0] == MONITOR_FLAG:
        monitor, argv = True, argv[1:]
        if not argv:
            raise SystemExit(f"{USAGE}\nerror: {MONITOR_FLAG} needs a SCRIPT or -m MODULE")
    if monitor:
        enable_monitor()
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
