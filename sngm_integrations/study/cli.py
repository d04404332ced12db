"""`sngm-study`: the large-batch study from the command line.

For example:

    sngm-study --preset quick --out study_out/quick
    sngm-study --preset full --plan
    sngm-study --preset full --device cuda --workers 8 --out study_out/full

Without `--preset` it runs `full` on a machine with a GPU; elsewhere it prints the
plan and an estimate of both presets and starts nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch

from sngm_integrations.study.config import DATASETS, OPTIMIZERS, PRESETS, StudyConfig, preset
from sngm_integrations.study.runner import run_study

__all__ = ["build_parser", "command_line", "estimate_images_per_second", "main", "study_from_args"]


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 256,1024, got {text!r}") from None


def _optional_int(text: str) -> int | None:
    if text.lower() == "none":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or none, got {text!r}") from None


def _optional_float(text: str) -> float | None:
    if text.lower() == "none":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or none, got {text!r}") from None


def _name_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _assignment(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name or not value:
        raise argparse.ArgumentTypeError(f"expected OPTIMIZER=VALUE, got {text!r}")
    return name.strip(), value.strip()


def _format(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    if isinstance(value, dict):
        return " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in
                        value.items())  # fmt: skip
    return str(value)


def _default(name: str) -> str:
    """`quick: X, full: Y` for a study setting (the dataclass default where unset)."""
    defaults = StudyConfig()
    values = [
        f"{preset_name}: {_format(settings.get(name, getattr(defaults, name)))}"
        for preset_name, settings in PRESETS.items()
    ]
    return "; ".join(values)


_UNSET: Any = object()  # an option not given: the preset's value stands

# The study settings the command line sets, with their help (the presets' values follow).
_SETTINGS: dict[str, tuple[dict[str, Any], str]] = {
    "dataset": ({"choices": DATASETS}, "synthetic is a tiny made-up set for checks"),
    "data_root": ({}, "folder holding the dataset files"),
    "train_size": ({"type": _optional_int}, "training images (None: all but the validation split)"),
    "val_size": ({"type": int}, "validation images, held out of the training set"),
    "test_size": ({"type": _optional_int}, "test images (None: all)"),
    "image_size": ({"type": _optional_int}, "resize images to this side (None: as they are)"),
    "depth": ({"type": int}, "blocks per ResNet stage: 3 is ResNet-20, 1 ResNet-8"),
    "width": ({"type": int}, "ResNet width (channels of the first stage)"),
    "epochs": ({"type": int}, "the equal-epoch budget, at every batch size"),
    "equal_steps": (
        {"type": int},
        "the equal-step budget (None: the largest batch's steps in --epochs; 0: none)",
    ),
    "batch_sizes": ({"type": _int_list}, "comma-separated, e.g. 256,1024,4096,8192"),
    "optimizers": ({"type": _name_list}, f"comma-separated, from {','.join(OPTIMIZERS)}"),
    "lr_points": ({"type": int}, "learning rates per grid, 2x apart, for every optimizer"),
    "max_widenings": ({"type": int}, "points a grid may grow by while its best is at an edge"),
    "reference_batch_size": ({"type": int}, "batch size the --lr-center values are for"),
    "seeds": ({"type": int}, "fresh seeds of each chosen lr (not the selection seed)"),
    "base_seed": ({"type": int}, "seed of the grid runs; fresh seeds count up from it"),
    "momentum": ({"type": float}, "momentum of every optimizer"),
    "weight_decay": ({"type": float}, "L2 penalty of MSGD, LARS and SNGM"),
    "warmup_fraction": ({"type": float}, "linear warmup, as a fraction of each run's steps"),
    "schedule": (
        {"choices": ("constant", "cosine", "linear", "poly")},
        "decay after warmup",
    ),
    "target_val_acc": (
        {"type": _optional_float},
        "validation accuracy whose time to reach is reported (None: 99%% of the best at "
        "the smallest batch)",
    ),
    "bn_recalibration_images": (
        {"type": int},
        "training images over which BatchNorm statistics are recomputed before evaluation",
    ),
    "workers": ({"type": int}, "runs trained at once in processes sharing the device"),
    "eval_batch_size": ({"type": int}, "batch size of evaluation"),
}


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser; every study setting's help shows both presets' values."""
    parser = argparse.ArgumentParser(
        prog="sngm-study",
        description=(
            "Train ResNet-20 at several batch sizes with MSGD (torch.optim.SGD), LARS "
            "(timm, 1-d tensors not adapted) and SNGM under two budgets (equal epochs, "
            "equal steps). Every optimizer's lr grid has the same points, 2x apart, widened "
            "while its best is at an edge; the lr chosen on validation accuracy is rerun "
            "at fresh seeds and reported as mean ± 95%% CI, with paired differences and "
            "the time to a target accuracy."
        ),
    )
    add = parser.add_argument
    add(
        "--preset",
        choices=tuple(PRESETS),
        default=None,
        help="quick: minutes on a 2-core CPU (make demo); full: all of Fashion-MNIST, for a "
        "GPU. Default: full where a GPU is found, otherwise print both plans and stop",
    )
    add("--out", default=None, help="output folder (default: study_out/PRESET); reruns resume")
    add("--plan", action="store_true", help="print the plan and an estimate, run nothing")
    for name, (options, text) in _SETTINGS.items():
        flag = "--" + name.replace("_", "-")
        add(flag, default=_UNSET, help=f"{text} [{_default(name)}]", **options)
    add(
        "--lr-center",
        type=_assignment,
        action="append",
        default=[],
        metavar="OPT=LR",
        help=f"centre of OPT's grid at the reference batch (repeatable) [{_default('lr_centers')}]",
    )
    add(
        "--lr-scaling",
        type=_assignment,
        action="append",
        default=[],
        metavar="OPT=RULE",
        help="how OPT's centre moves with the batch size: none, linear or sqrt (repeatable) "
        "[none for every optimizer]",
    )
    add(
        "--decay-norm-and-bias",
        action="store_true",
        default=None,
        help="decay (and LARS-adapt) BatchNorm and bias tensors too [off]",
    )
    add("--device", default="auto", help="cpu, cuda, cuda:1, ... [auto: cuda when available]")
    add(
        "--precision",
        choices=("auto", "fp32", "bf16"),
        default="auto",
        help="[auto: bf16 autocast on CUDA, fp32 elsewhere]",
    )
    add(
        "--time-budget",
        type=float,
        default=None,
        metavar="SECONDS",
        help="start no new run after this many seconds; report what finished (rerun resumes)",
    )
    add("--no-plots", action="store_true", help="skip the PNG plots")
    add(
        "--no-progress",
        action="store_true",
        help="a line per finished run instead of a progress bar",
    )
    return parser


def _float_assignments(option: str, assignments: list[tuple[str, str]]) -> dict[str, float]:
    values = {}
    for name, value in assignments:
        try:
            values[name] = float(value)
        except ValueError:
            raise ValueError(f"Invalid {option}: {name}={value} (expected a number)") from None
    return values


def study_from_args(args: argparse.Namespace, preset_name: str) -> StudyConfig:
    """The `StudyConfig` the arguments describe, on top of preset `preset_name`."""
    overrides: dict[str, Any] = {
        name: getattr(args, name) for name in _SETTINGS if getattr(args, name) is not _UNSET
    }
    if args.decay_norm_and_bias:
        overrides["decay_norm_and_bias"] = True
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    precision = args.precision
    if precision == "auto":
        precision = "bf16" if device.startswith("cuda") else "fp32"
    base = preset(preset_name)
    lr_centers = {**base.lr_centers, **_float_assignments("--lr-center", args.lr_center)}
    lr_scaling = {**base.lr_scaling, **dict(args.lr_scaling)}
    return preset(
        preset_name,
        **overrides,
        lr_centers=lr_centers,
        lr_scaling=lr_scaling,
        device=device,
        precision=precision,
        time_budget=args.time_budget,
    )


# Settings that change where or how fast a study runs, not its results.
_MACHINE_SETTINGS = ("workers", "time_budget", "data_root", "eval_batch_size")


def command_line(study: StudyConfig, out: str | os.PathLike[str]) -> str:
    """An `sngm-study` command that runs `study` into `out` (the nearest preset,
    with every setting that differs from it spelled out).
    """
    mine = study.to_dict()

    def differences(name: str) -> list[str]:
        base = preset(name, device=study.device, precision=study.precision).to_dict()
        return [
            key
            for key in mine
            if mine[key] != base[key] and key not in _MACHINE_SETTINGS + ("device", "precision")
        ]

    name = min(PRESETS, key=lambda p: len(differences(p)))
    parts = ["sngm-study", "--preset", name, "--out", str(out)]
    for key in differences(name):
        flag = "--" + key.replace("_", "-")
        value = mine[key]
        if key == "lr_centers":
            parts += [f"--lr-center {k}={v:g}" for k, v in value.items()]
        elif key == "lr_scaling":
            parts += [f"--lr-scaling {k}={v}" for k, v in value.items()]
        elif key == "decay_norm_and_bias":
            parts += [flag] if value else []
        else:
            parts += [flag, _format(value)]
    if study.device != "cpu":
        parts += ["--device", study.device, "--precision", study.precision]
    return " ".join(parts)


def estimate_images_per_second(study: StudyConfig, steps: int = 10) -> float:
    """Training images per second of the whole study on `study.device`: a short timing at
    the smallest batch, on random images of the study's size, with each worker's threads,
    times the workers on a CPU. On a busy machine it is an underestimate.
    """
    from sngm_integrations.study.runner import threads_per_run
    from sngm_integrations.vision import ResNet

    side = study.image_size or {"fashion-mnist": 28, "cifar10": 32, "synthetic": 12}[study.dataset]
    channels = 3 if study.dataset == "cifar10" else 1
    device = torch.device(study.device)
    model = ResNet(study.depth, study.width, channels).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    batch = min(study.batch_sizes)
    images = torch.randn(batch, channels, side, side, device=device)
    labels = torch.randint(0, 10, (batch,), device=device)
    threads = torch.get_num_threads()
    torch.set_num_threads(threads_per_run(study))
    try:
        for step in range(steps + 2):
            if step == 2:  # two steps warm up
                started = time.perf_counter()
            loss = torch.nn.functional.cross_entropy(model(images), labels)
            optimizer.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]  # torch leaves it untyped
            optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - started
    finally:
        torch.set_num_threads(threads)
    workers = study.workers if device.type == "cpu" else 1
    return workers * steps * batch / elapsed


def describe_plan(study: StudyConfig, name: str, measure: bool) -> str:
    """What a study will run and, with `measure`, a time estimate on this machine."""
    groups = study.groups()
    images = study.training_images()
    lines = [
        f"{name}: {len(study.batch_sizes)} batch sizes {_format(study.batch_sizes)} x "
        f"{len(study.optimizers)} optimizers x {len(study.budgets())} budgets "
        f"({', '.join(study.budgets())}) = {len(groups)} groups; each {study.lr_points} lrs "
        f"(up to {study.max_widenings} more) + {study.seeds} seeds",
        f"  {study.epochs} epochs of {study.train_count():,} images; "
        + ", ".join(
            f"batch {b}: {study.budget_steps('epochs', b)} steps" for b in sorted(study.batch_sizes)
        )  # fmt: skip
        + (
            f"; equal-step budget {study.budget_steps('steps', max(study.batch_sizes))} steps"
            if "steps" in study.budgets()
            else ""
        ),
        f"  about {images / 1e6:.1f}M training images (widenings not counted)",
    ]
    if measure:
        rate = estimate_images_per_second(study)
        seconds = images / rate * 1.25  # evaluation and BatchNorm recomputation
        lines.append(
            f"  on this {study.device}: about {rate:,.0f} training images/s, so roughly "
            f"{seconds / 60:,.1f} min ({seconds / 3600:,.1f} h; more if the machine is busy)"
        )
    return "\n".join(lines)


def _print_now(line: str) -> None:
    print(line, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the study the command line describes; print the report. Returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    gpu = args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())
    preset_name = args.preset or ("full" if gpu else None)
    if preset_name is None:
        print("No GPU here, so nothing is started. The two presets:\n")
        for name in PRESETS:
            study = study_from_args(args, name)
            print(describe_plan(study, name, measure=name == "quick") + "\n")
        print("Run `sngm-study --preset quick` for the CPU demo (make demo), or")
        print("`sngm-study --preset full` on a GPU (benchmarks/run_gpu_study.sh).")
        return 0
    try:
        study = study_from_args(args, preset_name)
    except ValueError as err:
        parser.error(str(err))
    if args.plan:
        print(describe_plan(study, preset_name, measure=True))
        return 0
    out = args.out or f"study_out/{preset_name}"
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
    print(f"\nstatus: {result.status}; {result.new_runs} new runs; results in {result.out}\n")
    print(result.report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
