"""A DDP communication hook that measures gradient norms while it all-reduces them.

DDP's all-reduce reads every gradient bucket anyway; `squared_norm_allreduce_hook` adds
each bucket's squared norm before the all-reduce (this rank's gradient) and after it (the
averaged, global gradient) to a `BucketSquaredNorms`. After the backward pass that
synchronises (the last micro-batch under `no_sync` accumulation) the two totals are the
squared norms of this rank's accumulated gradient and of the global one, the two batch
sizes of the gradient noise scale, without another pass over the gradients:

    norms = BucketSquaredNorms()
    ddp_model.register_comm_hook(norms, squared_norm_allreduce_hook)
    # Lightning: DDPStrategy(ddp_comm_state=norms, ddp_comm_hook=squared_norm_allreduce_hook)
    ...
    loss.backward()
    local_sq, global_sq = norms.local_sq, norms.global_sq
    norms.reset()
"""

# No `from __future__ import annotations`: DDP checks the hook's annotations at run time.
import threading

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["BucketSquaredNorms", "squared_norm_allreduce_hook"]


class BucketSquaredNorms:
    """The squared gradient norms a `squared_norm_allreduce_hook` adds up, bucket by bucket.

    Args:
        process_group: The group DDP all-reduces over (the default group when None).
    """

    def __init__(self, process_group: dist.ProcessGroup | None = None) -> None:
        self.process_group = process_group
        self.local_sq: Tensor | None = None
        self.global_sq: Tensor | None = None
        self.buckets = 0
        # The all-reduces' callbacks may run on the process group's threads.
        self.lock = threading.Lock()

    def reset(self) -> None:
        """Start the next step's totals."""
        self.local_sq = None
        self.global_sq = None
        self.buckets = 0

    def mean_local_sq(self) -> Tensor:
        """This step's local squared norm averaged over the ranks (one scalar all-reduce)."""
        if self.local_sq is None:
            raise RuntimeError("no bucket was all-reduced since the last reset()")
        mean = self.local_sq / dist.get_world_size(self.process_group)
        dist.all_reduce(mean, group=self.process_group)
        return mean


def _add(total: Tensor | None, value: Tensor) -> Tensor:
    return value if total is None else total + value


def squared_norm_allreduce_hook(
    state: BucketSquaredNorms,
    bucket: dist.GradBucket,  # type: ignore[name-defined]
) -> torch.futures.Future[Tensor]:
    """DDP's averaging all-reduce of `bucket`, adding its squared norms to `state`.

    Register with `DistributedDataParallel.register_comm_hook(state, hook)`. The result is
    the same average as DDP's default hook; the norms are accumulated in float32 (float64
    for float64 gradients) on the bucket's device, without synchronising the host.
    """
    buffer = bucket.buffer()
    dtype = torch.float64 if buffer.dtype == torch.float64 else torch.float32
    state.local_sq = _add(state.local_sq, torch.linalg.vector_norm(buffer, dtype=dtype).square())
    state.buckets += 1
    group = state.process_group
    buffer.div_(dist.get_world_size(group))
    future = dist.all_reduce(buffer, group=group, async_op=True).get_future()

    def record_global(done: torch.futures.Future[list[Tensor]]) -> Tensor:
        averaged = done.value()[0]
        squared = torch.linalg.vector_norm(averaged, dtype=dtype).square()
        with state.lock:
            state.global_sq = _add(state.global_sq, squared)
        return averaged

    return future.then(record_global)
