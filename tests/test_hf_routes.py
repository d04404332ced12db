"""The routes around optim="sngm": the unpatched optimizer_cls_and_kwargs pair, the
launcher's monitor flag, the learning-rate warning, training_args.bin and `evaluate`.

The real Trainer, a tiny BERT, CPU only.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("transformers")

from hf_fixtures.tiny_text_task import (  # noqa: E402
    TINY_RUN_ARGS,
    build_dataset,
    build_tiny_model,
)
from transformers import Trainer, TrainingArguments  # noqa: E402

import hf_trainer  # noqa: E402  (registers optim="sngm")
from hf_trainer.__main__ import help_text  # noqa: E402
from sngm_integrations import SNGM  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "hf_fixtures"

ARGS: dict[str, Any] = TINY_RUN_ARGS | dict(weight_decay=0.05, logging_steps=1)


def run_python(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    python_path = [str(REPO_ROOT), str(FIXTURES), os.environ.get("PYTHONPATH", "")]
    full_env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, python_path))}
    full_env.update(CUDA_VISIBLE_DEVICES="", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    full_env.update(env)
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=300
    )


def flat_parameters(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


# --- Trainer(optimizer_cls_and_kwargs=...) without registration -------------------------------

UNPATCHED_SCRIPT = """
import json, sys
import torch
from tiny_text_task import build_dataset, build_tiny_model
from transformers import Trainer, TrainingArguments
from transformers.training_args import OptimizerNames
original_lookup = Trainer.__dict__["get_optimizer_cls_and_kwargs"]
original_post_init = TrainingArguments.__post_init__

from hf_trainer_optim import get_sngm_cls_and_kwargs

args = TrainingArguments(sys.argv[1], optim_args="momentum=0.8", **json.loads(sys.argv[2]))
pair = get_sngm_cls_and_kwargs(args, nesterov=True)
trainer = Trainer(
    model=build_tiny_model(), args=args, train_dataset=build_dataset(),
    optimizer_cls_and_kwargs=pair,
)
trainer.train()
optimizer = trainer.optimizer
while hasattr(optimizer, "optimizer"):
    optimizer = optimizer.optimizer
names = {id(p): n for n, p in trainer.model.named_parameters()}
print(json.dumps({
    "optimizer": type(optimizer).__name__,
    "groups": [
        {"weight_decay": g["weight_decay"], "momentum": g["momentum"], "lr": g["lr"],
         "nesterov": g["nesterov"], "names": [names[id(p)] for p in g["params"]]}
        for g in optimizer.param_groups
    ],
    "sngm_registered": "sngm" in OptimizerNames._value2member_map_,
    "trainer_patched": Trainer.__dict__["get_optimizer_cls_and_kwargs"] is not original_lookup
        or TrainingArguments.__post_init__ is not original_post_init,
    "modules": sorted(m for m in sys.modules if m.split(".")[0] == "hf_trainer"),
    "pair_kwargs": pair[1],
    "parameters": torch.cat([p.detach().flatten() for p in trainer.model.parameters()]).tolist(),
}))
"""


@pytest.mark.slow
def test_optimizer_cls_and_kwargs_trains_like_optim_sngm_without_patching(tmp_path: Path) -> None:
    result = run_python(
        "-c", UNPATCHED_SCRIPT, str(tmp_path / "unpatched"), json.dumps(ARGS), cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["optimizer"] == "SNGM"
    assert not report["sngm_registered"] and not report["trainer_patched"]
    assert report["modules"] == []
    assert report["pair_kwargs"] == {"lr": 0.1, "momentum": 0.8, "nesterov": True}
    decayed, not_decayed = report["groups"]
    assert decayed["weight_decay"] == 0.05 and not_decayed["weight_decay"] == 0.0
    assert "classifier.weight" in decayed["names"]
    assert all(n.endswith("bias") or "LayerNorm" in n for n in not_decayed["names"])
    assert all(g["momentum"] == 0.8 and g["nesterov"] and g["lr"] == 0.1 for g in report["groups"])

    # The registered route with the same settings takes the same steps.
    args = TrainingArguments(
        str(tmp_path / "registered"),
        optim="sngm",
        optim_args="momentum=0.8,nesterov=true",
        **ARGS,
    )
    trainer = Trainer(model=build_tiny_model(), args=args, train_dataset=build_dataset())
    trainer.train()
    torch.testing.assert_close(
        flat_parameters(trainer.model), torch.tensor(report["parameters"]), rtol=0, atol=1e-6
    )


def test_get_sngm_cls_and_kwargs_checks_options_and_optim_args(tmp_path: Path) -> None:
    args = TrainingArguments(str(tmp_path), optim_args="eps=1e-6", **ARGS)
    cls, kwargs = hf_trainer.get_sngm_cls_and_kwargs(args, momentum=0.5, normalize="layer")
    assert cls is SNGM
    assert kwargs == {"lr": 0.1, "eps": 1e-6, "momentum": 0.5, "normalize": "layer"}
    with pytest.raises(ValueError, match=r"momentum=1\.5"):
        hf_trainer.get_sngm_cls_and_kwargs(args, momentum=1.5)
    with pytest.raises(ValueError, match="'betas'"):
        hf_trainer.get_sngm_cls_and_kwargs(args, betas=(0.9, 0.99))
    with pytest.raises(ValueError, match="weight_decay"):
        hf_trainer.get_sngm_cls_and_kwargs(args, weight_decay=0.1)
    bad = TrainingArguments(str(tmp_path), optim_args="eps=-1", **ARGS)
    with pytest.raises(ValueError, match="eps='-1'"):
        hf_trainer.get_sngm_cls_and_kwargs(bad)


# --- the learning-rate warning -----------------------------------------------------------------


def test_an_adamw_like_learning_rate_warns_once_when_the_arguments_are_built(
    tmp_path: Path,
) -> None:
    settings = {**ARGS, "learning_rate": 3e-5}
    with pytest.warns(UserWarning, match=r"learning_rate=3e-05.*learning-rate\.md") as record:
        TrainingArguments(str(tmp_path), optim="sngm", **settings)
    assert len([w for w in record if "AdamW learning rate" in str(w.message)]) == 1
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        TrainingArguments(str(tmp_path), optim="sngm", **settings)  # the same rate again
        TrainingArguments(str(tmp_path), optim="sngm", **ARGS)  # 0.1
        TrainingArguments(str(tmp_path), optim="adamw_torch", **{**ARGS, "learning_rate": 2e-5})
    assert not [w for w in record if "AdamW learning rate" in str(w.message)]


# --- python -m hf_trainer --sngm-monitor -----------------------------------------------------


def test_help_lists_the_monitor_flag_and_the_optim_args_ranges() -> None:
    text = help_text()
    assert "--sngm-monitor" in text and "SNGM_MONITOR=1" in text
    for key, arg in hf_trainer.ACCEPTED_OPTIM_ARGS.items():
        assert f"{key:<14} {arg.kind}" in text
    assert "float in [0, 1)" in text and "float > 0" in text


def tiny_script_args(tmp_path: Path, *extra: str) -> list[str]:
    return [
        str(FIXTURES / "train_tiny.py"),
        "--output_dir", str(tmp_path / "out"),
        "--optim", "sngm",
        "--learning_rate", "0.05",
        "--max_steps", "3",
        "--max_grad_norm", "0",
        "--per_device_train_batch_size", "8",
        "--report_to", "none",
        "--disable_tqdm", "true",
        "--use_cpu",
        "--report_file", str(tmp_path / "report.json"),
        *extra,
    ]  # fmt: skip


def logged_dicts(stdout: str) -> list[dict[str, Any]]:
    """The training logs the Trainer's console printer wrote (one dict per line)."""
    logs = []
    for line in stdout.splitlines():
        if line.startswith("{") and "'loss'" in line:
            logs.append({k: float(v) for k, v in ast.literal_eval(line).items()})
    return logs


@pytest.mark.slow
def test_monitor_flag_logs_sngm_values_from_the_first_logging_interval(tmp_path: Path) -> None:
    result = run_python(
        "-m", "hf_trainer", "--sngm-monitor",
        *tiny_script_args(tmp_path, "--logging_steps", "1"), cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "SNGM monitor: sngm/* values are added to the training logs every 1 steps" in (
        result.stdout
    )
    logs = logged_dicts(result.stdout)
    assert len(logs) == 3
    assert all(entry["sngm/grad_norm"] > 0 and entry["sngm/update_norm"] > 0 for entry in logs)


@pytest.mark.slow
def test_monitor_env_var_says_when_a_short_run_will_not_log(tmp_path: Path) -> None:
    result = run_python(
        "-m", "hf_trainer", *tiny_script_args(tmp_path), cwd=tmp_path, SNGM_MONITOR="1"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "never in this run: logging_steps=500 is more than its 3 steps" in result.stdout
    without = run_python("-m", "hf_trainer", *tiny_script_args(tmp_path), cwd=tmp_path)
    assert without.returncode == 0 and "SNGM monitor" not in without.stdout


# --- training_args.bin --------------------------------------------------------------------------


@pytest.mark.slow
def test_training_args_bin_loads_in_a_process_that_never_imported_hf_trainer(
    tmp_path: Path,
) -> None:
    path = tmp_path / "training_args.bin"
    torch.save(TrainingArguments(str(tmp_path), optim="sngm", **ARGS), path)
    load = (
        "import sys, torch\n"
        f"args = torch.load({str(path)!r}, weights_only=False)\n"
        "from transformers.training_args import OptimizerNames\n"
        "assert args.optim is OptimizerNames.SNGM, args.optim\n"
        "assert 'hf_trainer' in sys.modules\n"
        "print('loaded', args.optim.value)\n"
    )
    result = run_python("-c", load, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "loaded sngm"


# --- evaluate -----------------------------------------------------------------------------------


def test_the_shipped_accuracy_metric_loads_offline_and_drives_the_trainer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    evaluate = pytest.importorskip("evaluate")
    import numpy as np
    from transformers import EvalPrediction

    from hf_trainer.metrics import ACCURACY

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    metric = evaluate.load(ACCURACY)
    assert metric.compute(predictions=[0, 1, 1, 1], references=[0, 1, 0, 0]) == {"accuracy": 0.5}
    assert metric.compute(predictions=[0, 1, 1], references=[0, 1, 0], normalize=False) == {
        "accuracy": 2.0
    }

    def compute_metrics(prediction: EvalPrediction) -> dict[str, Any]:
        predicted = np.argmax(prediction.predictions, axis=-1)
        return metric.compute(predictions=predicted, references=prediction.label_ids)

    dataset = build_dataset()
    trainer = Trainer(
        model=build_tiny_model(),
        args=TrainingArguments(str(tmp_path), optim="sngm", **ARGS),
        train_dataset=dataset,
        compute_metrics=compute_metrics,
    )
    trainer.train()
    logits = trainer.predict(dataset).predictions
    expected = float(np.mean(np.argmax(logits, axis=-1) == np.array(dataset["labels"])))
    assert trainer.evaluate(dataset)["eval_accuracy"] == pytest.approx(expected)
