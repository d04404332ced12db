"""``sngm-study``: the large-batch study from the command line.

For example:

    sngm-study --preset quick --out study_out/quick
    sngm-study --batch-sizes 256,1024,4096,8192 --optimizers msgd,lars,sngm --epochs 30 \\
        --seeds 3 --device cuda --workers 8
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

import torch

from sngm_integrations.study.config import DATASETS, OPTIMIZERS, PRESETS, preset
from sngm_integrations.study.runner import run_study

__all__ = ["build_parser", "main", "study_from_args"]


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 256,1024, got {text!r}") from None


def _name_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _assignment(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name or not value:
        raise argparse.ArgumentTypeError(f"expected OPTIMIZER=VALUE, got {text!r}")
    return name.strip(), value.strip()


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser (every study setting defaults to the preset's)."""
    parser = argparse.ArgumentParser(
        prog="sngm-study",
        description=(
            "Train ResNet-20 at several batch sizes with MSGD (torch.optim.SGD), LARS "
            "(timm) and SNGM, the same epochs at every batch size. Each optimizer's "
            "learning rate is chosen per batch size on a validation split, then rerun "
            "with more seeds; test accuracy is reported as mean ± std."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    add(
        "--preset",
        choices=tuple(PRESETS),
        default="full",
        help="quick: minutes on a CPU (subset, narrow net); full: all of Fashion-MNIST, for a GPU",
    )
    add("--out", default=None, help="output folder (default: study_out/PRESET); reruns resume")
    add("--dataset", choices=DATASETS, help="synthetic is a tiny made-up set for checks")
    add("--data-root", help="folder holding the dataset files")
    add("--train-size", type=int, help="training images (default: all but the validation split)")
    add("--val-size", type=int, help="validation images, held out of the training set")
    add("--test-size", type=int, help="test images (default: all)")
    add("--width", type=int, help="ResNet-20 width (channels of the first stage)")
    add("--epochs", type=int, help="epochs of every run, at every batch size")
    add("--batch-sizes", type=_int_list, help="comma-separated, e.g. 256,1024,4096,8192")
    add("--optimizers", type=_name_list, help=f"comma-separated, from {','.join(OPTIMIZERS)}")
    add(
        "--lrs",
        type=_assignment,
        action="append",
        default=[],
        metavar="OPT=LR,LR,...",
        help="learning-rate grid of an optimizer at the reference batch size (repeatable)",
    )
    add(
        "--lr-scaling",
        type=_assignment,
        action="append",
        default=[],
        metavar="OPT=RULE",
        help="how OPT's grid scales with the batch size: none, linear or sqrt (repeatable)",
    )
    add("--reference-batch-size", type=int, help="batch size the --lrs grids are given for")
    add("--seeds", type=int, help="seeds of each chosen lr (the grid run is the first)")
    add("--base-seed", type=int, help="seed of the grid runs; more seeds count up from it")
    add("--momentum", type=float)
    add("--weight-decay", type=float, help="L2 penalty of MSGD, LARS and SNGM")
    add("--warmup-epochs", type=float, help="linear warmup, turned into optimizer steps per run")
    add("--schedule", choices=("constant", "cosine", "linear", "poly"), help="decay after warmup")
    add("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda when available)")
    add(
        "--precision",
        choices=("auto", "fp32", "bf16"),
        default="auto",
        help="auto: bf16 autocast on CUDA, fp32 elsewhere",
    )
    add(
        "--workers",
        type=int,
        help="runs trained at once in separate processes sharing the device (quick: 2, full: 1)",
    )
    add(
        "--time-budget",
        type=float,
        default=None,
        metavar="SECONDS",
        help="start no new run after this many seconds; report what finished",
    )
    add("--eval-batch-size", type=int)
    add("--no-plots", action="store_true", help="skip the PNG plots")
    add(
        "--no-progress",
        action="store_true",
        help="a line per finished run instead of a progress bar",
    )
    return parser  # fmt: skip


_OVERRIDES = (
    "dataset", "data_root", "train_size", "val_size", "test_size", "width", "epochs",
    "batch_sizes", "optimizers", "reference_batch_size", "seeds", "base_seed", "momentum",
    "weight_decay", "warmup_epochs", "schedule", "eval_batch_size", "workers",
)  # fmt: skip


def _parse_lrs(assignments: list[tuple[str, str]]) -> dict[str, tuple[float, ...]]:
    grids = {}
    for name, values in assignments:
        try:
            grids[name] = tuple(float(v) for v in values.split(",") if v)
        except ValueError:
            raise ValueError(f"Invalid --lrs: {name}={values} (expected numbers)") from None
    return grids


def study_from_args(args: argparse.Namespace) -> Any:
    """The `StudyConfig` the arguments describe."""
    overrides: dict[str, Any] = {
        name: getattr(args, name) for name in _OVERRIDES if getattr(args, name) is not None
    }
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    precision = args.precision
    if precision == "auto":
        precision = "bf16" if device.startswith("cuda") else "fp32"
    base = preset(args.preset)
    lr_grids = dict(base.lr_grids)
    lr_grids.update(_parse_lrs(args.lrs))
    lr_scaling = dict(base.lr_scaling)
    lr_scaling.update(dict(args.lr_scaling))
    return preset(
        args.preset,
        **overrides,
        lr_grids=lr_grids,
        lr_scaling=lr_scaling,
        device=device,
        precision=precision,
        time_budget=args.time_budget,
    )


def _print_now(line: str) -> None:
    print(line, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the study the command line describes; print the table. Returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        study = study_from_args(args)
    except ValueError as err:
        parser.error(str(err))
    out = args.out or f"study_out/{args.preset}"
    try:
        result = run_study(
            study,
            out,
            progress=not args.no_progress,
            plots=not args.no_plots,
            log=_print_now if args.no_progress else None,
        )
    except KeyboardInterrupt:
        print(f"\ninterrupted; finished runs are saved in {out} (rerun to resume)", file=sys.stderr)
        return 130
    print("\nTest accuracy (%), mean ± std over seeds (best lr by validation accuracy)")
    print(f"status: {result.status}; {result.new_runs} new runs; results in {result.out}\n")
    print(result.table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
