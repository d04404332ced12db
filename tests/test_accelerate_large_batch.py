"""The Accelerate example, run for real: multi-process on CPU (gloo), resume, FSDP2 on GPU.

Every run is a separate launch of `examples/accelerate_large_batch.py`: `torchrun` for
two CPU processes (`accelerate launch --cpu` would start only one), plain `python` for
one. The model is the example's BatchNorm-free MLP, so a gradient does not depend on how
its batch is split, and runs that split the same batch differently must agree.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sngm_integrations.vision import FashionMNISTUnavailable, load_fashion_mnist

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "accelerate_large_batch.py"
CONFIGS = ROOT / "examples" / "accelerate_configs"

# 256 images in batches of 64: 4 optimizer steps per epoch, so 6 steps cross an epoch
# (and its reshuffle), and a checkpoint at step 3 lies mid-epoch. Half the steps are
# warmup, so every step has its own learning rate and a mis-stepped schedule shows.
MICRO_BATCH = 16
TINY_RUN = [
    "--model", "mlp", "--width", "32", "--subset", "256", "--eval-subset", "64",
    "--max-steps", "6", "--warmup-fraction", "0.5", "--lr", "0.5", "--log-every", "1",
]  # fmt: skip


def _fashion_mnist_missing() -> bool:
    try:
        load_fashion_mnist(download=False)
    except FashionMNISTUnavailable:
        return True
    return False


pytestmark = pytest.mark.skipif(
    _fashion_mnist_missing(), reason="Fashion-MNIST is not installed (dataset-fashion-mnist)"
)


def launch(
    output_dir: Path, *args: str, processes: int = 1, cpu: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run the example in `processes` CPU processes (torchrun when more than one)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    if cpu:
        env["ACCELERATE_USE_CPU"] = "1"
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    command = [*launcher, str(EXAMPLE), *TINY_RUN, *args, "--output-dir", str(output_dir)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stderr[-4000:]}"
    return result


def final_parameters(output_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(output_dir / "model" / "model.safetensors")


def assert_same_parameters(
    got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], atol: float
) -> None:
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=atol, msg=name)


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """2 processes x 2 accumulation x 16 examples, checkpointing every 3 steps."""
    output_dir = tmp_path_factory.mktemp("two_processes")
    result = launch(
        output_dir,
        "--per-device-batch", str(MICRO_BATCH), "--grad-accum", "2", "--checkpoint-every", "3",
        processes=2,
    )  # fmt: skip
    return output_dir, result.stdout


@pytest.mark.slow
def test_two_processes_with_accumulation_match_one_process_with_the_whole_batch(
    two_process_run: tuple[Path, str], tmp_path: Path
) -> None:
    output_dir, _ = two_process_run
    launch(tmp_path, "--per-device-batch", str(4 * MICRO_BATCH), "--grad-accum", "1")
    one_process = final_parameters(tmp_path)
    two_processes = final_parameters(output_dir)
    assert_same_parameters(two_processes, one_process, atol=1e-5)
    # The tolerance is tight: the last three steps alone moved the weights far more.
    mid_run = load_file(output_dir / "checkpoints" / "step_3" / "model.safetensors")
    assert (one_process["1.weight"] - mid_run["1.weight"]).abs().max() > 1e-2


@pytest.mark.slow
def test_comm_hook_gives_sngm_its_norm_and_the_noise_scale(tmp_path: Path) -> None:
    """--comm-hook on 2 processes: every step's norm comes from the all-reduce, the weights
    are those of one process with the whole batch, and the noise scale is measured."""
    no_decay = ("--weight-decay", "0")
    launch(tmp_path / "one", *no_decay, "--per-device-batch", str(4 * MICRO_BATCH))
    hooked = launch(
        tmp_path / "hooked", *no_decay, "--comm-hook",
        "--per-device-batch", str(MICRO_BATCH), "--grad-accum", "2",
        processes=2,
    )  # fmt: skip
    assert "measures the gradient norm itself" not in hooked.stderr
    metrics = json.loads((tmp_path / "hooked" / "metrics.json").read_text())
    assert metrics["allreduce_norm_steps"] == 6
    assert math.isfinite(metrics["noise_scale"])
    assert json.loads((tmp_path / "one" / "metrics.json").read_text())["allreduce_norm_steps"] == 0
    assert_same_parameters(
        final_parameters(tmp_path / "hooked"), final_parameters(tmp_path / "one"), atol=1e-5
    )


def test_comm_hook_without_ddp_is_refused_by_name(tmp_path: Path) -> None:
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "PYTHONPATH": str(ROOT)}
    command = [
        sys.executable,
        str(EXAMPLE),
        *TINY_RUN,
        "--comm-hook",
        "--output-dir",
        str(tmp_path),
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "--comm-hook needs DDP" in result.stderr


@pytest.mark.slow
def test_resume_from_a_mid_epoch_checkpoint_continues_exactly(
    two_process_run: tuple[Path, str], tmp_path: Path
) -> None:
    output_dir, _ = two_process_run
    checkpoint = output_dir / "checkpoints" / "step_3"
    result = launch(
        tmp_path,
        "--per-device-batch", str(MICRO_BATCH), "--grad-accum", "2",
        "--resume-from", str(checkpoint),
        processes=2,
    )  # fmt: skip
    assert "at step 3" in result.stdout
    assert_same_parameters(final_parameters(tmp_path), final_parameters(output_dir), atol=0.0)
    resumed = json.loads((tmp_path / "metrics.json").read_text())
    assert resumed["optimizer_steps"] == 6


@pytest.mark.slow
def test_run_reports_effective_batch_metrics_and_tracker_logs(
    two_process_run: tuple[Path, str],
) -> None:
    output_dir, stdout = two_process_run
    assert "effective batch 64 = 16 per device x 2 processes x 2 accumulation" in stdout
    metrics = json.loads((output_dir / "metrics.json").read_text())
    assert metrics["effective_batch"] == 64
    assert metrics["num_processes"] == 2
    assert metrics["optimizer_steps"] == 6
    assert metrics["skipped_steps"] == 0
    assert math.isfinite(metrics["noise_scale"])  # measured on the logged steps
    assert ", noise scale " in stdout
    assert 0.0 <= metrics["eval/accuracy"] <= 1.0
    assert list(output_dir.glob("sngm/events.out.tfevents.*")), "no TensorBoard event file"


def _load_example_module():
    spec = importlib.util.spec_from_file_location("accelerate_large_batch", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass resolves annotations through it
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("argument", "value"),
    [("--grad-accum", "0"), ("--per-device-batch", "-1"), ("--warmup-fraction", "1.5")],
)
def test_bad_arguments_are_named_in_the_error(
    argument: str, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    example = _load_example_module()
    with pytest.raises(SystemExit):
        example.parse_args([argument, value])
    assert f"{argument} must be" in capsys.readouterr().err


def test_configs_are_valid_accelerate_configs() -> None:
    from accelerate.commands.config.config_args import load_config_from_file

    configs = {path.stem: load_config_from_file(str(path)) for path in CONFIGS.glob("*.yaml")}
    assert set(configs) == {"single_gpu", "multi_gpu", "fsdp2", "deepspeed_zero2"}
    assert configs["single_gpu"].num_processes == 1
    assert configs["fsdp2"].fsdp_config["fsdp_version"] == 2
    deepspeed_file = ROOT / configs["deepspeed_zero2"].deepspeed_config["deepspeed_config_file"]
    deepspeed = json.loads(deepspeed_file.read_text())
    assert deepspeed["zero_optimization"]["stage"] == 2
    assert deepspeed["zero_allow_untested_optimizer"] is True


@pytest.mark.cuda
@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="FSDP2 needs CUDA here: Accelerate does not apply FSDP to CPU (MULTI_CPU) runs",
)
def test_fsdp2_run_matches_the_unsharded_run(tmp_path: Path) -> None:
    processes = min(torch.cuda.device_count(), 2)
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--mixed_precision", "no"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def run(config: str, output_dir: Path, processes: int, *args: str) -> dict[str, torch.Tensor]:
        command = [
            *accelerate, "--config_file", str(CONFIGS / config), "--num_processes",
            str(processes), str(EXAMPLE), *TINY_RUN, *args, "--output-dir", str(output_dir),
        ]  # fmt: skip
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stderr[-4000:]}"
        return final_parameters(output_dir)

    sharded = run(
        "fsdp2.yaml", tmp_path / "fsdp2", processes,
        "--per-device-batch", str(MICRO_BATCH), "--grad-accum", "2",
    )  # fmt: skip
    unsharded = run(
        "single_gpu.yaml", tmp_path / "single", 1,
        "--per-device-batch", str(2 * processes * MICRO_BATCH),
    )  # fmt: skip
    assert_same_parameters(sharded, unsharded, atol=1e-4)
