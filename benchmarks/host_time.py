"""Host time of one optimizer step, measured without a GPU.

An eager step over a few hundred small tensors on a GPU is bound by the Python and the
launches on the host, not by the device (see the ResNet-50 rows of `step_time.py`). This
measures that host side on the CPU: every tensor has the tensor count of a shape set from
`step_time.py` but only 4 elements, and SNGM's Triton path runs with its two kernels
replaced by no-ops (under `TRITON_INTERPRET=1`, so planning, the plan cache and the
launch arguments are all exercised; Triton's own launcher is not). torch.optim.SGD's
fused and foreach steps do their tiny CPU work. Interleaved rounds, medians after warm-up.

    python benchmarks/host_time.py [--shapes resnet50,gpt2-medium] [--steps 300]
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from sngm_integrations import SNGM, triton_sngm

sys.path.insert(0, str(Path(__file__).parent))
from step_time import SHAPE_SETS  # noqa: E402


class _NoOpKernel:
    """Stands in for a Triton kernel: `kernel[grid](...)` does nothing."""

    def __getitem__(self, grid: object) -> object:
        return lambda *args, **kwargs: None


OPTIMIZERS = {
    "SGD fused": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, fused=True),
    "SGD foreach": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, foreach=True),
    "SNGM Triton path, kernels stubbed": lambda ps: SNGM(ps, lr=0.1, fused_backend="triton"),
    "SNGM Triton path, kernels stubbed, + weight decay": lambda ps: SNGM(
        ps, lr=0.1, weight_decay=5e-4, fused_backend="triton"
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="resnet50,gpt2-medium")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=50)
    args = parser.parse_args()
    if not triton_sngm.AVAILABLE:
        raise SystemExit("host_time.py needs Triton (it ships with torch's CUDA builds)")
    triton_sngm._squared_norm_kernel = _NoOpKernel()
    triton_sngm._update_kernel = _NoOpKernel()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, CPU, 4 elements per tensor, Triton kernels stubbed")
    print("\n| tensors of | optimizer | us / step | / SGD fused |\n|---|---|---:|---:|")
    for name in args.shapes.split(","):
        count = len(SHAPE_SETS[name]())
        optimizers = {}
        for label, make in OPTIMIZERS.items():
            params = [torch.zeros(4, requires_grad=True) for _ in range(count)]
            for p in params:
                p.grad = torch.randn(4)
            optimizers[label] = make(params)
        times: dict[str, list[float]] = {label: [] for label in optimizers}
        for _ in range(args.warmup + args.steps):
            for label, optimizer in optimizers.items():
                start = time.perf_counter()
                optimizer.step()
                times[label].append(time.perf_counter() - start)
        medians = {label: statistics.median(t[args.warmup :]) for label, t in times.items()}
        for label, median in medians.items():
            ratio = median / medians["SGD fused"]
            print(f"| {name} ({count}) | {label} | {median * 1e6:.0f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
