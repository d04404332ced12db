"""The ground-truth problem of the noise-scale tests, and its DDP run on gloo ranks.

Linear regression `y = x·w* + σε`, `x ~ N(0, I_d)`, evaluated at `w = 0` and never stepped:
the per-example gradient of `(x·w - y)² / 2` is `-x y`, so `|G|² = |w*|²` and
`tr Σ = (d + 1)|w*|² + d σ²`.
Usage: python -m torch.distributed.run --nproc_per_node 2 noise_scale_worker.py OUT
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from teardown import finish
from torch.nn.parallel import DistributedDataParallel

from sngm_integrations.noise_scale import GradientNoiseScaleMeter

DIM = 10


def true_noise_scale(sigma: float) -> float:
    """`B_simple` of the problem, with `|w*| = 1`."""
    return (DIM + 1) + DIM * sigma**2


def w_star() -> torch.Tensor:
    w = torch.randn(DIM, generator=torch.Generator().manual_seed(0))
    return w / w.norm()


def run(
    steps: int,
    micro_batch: int,
    accumulation: int,
    sigmas: list[float],
    rank: int = 0,
    ddp: bool = False,
    ema_decay: float = 0.99,
) -> list[float]:
    """Measures `B_simple` for `steps` steps at each σ in turn; the estimate after each."""
    model: torch.nn.Module = torch.nn.Linear(DIM, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    meter = GradientNoiseScaleMeter(model.parameters(), ema_decay=ema_decay)
    if ddp:
        model = DistributedDataParallel(model)
    target = w_star()
    generator = torch.Generator().manual_seed(1 + rank)
    estimates = []
    for sigma in sigmas:
        for _ in range(steps):
            model.zero_grad()
            meter.arm()
            for _ in range(accumulation):
                x = torch.randn(micro_batch, DIM, generator=generator)
                y = x @ target + sigma * torch.randn(micro_batch, generator=generator)
                loss = 0.5 * (model(x).squeeze(1) - y).square().mean() / accumulation
                loss.backward()
            assert meter.measure(micro_batch)
        assert meter.noise_scale is not None
        estimates.append(float(meter.noise_scale))
    return estimates


def main() -> None:
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    results = {
        "ddp": run(400, 32, 1, [1.0], rank, ddp=True),
        "ddp_accumulation": run(400, 16, 2, [1.0], rank, ddp=True),
        "ddp_sigma_change": run(400, 32, 1, [1.0, 3.0], rank, ddp=True),
    }
    torch.save(results, out / f"rank{rank}.pt")
    finish()


if __name__ == "__main__":
    main()
