"""Triton kernels for SNGM's fused path on CUDA: two multi-tensor launches per step.

Torch's fused SGD kernel, fed the norm as its `grad_scale`, writes the scaled gradient
back into `p.grad`, and weight decay has to be folded into the gradient beforehand. These
kernels take neither detour. For each bucket of tensors (one parameter group, one dtype):

* `_squared_norm_kernel` reads `g` (and `w` when weight decay is on) and writes one
  float32 partial sum of `(g + sign * lambda * w)^2` per chunk; the partials are summed
  in a fixed order, so the norm is deterministic.
* `_update_kernel` reads `w`, `g` and `u` and writes `w` and `u`, forming
  `d = sign * g + lambda * w` in registers and dividing it by `max(||d||, eps)`, from the
  squared norm it is given. When that norm is not finite it leaves them alone and adds
  one to each tensor's skip counter instead. It can also write the norm and the skip
  flag out, which saves the host the scalar launches that would compute them.

With weight decay off that is 6 passes over the data against momentum SGD's 5, the floor
for SNGM; `p.grad` is left untouched. Every launch covers all tensors of its bucket: a
program handles one chunk of one tensor, found through a table of data pointers that
is copied to the device once and reused while the tensors stay where they are.

`fused_step` is the one entry point: `sngm_integrations.sngm` hands it the fused steps of
parameters on CUDA (float32, float16 or bfloat16, `normalize="global"`) and it takes them,
or says it cannot, in which case torch's fused kernel does. The norm is accumulated in
float64, so every finite gradient gives a finite norm. With `TRITON_INTERPRET=1` the same
kernels run on CPU tensors through Triton's interpreter, which is how the CPU tests hold
them against the reference.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import torch
import torch.distributed as dist
from torch import Tensor

from sngm_integrations.distributed import (
    all_reduce_and_sum,
    any_dtensor,
    local_tensor,
    reduction_classes,
    sum_on,
)

if TYPE_CHECKING:
    from sngm_integrations.sngm import SNGMParamGroup

try:
    import triton
    import triton.language as tl
except ImportError:  # Triton ships with torch's CUDA builds only
    triton = None

__all__ = [
    "AVAILABLE",
    "BucketPlan",
    "PlanCache",
    "fused_step",
    "plan_bucket",
    "squared_norm",
    "supports",
    "update",
]

AVAILABLE = triton is not None
INTERPRETED = AVAILABLE and os.environ.get("TRITON_INTERPRET") == "1"
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

BLOCK = 2048  # elements per loop iteration of one program
CHUNK = 32 * BLOCK  # elements per program: enough work to hide the table lookups
NUM_WARPS = 8

if AVAILABLE:
    _TL_DTYPES = {
        torch.float32: tl.float32,
        torch.float16: tl.float16,
        torch.bfloat16: tl.bfloat16,
    }

    @triton.jit
    def _load(ptr, index, end, MASKED: tl.constexpr):
        if MASKED:
            value = tl.load(ptr + index, mask=index < end, other=0.0)
        else:
            value = tl.load(ptr + index)
        return value.to(tl.float32)

    @triton.jit
    def _store(ptr, index, end, value, MASKED: tl.constexpr):
        if MASKED:
            tl.store(ptr + index, value.to(ptr.dtype.element_ty), mask=index < end)
        else:
            tl.store(ptr + index, value.to(ptr.dtype.element_ty))

    @triton.jit
    def _chunk(table, chunks, DTYPE: tl.constexpr, ALIGNED: tl.constexpr, CHUNK: tl.constexpr):
        """This program's chunk: the w, g and u pointers and the element range."""
        pid = tl.program_id(0)
        tensor = tl.load(chunks + 2 * pid)
        start = tl.multiple_of(tl.load(chunks + 2 * pid + 1), CHUNK)
        end = tl.minimum(start + CHUNK, tl.load(table + 5 * tensor + 3))
        w_ptr = tl.load(table + 5 * tensor).to(tl.pointer_type(DTYPE))
        g_ptr = tl.load(table + 5 * tensor + 1).to(tl.pointer_type(DTYPE))
        u_ptr = tl.load(table + 5 * tensor + 2).to(tl.pointer_type(DTYPE))
        if ALIGNED:  # every pointer 16-byte aligned (checked on the host): vector accesses
            w_ptr = tl.multiple_of(w_ptr, 16)
            g_ptr = tl.multiple_of(g_ptr, 16)
            u_ptr = tl.multiple_of(u_ptr, 16)
        return w_ptr, g_ptr, u_ptr, start, end

    @triton.jit
    def _squared_block(w_ptr, g_ptr, index, end, coefficient, HAS_WEIGHT_DECAY, MASKED):
        d = _load(g_ptr, index, end, MASKED)
        if HAS_WEIGHT_DECAY:
            d += coefficient * _load(w_ptr, index, end, MASKED)
        d = d.to(tl.float64)  # squares of finite float32 values cannot overflow float64
        return d * d

    @triton.jit
    def _squared_norm_kernel(
        table,
        chunks,
        partials,
        weight_decay_coefficient,
        DTYPE: tl.constexpr,
        HAS_WEIGHT_DECAY: tl.constexpr,
        ALIGNED: tl.constexpr,
        BLOCK: tl.constexpr,
        CHUNK: tl.constexpr,
    ):
        w_ptr, g_ptr, _, start, end = _chunk(table, chunks, DTYPE, ALIGNED, CHUNK)
        full_end = start + (end - start) // BLOCK * BLOCK
        acc = tl.zeros([BLOCK], dtype=tl.float64)
        for block in range(0, (full_end - start) // BLOCK):  # whole blocks: no mask
            index = start + block * BLOCK + tl.arange(0, BLOCK)
            acc += _squared_block(
                w_ptr, g_ptr, index, end, weight_decay_coefficient, HAS_WEIGHT_DECAY, False
            )
        if full_end < end:
            index = full_end + tl.arange(0, BLOCK)
            acc += _squared_block(
                w_ptr, g_ptr, index, end, weight_decay_coefficient, HAS_WEIGHT_DECAY, True
            )
        tl.store(partials + tl.program_id(0), tl.sum(acc, axis=0))

    @triton.jit
    def _update_block(
        w_ptr,
        g_ptr,
        u_ptr,
        index,
        end,
        scale,
        step_size,
        momentum,
        grad_sign,
        weight_decay,
        HAS_WEIGHT_DECAY: tl.constexpr,
        HAS_MOMENTUM: tl.constexpr,
        NESTEROV: tl.constexpr,
        MASKED: tl.constexpr,
    ):
        w = _load(w_ptr, index, end, MASKED)
        d = grad_sign * _load(g_ptr, index, end, MASKED)
        if HAS_WEIGHT_DECAY:
            d += weight_decay * w
        d *= scale
        direction = d
        if HAS_MOMENTUM:
            u = momentum * _load(u_ptr, index, end, MASKED) + d
            _store(u_ptr, index, end, u, MASKED)
            direction = u
            if NESTEROV:
                direction = d + momentum * u
        _store(w_ptr, index, end, w - step_size * direction, MASKED)

    @triton.jit
    def _update_kernel(
        table,
        chunks,
        squared_norm,
        stats,
        eps,
        lr_tensor,
        lr,
        momentum,
        grad_sign,
        weight_decay,
        DTYPE: tl.constexpr,
        HAS_WEIGHT_DECAY: tl.constexpr,
        HAS_MOMENTUM: tl.constexpr,
        NESTEROV: tl.constexpr,
        LR_IS_TENSOR: tl.constexpr,
        WRITE_STATS: tl.constexpr,
        COUNT_SKIPS: tl.constexpr,
        ALIGNED: tl.constexpr,
        BLOCK: tl.constexpr,
        CHUNK: tl.constexpr,
    ):
        norm = tl.sqrt(tl.load(squared_norm).to(tl.float64))
        finite = norm <= 1.7976931348623157e308  # float64's largest: false for inf and nan
        if WRITE_STATS:  # noqa: SIM102 (a compile-time branch around a run-time one)
            if tl.program_id(0) == 0:
                tl.store(stats, norm.to(tl.float32))
                tl.store(stats + 1, 1.0 - finite.to(tl.float32))
        if finite:
            w_ptr, g_ptr, u_ptr, start, end = _chunk(table, chunks, DTYPE, ALIGNED, CHUNK)
            scale = (1.0 / tl.maximum(norm, eps)).to(tl.float32)
            step_size = lr
            if LR_IS_TENSOR:
                step_size = tl.load(lr_tensor).to(tl.float32)
            full_end = start + (end - start) // BLOCK * BLOCK
            for block in range(0, (full_end - start) // BLOCK):  # whole blocks: no mask
                index = start + block * BLOCK + tl.arange(0, BLOCK)
                _update_block(
                    w_ptr, g_ptr, u_ptr, index, end, scale, step_size, momentum, grad_sign,
                    weight_decay, HAS_WEIGHT_DECAY, HAS_MOMENTUM, NESTEROV, False,
                )  # fmt: skip
            if full_end < end:
                index = full_end + tl.arange(0, BLOCK)
                _update_block(
                    w_ptr, g_ptr, u_ptr, index, end, scale, step_size, momentum, grad_sign,
                    weight_decay, HAS_WEIGHT_DECAY, HAS_MOMENTUM, NESTEROV, True,
                )  # fmt: skip
        else:
            if COUNT_SKIPS:  # once per tensor: by the program of its first chunk
                pid = tl.program_id(0)
                if tl.load(chunks + 2 * pid + 1) == 0:
                    tensor = tl.load(chunks + 2 * pid)
                    counter = tl.load(table + 5 * tensor + 4).to(tl.pointer_type(tl.float32))
                    tl.store(counter, tl.load(counter) + 1.0)


def supports(tensor: Tensor) -> bool:
    """Whether these kernels can update `tensor` (a local tensor, not a DTensor)."""
    device_ok = tensor.is_cuda or (INTERPRETED and tensor.device.type == "cpu")
    return AVAILABLE and device_ok and tensor.dtype in SUPPORTED_DTYPES


def _same_dense_layout(p: Tensor, g: Tensor, u: Tensor) -> bool:
    """Whether w, g and u can be walked as one flat array each, element for element."""
    dense = p.is_contiguous() or (
        p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last)
    )
    return dense and p.stride() == g.stride() == u.stride() and p.dtype == g.dtype == u.dtype


@dataclass
class BucketPlan:
    """The device tables of one bucket: a row per tensor and a row per chunk."""

    table: Tensor  # int64, (tensors, 5): w, g, u data pointers, numel, skip counter pointer
    chunks: Tensor  # int64, (chunks, 2): tensor row and first element of each chunk
    dtype: torch.dtype
    aligned: bool  # every pointer a multiple of 16 bytes, so accesses can be vectorized
    counts_skips: bool  # the table holds skip counters

    @property
    def num_chunks(self) -> int:
        return self.chunks.shape[0]


def plan_bucket(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    buffers: Sequence[Tensor],
    skip_counters: Sequence[Tensor] | None = None,
) -> BucketPlan | None:
    """Build the tables for one bucket (one small host-to-device copy), or return None if
    a tensor's layout rules the kernels out. `skip_counters` are float32 0-dim tensors,
    one per parameter, that `update` increments when it skips a step."""
    if not all(_same_dense_layout(p, g, u) for p, g, u in zip(params, grads, buffers, strict=True)):
        return None
    device = params[0].device
    counter_ptrs = (
        [0] * len(params) if skip_counters is None else _counter_pointers(skip_counters, device)
    )
    rows = [
        (p.data_ptr(), g.data_ptr(), u.data_ptr(), p.numel(), counter)
        for p, g, u, counter in zip(params, grads, buffers, counter_ptrs, strict=True)
    ]
    # An empty tensor gets one empty chunk, so that its skip counter is still counted.
    chunk_rows = [
        (t, start) for t, row in enumerate(rows) for start in range(0, max(row[3], 1), CHUNK)
    ]
    host = torch.tensor([v for row in rows + chunk_rows for v in row], dtype=torch.int64)
    if device.type == "cuda":
        host = host.pin_memory()
    flat = host.to(device, non_blocking=True)
    table = flat[: 5 * len(rows)].view(-1, 5)
    chunks = flat[5 * len(rows) :].view(-1, 2)
    aligned = all(ptr % 16 == 0 for row in rows for ptr in row[:3])
    return BucketPlan(table, chunks, params[0].dtype, aligned, skip_counters is not None)


def _counter_pointers(skip_counters: Sequence[Tensor], device: torch.device) -> list[int]:
    for counter in skip_counters:
        if counter.dtype != torch.float32 or counter.numel() != 1 or counter.device != device:
            raise ValueError(
                f"skip counters must be float32 tensors of one element on their parameters' "
                f"device ({device}), got a {counter.dtype} tensor of shape "
                f"{tuple(counter.shape)} on {counter.device}"
            )
    return [counter.data_ptr() for counter in skip_counters]


def squared_norm(plan: BucketPlan, weight_decay_coefficient: float) -> Tensor:
    """Sum of `(g + c * w)^2` over the bucket, in float64, as a 0-dim device tensor."""
    partials = torch.empty(plan.num_chunks, dtype=torch.float64, device=plan.table.device)
    _squared_norm_kernel[(plan.num_chunks,)](
        plan.table,
        plan.chunks,
        partials,
        weight_decay_coefficient,
        DTYPE=_TL_DTYPES[plan.dtype],
        HAS_WEIGHT_DECAY=weight_decay_coefficient != 0.0,
        ALIGNED=plan.aligned,
        BLOCK=BLOCK,
        CHUNK=CHUNK,
        num_warps=NUM_WARPS,
    )
    return partials.sum()


def update(
    plan: BucketPlan,
    squared_norm: Tensor,
    stats: Tensor | None,
    eps: float,
    lr: float | Tensor,
    momentum: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
) -> None:
    """One SNGM update of the bucket's w and u, given the squared global norm on the device.

    `squared_norm` is float64 (the kernel takes the norm's root and inverse in float64).
    The kernel divides by `max(||d||, eps)` itself; when the norm is not finite it leaves
    w and u alone and increments the bucket's skip counters. Given `stats` (two float32
    elements on the device), it writes the norm and the skip flag (1.0 or 0.0) there.
    """
    lr_is_tensor = isinstance(lr, Tensor)
    _update_kernel[(plan.num_chunks,)](
        plan.table,
        plan.chunks,
        squared_norm,
        squared_norm if stats is None else stats,  # an unwritten placeholder without stats
        eps,
        lr if lr_is_tensor else squared_norm,  # an unread placeholder for a float lr
        0.0 if lr_is_tensor else float(lr),
        momentum,
        -1.0 if maximize else 1.0,
        weight_decay,
        DTYPE=_TL_DTYPES[plan.dtype],
        HAS_WEIGHT_DECAY=weight_decay != 0.0,
        HAS_MOMENTUM=momentum != 0.0,
        NESTEROV=nesterov,
        LR_IS_TENSOR=lr_is_tensor,
        WRITE_STATS=stats is not None,
        COUNT_SKIPS=plan.counts_skips,
        ALIGNED=plan.aligned,
        BLOCK=BLOCK,
        CHUNK=CHUNK,
        num_warps=NUM_WARPS,
    )


class PlanCache:
    """A few recent steps' plans (or the reason the kernels could not take them), by key.

    The key names the step's tensors by their addresses, so a plan is reused for as long
    as the parameters, gradients and momentum buffers stay where they are, which they do
    from step to step once the caching allocator has settled.
    """

    def __init__(self, max_entries: int = 8) -> None:
        self._entries: dict[Hashable, object] = {}
        self._max_entries = max_entries

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable) -> object | None:
        return self._entries.get(key)

    def put(self, key: Hashable, value: object) -> None:
        if len(self._entries) >= self._max_entries:
            self._entries.pop(next(iter(self._entries)))
        self._entries[key] = value


_StepPlan = list[tuple[list[dist.ProcessGroup], list[tuple[int, BucketPlan]]]]
"""For each reduction class: the groups its squared sum is all-reduced over, and its
buckets as (group index, plan) pairs."""


def fused_step(
    groups: Sequence[SNGMParamGroup],
    normalize: str,
    eps: float,
    process_group: dist.ProcessGroup | None,
    backend: str,
    cache: PlanCache | None,
    known_squared_norm: Tensor | None = None,
) -> tuple[Tensor, Tensor] | None:
    """Take SNGM's step with these kernels, or return None when they cannot take it.

    One norm launch per bucket, one sum (and all-reduce where the tensors are sharded),
    then one update launch per bucket. `d = ±g + λw` is formed inside the kernels, so
    nothing is materialized and `p.grad` is left as it was; the update kernels also count
    skipped steps into the groups' skip counters and write the norm and skip flag out.
    With `backend="triton"` a step the kernels cannot take raises a RuntimeError instead.
    Given `known_squared_norm` (the caller's `||d||^2`, see `sngm`), no norm kernel runs.

    Returns:
        The step's gradient norm and skip flag (float32 device tensors), or None.
    """
    plans = _step_plan(groups, normalize, process_group, backend, cache)
    if plans is None:
        return None
    device = local_tensor(groups[0].grads[0]).device
    if known_squared_norm is not None:
        squared = known_squared_norm.to(device, torch.float64, non_blocking=True)
    else:
        squared = _squared_global_norm(groups, plans, device)
    stats = torch.empty(2, dtype=torch.float32, device=device)  # the norm and the skip flag
    stats_written = False
    for _, class_plans in plans:
        for group_index, plan in class_plans:
            group = groups[group_index]
            plan_device = plan.table.device
            lr = group.lr.to(plan_device) if isinstance(group.lr, Tensor) else group.lr
            write_stats = not stats_written and plan_device == device
            update(
                plan,
                squared.to(plan_device),
                stats if write_stats else None,
                eps,
                lr.reshape(()) if isinstance(lr, Tensor) else lr,
                group.momentum,
                group.weight_decay,
                group.nesterov,
                group.maximize,
            )
            stats_written |= write_stats
    norm, found_inf = stats.unbind()
    return norm, found_inf


def _squared_global_norm(
    groups: Sequence[SNGMParamGroup], plans: _StepPlan, device: torch.device
) -> Tensor:
    """`||d||^2` over every bucket: one norm launch per bucket, then the classes' reduction."""
    coefficient = [-g.weight_decay if g.maximize else g.weight_decay for g in groups]
    local_sums = []
    for class_groups, class_plans in plans:
        sums = [squared_norm(plan, coefficient[i]) for i, plan in class_plans]
        local_sums.append((class_groups, sum_on(sums, device)))
    return all_reduce_and_sum(local_sums, device)


def _step_plan(
    groups: Sequence[SNGMParamGroup],
    normalize: str,
    process_group: dist.ProcessGroup | None,
    backend: str,
    cache: PlanCache | None,
) -> _StepPlan | None:
    """This step's plan, or None when the kernels cannot take it (see `fused_step`).

    A step's plan, or the reason it has none, is cached under the addresses of all its
    tensors, so that a step like the last one costs only building that key.
    """

    def unavailable(reason: str) -> _StepPlan | None:
        if backend == "triton":
            raise RuntimeError(f"fused_backend='triton' cannot take this step: {reason}")
        return None

    if normalize != "global":
        return unavailable(f"normalize={normalize!r} (the kernels take 'global' only)")
    if not AVAILABLE:
        return unavailable("Triton is not installed")
    full_grads = [g for group in groups for g in group.grads]
    params = [p for group in groups for p in group.params]
    # Without momentum there is no buffer; the kernels never read that column then.
    buffers = [u for group in groups for u in group.momentum_buffers or group.params]
    counters = [c for group in groups for c in group.skip_counters or ()]
    grads = full_grads
    if any_dtensor(full_grads):
        params, grads, buffers = ([local_tensor(t) for t in ts] for ts in (params, grads, buffers))
    key = (
        tuple(map(Tensor.data_ptr, params)),
        tuple(map(Tensor.data_ptr, grads)),
        tuple(map(Tensor.data_ptr, buffers)),
        tuple(map(Tensor.data_ptr, counters)),
        tuple(map(Tensor.numel, grads)),
        tuple((len(group.params), group.skip_counters is None) for group in groups),
        id(process_group),
        backend,
    )
    found = cache.get(key) if cache is not None else None
    if found is None:
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            # A plan's tables are copied from host memory that is reused after the copy;
            # a graph must not record that copy.
            return unavailable("a CUDA graph is being captured before any eager step")
        found = _plan_step(groups, full_grads, params, grads, buffers, process_group, backend)
        if cache is not None:
            cache.put(key, found)
    if isinstance(found, str):
        return unavailable(found)
    return cast(_StepPlan, found)


def _plan_step(
    groups: Sequence[SNGMParamGroup],
    full_grads: list[Tensor],
    params: list[Tensor],
    grads: list[Tensor],
    buffers: list[Tensor],
    process_group: dist.ProcessGroup | None,
    backend: str,
) -> _StepPlan | str:
    """Bucket the step's local tensors by reduction class, group and dtype, and build each
    bucket's tables; or say why the kernels cannot take the step."""
    for p in params:
        if not supports(p) or (backend == "auto" and not p.is_cuda):
            return f"a {p.dtype} parameter on {p.device}"
    group_of = [i for i, group in enumerate(groups) for _ in group.params]
    counter_of: list[Tensor | None] = []
    for group in groups:
        counter_of += group.skip_counters or [None] * len(group.params)
    plans: _StepPlan = []
    for class_groups, indices in reduction_classes(full_grads, process_group):
        buckets: dict[tuple[int, torch.device, torch.dtype], list[int]] = {}
        for i in indices:
            buckets.setdefault((group_of[i], params[i].device, params[i].dtype), []).append(i)
        class_plans: list[tuple[int, BucketPlan]] = []
        plans.append((class_groups, class_plans))
        for (group_index, _, _), members in buckets.items():
            counts_skips = groups[group_index].skip_counters is not None
            plan = plan_bucket(
                [params[i] for i in members],
                [grads[i] for i in members],
                [buffers[i] for i in members],
                [cast(Tensor, counter_of[i]) for i in members] if counts_skips else None,
            )
            if plan is None:
                return "a gradient or momentum buffer does not share its parameter's dense layout"
            class_plans.append((group_index, plan))
    return plans
