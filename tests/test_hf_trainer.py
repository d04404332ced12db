"""The Hugging Face Trainer with optim="sngm": the real Trainer, a tiny BERT, CPU only."""

from __future__ import annotations

import importlib
import json
import math
import os
import pickle
import re
import shutil
import subprocess
import sys
import threading
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
from transformers import (  # noqa: E402
    HfArgumentParser,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from transformers.training_args import OptimizerNames  # noqa: E402

import hf_trainer  # noqa: E402  (registers optim="sngm")
from hf_trainer.__main__ import main as hf_trainer_main  # noqa: E402
from sngm_integrations import SNGM  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent / "distributed"))
import noise_scale_worker as noise_problem  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "hf_fixtures"


def training_args(output_dir: Path, **overrides: Any) -> TrainingArguments:
    settings = TINY_RUN_ARGS | dict(output_dir=str(output_dir), optim="sngm", logging_steps=1)
    return TrainingArguments(**(settings | overrides))


def sngm_of(trainer: Trainer) -> SNGM:
    optimizer = trainer.optimizer
    while hasattr(optimizer, "optimizer"):  # Accelerate's wrapper
        optimizer = optimizer.optimizer
    assert isinstance(optimizer, SNGM), type(optimizer)
    return optimizer


def flat_parameters(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten().clone() for p in model.parameters()])


def train(args: TrainingArguments, resume: str | None = None, **trainer_kwargs: Any) -> Trainer:
    trainer = Trainer(
        model=build_tiny_model(),
        args=args,
        train_dataset=build_dataset(),
        **trainer_kwargs,
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer


# --- registration -------------------------------------------------------------------------


def test_sngm_is_an_optimizer_name() -> None:
    member = OptimizerNames("sngm")
    assert member is OptimizerNames.SNGM is OptimizerNames["SNGM"]
    assert member == "sngm" and member.value == "sngm"
    assert "sngm" in [name.value for name in OptimizerNames]
    assert pickle.loads(pickle.dumps(member)) is member


def test_register_is_idempotent_across_calls_reloads_and_threads() -> None:
    members_before = len(OptimizerNames)
    threads = [threading.Thread(target=hf_trainer.register) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    importlib.reload(hf_trainer)
    hf_trainer.register()

    assert len(OptimizerNames) == members_before
    assert hf_trainer.is_registered()
    lookup = Trainer.__dict__["get_optimizer_cls_and_kwargs"].__func__
    original = lookup.__sngm_wraps__
    assert not hasattr(original, "__sngm_wraps__"), "the lookup was wrapped twice"


def test_training_args_serialise_with_sngm(tmp_path: Path) -> None:
    args = training_args(tmp_path, optim_args="momentum=0.8")
    assert args.optim is OptimizerNames.SNGM
    assert json.loads(args.to_json_string())["optim"] == "sngm"
    path = tmp_path / "training_args.bin"
    torch.save(args, path)
    loaded = torch.load(path, weights_only=False)
    assert loaded.optim is OptimizerNames.SNGM and loaded.optim_args == "momentum=0.8"


def test_other_optimizer_names_are_left_to_transformers(tmp_path: Path) -> None:
    adamw_cls, adamw_kwargs = Trainer.get_optimizer_cls_and_kwargs(
        training_args(tmp_path, optim="adamw_torch", learning_rate=3e-4)
    )
    assert adamw_cls is torch.optim.AdamW and adamw_kwargs["lr"] == 3e-4
    sgd_cls, _ = Trainer.get_optimizer_cls_and_kwargs(training_args(tmp_path, optim="sgd"))
    assert sgd_cls is torch.optim.SGD
    with pytest.raises(ValueError, match="not_an_optimizer"):
        training_args(tmp_path, optim="not_an_optimizer")


# --- optim_args -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("optim_args", "expected"),
    [
        (None, {}),
        ("", {}),
        ("momentum=0.8", {"momentum": 0.8}),
        (
            " momentum = 0.95 , nesterov=TRUE,normalize=layer,eps=1e-6 ",
            {"momentum": 0.95, "nesterov": True, "normalize": "layer", "eps": 1e-6},
        ),
        ("foreach=1,maximize=false", {"foreach": True, "maximize": False}),
        ("fused=yes,fused_backend=torch", {"fused": True, "fused_backend": "torch"}),
    ],
)
def test_optim_args_are_typed(optim_args: str | None, expected: dict[str, Any]) -> None:
    parsed = hf_trainer.parse_sngm_optim_args(optim_args)
    assert parsed == expected
    assert all(type(parsed[k]) is type(v) for k, v in expected.items())


@pytest.mark.parametrize(
    ("optim_args", "named"),
    [
        ("betas=0.9", "'betas'"),
        ("momentum=fast", "momentum='fast'"),
        ("momentum=nan", "momentum='nan'"),
        ("nesterov=maybe", "nesterov='maybe'"),
        ("normalize=block", "normalize='block'"),
        ("fused_backend=cuda", "fused_backend='cuda'"),
        ("momentum", "'momentum'"),
        ("momentum=0.9,momentum=0.8", "'momentum'"),
        ("weight_decay=0.1", "weight_decay"),
        ("lr=0.5", "learning_rate"),
    ],
)
def test_bad_optim_args_name_the_key_and_list_accepted_keys(optim_args: str, named: str) -> None:
    with pytest.raises(ValueError) as error:
        hf_trainer.parse_sngm_optim_args(optim_args)
    message = str(error.value)
    assert named in message
    if "twice" not in message:
        assert all(key in message for key in hf_trainer.ACCEPTED_OPTIM_ARGS)


@pytest.mark.parametrize(
    ("optim_args", "named"),
    [
        ("momentum=0.9,nesterov=sometimes", "nesterov='sometimes'"),
        ("momentum=1.5", "momentum='1.5'"),
        ("eps=-1", "eps='-1'"),
        ("momentum=0,nesterov=true", "nesterov=true needs momentum > 0"),
    ],
)
def test_bad_optim_args_fail_when_training_args_are_built(
    tmp_path: Path, optim_args: str, named: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(named)):
        training_args(tmp_path, optim_args=optim_args)
    parser = HfArgumentParser(TrainingArguments)
    with pytest.raises(ValueError, match=re.escape(named)):
        parser.parse_args_into_dataclasses(
            ["--output_dir", str(tmp_path), "--optim", "sngm", "--optim_args", optim_args]
        )
    # Another optimizer's optim_args are left to transformers.
    training_args(tmp_path, optim="adamw_torch", optim_args=optim_args)


# --- the optimizer the Trainer builds --------------------------------------------------------


def test_trainer_builds_sngm_with_requested_hyperparameters_and_decay_groups(
    tmp_path: Path,
) -> None:
    trainer = train(
        training_args(
            tmp_path,
            learning_rate=0.25,
            weight_decay=0.05,
            optim_args="momentum=0.8,nesterov=true,eps=1e-7",
        )
    )
    optimizer = sngm_of(trainer)
    assert trainer.state.global_step == 3
    decayed, not_decayed = optimizer.param_groups
    for group in optimizer.param_groups:
        assert group["lr"] == 0.25
        assert group["momentum"] == 0.8 and group["nesterov"] is True and group["eps"] == 1e-7
        assert group["normalize"] == "global"
    assert decayed["weight_decay"] == 0.05 and not_decayed["weight_decay"] == 0.0

    names = {id(p): n for n, p in trainer.model.named_parameters()}
    decayed_names = [names[id(p)] for p in decayed["params"]]
    not_decayed_names = [names[id(p)] for p in not_decayed["params"]]
    assert "classifier.weight" in decayed_names
    assert all("bias" not in n and "LayerNorm" not in n for n in decayed_names)
    assert any(n.endswith("LayerNorm.weight") for n in not_decayed_names)
    assert all(n.endswith("bias") or "LayerNorm" in n for n in not_decayed_names)
    buffers = [optimizer.state[p]["momentum_buffer"] for p in decayed["params"]]
    assert all(buffer.abs().sum() > 0 for buffer in buffers)


def test_max_grad_norm_warns_once_per_training_and_zero_is_silent(tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match="max_grad_norm=1.0") as record:
        train(training_args(tmp_path, max_grad_norm=1.0, max_steps=2))
    assert len([w for w in record if "max_grad_norm" in str(w.message)]) == 1
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        train(training_args(tmp_path, max_grad_norm=0.0, max_steps=2))
    assert not [w for w in record if "max_grad_norm" in str(w.message)]


def test_learning_rate_schedule_and_warmup_drive_sngm(tmp_path: Path) -> None:
    lrs: list[float] = []

    class RecordLr(TrainerCallback):
        def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):  # type: ignore[no-untyped-def]
            lrs.append(optimizer.param_groups[0]["lr"])

    train(
        training_args(
            tmp_path, lr_scheduler_type="linear", warmup_steps=2, max_steps=6, learning_rate=0.4
        ),
        callbacks=[RecordLr()],
    )
    assert lrs == pytest.approx([0.0, 0.2, 0.4, 0.3, 0.2, 0.1])


# --- large batches and checkpoints --------------------------------------------------------------


def mean_cross_entropy_over_effective_batch(
    outputs: Any, labels: torch.Tensor, num_items_in_batch: int | torch.Tensor | None = None
) -> torch.Tensor:
    """The loss the Trainer divides correctly by the examples of the whole effective batch."""
    return torch.nn.functional.cross_entropy(
        outputs.logits, labels, reduction="sum"
    ) / torch.as_tensor(num_items_in_batch)


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_gradient_accumulation_takes_one_step_per_effective_batch(
    tmp_path: Path, weight_decay: float
) -> None:
    # Without weight decay the model's own loss is used. With BERT's classification head,
    # transformers 4.47 and 5.x sum (not average) the micro-batch losses under accumulation,
    # a factor SNGM's normalization removes. Weight decay is not scaled with it, so there the
    # Trainer's compute_loss_func hook gives the exact mean over the effective batch.
    loss_func = mean_cross_entropy_over_effective_batch if weight_decay else None

    def train_with(name: str, batch_size: int, accumulation_steps: int) -> Trainer:
        args = training_args(
            tmp_path / name,
            per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=accumulation_steps,
            max_steps=2,
            weight_decay=weight_decay,
            optim_args="momentum=0.9",
        )
        return train(args, compute_loss_func=loss_func)

    one_batch = train_with("one_batch", batch_size=24, accumulation_steps=1)
    accumulated = train_with("accumulated", batch_size=8, accumulation_steps=3)
    small_batches = train_with("small_batches", batch_size=8, accumulation_steps=1)

    assert one_batch.state.global_step == accumulated.state.global_step == 2
    expected = flat_parameters(one_batch.model)
    torch.testing.assert_close(flat_parameters(accumulated.model), expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(flat_parameters(small_batches.model), expected, atol=1e-4)


def test_resume_from_checkpoint_restores_momentum_and_continues_exactly(tmp_path: Path) -> None:
    common = dict(
        max_steps=6,
        save_strategy="steps",
        save_steps=3,
        weight_decay=0.01,
        lr_scheduler_type="linear",
        optim_args="momentum=0.9",
    )
    uninterrupted = train(training_args(tmp_path / "full", **common))
    checkpoint = tmp_path / "full" / "checkpoint-3"
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    assert saved["state"] and all(
        state["momentum_buffer"].abs().sum() > 0 for state in saved["state"].values()
    )
    assert torch.load(checkpoint / "training_args.bin", weights_only=False).optim == "sngm"

    resumed = train(training_args(tmp_path / "resumed", **common), resume=str(checkpoint))
    assert resumed.state.global_step == 6
    torch.testing.assert_close(
        flat_parameters(resumed.model), flat_parameters(uninterrupted.model), rtol=0, atol=1e-7
    )

    # Control: the same resume with the momentum buffers zeroed ends somewhere else.
    no_momentum = tmp_path / "no_momentum-3"
    shutil.copytree(checkpoint, no_momentum)
    for state in saved["state"].values():
        state["momentum_buffer"].zero_()
    torch.save(saved, no_momentum / "optimizer.pt")
    restarted = train(training_args(tmp_path / "restarted", **common), resume=str(no_momentum))
    assert not torch.allclose(
        flat_parameters(restarted.model), flat_parameters(uninterrupted.model), atol=1e-4
    )


# --- monitoring ---------------------------------------------------------------------------------


class RecordStep(TrainerCallback):
    """Measures each optimizer step from the outside: gradient norm and weight change."""

    def __init__(self) -> None:
        self.grad_norms: list[float] = []
        self.update_norms: list[float] = []
        self._before: torch.Tensor | None = None

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):  # type: ignore[no-untyped-def]
        squared = 0.0
        for group in optimizer.param_groups:
            for p in group["params"]:
                d = p.grad + group["weight_decay"] * p.detach()
                squared += float(d.double().square().sum())
        self.grad_norms.append(math.sqrt(squared))
        self._before = flat_parameters(kwargs["model"])

    def on_optimizer_step(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        change = flat_parameters(kwargs["model"]) - self._before
        self.update_norms.append(float(change.double().norm()))


def test_monitor_logs_grad_norm_update_norm_and_effective_lr(tmp_path: Path) -> None:
    recorder = RecordStep()
    trainer = Trainer(
        model=build_tiny_model(),
        args=training_args(
            tmp_path, weight_decay=0.01, report_to=["tensorboard"], learning_rate=0.2
        ),
        train_dataset=build_dataset(),
        callbacks=[recorder],
    )
    hf_trainer.add_sngm_monitor(trainer)
    trainer.train()

    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in logs] == [1, 2, 3]
    for entry, grad_norm, update_norm in zip(
        logs, recorder.grad_norms, recorder.update_norms, strict=True
    ):
        assert entry["sngm/grad_norm"] == pytest.approx(grad_norm, rel=1e-5)
        assert entry["sngm/update_norm"] == pytest.approx(update_norm, rel=1e-4)
        assert entry["sngm/effective_lr"] == pytest.approx(0.2 / grad_norm, rel=1e-5)
        assert entry["sngm/skipped_steps"] == 0

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (event_file,) = Path(tmp_path).rglob("events.out.tfevents.*")
    events = EventAccumulator(str(event_file))
    events.Reload()
    grad_norm_tags = [tag for tag in events.Tags()["scalars"] if tag.endswith("sngm/grad_norm")]
    assert grad_norm_tags
    logged = [event.value for event in events.Scalars(grad_norm_tags[0])]
    assert logged == pytest.approx(recorder.grad_norms, rel=1e-5)


def test_monitor_logs_any_optimizer(tmp_path: Path) -> None:
    recorder = RecordStep()
    trainer = train(
        training_args(tmp_path, optim="adamw_torch", learning_rate=1e-3, weight_decay=0.0),
        callbacks=[hf_trainer.SNGMMonitorCallback(), recorder],
    )
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["sngm/grad_norm"] for entry in logs] == pytest.approx(
        recorder.grad_norms, rel=1e-5
    )
    assert [entry["sngm/update_norm"] for entry in logs] == pytest.approx(
        recorder.update_norms, rel=1e-4
    )
    assert not any("sngm/effective_lr" in entry for entry in logs)


class LinearRegressionAtZero(torch.nn.Module):
    """The noise-scale ground truth (tests/distributed/noise_scale_worker.py) as a model
    the Trainer calls."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(noise_problem.DIM, 1, bias=False)
        torch.nn.init.zeros_(self.linear.weight)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": 0.5 * (self.linear(x).squeeze(1) - labels).square().mean()}


class RegressionRows(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    def __init__(self, samples: int) -> None:
        generator = torch.Generator().manual_seed(5)
        self.x = torch.randn(samples, noise_problem.DIM, generator=generator)
        self.y = self.x @ noise_problem.w_star() + torch.randn(samples, generator=generator)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[index], "labels": self.y[index]}


@pytest.mark.slow
def test_noise_scale_under_accumulation_matches_ground_truth(tmp_path: Path) -> None:
    steps, micro_batch, accumulation = 300, 16, 4
    trainer = Trainer(
        model=LinearRegressionAtZero(),
        args=training_args(
            tmp_path,
            optim="sgd",
            learning_rate=0.0,
            per_device_train_batch_size=micro_batch,
            gradient_accumulation_steps=accumulation,
            max_steps=steps,
            report_to=["tensorboard"],
            dataloader_drop_last=True,
        ),
        train_dataset=RegressionRows(steps * micro_batch * accumulation),
    )
    hf_trainer.add_sngm_monitor(trainer, noise_scale_ema_decay=0.99)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "sngm/noise_scale" in entry]
    assert len(logs) == steps
    truth = noise_problem.true_noise_scale(1.0)
    assert logs[-1]["sngm/noise_scale"] == pytest.approx(truth, rel=0.15)
    assert logs[-1]["sngm/update_norm"] == 0.0

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (event_file,) = Path(tmp_path).rglob("events.out.tfevents.*")
    events = EventAccumulator(str(event_file))
    events.Reload()
    (tag,) = [t for t in events.Tags()["scalars"] if t.endswith("sngm/noise_scale")]
    assert events.Scalars(tag)[-1].value == pytest.approx(logs[-1]["sngm/noise_scale"])


def test_noise_scale_is_measured_on_logged_steps_only(tmp_path: Path) -> None:
    callback = hf_trainer.SNGMMonitorCallback()
    trainer = train(
        training_args(tmp_path, gradient_accumulation_steps=2, max_steps=4, logging_steps=2),
        callbacks=[callback],
    )
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in logs] == [2, 4]
    assert all(math.isfinite(entry["sngm/noise_scale"]) for entry in logs)
    assert callback.meter is None  # the hooks are removed when training ends


# --- command line -------------------------------------------------------------------------------


def test_hf_argument_parser_accepts_sngm(tmp_path: Path) -> None:
    parser = HfArgumentParser(TrainingArguments)
    (args,) = parser.parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--optim", "sngm", "--optim_args", "momentum=0.7"]
        + ["--max_grad_norm", "0"]
    )
    assert args.optim is OptimizerNames.SNGM
    optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
    assert optimizer_cls is SNGM and kwargs["momentum"] == 0.7
    with pytest.raises(SystemExit):
        parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--optim", "sngn"])


def run_python(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    python_path = [str(REPO_ROOT), str(FIXTURES), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, python_path))}
    env.update(CUDA_VISIBLE_DEVICES="", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def test_python_m_hf_trainer_runs_an_unmodified_script(tmp_path: Path) -> None:
    script_args = [
        "--output_dir", str(tmp_path / "out"),
        "--optim", "sngm",
        "--optim_args", "momentum=0.7,normalize=layer",
        "--learning_rate", "0.05",
        "--max_steps", "2",
        "--max_grad_norm", "0",
        "--lr_scheduler_type", "constant",
        "--per_device_train_batch_size", "8",
        "--report_to", "none",
        "--use_cpu",
        "--report_file", str(tmp_path / "report.json"),
        "--exit_code", "3",
    ]  # fmt: skip
    result = run_python(
        "-m", "hf_trainer", str(FIXTURES / "train_tiny.py"), *script_args, cwd=tmp_path
    )
    assert result.returncode == 3, result.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["optimizer"] == "SNGM" and report["global_step"] == 2
    assert report["group"]["momentum"] == 0.7 and report["group"]["normalize"] == "layer"
    assert report["group"]["lr"] == 0.05
    saved_args = torch.load(tmp_path / "out" / "training_args.bin", weights_only=False)
    assert saved_args.optim is OptimizerNames.SNGM


def test_torchrun_m_hf_trainer_trains_with_sngm_on_two_processes(tmp_path: Path) -> None:
    result = run_python(
        "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "hf_trainer", str(FIXTURES / "train_tiny.py"),
        "--output_dir", str(tmp_path / "out"),
        "--optim", "sngm",
        "--optim_args", "momentum=0.8",
        "--learning_rate", "0.05",
        "--max_steps", "2",
        "--max_grad_norm", "0",
        "--per_device_train_batch_size", "4",
        "--report_to", "none",
        "--use_cpu",
        "--report_file", str(tmp_path / "report{rank}.json"),
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    reports = [json.loads((tmp_path / f"report{rank}.json").read_text()) for rank in (0, 1)]
    for report in reports:
        assert report["optimizer"] == "SNGM" and report["world_size"] == 2
        assert report["global_step"] == 2 and report["group"]["momentum"] == 0.8
    assert reports[0]["parameters"] == reports[1]["parameters"]


@pytest.mark.slow
def test_sngm_comm_hook_flag_hooks_ddp_on_two_processes(tmp_path: Path) -> None:
    """`torchrun -m hf_trainer --sngm-comm-hook` all-reduces through the hook; SNGM takes
    its norm from it unless the Trainer writes the gradients after the all-reduce (every
    step in the transformers releases that log the norm through `clip_grad_norm_`)."""
    reports, stderr = {}, {}
    for name, flags in (("plain", []), ("hooked", ["--sngm-comm-hook"])):
        result = run_python(
            "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "hf_trainer", *flags, str(FIXTURES / "train_tiny.py"),
            "--output_dir", str(tmp_path / name),
            "--optim", "sngm",
            "--learning_rate", "0.05",
            "--max_steps", "3",
            "--max_grad_norm", "0",
            "--gradient_accumulation_steps", "2",
            "--per_device_train_batch_size", "4",
            "--report_to", "none",
            "--use_cpu",
            "--report_file", str(tmp_path / f"{name}{{rank}}.json"),
            cwd=tmp_path,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        reports[name] = json.loads((tmp_path / f"{name}0.json").read_text())
        stderr[name] = result.stderr
    plain, hooked = reports["plain"], reports["hooked"]
    assert hooked["global_step"] == plain["global_step"] == 3
    assert plain["allreduce_norm_steps"] == 0
    if hasattr(Trainer, "_get_grad_norm"):
        assert hooked["allreduce_norm_steps"] == 0
        assert "writes every gradient after the all-reduce" in stderr["hooked"]
    else:
        assert hooked["allreduce_norm_steps"] == 3
        assert "SNGM measures" not in stderr["hooked"]
    torch.testing.assert_close(
        torch.tensor(hooked["parameters"]), torch.tensor(plain["parameters"]), rtol=1e-5, atol=1e-6
    )


def test_cli_passes_the_exit_status_and_argv_through(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    script = tmp_path / "exits.py"
    script.write_text(
        "import sys\n"
        "from transformers.training_args import OptimizerNames\n"
        "assert OptimizerNames(sys.argv[1]) is OptimizerNames.SNGM\n"
        "sys.exit(int(sys.argv[2]))\n"
    )
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    monkeypatch.setattr(sys, "path", list(sys.path))
    with pytest.raises(SystemExit) as status:
        hf_trainer_main([str(script), "sngm", "7"])
    assert status.value.code == 7
    assert sys.argv == [str(script), "sngm", "7"]

    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(SystemExit) as status:
        hf_trainer_main(["-m", "exits", "sngm", "5"])
    assert status.value.code == 5


def test_cli_rejects_a_missing_script() -> None:
    with pytest.raises(SystemExit, match="no_such_script.py"):
        hf_trainer_main(["no_such_script.py", "--optim", "sngm"])
    with pytest.raises(SystemExit) as status:
        hf_trainer_main([])
    assert status.value.code == 2
