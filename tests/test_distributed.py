"""SNGM's global norm across real processes (gloo on CPU): sharded steps equal one process."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_cpu_ranks

from sngm_integrations import SNGM

WORKER = Path(__file__).parent / "distributed" / "sharded_sngm_worker.py"
sys.path.insert(0, str(WORKER.parent))
import sharded_sngm_worker as worker  # noqa: E402


@pytest.fixture(
    scope="module",
    params=[
        "auto",
        pytest.param(
            "triton",
            marks=pytest.mark.skipif(
                importlib.util.find_spec("triton") is None, reason="needs Triton"
            ),
        ),
    ],
)
def results(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Each scenario's saved tensors, with SNGM's default kernels and with its Triton
    kernels (through Triton's interpreter on CPU)."""
    backend = request.param
    out = tmp_path_factory.mktemp(f"sharded_{backend}")
    # The workers' tensors are on the CPU, so Triton's kernels run in its interpreter.
    env = {"TRITON_INTERPRET": "1"} if backend == "triton" else {}
    run_cpu_ranks(WORKER, str(out), backend, env=env)
    return out


def single_process_run(normalize: str = "global") -> tuple[list[torch.Tensor], torch.Tensor]:
    model = worker.full_model()
    optimizer = SNGM(model.parameters(), **worker.HYPERPARAMETERS, normalize=normalize)
    for step in range(worker.STEPS):
        x, y = worker.batch(step)
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
    assert optimizer.last_grad_norm is not None
    return [p.detach() for p in model.parameters()], optimizer.last_grad_norm


@pytest.mark.slow
def test_parameters_split_across_ranks_step_like_one_process(results: Path) -> None:
    expected, expected_norm = single_process_run()
    for rank in range(2):
        saved = torch.load(results / f"split_rank{rank}.pt", weights_only=True)
        for i, value in saved["params"].items():
            torch.testing.assert_close(value, expected[i], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(saved["norm"], expected_norm, rtol=1e-6, atol=0)
        # One all-reduce per step, not one per tensor.
        assert saved["all_reduces"] == worker.STEPS


@pytest.mark.slow
def test_flat_shards_with_process_group_step_like_one_process(results: Path) -> None:
    expected = torch.cat([p.flatten() for p in single_process_run()[0]])
    shards = [torch.load(results / f"flat_rank{r}.pt", weights_only=True) for r in range(2)]
    joined = torch.cat([s["shard"] for s in shards])
    torch.testing.assert_close(joined, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.slow
@pytest.mark.parametrize("normalize", ["global", "layer"])
def test_fsdp2_dtensor_step_equals_unsharded_step(results: Path, normalize: str) -> None:
    expected, expected_norm = single_process_run(normalize)
    for rank in range(2):
        saved = torch.load(results / f"fsdp2_{normalize}_rank{rank}.pt", weights_only=True)
        for got, want in zip(saved["params"], expected, strict=False):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(saved["norm"], expected_norm, rtol=1e-5, atol=0)


def test_layer_normalization_refuses_flat_shards(tmp_path: Path) -> None:
    import torch.distributed as dist

    store = dist.FileStore(str(tmp_path / "store"), 1)
    group = dist.ProcessGroupGloo(store, 0, 1)
    with pytest.raises(ValueError, match="normalize='layer'.*process_group"):
        SNGM([torch.zeros(2, requires_grad=True)], lr=0.1, normalize="layer", process_group=group)
