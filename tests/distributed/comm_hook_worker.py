"""Runs under `torchrun --nproc_per_node 2`: DDP with `squared_norm_allreduce_hook`.

Several buckets (a tiny `bucket_cap_mb`), a parameter no loss uses, and accumulation of
two micro-batches under `no_sync`. Saves, per step, the hook's squared norms next to the
same norms computed from the gradients, and the final parameters with and without the
hook, to OUT/rank<r>.pt.
Usage: python -m torch.distributed.run --nproc_per_node 2 comm_hook_worker.py OUT
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from sngm_integrations import SNGM
from sngm_integrations.comm_hooks import BucketSquaredNorms, squared_norm_allreduce_hook

STEPS = 3


class WithUnused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(6, 64), nn.Tanh(), nn.Linear(64, 64), nn.Linear(64, 3))
        self.unused = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def run(rank: int, hook: bool) -> dict[str, object]:
    model = WithUnused()
    ddp = DistributedDataParallel(model, bucket_cap_mb=0.01, find_unused_parameters=True)
    norms = BucketSquaredNorms()
    if hook:
        ddp.register_comm_hook(norms, squared_norm_allreduce_hook)
    optimizer = SNGM(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    generator = torch.Generator().manual_seed(10 + rank)
    measured, expected = [], []
    for _ in range(STEPS):
        optimizer.zero_grad()
        local = [torch.zeros_like(p) for p in model.parameters()]
        for micro in range(2):
            x, y = torch.randn(4, 6, generator=generator), torch.randn(4, 3, generator=generator)
            # The local gradient, from a second backward on a copy that DDP does not see.
            reference = WithUnused()
            reference.load_state_dict(model.state_dict())
            (nn.functional.mse_loss(reference(x), y) / 2).backward()
            for acc, p in zip(local, reference.parameters(), strict=True):
                if p.grad is not None:
                    acc += p.grad
            if micro == 0:
                with ddp.no_sync():  # the forward pass decides whether backward syncs
                    (nn.functional.mse_loss(ddp(x), y) / 2).backward()
            else:
                (nn.functional.mse_loss(ddp(x), y) / 2).backward()
        local_sq = sum(float(t.double().square().sum()) for t in local)
        mean_local = torch.tensor(local_sq / dist.get_world_size(), dtype=torch.float64)
        dist.all_reduce(mean_local)
        global_sq = sum(
            float(p.grad.double().square().sum()) for p in model.parameters() if p.grad is not None
        )
        if hook:
            assert norms.global_sq is not None
            measured.append((float(norms.mean_local_sq()), float(norms.global_sq), norms.buckets))
            norms.reset()
        expected.append((float(mean_local), global_sq))
        optimizer.step()
    return {
        "measured": measured,
        "expected": expected,
        "params": [p.detach().clone() for p in model.parameters()],
    }


def main() -> None:
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    results = {"hook": run(rank, hook=True), "default": run(rank, hook=False)}
    torch.save(results, out / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


if __name__ == "__main__":
    main()
