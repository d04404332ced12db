"""Device time per optimizer step, kernel by kernel, from torch.profiler (CUDA only).

Shows where a step's device time goes (the norm, the update, small scalar kernels) for
SNGM's fused paths and fused SGD, on one shape set of benchmarks/step_time.py, and the
time a pure memory-bound step would take at the measured copy bandwidth.

    python benchmarks/kernel_times.py --shapes gpt2-medium --steps 20
"""

from __future__ import annotations

import argparse

import torch
from step_time import OPTIMIZERS, SHAPE_SETS
from torch.profiler import ProfilerActivity, profile


def copy_bandwidth_gbs(device: torch.device) -> float:
    """Bytes read plus bytes written per second by a 1 GiB device-to-device copy."""
    x = torch.empty(2**28, device=device)
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        y.copy_(x)
    end.record()
    end.synchronize()
    return 10 * 2 * x.numel() * 4 / (start.elapsed_time(end) / 1e3) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shapes", default="gpt2-medium", choices=list(SHAPE_SETS))
    parser.add_argument(
        "--optimizers",
        default="SGD fused,SNGM fused (default),SNGM fused torch-kernel",
        help="comma-separated names from benchmarks/step_time.py",
    )
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    device = torch.device("cuda")

    shapes = SHAPE_SETS[args.shapes]()
    g = torch.Generator(device=device).manual_seed(0)
    params = [torch.randn(s, device=device, generator=g).requires_grad_() for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, device=device, generator=g)
    numel = sum(p.numel() for p in params)
    bandwidth = copy_bandwidth_gbs(device)
    print(f"{args.shapes}: {numel / 1e6:.1f}M float32 parameters in {len(params)} tensors")
    print(f"copy bandwidth {bandwidth:.0f} GB/s: one pass over the parameters takes "
          f"{numel * 4 / bandwidth / 1e6:.3f} ms")  # fmt: skip

    for name in args.optimizers.split(","):
        optimizer = OPTIMIZERS[name](params)
        for _ in range(3):
            optimizer.step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(args.steps):
                optimizer.step()
            torch.cuda.synchronize()
        rows = [e for e in prof.key_averages() if e.device_time_total > 0]
        rows.sort(key=lambda e: e.device_time_total, reverse=True)
        total = sum(e.device_time_total for e in rows) / args.steps / 1e3
        passes = total / (numel * 4 / bandwidth / 1e6)
        print(f"\n{name}: {total:.3f} ms of kernels per step = {passes:.1f} passes' worth")
        print("| kernel | calls / step | ms / step |")
        print("|---|---:|---:|")
        for e in rows[:8]:
            print(f"| {e.key[:70]} | {e.count / args.steps:.0f} | "
                  f"{e.device_time_total / args.steps / 1e3:.3f} |")  # fmt: skip
        del optimizer
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
