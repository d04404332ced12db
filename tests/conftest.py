"""Helpers shared by the tests: the implementations to hold against each other, seeded
gradients, flattened weights and a launcher for multi-process CPU runs."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None
TRITON_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

IMPLEMENTATIONS: dict[str, dict[str, object]] = {
    "single": dict(foreach=False, fused=False),
    "foreach": dict(foreach=True),
    "fused": dict(fused=True),
}
"""The CPU implementations: the per-tensor loop, foreach kernels, torch's fused kernel."""

CUDA_IMPLEMENTATIONS = IMPLEMENTATIONS | {"fused-torch": dict(fused=True, fused_backend="torch")}
"""On CUDA "fused" is SNGM's Triton kernels where they apply; "fused-torch" is torch's."""


def seeded_grads(
    params: Iterable[torch.Tensor], seed: int, scale: float = 1.0
) -> list[torch.Tensor]:
    """Normal gradients for `params`, the same for the same seed on every device and dtype."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(p.shape, generator=g) * scale).to(p.device, p.dtype) for p in params]


def set_grads(params: Iterable[torch.Tensor], seed: int, scale: float = 1.0) -> None:
    """Give every parameter a fresh `seeded_grads` gradient."""
    params = list(params)
    for p, grad in zip(params, seeded_grads(params, seed, scale), strict=True):
        p.grad = grad


def flat(tensors: torch.nn.Module | Iterable[torch.Tensor]) -> torch.Tensor:
    """The tensors (a module's parameters) as one detached 1-D tensor."""
    if isinstance(tensors, torch.nn.Module):
        tensors = tensors.parameters()
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def run_cpu_ranks(
    script: Path,
    *args: str,
    ranks: int = 2,
    env: dict[str, str] | None = None,
    timeout: float = 240,
) -> None:
    """Run `script` with `torchrun --standalone` in `ranks` CPU processes; fail the test,
    with the end of the output, if it fails. `env` is added to this process's environment;
    no GPU is visible (gloo only: with one, FSDP would place its shards there)."""
    run_env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", **(env or {})}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc_per_node", str(ranks), str(script), *args]
    proc = subprocess.run(command, env=run_env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
