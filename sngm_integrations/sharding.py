"""Which engine shards the optimizer's tensors, and what SNGM's step must do about it.

SNGM needs one norm over the whole model's gradient. Engines that shard the optimizer's
tensors do not tell the optimizer, so this module recognises them from what the optimizer
holds and from who calls its `step()`:

* DeepSpeed ZeRO-1/2 (`DeepSpeedZeroOptimizer`, the caller of `step()`): each rank holds
  one flat fp32 partition per param group, disjoint across the data-parallel group, padded
  with zeros. Squared norms are summed over that group. ZeRO steps the client optimizer
  once per param group (`param_groups = [group_i]`), before group `i + 1`'s gradient
  exists, so the updates are deferred to the step's last group call: every group's
  gradient is kept until then (one fp32 gradient partition per group at once, where ZeRO
  alone holds one group's), all groups are updated with the one norm, and the earlier
  groups' weights are copied to their 16-bit partitions, as ZeRO does after each call.
  Configurations that ZeRO steps this way but writes out between calls (optimizer
  offload with several groups) are refused.
* DeepSpeed ZeRO-3 (`DeepSpeedZeroOptimizer_Stage3`): the same, one call per sub-group
  (`sub_group_size`); the padding of its fp32 partitions is not initialised, so SNGM
  zeroes it (it maps to no parameter) before it enters the norm.
* DeepSpeed ZeRO-0 (the `DeepSpeedEngine` calls `step()`): gradients are averaged and
  replicated; nothing is summed.
* FSDP1 (`FlatParameter`s, or with `use_orig_params=True` the original parameters as views
  of them): sharded strategies split each flat parameter across the ranks of the world
  (zero padding); NO_SHARD replicates it. Squared norms are summed over the world.
  HYBRID_SHARD shards over a group SNGM cannot see: it needs `process_group`.

Configurations that cannot be made exact raise `ShardingError` before the first update.
"""

from __future__ import annotations

import gc
import sys
import warnings
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim import Optimizer

from sngm_integrations.distributed import local_tensor
from sngm_integrations.norms import accumulation_dtype

if TYPE_CHECKING:
    from sngm_integrations.sngm import SNGMParamGroup

__all__ = ["ShardingError", "StepPlan", "norm_group", "plan_step"]

_CALLER_FRAMES = 8


class ShardingError(RuntimeError):
    """A sharded configuration in which SNGM cannot take the global-norm step."""


@dataclass
class StepPlan:
    """What `SNGM.step` does now: update `groups` with the norm reduced over
    `process_group`, then call `finish` (nothing to update when `groups` is empty)."""

    groups: list[SNGMParamGroup]
    process_group: dist.ProcessGroup | None
    finish: Callable[[], None] = lambda: None


@dataclass
class _Engine:
    name: str
    process_group: dist.ProcessGroup | None  # None: gradients are replicated
    partitions: list[Tensor] = field(default_factory=list)
    """DeepSpeed ZeRO's flat fp32 partitions, stepped one per call, in its order."""
    write_back: Callable[[int], None] = lambda index: None
    """Copies partition `index`'s updated weights where ZeRO copies them after its call."""
    paddings: list[list[tuple[int, int]]] = field(default_factory=list)
    """Per partition, `(offset, length)` of its padding (ZeRO-3 leaves it uninitialised)."""
    pending: dict[int, SNGMParamGroup] = field(default_factory=dict)


_ENGINES: weakref.WeakKeyDictionary[Optimizer, _Engine | None] = weakref.WeakKeyDictionary()


def _deepspeed_caller(optimizer: Optimizer) -> Any:
    """The DeepSpeed object whose `optimizer` is `optimizer` and which is calling its step."""
    frame: FrameType | None = sys._getframe(2)
    for _ in range(_CALLER_FRAMES):
        if frame is None:
            return None
        caller = frame.f_locals.get("self")
        if (
            caller is not None
            and caller is not optimizer
            and type(caller).__module__.startswith("deepspeed.")
            and getattr(caller, "optimizer", None) is optimizer
        ):
            return caller
        frame = frame.f_back
    return None


def _deepspeed_engine(caller: Any) -> _Engine:
    kind = type(caller).__name__
    if kind == "DeepSpeedEngine":
        return _Engine("DeepSpeed ZeRO-0", None)
    build = {
        "DeepSpeedZeroOptimizer": _zero12_engine,
        "DeepSpeedZeroOptimizer_Stage3": _zero3_engine,
    }
    if kind in build:
        try:
            return build[kind](caller)
        except AttributeError as error:  # ZeRO's internals, as of DeepSpeed 0.19.8
            version = getattr(sys.modules.get("deepspeed"), "__version__", "?")
            raise ShardingError(
                f"SNGM does not know the internals of {kind} in DeepSpeed {version} "
                f"({error}); it is tested with DeepSpeed 0.19.8"
            ) from error
    if kind in ("FP16_Optimizer", "FP16_UnfusedOptimizer"):  # stage 0, fp16: whole copies
        return _Engine("DeepSpeed ZeRO-0 fp16", None)
    if kind == "BF16_Optimizer":  # stage 0, bf16: one step over fp32 partitions
        if len({id(g) for g in caller.real_dp_process_group}) != 1:
            raise ShardingError(
                "SNGM under DeepSpeed's BF16_Optimizer needs one data-parallel group for "
                "all param groups (expert parallelism gives each its own)"
            )
        return _Engine("DeepSpeed ZeRO-0 bf16", caller.dp_process_group)
    raise ShardingError(
        f"SNGM does not know DeepSpeed's {kind} (it calls SNGM.step()), so it cannot tell "
        "whether the optimizer's tensors are sharded; supported: ZeRO stages 0-3"
    )


def _zero12_engine(zero: Any) -> _Engine:
    stage = 2 if zero.partition_gradients else 1
    name = f"DeepSpeed ZeRO-{stage}"
    partitions = list(zero.single_partition_of_fp32_groups)
    if zero.cpu_offload and len(partitions) > 1:
        raise ShardingError(
            f"SNGM under {name} with offload_optimizer and several param groups is not "
            "supported (ZeRO writes each group back before the next one's gradient "
            "exists); use one param group or no optimizer offload"
        )
    if len({id(g) for g in zero.real_dp_process_group}) != 1:
        raise ShardingError(f"SNGM under {name} needs one data-parallel group for all groups")

    def write_back(index: int) -> None:
        rank = dist.get_rank(group=zero.real_dp_process_group[index])
        zero.parallel_partitioned_bit16_groups[index][rank].data.copy_(partitions[index].data)

    return _Engine(name, zero.real_dp_process_group[0], partitions, write_back)


def _zero3_engine(zero: Any) -> _Engine:
    partitions = list(zero.fp32_partitioned_groups_flat)
    if (zero.offload_optimizer or zero.offload_param) and len(partitions) > 1:
        raise ShardingError(
            "SNGM under DeepSpeed ZeRO-3 with offload_optimizer or offload_param and "
            "several sub-groups is not supported (ZeRO swaps each sub-group out before the "
            "next one's gradient exists); use one param group and a sub_group_size above "
            "the model's size, or no offload"
        )
    rank = dist.get_rank(group=zero.dp_process_group)
    paddings = []
    for params in zero.fp16_groups:  # each partition holds every parameter's slice, padded
        offset, padding = 0, []
        for p in params:
            size = p.partition_numel()
            valid = max(0, min(size, p.ds_numel - rank * size))
            if valid < size:
                padding.append((offset + valid, size - valid))
            offset += size
        paddings.append(padding)
    return _Engine(
        "DeepSpeed ZeRO-3",
        zero.dp_process_group,
        partitions,
        zero._reassign_or_swap_out_partitioned_parameters,
        paddings,
    )


def _flat_parameters(params: Sequence[Tensor]) -> list[Any]:
    """FSDP1's flat parameters behind `params` (themselves, or those they are views of)."""
    from torch.distributed.fsdp._flat_param import FlatParameter

    flat: list[Any] = [p for p in params if isinstance(p, FlatParameter)]
    if len(flat) == len(params):
        return flat
    # use_orig_params=True: the optimizer holds views of flat parameters, which do not
    # point back to them; they are found once, on the first step, among the live objects
    # (by the flag FlatParameter's own isinstance check reads, after a C-level check).
    wanted = {id(p) for p in params if not isinstance(p, FlatParameter)}
    for obj in gc.get_objects():
        if isinstance(obj, Tensor) and getattr(obj, "_is_flat_param", False):
            originals = getattr(obj, "_params", None) or ()
            if any(id(p) in wanted for p in originals):
                flat.append(obj)
    return flat


def _shard_count(flat_param: Any) -> int:
    """Over how many ranks FSDP1 splits `flat_param` (1 for NO_SHARD, which sets no sizes)."""
    padded = getattr(flat_param, "_padded_unsharded_size", None)
    if padded is None:
        return 1
    return int(padded.numel() // max(flat_param._sharded_size.numel(), 1))


def _fsdp1_engine(params: Sequence[Tensor], explicit: dist.ProcessGroup | None) -> _Engine:
    flat = _flat_parameters(params)
    if not flat:
        raise ShardingError("SNGM found FSDP1 parameters but not their flat parameters")
    shard_counts = {_shard_count(f) for f in flat}
    if shard_counts == {1}:
        return _Engine("FSDP1 NO_SHARD", None)
    if len(shard_counts) != 1:
        raise ShardingError(
            f"SNGM under FSDP1 found flat parameters sharded {sorted(shard_counts)} ways; "
            "it needs one sharding strategy for every FSDP unit it optimizes"
        )
    (shards,) = shard_counts
    if explicit is not None:
        if dist.get_world_size(explicit) != shards:
            raise ShardingError(
                f"process_group has {dist.get_world_size(explicit)} ranks, but FSDP1 shards "
                f"each flat parameter over {shards}: pass its shard group"
            )
        return _Engine("FSDP1", explicit)
    if shards != dist.get_world_size():
        raise ShardingError(
            f"SNGM under FSDP1 HYBRID_SHARD (flat parameters sharded over {shards} of "
            f"{dist.get_world_size()} ranks) needs process_group=<the shard group> (FSDP's "
            "process_group[0] or its intra-node group)"
        )
    return _Engine("FSDP1", dist.group.WORLD)


def _detect(optimizer: Optimizer, explicit: dist.ProcessGroup | None) -> _Engine | None:
    caller = _deepspeed_caller(optimizer)
    if caller is not None:
        engine = _deepspeed_engine(caller)
    else:
        params = [p for g in optimizer.param_groups for p in g["params"]]
        if not any(getattr(p, "_fsdp_flattened", False) for p in params):
            return None
        engine = _fsdp1_engine(params, explicit)
    if explicit is not None and engine.process_group is None:
        warnings.warn(
            f"SNGM ignores process_group under {engine.name}: its gradients are already "
            "averaged and replicated on every rank, and summing their norms would inflate "
            "the norm",
            stacklevel=4,
        )
    return engine


def norm_group(optimizer: Optimizer) -> dist.ProcessGroup | None:
    """The group over which `optimizer`'s per-rank squared norms are summed, or None.

    The engine's group where SNGM recognised one on its first step, else the optimizer's
    `process_group` (if it has one): for tools that measure norms of the tensors the
    optimizer holds (its momentum buffers, its updates) the way SNGM measures the gradient.
    """
    engine = _ENGINES.get(optimizer)
    if engine is not None:
        return engine.process_group
    return getattr(optimizer, "process_group", None)


def _zero_contribution(optimizer: Optimizer, group: dist.ProcessGroup) -> Tensor:
    """A rank without gradients joins the norm's all-reduce with zero, on the device the
    other ranks reduce on (their parameters'), in float64 as they do; the norm it returns
    is in the dtype SNGM reports norms in."""
    params = [local_tensor(p) for g in optimizer.param_groups for p in g["params"]]
    device = params[0].device if params else torch.device("cpu")
    total = torch.zeros((), dtype=torch.float64, device=device)
    dist.all_reduce(total, group=group)
    return total.sqrt().to(accumulation_dtype(params))


def plan_step(
    optimizer: Optimizer,
    groups: list[SNGMParamGroup],
    explicit: dist.ProcessGroup | None,
    last_step: dict[str, Tensor | None],
) -> StepPlan:
    """The step `optimizer` (an SNGM) takes now with the local `groups` it collected.

    Args:
        optimizer: The SNGM whose `step()` is running.
        groups: The param groups with gradients, as `step()` collected them.
        explicit: The `process_group` the user gave, or None.
        last_step: SNGM's record of the last step, where a rank without gradients puts
            the reduced norm.
    """
    if torch.compiler.is_compiling():  # engines are recognised on an eager step
        return StepPlan(groups, explicit)
    if optimizer not in _ENGINES:
        _ENGINES[optimizer] = _detect(optimizer, explicit)
    engine = _ENGINES[optimizer]
    if engine is None:
        if not groups and explicit is not None:
            last_step["grad_norm"] = _zero_contribution(optimizer, explicit)
        return StepPlan(groups, explicit)
    flat = engine.name not in ("DeepSpeed ZeRO-0", "DeepSpeed ZeRO-0 fp16")
    if flat and optimizer.param_groups[0]["normalize"] == "layer":
        raise ShardingError(
            f"normalize='layer' cannot be used under {engine.name}: the optimizer holds flat "
            "partitions, whose norms are not the tensors' norms"
        )
    if engine.partitions:
        return _per_partition_plan(engine, groups)
    if not groups and engine.process_group is not None:
        last_step["grad_norm"] = _zero_contribution(optimizer, engine.process_group)
    return StepPlan(groups, engine.process_group)


def _per_partition_plan(engine: _Engine, groups: list[SNGMParamGroup]) -> StepPlan:
    """ZeRO steps one partition per call: keep each until the step's last call."""
    held = {id(p): g for g in groups for p in g.params}
    index = next((i for i, p in enumerate(engine.partitions) if id(p) in held), None)
    if index is None or len(held) != 1:
        raise ShardingError(
            f"SNGM under {engine.name} expects one flat partition with a gradient per "
            f"step() call; got {len(held)}"
        )
    partition = engine.partitions[index]
    for offset, length in engine.paddings[index] if engine.paddings else ():
        partition.data.narrow(0, offset, length).zero_()
        if partition.grad is not None:
            partition.grad.narrow(0, offset, length).zero_()
    engine.pending[index] = held[id(partition)]
    last = len(engine.partitions) - 1
    if index < last:
        return StepPlan([], engine.process_group)
    pending = [engine.pending.pop(i) for i in sorted(engine.pending)]
    if len(pending) != len(engine.partitions):
        raise ShardingError(
            f"SNGM under {engine.name} received {len(pending)} of {len(engine.partitions)} "
            "flat partitions' gradients in one step"
        )

    def write_back() -> None:
        # ZeRO copied the earlier partitions' weights out before they were updated.
        for i in range(last):
            engine.write_back(i)

    return StepPlan(pending, engine.process_group, write_back)
