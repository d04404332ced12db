"""Turning run records into the study's answer: chosen learning rates, tables, files, plots.

Everything here is a pure function of the `StudyConfig`
and the run records (dicts as written by `train_run`),
so a finished, partial or resumed study is reported the same way.
"""

from __future__ import annotations

import csv
import json
import os
import statistics
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sngm_integrations.study.config import StudyConfig, run_key

__all__ = [
    "best_lr",
    "format_table",
    "grid_results",
    "plot_study",
    "summarize",
    "write_json",
    "write_reports",
]

Records = Mapping[str, dict[str, Any]]


def grid_results(
    study: StudyConfig, records: Records, optimizer: str, batch_size: int
) -> list[tuple[float, dict[str, Any] | None]]:
    """The grid of (optimizer, batch size): each lr with its record at the base seed, or None."""
    return [
        (lr, records.get(run_key(study.run_config(optimizer, batch_size, lr, study.base_seed))))
        for lr in study.lrs(optimizer, batch_size)
    ]


def best_lr(study: StudyConfig, records: Records, optimizer: str, batch_size: int) -> float | None:
    """The grid lr with the highest *validation* accuracy, once the whole grid has run.

    The test set plays no part in the choice. Ties go to the smaller learning rate.
    ``None`` while any grid run is missing.
    """
    grid = grid_results(study, records, optimizer, batch_size)
    finished = [(lr, record) for lr, record in grid if record is not None]
    if len(finished) < len(grid):
        return None
    # max() keeps the first of equal values, and grids run from small to large lr.
    return max(finished, key=lambda item: item[1]["val_acc"])[0]


def _seed_records(
    study: StudyConfig, records: Records, optimizer: str, batch_size: int, lr: float
) -> list[dict[str, Any]]:
    configs = [study.run_config(optimizer, batch_size, lr, study.base_seed)]
    configs += study.seed_runs(optimizer, batch_size, lr)
    found = (records.get(run_key(config)) for config in configs)
    return [record for record in found if record is not None]


def summarize(study: StudyConfig, records: Records) -> list[dict[str, Any]]:
    """One row per (optimizer, batch size): best lr and test accuracy over its seeds.

    ``test_acc_std`` is the sample standard deviation (0 with one seed); ``lr_at_edge``
    flags a best lr at either end of its grid, where a wider grid might do better.
    """
    rows = []
    for optimizer in study.optimizers:
        for batch_size in sorted(study.batch_sizes):
            lrs = study.lrs(optimizer, batch_size)
            lr = best_lr(study, records, optimizer, batch_size)
            row: dict[str, Any] = {
                "optimizer": optimizer,
                "batch_size": batch_size,
                "lr_grid": lrs,
                "best_lr": lr,
                "lr_at_edge": None,
                "val_acc": None,
                "seeds": 0,
                "test_acc": [],
                "test_acc_mean": None,
                "test_acc_std": None,
            }
            if lr is not None:
                seed_records = _seed_records(study, records, optimizer, batch_size, lr)
                test_acc = [record["test_acc"] for record in seed_records]
                row.update(
                    lr_at_edge=len(lrs) > 1 and lr in (lrs[0], lrs[-1]),
                    val_acc=seed_records[0]["val_acc"],
                    seeds=len(test_acc),
                    test_acc=test_acc,
                    test_acc_mean=statistics.fmean(test_acc),
                    test_acc_std=statistics.stdev(test_acc) if len(test_acc) > 1 else 0.0,
                )
            rows.append(row)
    return rows


def format_table(study: StudyConfig, rows: list[dict[str, Any]]) -> str:
    """A Markdown table: optimizers down, batch sizes across, ``mean ± std (lr)`` cells.

    A ``*`` marks a best lr at the edge of its grid; ``n=`` shows fewer seeds than asked.
    """
    batch_sizes = sorted(study.batch_sizes)
    header = "| optimizer | " + " | ".join(f"batch {b}" for b in batch_sizes) + " |"
    lines = [header, "|---" * (len(batch_sizes) + 1) + "|"]
    cells = {(row["optimizer"], row["batch_size"]): row for row in rows}
    for optimizer in study.optimizers:
        line = [optimizer]
        for batch_size in batch_sizes:
            row = cells[(optimizer, batch_size)]
            if row["best_lr"] is None:
                line.append("(not run)")
                continue
            cell = f"{row['test_acc_mean']:.2f} ± {row['test_acc_std']:.2f} (lr {row['best_lr']:g}"
            cell += "*)" if row["lr_at_edge"] else ")"
            if row["seeds"] < study.seeds:
                cell += f" n={row['seeds']}"
            line.append(cell)
        lines.append("| " + " | ".join(line) + " |")
    return "\n".join(lines)


def _write_atomically(path: Path, text: str) -> None:
    temporary = path.with_suffix(path.suffix + ".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def write_json(
    out: Path,
    study: StudyConfig,
    records: Records,
    metadata: dict[str, Any],
    status: str,
) -> None:
    """Write ``study.json``: settings, environment, status, summary and every run."""
    document = {
        "status": status,
        "study": study.to_dict(),
        "environment": metadata,
        "summary": summarize(study, records),
        "runs": list(records.values()),
    }
    _write_atomically(out / "study.json", json.dumps(document, indent=1) + "\n")


_RUN_COLUMNS = (
    "optimizer", "batch_size", "lr", "seed", "epochs", "val_acc", "test_acc", "val_loss",
    "test_loss", "final_train_loss", "diverged", "steps", "seconds", "key",
)  # fmt: skip


def _write_csv(path: Path, columns: tuple[str, ...], rows: list[dict[str, Any]]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def write_reports(
    out: Path,
    study: StudyConfig,
    records: Records,
    metadata: dict[str, Any],
    status: str,
    plots: bool = True,
) -> str:
    """Write study.json, runs.csv, summary.csv, summary.md and the plots; return the table."""
    write_json(out, study, records, metadata, status)
    runs = []
    for record in records.values():
        config = record["config"]
        runs.append(
            {
                **config,
                **record,
                "final_train_loss": record["train_loss"][-1] if record["train_loss"] else None,
            }
        )
    runs.sort(key=lambda r: (r["batch_size"], r["optimizer"], r["lr"], r["seed"]))
    _write_csv(out / "runs.csv", _RUN_COLUMNS, runs)
    rows = summarize(study, records)
    summary_columns = (
        "optimizer", "batch_size", "best_lr", "lr_at_edge", "val_acc", "seeds",
        "test_acc_mean", "test_acc_std",
    )  # fmt: skip
    _write_csv(out / "summary.csv", summary_columns, rows)
    table = format_table(study, rows)
    (out / "summary.md").write_text(
        f"Test accuracy (%), mean ± std over seeds, best lr by validation accuracy "
        f"({study.dataset}, {study.epochs} epochs, status: {status})\n\n{table}\n"
    )
    if plots:
        plot_study(out, study, records)
    return table


def plot_study(out: Path, study: StudyConfig, records: Records) -> list[Path]:
    """Write the three PNG plots and return their paths.

    ``accuracy_vs_batch_size.png``: test accuracy (mean ± std) per optimizer.
    ``accuracy_vs_lr.png``: validation and test accuracy over each grid at the largest batch.
    ``train_loss.png``: training loss per epoch of each best-lr run (mean over seeds).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summarize(study, records)
    batch_sizes = sorted(study.batch_sizes)
    paths = []

    figure, axis = plt.subplots(figsize=(6, 4))
    for optimizer in study.optimizers:
        done = [r for r in rows if r["optimizer"] == optimizer and r["best_lr"] is not None]
        axis.errorbar(
            [r["batch_size"] for r in done],
            [r["test_acc_mean"] for r in done],
            yerr=[r["test_acc_std"] for r in done],
            marker="o",
            capsize=3,
            label=optimizer,
        )
    axis.set_xscale("log", base=2)
    axis.set_xlabel("batch size")
    axis.set_ylabel("test accuracy (%)")
    axis.set_title(f"{study.dataset}, {study.epochs} epochs at every batch size")
    axis.legend()
    axis.grid(alpha=0.3)
    paths.append(_save(figure, out / "accuracy_vs_batch_size.png"))

    largest = batch_sizes[-1]
    figure, axes = plt.subplots(
        1, len(study.optimizers), figsize=(4 * len(study.optimizers), 3.5), sharey=True
    )
    for axis, optimizer in zip(_as_list(axes), study.optimizers, strict=True):
        grid = [(lr, r) for lr, r in grid_results(study, records, optimizer, largest) if r]
        lrs = [lr for lr, _ in grid]
        axis.plot(lrs, [r["val_acc"] for _, r in grid], "o-", label="validation")
        axis.plot(lrs, [r["test_acc"] for _, r in grid], "s--", label="test")
        axis.set_xscale("log")
        axis.set_xticks(lrs, [f"{lr:g}" for lr in lrs])
        axis.minorticks_off()
        axis.set_xlabel("learning rate")
        axis.set_title(f"{optimizer}, batch {largest}")
        axis.grid(alpha=0.3)
    _as_list(axes)[0].set_ylabel(f"accuracy (%), seed {study.base_seed}")
    _as_list(axes)[0].legend()
    paths.append(_save(figure, out / "accuracy_vs_lr.png"))

    figure, axes = plt.subplots(
        1, len(batch_sizes), figsize=(4 * len(batch_sizes), 3.5), sharey=True
    )
    for axis, batch_size in zip(_as_list(axes), batch_sizes, strict=True):
        for row in rows:
            if row["batch_size"] != batch_size or row["best_lr"] is None:
                continue
            curves = [
                r["train_loss"]
                for r in _seed_records(study, records, row["optimizer"], batch_size, row["best_lr"])
            ]
            length = min(len(c) for c in curves)
            mean = [statistics.fmean(c[i] for c in curves) for i in range(length)]
            axis.plot(
                range(1, length + 1), mean, label=f"{row['optimizer']} (lr {row['best_lr']:g})"
            )
        axis.set_yscale("log")
        axis.xaxis.get_major_locator().set_params(integer=True)
        axis.set_xlabel("epoch")
        axis.set_title(f"batch {batch_size}")
        axis.grid(alpha=0.3)
        if axis.lines:
            axis.legend(fontsize=8)
    _as_list(axes)[0].set_ylabel("training loss")
    paths.append(_save(figure, out / "train_loss.png"))
    return paths


def _as_list(axes: Any) -> list[Any]:
    return list(axes) if hasattr(axes, "__len__") else [axes]


def _save(figure: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
