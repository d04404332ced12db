"""`squared_norm_allreduce_hook` on two gloo ranks: the norms it adds up and DDP's result."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import run_cpu_ranks

WORKER = Path(__file__).parent / "distributed" / "comm_hook_worker.py"


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, object]]:
    out = tmp_path_factory.mktemp("comm_hook")
    run_cpu_ranks(WORKER, str(out))
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.mark.slow
def test_hook_norms_equal_the_gradients_norms(ranks: list[dict[str, object]]) -> None:
    for rank in ranks:
        hook = rank["hook"]
        assert isinstance(hook, dict)
        for (local_sq, global_sq, buckets), (want_local, want_global) in zip(
            hook["measured"], hook["expected"], strict=True
        ):
            assert buckets == 2  # several buckets, each once: only the last micro-batch syncs
            assert local_sq == pytest.approx(want_local, rel=1e-5)
            assert global_sq == pytest.approx(want_global, rel=1e-5)
            assert local_sq > global_sq  # averaging over ranks shrinks the noise


@pytest.mark.slow
def test_sngm_steps_the_same_with_and_without_the_hook(ranks: list[dict[str, object]]) -> None:
    for rank in ranks:
        with_hook, default = rank["hook"], rank["default"]
        assert isinstance(with_hook, dict) and isinstance(default, dict)
        for a, b in zip(with_hook["params"], default["params"], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
