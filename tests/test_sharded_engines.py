"""A plain SNGM under real sharding engines (DeepSpeed ZeRO, FSDP1) on 2 gloo CPU ranks
takes the step of one process on the whole batch, or raises a clear error."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_cpu_ranks

from sngm_integrations import SNGM

WORKER = Path(__file__).parent / "distributed" / "engine_worker.py"
sys.path.insert(0, str(WORKER.parent))
import engine_worker as worker  # noqa: E402

pytestmark = pytest.mark.slow


def run_workers(out: Path, engine: str, ranks: int = 2) -> Path:
    run_cpu_ranks(WORKER, str(out), engine, ranks=ranks, env={"DS_ACCELERATOR": "cpu"}, timeout=400)
    return out


@pytest.fixture(scope="module")
def deepspeed_results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("needs DeepSpeed (make setup installs it)")
    return run_workers(tmp_path_factory.mktemp("deepspeed"), "deepspeed")


@pytest.fixture(scope="module")
def fsdp1_results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return run_workers(tmp_path_factory.mktemp("fsdp1"), "fsdp1")


@pytest.fixture(scope="module")
def fsdp1_hybrid_results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return run_workers(tmp_path_factory.mktemp("fsdp1_hybrid"), "fsdp1-hybrid", ranks=4)


def one_process(
    groups: int, frozen: bool = False, weight_decay: float = worker.WEIGHT_DECAY
) -> tuple[list[torch.Tensor], torch.Tensor]:
    model = worker.full_model()
    if frozen:
        for layer in (model[0], model[2]):
            layer.requires_grad_(False)
    optimizer = SNGM(worker.param_groups(model, groups, weight_decay), lr=0.1, momentum=0.9)
    for step in range(worker.STEPS):
        x, y = worker.batch(step)
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
    assert optimizer.last_grad_norm is not None
    return [p.detach() for p in model.parameters()], optimizer.last_grad_norm


def assert_one_process_step(result: dict, groups: int, frozen: bool = False) -> None:
    expected, expected_norm = one_process(groups, frozen)
    assert len(result["params"]) == len(expected)
    for value, want in zip(result["params"], expected, strict=True):
        torch.testing.assert_close(value.reshape(want.shape), want, rtol=0, atol=1e-5)
    torch.testing.assert_close(result["norm"], expected_norm, rtol=1e-5, atol=0)


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize(
    ("stage", "wrapper"),
    [(0, "SNGM"), (1, "DeepSpeedZeroOptimizer"), (2, "DeepSpeedZeroOptimizer")],
)
def test_deepspeed_zero_steps_like_one_process(
    deepspeed_results: Path, stage: int, wrapper: str, groups: int
) -> None:
    result = torch.load(deepspeed_results / f"zero{stage}_groups{groups}.pt", weights_only=False)
    assert result["wrapper"] == wrapper
    assert "error" not in result, result.get("error")
    assert_one_process_step(result, groups)


@pytest.mark.parametrize(
    ("stage", "wrapper"), [(0, "FP16_UnfusedOptimizer"), (2, "DeepSpeedZeroOptimizer")]
)
def test_deepspeed_bf16_divides_by_deepspeeds_global_norm(
    deepspeed_results: Path, stage: int, wrapper: str
) -> None:
    result = torch.load(deepspeed_results / f"zero{stage}_groups2_bf16.pt", weights_only=False)
    assert result["wrapper"] == wrapper
    assert result["dtype"] == "torch.bfloat16"
    # Weight decay 0: SNGM's norm is DeepSpeed's own, of the fp32 gradient partitions.
    deepspeed_norm = torch.as_tensor(result["deepspeed_norm"], dtype=torch.float32)
    torch.testing.assert_close(result["norm"], deepspeed_norm, rtol=1e-5, atol=0)
    # The steps are one process's, up to bfloat16's rounding of the forward pass.
    expected, _ = one_process(2, weight_decay=0.0)
    for value, want in zip(result["params"], expected, strict=True):
        torch.testing.assert_close(value, want, rtol=0, atol=1e-2)


@pytest.mark.parametrize(
    ("name", "groups", "partitions"),
    [("zero3_groups1", 1, 1), ("zero3_groups2", 2, 2), ("zero3_groups2_subgroups8", 2, 4)],
)
def test_deepspeed_zero3_sub_groups_step_like_one_process(
    deepspeed_results: Path, name: str, groups: int, partitions: int
) -> None:
    result = torch.load(deepspeed_results / f"{name}.pt", weights_only=False)
    assert result["wrapper"] == "DeepSpeedZeroOptimizer_Stage3"
    assert result["partitions"] == partitions  # the sub-groups ZeRO-3 steps one by one
    assert "error" not in result, result.get("error")
    assert_one_process_step(result, groups)


@pytest.mark.parametrize("use_orig_params", [True, False])
@pytest.mark.parametrize("strategy", ["FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD"])
def test_fsdp1_steps_like_one_process(
    fsdp1_results: Path, strategy: str, use_orig_params: bool
) -> None:
    groups = 2 if use_orig_params else 1
    name = f"fsdp1_{strategy}_orig{int(use_orig_params)}_groups{groups}.pt"
    result = torch.load(fsdp1_results / name, weights_only=False)
    assert result["wrapper"] == "FullyShardedDataParallel"
    assert result["strategy"] == strategy
    assert result["flat_parameters"] == (0 if use_orig_params else 1)
    full_numel = sum(p.numel() for p in worker.full_model().parameters())
    if strategy != "NO_SHARD":  # this rank really holds a shard, not the whole model
        assert result["local_numel"] < full_numel
    assert_one_process_step(result, groups)


@pytest.mark.parametrize("use_orig_params", [True, False])
def test_fsdp1_with_frozen_layers_steps_like_one_process(
    fsdp1_results: Path, use_orig_params: bool
) -> None:
    name = f"fsdp1_FULL_SHARD_orig{int(use_orig_params)}_groups1_frozen.pt"
    result = torch.load(fsdp1_results / name, weights_only=False)
    assert result["wrapper"] == "FullyShardedDataParallel"
    if use_orig_params:  # rank 0's half of the one flat parameter is all frozen
        assert result["tensors_with_grad"] == 0
    assert_one_process_step(result, 1, frozen=True)


@pytest.fixture(scope="module")
def hf_zero2_result(tmp_path_factory: pytest.TempPathFactory) -> dict:
    pytest.importorskip("transformers")
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("needs DeepSpeed (make setup installs it)")
    out = tmp_path_factory.mktemp("hf_deepspeed")
    tests = Path(__file__).parent
    python_path = [str(tests.parent), str(tests), os.environ.get("PYTHONPATH", "")]
    env = {
        "PYTHONPATH": os.pathsep.join(filter(None, python_path)),
        "DS_ACCELERATOR": "cpu",
        "TOKENIZERS_PARALLELISM": "false",
    }
    worker_script = tests / "distributed" / "hf_deepspeed_worker.py"
    run_cpu_ranks(worker_script, str(out), "2", env=env, timeout=400)
    return torch.load(out / "hf_zero2.pt", weights_only=False)


def test_hf_trainer_under_deepspeed_zero2_steps_like_one_process(
    hf_zero2_result: dict, tmp_path: Path
) -> None:
    from hf_fixtures.tiny_text_task import TINY_RUN_ARGS, build_dataset, build_tiny_model
    from transformers import Trainer, TrainingArguments

    import hf_trainer  # noqa: F401  (registers optim="sngm")

    assert hf_zero2_result["chain"] == [
        "DeepSpeedOptimizerWrapper",
        "DeepSpeedZeroOptimizer",
        "SNGM",
    ]
    assert hf_zero2_result["engine"] == "DeepSpeedEngine"
    assert hf_zero2_result["global_step"] == 3
    # SNGM divides by DeepSpeed's own global norm (weight decay 0), not a partition's.
    assert hf_zero2_result["norm"].item() == pytest.approx(
        hf_zero2_result["deepspeed_norm"], rel=1e-5
    )
    args = TrainingArguments(
        output_dir=str(tmp_path), optim="sngm", weight_decay=0.0, **TINY_RUN_ARGS
    )
    trainer = Trainer(model=build_tiny_model(), args=args, train_dataset=build_dataset(8))
    trainer.train()
    expected = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
    torch.testing.assert_close(hf_zero2_result["params"], expected, rtol=0, atol=1e-5)


def test_fsdp1_no_shard_ignores_a_given_process_group_with_a_warning(fsdp1_results: Path) -> None:
    result = torch.load(
        fsdp1_results / "fsdp1_NO_SHARD_orig1_groups2_world_group.pt", weights_only=False
    )
    assert result["strategy"] == "NO_SHARD"
    assert any("ignores process_group under FSDP1 NO_SHARD" in w for w in result["warnings"])
    assert_one_process_step(result, 2)  # the norm is not inflated by sqrt(2)


def test_fsdp1_hybrid_shard_needs_its_shard_group(fsdp1_hybrid_results: Path) -> None:
    refused = torch.load(
        fsdp1_hybrid_results / "fsdp1_HYBRID_SHARD_orig1_groups2.pt", weights_only=False
    )
    assert refused["strategy"] == "HYBRID_SHARD"
    assert "HYBRID_SHARD" in refused["error"] and "process_group" in refused["error"]
    result = torch.load(
        fsdp1_hybrid_results / "fsdp1_HYBRID_SHARD_orig1_groups2_shard_group.pt",
        weights_only=False,
    )
    assert result["strategy"] == "HYBRID_SHARD"
    full_numel = sum(p.numel() for p in worker.full_model().parameters())
    assert result["local_numel"] < full_numel
    assert_one_process_step(result, 2)
