"""The large-batch study's plumbing, on a tiny synthetic dataset, and its data on real files."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sngm_integrations.study import StudyConfig, preset, run_key, run_study
from sngm_integrations.study.cli import build_parser, main, study_from_args
from sngm_integrations.study.data import (
    augment_batch,
    load_study_data,
    split_data,
    synthetic_dataset,
)
from sngm_integrations.study.report import best_lr, format_table, summarize
from sngm_integrations.study.train import train_run
from sngm_integrations.vision import FASHION_MNIST_DIRS

PLOTS = ("accuracy_vs_batch_size.png", "accuracy_vs_lr.png", "train_loss.png")


def tiny_study(**overrides: object) -> StudyConfig:
    settings: dict[str, object] = {
        "dataset": "synthetic",
        "train_size": 128,
        "val_size": 64,
        "test_size": 128,
        "width": 4,
        "epochs": 1,
        "batch_sizes": (32, 64),
        "optimizers": ("msgd", "sngm"),
        "lr_grids": {"msgd": (0.05, 0.2), "sngm": (0.2, 0.8), "lars": (1.0, 4.0)},
        "seeds": 2,
        "warmup_epochs": 0.5,
        "eval_batch_size": 256,
    }
    settings.update(overrides)
    return StudyConfig(**settings)  # type: ignore[arg-type]


def fake_record(study: StudyConfig, optimizer: str, batch: int, lr: float, seed: int, **values):
    config = study.run_config(optimizer, batch, lr, seed)
    record = {"key": run_key(config), "config": config.to_dict(), "train_loss": [1.0, 0.5]}
    record.update(values)
    return record


@pytest.fixture(scope="module")
def finished_study(tmp_path_factory: pytest.TempPathFactory) -> tuple[StudyConfig, Path]:
    study = tiny_study()
    out = tmp_path_factory.mktemp("study")
    result = run_study(study, out, progress=False)
    assert result.status == "complete"
    return study, out


def read_runs(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]


def test_best_lr_is_chosen_on_validation_accuracy_not_test() -> None:
    study = tiny_study(batch_sizes=(64,), optimizers=("sngm",), lr_grids={"sngm": (0.1, 0.2, 0.4)})
    lrs = study.lrs("sngm", 64)
    val_and_test = {lrs[0]: (70.0, 90.0), lrs[1]: (80.0, 60.0), lrs[2]: (75.0, 95.0)}
    records = {}
    for lr, (val, test) in val_and_test.items():
        record = fake_record(study, "sngm", 64, lr, study.base_seed, val_acc=val, test_acc=test)
        records[record["key"]] = record
    assert best_lr(study, records, "sngm", 64) == lrs[1]

    incomplete = dict(list(records.items())[:2])
    assert best_lr(study, incomplete, "sngm", 64) is None

    for record in records.values():
        record["val_acc"] = 50.0
    assert best_lr(study, records, "sngm", 64) == lrs[0], "ties go to the smaller lr"


def test_summary_averages_the_seeds_of_the_best_lr_with_grid_run_as_first_seed() -> None:
    study = tiny_study(batch_sizes=(64,), optimizers=("msgd",), seeds=3)
    low, high = study.lrs("msgd", 64)
    records = {}
    for lr, seed, val, test in [
        (low, 0, 60.0, 50.0),
        (high, 0, 70.0, 80.0),
        (high, 1, 0.0, 82.0),
        (high, 2, 0.0, 84.0),
        (low, 1, 99.0, 99.0),  # a seed of the lr that was not chosen: ignored
    ]:
        record = fake_record(study, "msgd", 64, lr, seed, val_acc=val, test_acc=test)
        records[record["key"]] = record
    (row,) = summarize(study, records)
    assert row["best_lr"] == high
    assert row["test_acc"] == [80.0, 82.0, 84.0]
    assert row["test_acc_mean"] == pytest.approx(82.0)
    assert row["test_acc_std"] == pytest.approx(2.0)
    assert row["lr_at_edge"] is True
    assert "82.00 ± 2.00 (lr" in format_table(study, [row])


def test_study_runs_grids_then_seeds_and_writes_table_json_csv_and_plots(
    finished_study: tuple[StudyConfig, Path],
) -> None:
    study, out = finished_study
    runs = read_runs(out)
    groups = len(study.batch_sizes) * len(study.optimizers)
    grid_size = 2
    assert len(runs) == groups * grid_size + groups * (study.seeds - 1)
    assert len({r["key"] for r in runs}) == len(runs)

    document = json.loads((out / "study.json").read_text())
    assert document["status"] == "complete"
    assert document["environment"]["torch"] == torch.__version__
    assert document["environment"]["device"] == "cpu"
    for row in document["summary"]:
        # The grid run is seed 0; exactly the missing seeds were added, all at the best lr.
        seeds = sorted(
            r["config"]["seed"]
            for r in runs
            if r["config"]["optimizer"] == row["optimizer"]
            and r["config"]["batch_size"] == row["batch_size"]
            and r["config"]["lr"] == row["best_lr"]
        )
        assert seeds == list(range(study.seeds))
        assert row["seeds"] == study.seeds
        grid = [
            r
            for r in runs
            if r["config"]["optimizer"] == row["optimizer"]
            and r["config"]["batch_size"] == row["batch_size"]
            and r["config"]["seed"] == 0
        ]
        assert row["best_lr"] == max(grid, key=lambda r: r["val_acc"])["config"]["lr"]
        assert all(len(r["train_loss"]) == study.epochs for r in grid)

    csv_lines = (out / "runs.csv").read_text().splitlines()
    assert csv_lines[0].startswith("optimizer,batch_size,lr,seed")
    assert len(csv_lines) == len(runs) + 1
    table = (out / "summary.md").read_text()
    assert "| msgd |" in table and "| sngm |" in table and "batch 64" in table
    for name in PLOTS:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rerun_resumes_without_redoing_finished_runs(
    finished_study: tuple[StudyConfig, Path], tmp_path: Path
) -> None:
    study, finished = finished_study
    out = tmp_path / "resumed"
    shutil.copytree(finished, out)
    lines = (out / "runs.jsonl").read_text().splitlines()
    # As if killed and rerun: a grid run is missing and the last line was cut short.
    kept = lines[:3] + lines[4:-1]
    (out / "runs.jsonl").write_text("\n".join(kept) + "\n" + lines[-1][:40] + "\n")

    result = run_study(study, out, progress=False, plots=False)
    assert result.status == "complete"
    assert result.new_runs == len(lines) - len(kept)
    for line in kept:
        record = json.loads(line)
        assert result.records[record["key"]]["seconds"] == record["seconds"]

    again = run_study(study, out, progress=False, plots=False)
    assert again.new_runs == 0
    assert again.table == result.table


def test_time_budget_stops_new_runs_and_still_writes_results(tmp_path: Path) -> None:
    study = tiny_study(time_budget=1e-6)
    result = run_study(study, tmp_path, progress=False, plots=False)
    assert result.status == "time budget reached"
    assert result.new_runs == 0
    document = json.loads((tmp_path / "study.json").read_text())
    assert document["status"] == "time budget reached"
    assert "(not run)" in (tmp_path / "summary.md").read_text()


def test_same_seed_same_run_other_seed_other_run_and_lars_from_timm() -> None:
    study = tiny_study()
    data = synthetic_dataset()
    config = study.run_config("lars", 32, 1.0, seed=0)
    split = split_data(data, config, "cpu")
    first, again = train_run(config, split), train_run(config, split)
    other = train_run(study.run_config("lars", 32, 1.0, seed=1), split)
    assert first["train_loss"] == again["train_loss"]
    assert first["test_acc"] == again["test_acc"]
    assert other["train_loss"] != first["train_loss"]
    assert first["steps"] == study.epochs * 4  # 128 images in batches of 32


def test_parallel_workers_give_the_same_results_as_one_process(
    finished_study: tuple[StudyConfig, Path], tmp_path: Path
) -> None:
    serial_study, serial_out = finished_study
    study = tiny_study(batch_sizes=(64,), optimizers=("sngm",), seeds=1, workers=2)
    result = run_study(study, tmp_path, progress=False, plots=False)
    assert result.new_runs == 2
    serial = {r["key"]: r for r in read_runs(serial_out)}
    for key, record in result.records.items():
        assert record["train_loss"] == serial[key]["train_loss"], "spawned workers differ"


def test_augmentation_crops_and_flips_each_image_on_its_own() -> None:
    images = torch.arange(4 * 2 * 6 * 6, dtype=torch.uint8).view(4, 2, 6, 6)
    out = augment_batch(images, 2, torch.Generator().manual_seed(0))
    assert out.shape == images.shape and out.dtype == torch.uint8 and out.is_contiguous()
    padded = torch.nn.functional.pad(images, (2,) * 4)
    for image, result in zip(padded, out, strict=True):
        windows = [
            image[:, r : r + 6, c : c + 6].flip(2) if flip else image[:, r : r + 6, c : c + 6]
            for r in range(5)
            for c in range(5)
            for flip in (False, True)
        ]
        assert any(torch.equal(result, w) for w in windows)
    same = augment_batch(images, 2, torch.Generator().manual_seed(0))
    assert torch.equal(out, same)


def test_invalid_settings_name_the_argument() -> None:
    with pytest.raises(ValueError, match="optimizers contains 'adam'"):
        tiny_study(optimizers=("adam",))
    with pytest.raises(ValueError, match="warmup_epochs"):
        tiny_study(warmup_epochs=5.0)
    with pytest.raises(ValueError, match="preset='huge'"):
        preset("huge")
    study = tiny_study(train_size=10_000)
    with pytest.raises(ValueError, match="train_size=10000"):
        split_data(synthetic_dataset(), study.run_config("sngm", 32, 0.1, 0), "cpu")


def test_command_line_overrides_the_preset_and_rejects_bad_values(
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = build_parser().parse_args(
        ["--preset", "quick", "--epochs", "3", "--batch-sizes", "32,64", "--lrs", "sngm=0.5,1",
         "--lr-scaling", "msgd=none", "--device", "cpu"]
    )  # fmt: skip
    study = study_from_args(args)
    assert study.epochs == 3 and study.batch_sizes == (32, 64)
    assert study.width == preset("quick").width
    assert study.lr_grids["sngm"] == (0.5, 1.0)
    assert study.lrs("msgd", 64) == list(study.lr_grids["msgd"])
    assert study.precision == "fp32"
    for bad, message in [
        (["--optimizers", "msgd,adam"], "adam"),
        (["--lrs", "sngm=fast"], "sngm=fast"),
        (["--batch-sizes", "big"], "big"),
    ]:
        with pytest.raises(SystemExit):
            main(bad)
        assert message in capsys.readouterr().err


def test_command_line_study_prints_the_table(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = main(
        ["--dataset", "synthetic", "--train-size", "64", "--val-size", "32", "--test-size", "64",
         "--width", "4", "--epochs", "1", "--batch-sizes", "64", "--optimizers", "sngm",
         "--lrs", "sngm=0.5", "--seeds", "1", "--warmup-epochs", "0", "--device", "cpu",
         "--out", str(tmp_path), "--no-progress", "--no-plots"]
    )  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "| sngm |" in printed and "batch 64" in printed and "status: complete" in printed


def test_importing_the_package_leaves_the_study_and_its_extras_alone() -> None:
    check = (
        "import sys, sngm_integrations;"
        "assert 'sngm_integrations.study' not in sys.modules;"
        "import sngm_integrations.study;"
        "assert not {'matplotlib', 'timm'} & set(sys.modules), sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", check], check=True)


@pytest.mark.skipif(
    not any((folder / "t10k-labels-idx1-ubyte.gz").exists() for folder in FASHION_MNIST_DIRS),
    reason="Fashion-MNIST files not installed (apt-get install dataset-fashion-mnist)",
)
def test_fashion_mnist_splits_into_train_validation_and_test() -> None:
    study = preset("full")
    data = load_study_data(study)
    assert data.train_images.shape == (60_000, 1, 28, 28)
    assert data.test_images.shape == (10_000, 1, 28, 28)
    split = split_data(data, study.run_config("sngm", 256, 0.1, 0), "cpu")
    assert len(split.train_labels) == 54_000
    assert len(split.val_labels) == 6_000
    assert len(split.test_labels) == 10_000
    assert torch.bincount(split.val_labels, minlength=10).min() > 450  # about 600 per class
    normalized = split.normalize(split.train_images[:2000])
    assert abs(normalized.mean().item()) < 0.1 and abs(normalized.std().item() - 1) < 0.1
