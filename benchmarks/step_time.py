"""Optimizer step time: SNGM's implementations against torch.optim.SGD(momentum=0.9).

Rows with weight decay are compared with fused SGD with the same weight decay, the rest
with fused SGD without it, so that like is compared with like.

The parameter shapes are those of ResNet-50 (25.6M parameters in 161 tensors), a
GPT-2-medium-like stack (355M in 292 tensors) and a few large flat tensors. All optimizers
share one set of parameters and gradients (each has its own momentum buffers) and are run
in interleaved rounds, so that each sees the same machine state; the table reports the
median milliseconds per step after warm-up and the ratio to fused SGD.

The row `SNGM fused with the all-reduce norm` (asked for by name) is SNGM on a one-process
DDP model whose gradients came from a backward pass through `squared_norm_allreduce_hook`: its steps
divide by the norm the hook measured (checked, not recomputed), so it shows what the hook
saves. Its gradients are the other rows' (the backward reproduces them exactly).

On CUDA, `--cuda-graphs` times replays of each optimizer's step captured in a CUDA graph:
the device's time alone, without the Python that launches the kernels.

    python benchmarks/step_time.py                        # CPU, every shape set
    python benchmarks/step_time.py --device cuda --steps 200 [--cuda-graphs]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from sngm_integrations import SNGM
from sngm_integrations.comm_hooks import BucketSquaredNorms, squared_norm_allreduce_hook


def resnet50_shapes() -> list[tuple[int, ...]]:
    """Weights of torchvision's ResNet-50: convolutions, batch-norm affine pairs, the head."""
    shapes: list[tuple[int, ...]] = [(64, 3, 7, 7), (64,), (64,)]
    in_channels = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for block in range(blocks):
            shapes += [(width, in_channels, 1, 1), (width,), (width,)]
            shapes += [(width, width, 3, 3), (width,), (width,)]
            shapes += [(4 * width, width, 1, 1), (4 * width,), (4 * width,)]
            if block == 0:
                shapes += [(4 * width, in_channels, 1, 1), (4 * width,), (4 * width,)]
            in_channels = 4 * width
    return shapes + [(1000, 2048), (1000,)]


def gpt2_medium_shapes(
    layers: int = 24, width: int = 1024, vocab: int = 50257
) -> list[tuple[int, ...]]:
    """Token and position embeddings, 24 pre-norm transformer blocks, the final norm."""
    shapes: list[tuple[int, ...]] = [(vocab, width), (1024, width)]
    for _ in range(layers):
        shapes += [(width,), (width,), (width, 3 * width), (3 * width,), (width, width), (width,)]
        shapes += [
            (width,),
            (width,),
            (width, 4 * width),
            (4 * width,),
            (4 * width, width),
            (width,),
        ]
    return shapes + [(width,), (width,)]


SHAPE_SETS: dict[str, Callable[[], list[tuple[int, ...]]]] = {
    "resnet50": resnet50_shapes,
    "gpt2-medium": gpt2_medium_shapes,
    "flat-4x16M": lambda: [(16 * 2**20,)] * 4,
}

OPTIMIZERS: dict[str, Callable[[list[torch.Tensor]], torch.optim.Optimizer]] = {
    "SGD foreach": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, foreach=True),
    "SGD fused": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, fused=True),
    "SGD fused + weight decay": lambda ps: torch.optim.SGD(
        ps, lr=0.1, momentum=0.9, weight_decay=5e-4, fused=True
    ),
    "SNGM single-tensor": lambda ps: SNGM(ps, lr=0.1, foreach=False, fused=False),
    "SNGM foreach": lambda ps: SNGM(ps, lr=0.1, foreach=True),
    "SNGM fused (default)": lambda ps: SNGM(ps, lr=0.1),
    "SNGM fused + weight decay": lambda ps: SNGM(ps, lr=0.1, weight_decay=5e-4),
    "SNGM fused torch-kernel": lambda ps: SNGM(ps, lr=0.1, fused=True, fused_backend="torch"),
    "SNGM fused torch-kernel + weight decay": lambda ps: SNGM(
        ps, lr=0.1, weight_decay=5e-4, fused=True, fused_backend="torch"
    ),
}
HOOKED = "SNGM fused with the all-reduce norm"
# On CPU the default fused path is torch's kernel: those rows would repeat the default's.
CUDA_ONLY = ("SNGM fused torch-kernel", "SNGM fused torch-kernel + weight decay")


class _Weights(nn.Module):
    """Holds the benchmark's parameters; `forward(directions)` is `sum <w, direction>`, whose
    gradient with respect to each weight is its direction."""

    def __init__(self, params: list[nn.Parameter]) -> None:
        super().__init__()
        self.weights = nn.ParameterList(params)

    def forward(self, directions: list[torch.Tensor]) -> torch.Tensor:
        return sum((w * d).sum() for w, d in zip(self.weights, directions, strict=True))


def hooked_sngm(params: list[nn.Parameter], grads: list[torch.Tensor]) -> SNGM:
    """Fill every `p.grad` with `grads` by a backward pass of a one-process DDP model that
    all-reduces through `squared_norm_allreduce_hook`; return SNGM reading the hook's norm."""
    device = params[0].device
    if not dist.is_initialized():
        store = Path(tempfile.mkdtemp(prefix="step_time_")) / "store"
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=f"file://{store}", rank=0, world_size=1)
    ddp = DistributedDataParallel(_Weights(params))
    norms = BucketSquaredNorms()
    ddp.register_comm_hook(norms, squared_norm_allreduce_hook)
    for p in params:
        p.grad = None
    ddp(grads).backward()
    return SNGM(params, lr=0.1, allreduce_norms=norms)


class Timer:
    """Wall-clock on CPU, CUDA events on CUDA (no synchronisation between steps)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def start(self) -> object:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def elapsed_ms(self, start: object, end: object) -> float:
        if self.cuda:
            return start.elapsed_time(end)  # type: ignore[attr-defined]
        return (end - start) * 1e3  # type: ignore[operator]


def captured_steps(optimizers: dict[str, torch.optim.Optimizer]) -> dict[str, Callable[[], None]]:
    """Each optimizer's step captured in a CUDA graph, after warm-up steps on a side stream."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for optimizer in optimizers.values():
            for _ in range(3):
                optimizer.step()
    torch.cuda.current_stream().wait_stream(stream)
    replays: dict[str, Callable[[], None]] = {}
    for name, optimizer in optimizers.items():
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            optimizer.step()
        replays[name] = graph.replay
    return replays


def bench(
    shapes: list[tuple[int, ...]],
    device: torch.device,
    steps: int,
    warmup: int,
    names: list[str],
    cuda_graphs: bool = False,
) -> dict[str, float]:
    g = torch.Generator(device=device).manual_seed(0)
    params = [nn.Parameter(torch.randn(s, device=device, generator=g)) for s in shapes]
    grads = [torch.randn(s, device=device, generator=g) for s in shapes]
    for p, grad in zip(params, grads, strict=False):
        p.grad = grad
    hooked = hooked_sngm(params, grads) if HOOKED in names else None
    optimizers = {
        name: hooked if name == HOOKED and hooked is not None else OPTIMIZERS[name](params)
        for name in names
    }
    steps_of: dict[str, Callable[[], object]] = {n: o.step for n, o in optimizers.items()}
    if cuda_graphs:
        steps_of = dict(captured_steps(optimizers))
    timer = Timer(device)
    samples: dict[str, list[tuple[object, object]]] = {name: [] for name in names}
    for i in range(warmup + steps):
        for name, step in steps_of.items():
            start = timer.start()
            step()
            end = timer.start()
            if i >= warmup:
                samples[name].append((start, end))
    if device.type == "cuda":
        torch.cuda.synchronize()
    if hooked is not None and hooked.allreduce_norm_steps != warmup + steps:
        raise RuntimeError(
            f"{HOOKED}: {hooked.allreduce_norm_steps} of {warmup + steps} steps took the "
            "hook's norm"
        )
    return {
        name: statistics.median(timer.elapsed_ms(s, e) for s, e in pairs)
        for name, pairs in samples.items()
    }


def baseline_of(name: str) -> str:
    """The fused SGD row a row is compared with: the one with its weight decay."""
    return "SGD fused + weight decay" if name.endswith("+ weight decay") else "SGD fused"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--shapes", default=",".join(SHAPE_SETS), help=f"comma-separated, from {list(SHAPE_SETS)}"
    )
    parser.add_argument(
        "--optimizers",
        default=",".join(OPTIMIZERS),
        help=f"comma-separated names, from {[*OPTIMIZERS, HOOKED]}",
    )
    parser.add_argument("--steps", type=int, default=30, help="timed steps per optimizer")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--cuda-graphs", action="store_true", help="time CUDA-graph replays of each step"
    )
    args = parser.parse_args()

    device = torch.device(args.device)
    if args.cuda_graphs and device.type != "cuda":
        parser.error(f"--cuda-graphs needs a CUDA --device, got --device {args.device}")
    names = args.optimizers.split(",")
    if device.type != "cuda" and args.optimizers == parser.get_default("optimizers"):
        names = [n for n in names if n not in CUDA_ONLY]
    unknown = [n for n in names if n not in OPTIMIZERS and n != HOOKED]
    if unknown:
        parser.error(f"unknown --optimizers {unknown}; choose from {[*OPTIMIZERS, HOOKED]}")
    machine = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    )
    print(
        f"torch {torch.__version__}, device {device} ({machine}), median of {args.steps} steps "
        f"after {args.warmup} warm-up, interleaved"
        + (", CUDA-graph replays" if args.cuda_graphs else "")
    )
    results: dict[str, dict[str, float]] = {}
    for shape_set in args.shapes.split(","):
        shapes = SHAPE_SETS[shape_set]()
        numel = sum(torch.Size(s).numel() for s in shapes)
        label = f"{shape_set} ({numel / 1e6:.1f}M, {len(shapes)} tensors)"
        results[label] = bench(shapes, device, args.steps, args.warmup, names, args.cuda_graphs)
        if device.type == "cuda":
            torch.cuda.empty_cache()

    print()
    print("| shapes | optimizer | ms / step | / fused SGD (same weight decay) |")
    print("|---|---|---:|---:|")
    for label, timings in results.items():
        for name, ms in timings.items():
            baseline = baseline_of(name)
            ratio = f"{ms / timings[baseline]:.2f}x" if baseline in timings else "-"
            print(f"| {label} | {name} | {ms:.3f} | {ratio} |")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "torch": torch.__version__,
                    "device": machine,
                    "cuda_graphs": args.cuda_graphs,
                    "results": results,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
