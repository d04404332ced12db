"""Squared gradient norms that are correct when parameters are sharded.

SNGM divides by the norm of the *whole* model's gradient. When each rank holds only
part of the parameters, a norm over the local tensors is wrong unless it is reduced:

* DDP: every rank holds full, already averaged gradients. Nothing to do.
* DTensor parameters (FSDP2 `fully_shard`, tensor parallel): the squared norms of the
  local shards are summed over the mesh dimensions on which the tensor is sharded.
  Replicated dimensions are not summed (that would count a shard twice).
* Flat shards (FSDP1, DeepSpeed ZeRO-1/2/3): the optimizer's plain tensors are disjoint
  pieces of the model; their squared norms are summed over `process_group`, which
  `sngm_integrations.sharding` finds for the engines it recognises.

Every function here issues at most one all-reduce per kind of sharding per call, never
one per tensor, and none of them synchronises the host with the device.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from sngm_integrations.norms import squared_norms

try:
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.placement_types import Partial, Shard
except ImportError:  # torch < 2.5 keeps DTensor in a private module
    from torch.distributed._tensor import DTensor  # type: ignore[attr-defined]
    from torch.distributed._tensor.placement_types import Partial, Shard

__all__ = [
    "all_reduce_and_sum",
    "any_dtensor",
    "global_squared_norm",
    "local_tensor",
    "per_tensor_squared_norms",
    "reduction_classes",
    "sum_on",
]


def any_dtensor(tensors: Iterable[Tensor]) -> bool:
    """Return True when any of `tensors` is a DTensor (checked once per distinct type)."""
    return any(issubclass(kind, DTensor) for kind in set(map(type, tensors)))


def local_tensor(tensor: Tensor) -> Tensor:
    """The part of `tensor` held by this rank (the tensor itself unless it is a DTensor)."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _shard_groups(tensor: DTensor) -> list[dist.ProcessGroup]:
    """Process groups of the mesh dimensions over which `tensor`'s values are split."""
    mesh = tensor.device_mesh
    return [
        mesh.get_group(dim)
        for dim, placement in enumerate(tensor.placements)
        if isinstance(placement, (Shard, Partial))
    ]


def per_tensor_squared_norms(tensors: Sequence[Tensor]) -> list[Tensor]:
    """Squared L2 norm of each full tensor, as 0-dim float64 tensors in input order.

    DTensors are measured over their full extent (one all-reduce per layout); plain
    tensors are taken as whole.
    """
    dtensors = [isinstance(t, DTensor) for t in tensors]
    if any(dtensors) and not all(dtensors):
        raise ValueError(
            "per-tensor norms need all parameters to be DTensors or none of them; got a mix"
        )
    squares = squared_norms([local_tensor(t) for t in tensors])
    if not any(dtensors):
        return list(squares.unbind())
    out: list[Tensor | None] = [None] * len(tensors)
    for groups, indices in reduction_classes(tensors):
        class_squares = squares[indices]
        for group in groups:
            dist.all_reduce(class_squares, group=group)
        for i, value in zip(indices, class_squares.unbind(), strict=True):
            out[i] = value
    return [t for t in out if t is not None]


def sum_on(values: Sequence[Tensor], device: torch.device) -> Tensor:
    """The sum of 0-dim tensors, on `device` (one value is returned as it is)."""
    if len(values) == 1 and values[0].device == device:
        return values[0]
    return torch.stack([v.to(device, non_blocking=True) for v in values]).sum()


def reduction_classes(
    tensors: Sequence[Tensor], process_group: dist.ProcessGroup | None = None
) -> list[tuple[list[dist.ProcessGroup], list[int]]]:
    """Split `tensors` into classes whose local squared norms are summed over the same groups.

    Returns `(groups, indices)` pairs: plain tensors form one class, reduced over
    `process_group` when it is given and over nothing otherwise; DTensors form one class
    per layout (mesh and placements), reduced over the mesh dimensions they are sharded on.
    Summing each class's local squared norms, all-reducing the sum over its groups and
    adding the classes gives the squared norm of the full tensors.
    """
    no_shards = [process_group] if process_group is not None else []
    if not any_dtensor(tensors):
        return [(no_shards, list(range(len(tensors))))] if tensors else []
    plain: list[int] = []
    by_layout: dict[tuple[object, ...], list[int]] = {}
    for i, t in enumerate(tensors):
        if isinstance(t, DTensor):
            by_layout.setdefault((t.device_mesh, tuple(t.placements)), []).append(i)
        else:
            plain.append(i)
    classes: list[tuple[list[dist.ProcessGroup], list[int]]] = []
    if plain:
        classes.append((no_shards, plain))
    for indices in by_layout.values():
        first = tensors[indices[0]]
        assert isinstance(first, DTensor)
        classes.append((_shard_groups(first), indices))
    return classes


def all_reduce_and_sum(
    local_sums: Sequence[tuple[Sequence[dist.ProcessGroup], Tensor]], device: torch.device
) -> Tensor:
    """All-reduce each reduction class's local sum over its groups (in place), then add them.

    `local_sums` pairs each class's groups (see `reduction_classes`) with the sum of its
    tensors' local squared norms, a 0-dim tensor; the result is on `device`.
    """
    for groups, total in local_sums:
        for group in groups:
            dist.all_reduce(total, group=group)
    return sum_on([total for _, total in local_sums], device)


def global_squared_norm(
    tensors: Sequence[Tensor],
    process_group: dist.ProcessGroup | None = None,
    local_squares: Tensor | None = None,
) -> Tensor:
    """Squared L2 norm of all `tensors` taken together, as a 0-dim float64 tensor.

    Args:
        tensors: Plain tensors or DTensors. DTensors count over their full extent.
        process_group: When given, plain tensors are taken to be this rank's disjoint
            flat shards of the model, and their squared norm is summed over the group.
        local_squares: The squared norms of the tensors' local parts, one float64 value
            per tensor, when the caller has them (`squared_norms` of them otherwise).

    Returns:
        A 0-dim tensor on the device of the first tensor's local data: one all-reduce
        per reduction class (see `reduction_classes`), none for plain tensors alone.
    """
    device = local_tensor(tensors[0]).device
    if local_squares is None:
        local_squares = squared_norms([local_tensor(t) for t in tensors])
    local_squares = local_squares.to(device, non_blocking=True)
    classes = reduction_classes(tensors, process_group)
    if len(classes) == 1 and len(classes[0][1]) == len(tensors):
        return all_reduce_and_sum([(classes[0][0], local_squares.sum())], device)
    local_sums = [(groups, local_squares[indices].sum()) for groups, indices in classes]
    return all_reduce_and_sum(local_sums, device)
