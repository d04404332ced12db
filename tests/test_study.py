"""The large-batch study's plumbing, on a tiny synthetic dataset, and its data on real files."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from sngm_integrations.noise_scale import GradientNoiseScale
from sngm_integrations.study import StudyConfig, preset, run_key, run_study
from sngm_integrations.study.cli import build_parser, command_line, main, study_from_args
from sngm_integrations.study.data import (
    augment_batch,
    load_study_data,
    split_data,
    synthetic_dataset,
)
from sngm_integrations.study.optimizers import build_optimizer
from sngm_integrations.study.report import (
    best_lr,
    format_table,
    grid_lrs,
    mean_ci,
    paired_differences,
    summarize,
)
from sngm_integrations.study.train import probe_noise_scale, recalibrate_batch_norm, train_run
from sngm_integrations.vision import FASHION_MNIST_DIRS, ResNet

PLOTS = (
    "accuracy_vs_batch_size.png",
    "accuracy_vs_lr.png",
    "train_loss.png",
    "time_to_accuracy.png",
)


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny runs on a shared 2-core machine: one thread each, as the study's workers use."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_study(**overrides: object) -> StudyConfig:
    settings: dict[str, object] = {
        "dataset": "synthetic",
        "train_size": 128,
        "val_size": 64,
        "test_size": 128,
        "depth": 1,
        "width": 4,
        "epochs": 2,
        "batch_sizes": (32, 64),
        "optimizers": ("msgd", "sngm"),
        "lr_points": 2,
        "max_widenings": 1,
        "seeds": 2,
        "eval_batch_size": 256,
        "bn_recalibration_images": 64,
    }
    settings.update(overrides)
    return StudyConfig(**settings)  # type: ignore[arg-type]


def fake_record(study: StudyConfig, group: tuple[str, str, int], lr: float, seed: int, **values):
    config = study.run_config(*group, lr, seed)
    record = {
        "key": run_key(config),
        "config": config.to_dict(),
        "train_loss": [1.0, 0.5],
        "history": [],
        "diverged": False,
        "val_acc": 50.0,
        "test_acc": 50.0,
    }
    record.update(values)
    return record


def records_of(*records: dict) -> dict[str, dict]:
    return {r["key"]: r for r in records}


@pytest.fixture(scope="module")
def finished_study(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[StudyConfig, Path]]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    study = tiny_study()
    out = tmp_path_factory.mktemp("study")
    result = run_study(study, out, progress=False)
    assert result.status == "complete"
    torch.set_num_threads(threads)
    yield study, out


def read_runs(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]


def test_grids_have_the_same_points_2x_apart_and_budgets_their_steps() -> None:
    study = preset("full")
    for name in study.optimizers:
        for batch in study.batch_sizes:
            lrs = study.initial_lrs(name, batch)
            assert len(lrs) == study.lr_points == 3
            assert lrs[1] / lrs[0] == pytest.approx(2) and lrs[2] / lrs[1] == pytest.approx(2)
            assert lrs[1] == study.lr_centers[name], "no batch scaling: the centre stays put"
    assert study.budget_steps("epochs", 8192) == 30 * 7  # 54,000 images, 7 steps an epoch
    assert study.budget_steps("epochs", 256) == 30 * 211
    assert study.budget_steps("steps", 256) == study.budget_steps("steps", 8192) == 210
    # The largest batch's runs are the same under both budgets, so they run once.
    same = [study.run_config(b, "sngm", 8192, 0.2, 1) for b in ("epochs", "steps")]
    assert run_key(same[0]) == run_key(same[1])
    assert study.run_config("epochs", "sngm", 8192, 0.2, 1).warmup_steps == 10
    assert tiny_study(equal_steps=0).budgets() == ["epochs"]


def test_grid_widens_while_its_best_is_at_an_edge_and_best_lr_uses_validation() -> None:
    study = tiny_study(batch_sizes=(64,), optimizers=("sngm",), lr_points=3, max_widenings=2)
    group = ("epochs", "sngm", 64)
    low, mid, high = study.initial_lrs("sngm", 64)
    records = records_of(
        fake_record(study, group, low, 0, val_acc=50.0, test_acc=99.0),
        fake_record(study, group, mid, 0, val_acc=60.0, test_acc=10.0),
    )
    assert best_lr(study, records, group) is None, "grid not finished"
    records.update(records_of(fake_record(study, group, high, 0, val_acc=70.0, test_acc=10.0)))
    assert grid_lrs(study, records, group) == [low, mid, high, high * 2]
    assert best_lr(study, records, group) is None, "widening: best at the top edge"
    records.update(records_of(fake_record(study, group, high * 2, 0, val_acc=65.0)))
    assert best_lr(study, records, group) == high, "chosen on validation, not test accuracy"

    # A diverged run is never chosen over a finite one; ties go to the smaller lr.
    records = records_of(
        *[fake_record(study, group, lr, 0, val_acc=60.0) for lr in (low, mid)],
        fake_record(study, group, high, 0, val_acc=90.0, diverged=True),
    )
    assert best_lr(study, records, group) is None  # low edge: widened downwards first
    assert grid_lrs(study, records, group)[0] == pytest.approx(low / 2)
    records.update(records_of(fake_record(study, group, low / 2, 0, val_acc=10.0)))
    assert best_lr(study, records, group) == low

    # A grid that has used up its widenings keeps its edge and says so.
    capped = tiny_study(batch_sizes=(64,), optimizers=("sngm",), lr_points=2, max_widenings=0)
    a, b = capped.initial_lrs("sngm", 64)
    records = records_of(
        fake_record(capped, group, a, 0, val_acc=1.0), fake_record(capped, group, b, 0, val_acc=2.0)
    )
    assert best_lr(capped, records, group) == b


def test_intervals_paired_differences_and_not_significant() -> None:
    mean, half = mean_ci([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(4.303 * 1.0 / math.sqrt(3), rel=1e-4)
    assert math.isnan(mean_ci([5.0])[1])

    study = tiny_study(
        batch_sizes=(64,), optimizers=("msgd", "sngm"), lr_points=1, max_widenings=0, seeds=3
    )
    records = {}
    # sngm is msgd + 1 on every seed, give or take 0.1: a clear paired difference even
    # though the seeds spread msgd's own results over 10 points.
    for seed, base in zip((1, 2, 3), (70.0, 80.0, 75.0), strict=True):
        for name, acc in (("msgd", base), ("sngm", base + 1 + 0.1 * (seed - 2))):
            group = ("epochs", name, 64)
            lr = study.initial_lrs(name, 64)[0]
            records.update(records_of(fake_record(study, group, lr, seed, test_acc=acc)))
            records.update(records_of(fake_record(study, group, lr, 0, val_acc=50.0)))
    rows = summarize(study, records)
    msgd = next(r for r in rows if r["optimizer"] == "msgd" and r["budget"] == "epochs")
    assert msgd["seed_list"] == [1, 2, 3], "fresh seeds only, not the selection seed"
    assert msgd["test_acc_mean"] == pytest.approx(75.0) and msgd["test_acc_ci"] > 10
    (difference,) = [
        c for c in paired_differences(study, rows) if c["budget"] == "epochs"
    ]  # one batch, one optimizer pair
    assert difference["comparison"] == "sngm - msgd"
    assert difference["difference"] == pytest.approx(1.0)
    assert difference["significant"] is True
    assert "75.00 ±" in format_table(study, rows, "epochs")

    for record in records.values():  # now the sign flips with the seed
        seed = record["config"]["seed"]
        if record["config"]["optimizer"] == "sngm" and seed > 0:
            record["test_acc"] = (70.0, 80.0, 75.0)[seed - 1] + (-2, 3, -1)[seed - 1]
    rows = summarize(study, records)
    (difference,) = [c for c in paired_differences(study, rows) if c["budget"] == "epochs"]
    assert difference["significant"] is False


def test_weight_decay_groups_and_lars_adapts_only_the_weights() -> None:
    model = ResNet(1, 4)
    matrices = [p for p in model.parameters() if p.ndim > 1]
    vectors = [p for p in model.parameters() if p.ndim <= 1]
    for name in ("msgd", "lars", "sngm"):
        optimizer = build_optimizer(name, model.parameters(), 0.1, 0.9, 5e-4)
        decayed, plain = optimizer.param_groups
        assert decayed["params"] == matrices and decayed["weight_decay"] == 5e-4
        assert plain["params"] == vectors and plain["weight_decay"] == 0.0
    (single,) = build_optimizer("msgd", model.parameters(), 0.1, 0.9, 5e-4, True).param_groups
    assert single["weight_decay"] == 5e-4

    # LARS: a 1-d tensor takes a plain SGD step (lr * grad), a weight the trust ratio's.
    weight = torch.nn.Parameter(torch.ones(4, 4))
    bias = torch.nn.Parameter(torch.ones(4))
    lars = build_optimizer("lars", [weight, bias], 1.0, 0.0, 5e-4)
    assert type(lars).__module__.startswith("timm.")
    weight.grad, bias.grad = torch.full((4, 4), 0.5), torch.full((4,), 0.5)
    lars.step()
    assert torch.allclose(bias, torch.full((4,), 0.5)), "bias: neither adapted nor decayed"
    ratio = 1e-3 * 4.0 / (2.0 + 4.0 * 5e-4)  # trust * ||w|| / (||g|| + wd ||w||)
    assert torch.allclose(weight, torch.full((4, 4), 1 - ratio * (0.5 + 5e-4)), atol=1e-6)


def test_batch_norm_statistics_are_recomputed_from_training_images() -> None:
    study = tiny_study()
    data = synthetic_dataset()
    config = study.run_config("epochs", "sngm", 32, 0.1, 0)
    split = split_data(data, config, "cpu")
    model = ResNet(1, 4)
    stem_norm = model.stem[1]
    stem_norm.running_mean.fill_(100.0)
    recalibrate_batch_norm(model, split, config)
    features = model.stem[0](split.normalize(split.train_images[:64]))
    expected = features.mean((0, 2, 3))
    assert torch.allclose(stem_norm.running_mean, expected, atol=1e-5)
    assert stem_norm.momentum == 0.1, "momentum restored"


def test_noise_scale_probe_touches_neither_the_model_nor_its_gradients() -> None:
    study = tiny_study()
    config = study.run_config("epochs", "sngm", 32, 0.1, 0)
    split = split_data(synthetic_dataset(), config, "cpu")
    model = ResNet(1, 4)
    first = next(model.parameters())
    first.grad = torch.ones_like(first)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    estimator = GradientNoiseScale()
    probe_noise_scale(model, split, config, torch.Generator().manual_seed(0), estimator)
    assert estimator.updates == 1 and estimator.noise_scale is not None
    assert math.isfinite(float(estimator.noise_scale))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BatchNorm buffers too
    assert torch.equal(first.grad, torch.ones_like(first))
    assert all(p.grad is None for p in list(model.parameters())[1:])


def test_runs_record_the_noise_scale_and_train_as_without_the_probe(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    study = tiny_study()
    config = study.run_config("epochs", "sngm", 32, 0.1, 0)
    split = split_data(synthetic_dataset(), config, "cpu")
    probed = train_run(config, split)
    assert probed["noise_scale"] is not None and math.isfinite(probed["noise_scale"])
    assert all("noise_scale" in point for point in probed["history"])
    monkeypatch.setattr("sngm_integrations.study.train.probe_noise_scale", lambda *args: None)
    unprobed = train_run(config, split)
    assert unprobed["noise_scale"] is None
    assert probed["train_loss"] == unprobed["train_loss"]
    assert [p["val_acc"] for p in probed["history"]] == [p["val_acc"] for p in unprobed["history"]]
    assert probed["test_acc"] == unprobed["test_acc"]


def test_study_runs_grids_then_fresh_seeds_and_writes_reports_with_provenance(
    finished_study: tuple[StudyConfig, Path],
) -> None:
    study, out = finished_study
    runs = read_runs(out)
    assert len({r["key"] for r in runs}) == len(runs)
    document = json.loads((out / "study.json").read_text())
    assert document["status"] == "complete"
    (invocation,) = document["environment"]["invocations"]
    assert invocation["torch"] == torch.__version__ and invocation["new_runs"] == len(runs)
    assert len(invocation["git_commit"] or "x" * 40) == 40
    assert all(r["provenance"]["torch"] == torch.__version__ for r in runs)
    assert all(r["provenance"]["device_name"] for r in runs)
    for row in document["summary"]:
        group = (row["budget"], row["optimizer"], row["batch_size"])
        grid = [
            r
            for r in runs
            if r["config"]["optimizer"] == row["optimizer"]
            and r["config"]["batch_size"] == row["batch_size"]
            and r["config"]["steps"] == row["steps"]
            and r["config"]["seed"] == study.base_seed
        ]
        assert sorted(r["config"]["lr"] for r in grid) == sorted(row["lr_grid"]), group
        assert row["widened"] == len(row["lr_grid"]) - study.lr_points
        assert row["seed_list"] == [1, 2], "fresh seeds, the selection seed left out"
        for record in grid:
            assert len(record["history"]) == math.ceil(record["steps"] / record["steps_per_epoch"])
            assert record["history"][-1]["step"] == record["steps"]
        measured = [
            r["noise_scale"]
            for r in runs
            if r["config"]["optimizer"] == row["optimizer"]
            and r["config"]["batch_size"] == row["batch_size"]
            and r["config"]["steps"] == row["steps"]
            and r["config"]["lr"] == row["best_lr"]
            and r["config"]["seed"] in row["seed_list"]
        ]
        assert row["noise_scale"] == pytest.approx(sum(measured) / len(measured)), group
    csv_lines = (out / "runs.csv").read_text().splitlines()
    assert csv_lines[0].startswith("optimizer,batch_size,lr,seed,steps")
    assert len(csv_lines) == len(runs) + 1
    report = (out / "summary.md").read_text()
    for text in ("## Equal epochs", "## Equal steps", "## Paired differences", "## Conclusion",
                 "Caveat:", "Reproduce: `sngm-study --preset", "| msgd |",
                 "CPU time of", "## Gradient noise scale"):  # fmt: skip
        assert text in report
    for name in PLOTS:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rerun_resumes_and_records_each_invocation(
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
    invocations = json.loads((out / "study.json").read_text())["environment"]["invocations"]
    assert [i["new_runs"] for i in invocations] == [len(lines), result.new_runs, 0]


def test_time_budget_stops_new_runs_and_still_writes_results(tmp_path: Path) -> None:
    study = tiny_study(time_budget=1e-6)
    result = run_study(study, tmp_path, progress=False, plots=False)
    assert result.status == "time budget reached"
    assert result.new_runs == 0
    assert "(not run)" in (tmp_path / "summary.md").read_text()


def test_same_seed_same_run_and_a_run_that_blows_up_is_diverged() -> None:
    study = tiny_study()
    split = split_data(synthetic_dataset(), study.run_config("epochs", "msgd", 32, 0.1, 0), "cpu")
    config = study.run_config("epochs", "lars", 32, 1.0, seed=0)
    first, again = train_run(config, split), train_run(config, split)
    other = train_run(study.run_config("epochs", "lars", 32, 1.0, seed=1), split)
    assert first["train_loss"] == again["train_loss"]
    assert first["history"] == [
        {**point, "train_seconds": p["train_seconds"]}
        for point, p in zip(again["history"], first["history"], strict=True)
    ]
    assert other["train_loss"] != first["train_loss"]
    assert first["steps"] == study.epochs * 4  # 128 images in batches of 32
    assert not first["diverged"]
    assert first["cpu_seconds"] > 0
    wild = train_run(study.run_config("epochs", "msgd", 32, 300.0, seed=0), split)
    assert wild["diverged"], wild["train_loss"]


@pytest.mark.slow
def test_parallel_workers_give_the_same_results_as_one_process(
    finished_study: tuple[StudyConfig, Path], tmp_path: Path
) -> None:
    _, serial_out = finished_study
    study = tiny_study(
        batch_sizes=(64,), optimizers=("sngm",), seeds=1, workers=2, max_widenings=0, equal_steps=0
    )
    result = run_study(study, tmp_path, progress=False, plots=False)
    assert result.new_runs == 3
    serial = {r["key"]: r for r in read_runs(serial_out)}
    shared = [key for key in result.records if key in serial]
    assert shared
    for key in shared:
        assert result.records[key]["train_loss"] == serial[key]["train_loss"], "workers differ"


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
    with pytest.raises(ValueError, match="warmup_fraction"):
        tiny_study(warmup_fraction=1.5)
    with pytest.raises(ValueError, match="lr_centers\\['sngm'\\]"):
        tiny_study(lr_centers={"msgd": 0.1, "sngm": -1.0})
    with pytest.raises(ValueError, match="preset='huge'"):
        preset("huge")
    study = tiny_study(train_size=10_000)
    with pytest.raises(ValueError, match="train_size=10000"):
        split_data(synthetic_dataset(), study.run_config("epochs", "sngm", 32, 0.1, 0), "cpu")


def test_command_line_overrides_the_preset_and_reproduces_itself(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["--preset", "quick", "--epochs", "3", "--batch-sizes", "32,64", "--lr-center",
            "sngm=0.5", "--lr-scaling", "msgd=sqrt", "--image-size", "none",
            "--device", "cpu"]  # fmt: skip
    study = study_from_args(build_parser().parse_args(argv), "quick")
    assert study.epochs == 3 and study.batch_sizes == (32, 64) and study.image_size is None
    assert study.width == preset("quick").width
    assert study.initial_lrs("sngm", 64) == [0.25, 0.5, 1.0]
    assert study.initial_lrs("msgd", 1024)[1] == pytest.approx(0.6)
    assert study.precision == "fp32"
    rebuilt = command_line(study, "out").split()
    assert rebuilt[:5] == ["sngm-study", "--preset", "quick", "--out", "out"]
    again = study_from_args(build_parser().parse_args(rebuilt[1:]), "quick")
    assert again == study
    for bad, message in [
        (["--optimizers", "msgd,adam"], "adam"),
        (["--lr-center", "sngm=fast"], "sngm=fast"),
        (["--batch-sizes", "big"], "big"),
    ]:
        with pytest.raises(SystemExit):
            main(["--preset", "quick", *bad])
        assert message in capsys.readouterr().err


def test_help_shows_the_presets_values_and_a_bare_run_on_cpu_only_plans(
    capsys: pytest.CaptureFixture[str],
) -> None:
    help_text = build_parser().format_help()
    assert "quick: 15; full: 30" in " ".join(help_text.split())  # --epochs
    if torch.cuda.is_available():
        pytest.skip("a bare run on a GPU machine starts the full preset")
    assert main([]) == 0
    printed = capsys.readouterr().out
    assert "nothing is started" in printed and "quick:" in printed and "full:" in printed
    assert "training images/s" in printed


def test_full_preset_at_small_size_from_the_command_line_prints_the_report(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    code = main(
        ["--preset", "full", "--dataset", "synthetic", "--train-size", "64", "--val-size",
         "32", "--test-size", "64", "--image-size", "none", "--width", "4", "--epochs", "1",
         "--batch-sizes", "64", "--optimizers", "sngm", "--lr-points", "1", "--seeds", "1",
         "--max-widenings", "0", "--bn-recalibration-images", "32", "--device", "cpu",
         "--out", str(tmp_path), "--no-progress", "--no-plots"]
    )  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "| sngm |" in printed and "batch 64" in printed and "status: complete" in printed
    assert "## Conclusion" in printed
    document = json.loads((tmp_path / "study.json").read_text())
    assert document["study"]["width"] == 4 and document["study"]["seeds"] == 1
    assert document["study"]["depth"] == 3 and document["study"]["workers"] == 1  # full: ResNet-20


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
def test_fashion_mnist_splits_into_train_validation_and_test_and_resizes() -> None:
    study = preset("full")
    data = load_study_data(study)
    assert data.train_images.shape == (60_000, 1, 28, 28)
    assert data.test_images.shape == (10_000, 1, 28, 28)
    split = split_data(data, study.run_config("epochs", "sngm", 256, 0.1, 0), "cpu")
    assert len(split.train_labels) == 54_000
    assert len(split.val_labels) == 6_000
    assert len(split.test_labels) == 10_000
    assert torch.bincount(split.val_labels, minlength=10).min() > 450  # about 600 per class
    normalized = split.normalize(split.train_images[:2000])
    assert abs(normalized.mean().item()) < 0.1 and abs(normalized.std().item() - 1) < 0.1
    quick = preset("quick")
    small = split_data(data, quick.run_config("epochs", "sngm", 32, 0.1, 0), "cpu")
    assert small.train_images.shape == (2560, 1, 14, 14) and small.crop_padding == 1
    assert small.train_images.dtype == torch.uint8
    assert len(small.val_labels) == 1000 and len(small.test_labels) == 2000
