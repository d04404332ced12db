"""Runs under `torchrun --nproc_per_node 2`: SNGM steps on parameters split across ranks.

Each scenario saves this rank's resulting tensors to OUT/<scenario>_rank<r>.pt; the test
compares them with one process stepping the whole model (tests/test_distributed.py).
Usage: python -m torch.distributed.run --nproc_per_node 2 sharded_sngm_worker.py OUT [BACKEND]
BACKEND is SNGM's fused_backend ("auto" by default; "triton" on CPU needs TRITON_INTERPRET=1).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from teardown import finish

import sngm_integrations.distributed as sngm_distributed
from sngm_integrations import SNGM

STEPS = 3
HYPERPARAMETERS = dict(lr=0.1, momentum=0.9, weight_decay=0.01)
FUSED_BACKEND = sys.argv[2] if len(sys.argv) > 2 else "auto"


def full_model() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 5),
        torch.nn.Tanh(),
        torch.nn.Linear(5, 4),
        torch.nn.Tanh(),
        torch.nn.Linear(4, 3),
    )


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g)


def full_gradients(model: torch.nn.Module, step: int) -> list[torch.Tensor]:
    x, y = batch(step)
    model.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()
    return [p.grad.clone() for p in model.parameters()]


class CountingAllReduce:
    """Counts the all-reduces SNGM issues, then calls the real one."""

    def __init__(self) -> None:
        self.calls = 0
        self._real = dist.all_reduce

    def __call__(self, *args, **kwargs):  # noqa: ANN002, ANN003
        self.calls += 1
        return self._real(*args, **kwargs)


def split_parameters(rank: int, out: Path) -> None:
    """Rank r owns whole parameter tensors r, r+2, ... and steps them with process_group."""
    model = full_model()
    params = list(model.parameters())
    mine = [p for i, p in enumerate(params) if i % 2 == rank]
    optimizer = SNGM(
        mine, **HYPERPARAMETERS, process_group=dist.group.WORLD, fused_backend=FUSED_BACKEND
    )
    counter = CountingAllReduce()
    sngm_distributed.dist.all_reduce = counter  # type: ignore[assignment]
    for step in range(STEPS):
        grads = full_gradients(full_model_at(model), step)
        for i, p in enumerate(params):
            p.grad = grads[i] if i % 2 == rank else None
        optimizer.step()
    sngm_distributed.dist.all_reduce = counter._real  # type: ignore[assignment]
    torch.save(
        {
            "params": {i: p.detach() for i, p in enumerate(params) if i % 2 == rank},
            "all_reduces": counter.calls,
            "norm": optimizer.last_grad_norm,
        },
        out / f"split_rank{rank}.pt",
    )


def full_model_at(model: torch.nn.Module) -> torch.nn.Module:
    """The full model with every rank's current weights (gathered for the gradient only)."""
    gathered = full_model()
    with torch.no_grad():
        for i, (p, q) in enumerate(zip(gathered.parameters(), model.parameters(), strict=False)):
            owner = i % 2
            value = q.detach().clone()
            dist.broadcast(value, src=owner)
            p.copy_(value)
    return gathered


def flat_shards(rank: int, out: Path) -> None:
    """Like ZeRO: each rank holds one contiguous half of the flattened parameter vector."""
    model = full_model()
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    half = (flat.numel() + 1) // 2
    shard = flat[rank * half : (rank + 1) * half].clone().requires_grad_(True)
    optimizer = SNGM(
        [shard], **HYPERPARAMETERS, process_group=dist.group.WORLD, fused_backend=FUSED_BACKEND
    )
    for step in range(STEPS):
        pieces = [torch.empty(half) for _ in range(2)]
        dist.all_gather(pieces, torch.nn.functional.pad(shard.detach(), (0, half - shard.numel())))
        full = torch.cat(pieces)
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(full[: flat.numel()], model.parameters())
        grads = torch.cat([g.flatten() for g in full_gradients(model, step)])
        shard.grad = grads[rank * half : (rank + 1) * half].clone()
        optimizer.step()
    torch.save({"shard": shard.detach(), "half": half}, out / f"flat_rank{rank}.pt")


def fsdp2(rank: int, out: Path, normalize: str) -> None:
    """FSDP2 (fully_shard): DTensor shards; each rank sees half of every batch."""
    from torch.distributed.fsdp import fully_shard

    model = full_model()
    for layer in (model[0], model[2], model[4]):
        fully_shard(layer)
    fully_shard(model)
    backend = FUSED_BACKEND if normalize == "global" else "auto"  # Triton: global only
    optimizer = SNGM(
        model.parameters(), **HYPERPARAMETERS, normalize=normalize, fused_backend=backend
    )
    for step in range(STEPS):
        x, y = batch(step)
        rows = slice(rank * 4, (rank + 1) * 4)
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x[rows]), y[rows]).backward()
        optimizer.step()
    full = [p.full_tensor().detach() for p in model.parameters()]
    torch.save(
        {"params": full, "norm": optimizer.last_grad_norm}, out / f"fsdp2_{normalize}_rank{rank}.pt"
    )


def main() -> None:
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    split_parameters(rank, out)
    flat_shards(rank, out)
    fsdp2(rank, out, "global")
    fsdp2(rank, out, "layer")
    finish()


if __name__ == "__main__":
    main()
