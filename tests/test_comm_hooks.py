"""`squared_norm_allreduce_hook` on two gloo ranks: the norms it adds up, DDP's result, and
SNGM taking its norm from the hook exactly when that norm is still the gradient's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import run_cpu_ranks

WORKER = Path(__file__).parent / "distributed" / "comm_hook_worker.py"
HOOKED = ("hook", "hook-bucket-view", "hook-clipped", "hook-decay")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, dict]]:
    out = tmp_path_factory.mktemp("comm_hook")
    run_cpu_ranks(WORKER, str(out))
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.mark.slow
@pytest.mark.parametrize("run", HOOKED)
def test_hook_norms_equal_the_gradients_norms(ranks: list[dict[str, dict]], run: str) -> None:
    for rank in ranks:
        hook = rank[run]
        for (local_sq, global_sq, buckets), (want_local, want_global) in zip(
            hook["measured"], hook["expected"], strict=True
        ):
            assert buckets == 2  # several buckets, each once: only the last micro-batch syncs
            assert local_sq == pytest.approx(want_local, rel=1e-5)
            assert global_sq == pytest.approx(want_global, rel=1e-5)
            assert local_sq > global_sq  # averaging over ranks shrinks the noise


@pytest.mark.slow
@pytest.mark.parametrize(
    "run, default, hook_steps, warning",
    [
        ("hook", "default", 3, None),
        ("hook-bucket-view", "default", 3, None),
        # Clipping rescales the gradient, which SNGM's step ignores, but the hook's norm is
        # then stale: SNGM measures it again.
        ("hook-clipped", "default", 0, "a gradient was written after the all-reduce"),
        ("hook-decay", "default-decay", 0, "weight decay is on"),
    ],
)
def test_sngm_with_the_hooks_norm_steps_as_without(
    ranks: list[dict[str, dict]], run: str, default: str, hook_steps: int, warning: str | None
) -> None:
    for rank in ranks:
        with_hook, without = rank[run], rank[default]
        assert with_hook["allreduce_norm_steps"] == hook_steps
        for a, b in zip(with_hook["params"], without["params"], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        if warning is None:
            assert with_hook["warnings"] == []
        else:
            assert len(with_hook["warnings"]) == 1  # once, not once per step
            assert warning in with_hook["warnings"][0]
