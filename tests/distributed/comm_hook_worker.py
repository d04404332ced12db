"""Runs under `torchrun --nproc_per_node 2`: DDP with `squared_norm_allreduce_hook`.

Several buckets (a tiny `bucket_cap_mb`), a parameter no loss uses, and accumulation of
two micro-batches under `no_sync`. For each configuration in `RUNS` it saves, per step,
the hook's squared norms next to the same norms computed from the gradients, the final
parameters, how many steps SNGM took the hook's norm and what it warned, to
OUT/rank<r>.pt.
Usage: python -m torch.distributed.run --nproc_per_node 2 comm_hook_worker.py OUT
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from teardown import finish
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from sngm_integrations import SNGM
from sngm_integrations.comm_hooks import BucketSquaredNorms, squared_norm_allreduce_hook

STEPS = 3
RUNS = {
    # name: (hook, weight decay, gradient_as_bucket_view, clip the gradient before the step)
    "default": (False, 0.0, False, False),
    "hook": (True, 0.0, False, False),
    "hook-bucket-view": (True, 0.0, True, False),
    "hook-clipped": (True, 0.0, False, True),
    "default-decay": (False, 0.01, False, False),
    "hook-decay": (True, 0.01, False, False),
}


class WithUnused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(6, 64), nn.Tanh(), nn.Linear(64, 64), nn.Linear(64, 3))
        self.unused = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def run(rank: int, hook: bool, weight_decay: float, bucket_view: bool, clip: bool) -> dict:
    model = WithUnused()
    ddp = DistributedDataParallel(
        model, bucket_cap_mb=0.01, find_unused_parameters=True, gradient_as_bucket_view=bucket_view
    )
    norms = BucketSquaredNorms()
    if hook:
        ddp.register_comm_hook(norms, squared_norm_allreduce_hook)
    optimizer = SNGM(
        model.parameters(),
        lr=0.1,
        momentum=0.9,
        weight_decay=weight_decay,
        allreduce_norms=norms if hook else None,
    )
    generator = torch.Generator().manual_seed(10 + rank)
    measured, expected = [], []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(STEPS):
            optimizer.zero_grad()
            local = [torch.zeros_like(p) for p in model.parameters()]
            for micro in range(2):
                x = torch.randn(4, 6, generator=generator)
                y = torch.randn(4, 3, generator=generator)
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
                float(p.grad.double().square().sum())
                for p in model.parameters()
                if p.grad is not None
            )
            if hook:
                assert norms.global_sq is not None
                measured.append(
                    (float(norms.mean_local_sq()), float(norms.global_sq), norms.buckets)
                )
            expected.append((float(mean_local), global_sq))
            if clip:
                nn.utils.clip_grad_norm_(model.parameters(), max_norm=1e-3)
            optimizer.step()
    return {
        "measured": measured,
        "expected": expected,
        "params": [p.detach().clone() for p in model.parameters()],
        "allreduce_norm_steps": optimizer.allreduce_norm_steps,
        "warnings": [str(w.message) for w in caught],
    }


def main() -> None:
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    results = {name: run(rank, *config) for name, config in RUNS.items()}
    torch.save(results, out / f"rank{rank}.pt")
    finish()


if __name__ == "__main__":
    main()
