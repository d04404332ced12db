"""Turning run records into the study's answer: chosen learning rates, intervals, files.

Everything here is a pure function of the `StudyConfig` and the run records (dicts as
written by `train_run`), so a finished, partial or resumed study is reported the same way.
Intervals are 95% Student-t intervals over the fresh seeds; differences between two
optimizers (or two batch sizes) pair the runs of equal seed, which share the initial
weights and the order of the data.
"""

from __future__ import annotations

import csv
import json
import math
import os
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sngm_integrations.study.config import StudyConfig, run_key

__all__ = [
    "best_lr",
    "format_report",
    "format_table",
    "grid_lrs",
    "mean_ci",
    "paired_differences",
    "plot_study",
    "seed_records",
    "summarize",
    "target_accuracy",
    "write_json",
    "write_reports",
]

Records = Mapping[str, dict[str, Any]]

# Two-sided 95% Student-t quantiles by degrees of freedom; 1.96 beyond 30.
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


def mean_ci(values: Sequence[float]) -> tuple[float, float]:
    """Mean and half-width of its 95% t interval (`nan` half-width for one value)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.nan
    t = _T975[len(values) - 2] if len(values) - 1 <= len(_T975) else 1.96
    return mean, t * statistics.stdev(values) / math.sqrt(len(values))


def _grid_record(
    study: StudyConfig, records: Records, group: tuple[str, str, int], lr: float
) -> dict[str, Any] | None:
    return records.get(run_key(study.run_config(*group, lr, study.base_seed)))


def _selection_key(record: dict[str, Any]) -> tuple[bool, float]:
    return (not record["diverged"], record["val_acc"])


def grid_lrs(study: StudyConfig, records: Records, group: tuple[str, str, int]) -> list[float]:
    """The learning rates of a group's grid so far, widened while its best sits at an edge.

    Starts from `StudyConfig.initial_lrs`; once every lr has run, a best lr at the low
    (high) end adds the lr half (twice) that one, at most `study.max_widenings` times.
    """
    _, optimizer, batch_size = group
    lrs = study.initial_lrs(optimizer, batch_size)
    while True:
        grid = [_grid_record(study, records, group, lr) for lr in lrs]
        if any(record is None for record in grid):
            return lrs
        if len(lrs) - study.lr_points >= study.max_widenings:
            return lrs
        best = max(range(len(lrs)), key=lambda i: _selection_key(grid[i]))  # type: ignore[arg-type]
        if best == 0:
            lrs = [float(f"{lrs[0] / 2:.4g}"), *lrs]
        elif best == len(lrs) - 1:
            lrs = [*lrs, float(f"{lrs[-1] * 2:.4g}")]
        else:
            return lrs


def best_lr(study: StudyConfig, records: Records, group: tuple[str, str, int]) -> float | None:
    """The grid lr with the highest *validation* accuracy, once the grid is final.

    Diverged runs come last; ties go to the smaller learning rate; the test set plays no
    part. `None` while a grid run is missing or the grid is still being widened.
    """
    lrs = grid_lrs(study, records, group)
    grid = [_grid_record(study, records, group, lr) for lr in lrs]
    if any(record is None for record in grid):
        return None
    best = max(range(len(lrs)), key=lambda i: _selection_key(grid[i]))  # type: ignore[arg-type]
    at_edge = best in (0, len(lrs) - 1) and len(lrs) > 1
    if at_edge and len(lrs) - study.lr_points < study.max_widenings:
        return None
    return lrs[best]


def seed_records(
    study: StudyConfig, records: Records, group: tuple[str, str, int], lr: float
) -> list[dict[str, Any]]:
    """The finished fresh-seed runs of `lr` in `group`, in seed order."""
    found = (records.get(run_key(config)) for config in study.seed_runs(*group, lr))
    return [record for record in found if record is not None]


def target_accuracy(study: StudyConfig, records: Records) -> float | None:
    """The validation accuracy whose time to reach is reported (see `StudyConfig`)."""
    if study.target_val_acc is not None:
        return study.target_val_acc
    smallest = min(study.batch_sizes)
    finals = []
    for name in study.optimizers:
        group = ("epochs", name, smallest)
        lr = best_lr(study, records, group)
        runs = seed_records(study, records, group, lr) if lr is not None else []
        if runs:
            finals.append(statistics.fmean(r["val_acc"] for r in runs))
    return math.floor(2 * 0.99 * max(finals)) / 2 if finals else None


def _time_to_target(runs: list[dict[str, Any]], target: float | None) -> dict[str, Any]:
    reached = []
    for record in runs:
        for point in record["history"]:
            if target is not None and point["val_acc"] >= target:
                reached.append(point)
                break
    result: dict[str, Any] = {"reached": len(reached), "of": len(runs)}
    for name in ("step", "images", "train_seconds"):
        result[name] = statistics.median(p[name] for p in reached) if reached else None
    return result


def summarize(study: StudyConfig, records: Records) -> list[dict[str, Any]]:
    """One row per (budget, optimizer, batch size): grid, chosen lr, test accuracy's interval.

    `lr_at_edge` flags a chosen lr still at an end of its grid after every widening;
    `widened` counts the points added; `grid_diverged` the grid's diverged runs.
    `time_to_target` has the median steps, images and training seconds of the seeds
    that reached `target_accuracy` (epoch budget), and how many did. `noise_scale` is the
    gradient noise scale `B_simple` at the end of training (see `train.probe_noise_scale`),
    averaged over the seeds that measured it.
    """
    target = target_accuracy(study, records)
    rows = []
    for budget, optimizer, batch_size in sorted(
        study.groups(), key=lambda g: (study.budgets().index(g[0]), g[1], g[2])
    ):
        group = (budget, optimizer, batch_size)
        lrs = grid_lrs(study, records, group)
        grid = [_grid_record(study, records, group, lr) for lr in lrs]
        lr = best_lr(study, records, group)
        row: dict[str, Any] = {
            "budget": budget,
            "optimizer": optimizer,
            "batch_size": batch_size,
            "steps": study.budget_steps(budget, batch_size),
            "lr_grid": lrs,
            "grid_val_acc": [None if r is None else r["val_acc"] for r in grid],
            "grid_diverged": sum(1 for r in grid if r is not None and r["diverged"]),
            "widened": len(lrs) - study.lr_points,
            "best_lr": lr,
            "lr_at_edge": None,
            "val_acc": None,
            "seeds": 0,
            "seed_list": [],
            "test_acc": [],
            "test_acc_mean": None,
            "test_acc_ci": None,
            "final_train_loss": None,
            "diverged_seeds": 0,
            "time_to_target": None,
            "noise_scale": None,
        }
        if lr is not None:
            runs = seed_records(study, records, group, lr)
            row.update(
                lr_at_edge=len(lrs) > 1 and lr in (lrs[0], lrs[-1]),
                val_acc=_grid_record(study, records, group, lr)["val_acc"],  # type: ignore[index]
                seeds=len(runs),
                seed_list=[r["config"]["seed"] for r in runs],
                test_acc=[r["test_acc"] for r in runs],
                diverged_seeds=sum(r["diverged"] for r in runs),
            )
            if runs:
                mean, ci = mean_ci(row["test_acc"])
                row.update(
                    test_acc_mean=mean,
                    test_acc_ci=ci,
                    final_train_loss=statistics.fmean(r["train_loss"][-1] for r in runs),
                )
                measured = [r["noise_scale"] for r in runs if r.get("noise_scale") is not None]
                if measured:
                    row["noise_scale"] = statistics.fmean(measured)
                if budget == "epochs":
                    row["time_to_target"] = _time_to_target(runs, target)
        rows.append(row)
    return rows


def _paired(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any] | None:
    """`a - b` over their shared seeds: mean, 95% interval, significance."""
    a_by_seed = dict(zip(a["seed_list"], a["test_acc"], strict=True))
    b_by_seed = dict(zip(b["seed_list"], b["test_acc"], strict=True))
    shared = sorted(set(a_by_seed) & set(b_by_seed))
    if len(shared) < 2:
        return None
    mean, ci = mean_ci([a_by_seed[s] - b_by_seed[s] for s in shared])
    return {
        "difference": mean,
        "ci": ci,
        "pairs": len(shared),
        "significant": abs(mean) > ci,
    }


def paired_differences(study: StudyConfig, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Paired test-accuracy differences: every optimizer pair at every (budget, batch), and
    each optimizer's largest batch against its smallest (the large-batch effect).
    """
    cells = {(r["budget"], r["optimizer"], r["batch_size"]): r for r in rows}
    comparisons = []
    for budget in study.budgets():
        for batch_size in sorted(study.batch_sizes):
            for i, first in enumerate(study.optimizers):
                for second in study.optimizers[i + 1 :]:
                    a, b = cells[(budget, second, batch_size)], cells[(budget, first, batch_size)]
                    result = _paired(a, b)
                    if result is not None:
                        comparisons.append(
                            {
                                "kind": "optimizers",
                                "budget": budget,
                                "batch_size": batch_size,
                                "comparison": f"{second} - {first}",
                                **result,
                            }
                        )
        if len(study.batch_sizes) > 1:
            small, large = min(study.batch_sizes), max(study.batch_sizes)
            for name in study.optimizers:
                result = _paired(cells[(budget, name, large)], cells[(budget, name, small)])
                if result is not None:
                    comparisons.append(
                        {
                            "kind": "batch",
                            "budget": budget,
                            "batch_size": large,
                            "comparison": f"{name}: batch {large} - batch {small}",
                            **result,
                        }
                    )
    return comparisons


def _interval(mean: float, ci: float) -> str:
    return f"{mean:.2f} ± {ci:.2f}" if math.isfinite(ci) else f"{mean:.2f}"


def format_table(study: StudyConfig, rows: list[dict[str, Any]], budget: str) -> str:
    """A Markdown table of one budget: optimizers down, batch sizes across.

    Cells are `mean ± 95% CI (lr)`; `*` marks a chosen lr still at its grid's edge
    after every widening, `n=` fewer fresh seeds than asked, `d=` diverged seeds.
    """
    batch_sizes = sorted(study.batch_sizes)
    header = "| optimizer | " + " | ".join(
        f"batch {b} ({study.budget_steps(budget, b)} steps)" for b in batch_sizes
    )
    lines = [header + " |", "|---" * (len(batch_sizes) + 1) + "|"]
    cells = {(r["budget"], r["optimizer"], r["batch_size"]): r for r in rows}
    for optimizer in study.optimizers:
        line = [optimizer]
        for batch_size in batch_sizes:
            row = cells[(budget, optimizer, batch_size)]
            if row["best_lr"] is None or row["test_acc_mean"] is None:
                line.append("(not run)")
                continue
            cell = f"{_interval(row['test_acc_mean'], row['test_acc_ci'])} (lr {row['best_lr']:g}"
            cell += "*)" if row["lr_at_edge"] else ")"
            if row["seeds"] < study.seeds:
                cell += f" n={row['seeds']}"
            if row["diverged_seeds"]:
                cell += f" d={row['diverged_seeds']}"
            line.append(cell)
        lines.append("| " + " | ".join(line) + " |")
    return "\n".join(lines)


def format_noise_scale_table(study: StudyConfig, rows: list[dict[str, Any]], budget: str) -> str:
    """A Markdown table of the end-of-training noise scale: optimizers down, batch sizes
    across; `-` where no seed measured it."""
    batch_sizes = sorted(study.batch_sizes)
    lines = [
        "| optimizer | " + " | ".join(f"batch {b}" for b in batch_sizes) + " |",
        "|---" * (len(batch_sizes) + 1) + "|",
    ]
    cells = {(r["budget"], r["optimizer"], r["batch_size"]): r for r in rows}
    for optimizer in study.optimizers:
        values = [cells[(budget, optimizer, b)]["noise_scale"] for b in batch_sizes]
        line = [optimizer] + ["-" if v is None else f"{v:,.0f}" for v in values]
        lines.append("| " + " | ".join(line) + " |")
    return "\n".join(lines)


def _format_differences(comparisons: list[dict[str, Any]]) -> str:
    lines = [
        "| budget | batch | difference (test %) | 95% CI | pairs | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for c in comparisons:
        verdict = "significant" if c["significant"] else "not significant"
        lines.append(
            f"| {c['budget']} | {c['batch_size']} | {c['comparison']}: {c['difference']:+.2f} "
            f"| [{c['difference'] - c['ci']:+.2f}, {c['difference'] + c['ci']:+.2f}] "
            f"| {c['pairs']} | {verdict} |"
        )
    return "\n".join(lines)


def _format_time_to_target(study: StudyConfig, rows: list[dict[str, Any]], target: float) -> str:
    lines = [
        "| optimizer | batch | reached | steps | training images | training seconds |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        reach = row["time_to_target"]
        if reach is None:
            continue
        if reach["reached"] == 0:
            values = ["never", "-", "-"]
        else:
            values = [
                f"{reach['step']:g}",
                f"{reach['images']:,.0f}",
                f"{reach['train_seconds']:.1f}",
            ]
        lines.append(
            f"| {row['optimizer']} | {row['batch_size']} | {reach['reached']}/{reach['of']} | "
            + " | ".join(values)
            + " |"
        )
    return "\n".join(lines)


def _conclusion(
    study: StudyConfig, rows: list[dict[str, Any]], comparisons: list[dict[str, Any]]
) -> list[str]:
    """Plain-language sentences drawn from the intervals alone."""
    sentences = []
    large = max(study.batch_sizes)
    for budget in study.budgets():
        name = "equal epochs" if budget == "epochs" else "equal steps"
        done = [
            r
            for r in rows
            if r["budget"] == budget and r["batch_size"] == large and r["test_acc_mean"]
        ]
        if not done:
            continue
        best = max(done, key=lambda r: r["test_acc_mean"])
        against = [
            c
            for c in comparisons
            if c["kind"] == "optimizers"
            and c["budget"] == budget
            and c["batch_size"] == large
            and best["optimizer"] in c["comparison"].split(" - ")
        ]
        clear = [c for c in against if c["significant"]]
        sentence = f"At batch {large} ({name}), {best['optimizer']} has the highest mean test "
        sentence += f"accuracy ({best['test_acc_mean']:.2f}%); "
        if against and len(clear) == len(against):
            sentence += "its lead over every other optimizer is outside the 95% intervals."
        elif clear:
            sentence += (
                "its lead is outside the 95% intervals only for "
                + ", ".join(c["comparison"] for c in clear)
                + "; the rest are not significant."
            )
        else:
            sentence += "no difference between optimizers there is significant."
        sentences.append(sentence)
        effects = [c for c in comparisons if c["kind"] == "batch" and c["budget"] == budget]
        if effects:
            parts = [
                f"{c['comparison'].split(':')[0]} {c['difference']:+.2f} "
                f"({'significant' if c['significant'] else 'not significant'})"
                for c in effects
            ]
            sentences.append(
                f"Going from batch {min(study.batch_sizes)} to {large} ({name}) changes test "
                "accuracy by: " + ", ".join(parts) + "."
            )
    return sentences


def format_report(
    study: StudyConfig, records: Records, metadata: Mapping[str, Any], status: str
) -> str:
    """The whole summary in Markdown: tables, differences, time to target, conclusion."""
    rows = summarize(study, records)
    comparisons = paired_differences(study, rows)
    target = target_accuracy(study, records)
    parts = [
        f"# Large-batch study: {study.dataset} (status: {status})",
        "",
        f"Test accuracy (%), mean ± 95% CI over {study.seeds} fresh seeds of the lr chosen on "
        f"validation accuracy at seed {study.base_seed}. `*`: chosen lr still at its grid's "
        "edge after every widening; `n=`: fewer seeds finished; `d=`: diverged seeds "
        "(loss not finite, or ending above its first step's).",
    ]
    for budget in study.budgets():
        title = (
            f"## Equal epochs ({study.epochs} at every batch)"
            if budget == "epochs"
            else "## Equal steps (every batch the same number of optimizer steps)"
        )
        parts += ["", title, "", format_table(study, rows, budget)]
    if any(r["noise_scale"] is not None for r in rows):
        parts += [
            "",
            "## Gradient noise scale at the end of training",
            "",
            "`B_simple = tr(Σ)/|G|²` in examples (McCandlish et al., 2018), measured after "
            "every epoch at the weights the run reached (eight micro-batches of an eighth of "
            "the run's batch against the whole batch, the epochs' measurements averaged with "
            "weight 0.9 on the past), "
            "then averaged over the seeds. Past a batch of about `B_simple` a larger batch "
            "buys ever fewer steps; a negative value means the gradient's signal was too "
            "small against its noise to measure.",
        ]
        for budget in study.budgets():
            label = "equal epochs" if budget == "epochs" else "equal steps"
            parts += ["", f"{label}:", "", format_noise_scale_table(study, rows, budget)]
    if comparisons:
        parts += [
            "",
            "## Paired differences (same seeds)",
            "",
            "`not significant`: the 95% interval of the difference covers zero.",
            "",
            _format_differences(comparisons),
        ]
    if target is not None:
        parts += [
            "",
            f"## Time to {target:g}% validation accuracy (equal-epoch runs, median over seeds)",
            "",
            "Training seconds exclude evaluation; they depend on the machine (see below).",
            "",
            _format_time_to_target(study, rows, target),
        ]
    parts += ["", "## Conclusion", ""]
    parts += [f"- {s}" for s in _conclusion(study, rows, comparisons)]
    parts += [f"- Caveat: {c}" for c in _caveats(study)]
    invocations = metadata.get("invocations", [])
    parts += ["", "## Provenance", ""]
    for item in invocations:
        parts.append(
            f"- `{item.get('command')}` at {item.get('started')}: commit "
            f"{item.get('git_commit')}{' (dirty)' if item.get('git_dirty') else ''}, "
            f"sngm-integrations {item.get('sngm_integrations')}, torch {item.get('torch')}, "
            f"timm {item.get('timm')}, {item.get('device_name')} "
            f"({item.get('new_runs', 0)} new runs, {item.get('wall_seconds')} s)"
        )
    timed = [r["cpu_seconds"] for r in records.values() if "cpu_seconds" in r]
    if timed:
        parts.append(
            f"- CPU time of the {len(timed)} runs that record it: {sum(timed):,.0f} s "
            "(on a busy machine a better measure of the cost than wall time)"
        )
    parts.append(f"- Reproduce: `{metadata.get('reproduce')}`")
    return "\n".join(parts) + "\n"


def _caveats(study: StudyConfig) -> list[str]:
    caveats = [
        f"one model (ResNet-{6 * study.depth + 2}, width {study.width}) on one dataset "
        f"({study.dataset}"
        + (f", {study.train_size} training images" if study.train_size else "")
        + (f", resized to {study.image_size}x{study.image_size}" if study.image_size else "")
        + "); other models, data and budgets can order the optimizers differently.",
        f"each lr is chosen from {study.lr_points}+ points 2x apart at one seed; a finer grid "
        "or tuning other knobs (momentum, warmup, weight decay) could move every number.",
    ]
    if study.seeds < 5:
        caveats.append(
            f"{study.seeds} seeds give wide intervals: a difference called not significant "
            "may still be real."
        )
    return caveats


def _write_atomically(path: Path, text: str) -> None:
    temporary = path.with_suffix(path.suffix + ".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def write_json(
    out: Path,
    study: StudyConfig,
    records: Records,
    metadata: Mapping[str, Any],
    status: str,
) -> None:
    """Write `study.json`: settings, provenance, status, summary, differences, runs."""
    rows = summarize(study, records)
    document = {
        "status": status,
        "study": study.to_dict(),
        "environment": dict(metadata),
        "target_val_acc": target_accuracy(study, records),
        "summary": rows,
        "paired_differences": paired_differences(study, rows),
        "runs": list(records.values()),
    }
    _write_atomically(out / "study.json", json.dumps(document, indent=1) + "\n")


_RUN_COLUMNS = (
    "optimizer", "batch_size", "lr", "seed", "steps", "val_acc", "test_acc", "val_loss",
    "test_loss", "initial_loss", "final_train_loss", "noise_scale", "diverged",
    "train_seconds", "seconds", "cpu_seconds", "key",
)  # fmt: skip

_SUMMARY_COLUMNS = (
    "budget", "optimizer", "batch_size", "steps", "best_lr", "lr_at_edge", "widened",
    "val_acc", "seeds", "test_acc_mean", "test_acc_ci", "final_train_loss", "noise_scale",
    "diverged_seeds",
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
    metadata: Mapping[str, Any],
    status: str,
    plots: bool = True,
) -> str:
    """Write study.json, runs.csv, summary.csv, summary.md and the plots; return the report."""
    write_json(out, study, records, metadata, status)
    runs = []
    for record in records.values():
        final = record["train_loss"][-1] if record["train_loss"] else None
        runs.append({**record["config"], **record, "final_train_loss": final})
    runs.sort(key=lambda r: (r["batch_size"], r["optimizer"], r["steps"], r["lr"], r["seed"]))
    _write_csv(out / "runs.csv", _RUN_COLUMNS, runs)
    _write_csv(out / "summary.csv", _SUMMARY_COLUMNS, summarize(study, records))
    report = format_report(study, records, metadata, status)
    (out / "summary.md").write_text(report)
    if plots:
        plot_study(out, study, records)
    return report


def plot_study(out: Path, study: StudyConfig, records: Records) -> list[Path]:
    """Write the four PNG plots and return their paths.

    `accuracy_vs_batch_size.png`: test accuracy per optimizer, one panel per budget,
    error bars the 95% CI, markers only at the batch sizes run; beneath each, the noise
    scale at the end of those runs against the line where the batch equals it.
    `accuracy_vs_lr.png`: validation accuracy over every grid, the chosen lr circled.
    `train_loss.png`: training loss against optimizer steps of each chosen lr.
    `time_to_accuracy.png`: steps to the target validation accuracy against batch size.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summarize(study, records)
    budgets = study.budgets()
    batch_sizes = sorted(study.batch_sizes)
    shift = {name: 1.04 ** (i - (len(study.optimizers) - 1) / 2) for i, name in
             enumerate(study.optimizers)}  # fmt: skip
    paths = []

    figure, axes = plt.subplots(
        2, len(budgets), figsize=(5 * len(budgets), 7.5), squeeze=False, sharex="col"
    )
    for axis, noise_axis, budget in zip(axes[0], axes[1], budgets, strict=True):
        for optimizer in study.optimizers:
            done = [
                r
                for r in rows
                if r["budget"] == budget and r["optimizer"] == optimizer and r["test_acc_mean"]
            ]
            axis.errorbar(
                [r["batch_size"] * shift[optimizer] for r in done],
                [r["test_acc_mean"] for r in done],
                yerr=[0.0 if math.isnan(r["test_acc_ci"]) else r["test_acc_ci"] for r in done],
                fmt="o",
                capsize=3,
                label=optimizer,
            )
        axis.set_xscale("log", base=2)
        axis.set_xticks(batch_sizes, [str(b) for b in batch_sizes])
        axis.minorticks_off()
        axis.set_ylabel("test accuracy (%), error bars: 95% CI")
        axis.set_title("equal epochs" if budget == "epochs" else "equal steps")
        axis.grid(alpha=0.3)
        axis.legend()
        _plot_noise_scale(noise_axis, study, rows, budget, shift)
    paths.append(_save(figure, out / "accuracy_vs_batch_size.png"))

    figure, axes = plt.subplots(
        len(budgets), len(batch_sizes), figsize=(4 * len(batch_sizes), 3.3 * len(budgets)),
        squeeze=False, sharey=True,
    )  # fmt: skip
    for row_axes, budget in zip(axes, budgets, strict=True):
        for axis, batch_size in zip(row_axes, batch_sizes, strict=True):
            for optimizer in study.optimizers:
                (row,) = [
                    r
                    for r in rows
                    if (r["budget"], r["optimizer"], r["batch_size"])
                    == (budget, optimizer, batch_size)
                ]
                grid = zip(row["lr_grid"], row["grid_val_acc"], strict=True)
                points = [(lr, acc) for lr, acc in grid if acc is not None]
                if not points:
                    continue
                lrs, accuracies = [p[0] for p in points], [p[1] for p in points]
                (line,) = axis.plot(lrs, accuracies, "o-", label=optimizer)
                if row["best_lr"] is not None:
                    chosen = dict(points)[row["best_lr"]]
                    axis.plot(
                        [row["best_lr"]], [chosen], "o", ms=12, mfc="none", color=line.get_color()
                    )
            axis.set_xscale("log")
            axis.set_xlabel("learning rate")
            axis.set_title(f"batch {batch_size}, {budget}", fontsize=9)
            axis.grid(alpha=0.3)
        row_axes[0].set_ylabel(f"val. accuracy (%), seed {study.base_seed}")
    axes[0][0].legend(fontsize=8, title="circled: chosen", title_fontsize=8)
    paths.append(_save(figure, out / "accuracy_vs_lr.png"))

    figure, axes = plt.subplots(
        1, len(batch_sizes), figsize=(4 * len(batch_sizes), 3.5), squeeze=False, sharey=True
    )
    for axis, batch_size in zip(axes[0], batch_sizes, strict=True):
        for row in rows:
            if (row["budget"], row["batch_size"]) != ("epochs", batch_size) or not row["seeds"]:
                continue
            group = ("epochs", row["optimizer"], batch_size)
            runs = seed_records(study, records, group, row["best_lr"])
            length = min(len(r["history"]) for r in runs)
            steps = [p["step"] for p in runs[0]["history"][:length]]
            mean = [statistics.fmean(r["history"][i]["train_loss"] for r in runs)
                    for i in range(length)]  # fmt: skip
            axis.plot(steps, mean, label=f"{row['optimizer']} (lr {row['best_lr']:g})")
        axis.set_yscale("log")
        axis.set_xlabel("optimizer steps")
        axis.set_title(f"batch {batch_size}, equal epochs (mean over seeds)", fontsize=9)
        axis.grid(alpha=0.3)
        if axis.lines:
            axis.legend(fontsize=8)
    axes[0][0].set_ylabel("training loss (per epoch)")
    paths.append(_save(figure, out / "train_loss.png"))

    target = target_accuracy(study, records)
    figure, axis = plt.subplots(figsize=(5.5, 4))
    for optimizer in study.optimizers:
        done = [
            r
            for r in rows
            if r["budget"] == "epochs"
            and r["optimizer"] == optimizer
            and r["time_to_target"]
            and r["time_to_target"]["reached"]
        ]
        axis.plot(
            [r["batch_size"] * shift[optimizer] for r in done],
            [r["time_to_target"]["step"] for r in done],
            "o",
            label=optimizer,
        )
    axis.set_xscale("log", base=2)
    if any(r["time_to_target"] and r["time_to_target"]["reached"] for r in rows):
        axis.set_yscale("log")
    axis.set_xticks(batch_sizes, [str(b) for b in batch_sizes])
    axis.minorticks_off()
    axis.set_xlabel("batch size")
    axis.set_ylabel("optimizer steps (median over seeds)")
    axis.set_title(f"steps to {target:g}% validation accuracy" if target else "no target")
    axis.grid(alpha=0.3)
    axis.legend()
    paths.append(_save(figure, out / "time_to_accuracy.png"))
    return paths


def _plot_noise_scale(
    axis: Any, study: StudyConfig, rows: list[dict[str, Any]], budget: str, shift: dict[str, float]
) -> None:
    """The end-of-training noise scale per optimizer against batch size (positive values
    only, on a log axis), with the line where the batch equals the noise scale."""
    batch_sizes = sorted(study.batch_sizes)
    for optimizer in study.optimizers:
        measured = [
            r
            for r in rows
            if r["budget"] == budget
            and r["optimizer"] == optimizer
            and r["noise_scale"] is not None
            and r["noise_scale"] > 0
        ]
        axis.plot(
            [r["batch_size"] * shift[optimizer] for r in measured],
            [r["noise_scale"] for r in measured],
            "o",
            label=optimizer,
        )
    axis.plot(batch_sizes, batch_sizes, "k--", linewidth=1, label="batch = noise scale")
    axis.set_xscale("log", base=2)
    axis.set_yscale("log")
    axis.set_xticks(batch_sizes, [str(b) for b in batch_sizes])
    axis.minorticks_off()
    axis.set_xlabel("batch size")
    axis.set_ylabel("noise scale B_simple at the end (examples)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize="small")


def _save(figure: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
