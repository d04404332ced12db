"""A DDP communication hook that measures gradient norms while it all-reduces them.

DDP's all-reduce reads every gradient bucket anyway; `squared_norm_allreduce_hook` adds
each bucket's squared norm before the all-reduce (this rank's gradient) and after it (the
averaged, global gradient) to a `BucketSquaredNorms`. After the backward pass that
synchronises (the last micro-batch under `no_sync` accumulation) the two totals are the
squared norms of this rank's accumulated gradient and of the global one: the two batch
sizes of the gradient noise scale, and the norm SNGM divides by, without another pass
over the gradients:

    norms = BucketSquaredNorms()
    ddp_model.register_comm_hook(norms, squared_norm_allreduce_hook)
    # Lightning: DDPStrategy(ddp_comm_state=norms, ddp_comm_hook=squared_norm_allreduce_hook)
    optimizer = SNGM(ddp_model.parameters(), lr=0.1, allreduce_norms=norms)
    ...
    loss.backward()              # the first bucket of a synchronising pass starts new totals
    local_sq, global_sq = norms.mean_local_sq(), norms.global_sq
    optimizer.step()             # takes global_sq when the gradients are still the same

The totals are only the norm of the gradients as the all-reduce left them: anything that
writes to `.grad` afterwards (norm clipping, `GradScaler.unscale_`, zeroing) makes them
stale. At the end of each synchronising backward pass the hook's state records every
gradient it covered and that gradient's version counter (which torch bumps on every
in-place write); `mismatch` compares them with the gradients an optimizer is about to use.
"""

# No `from __future__ import annotations`: DDP checks the hook's annotations at run time.
import threading
import weakref
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["BucketSquaredNorms", "squared_norm_allreduce_hook"]


class BucketSquaredNorms:
    """The squared gradient norms a `squared_norm_allreduce_hook` adds up, bucket by bucket.

    Attributes:
        local_sq: This rank's squared gradient norm before the all-reduce (a 0-dim tensor).
        global_sq: The squared norm of the averaged gradient DDP leaves in `.grad`.
        buckets: How many buckets the last synchronising backward pass all-reduced.
        complete: Whether that pass has finished (DDP has written every gradient).

    Args:
        process_group: The group DDP all-reduces over (the default group when None).
    """

    def __init__(self, process_group: dist.ProcessGroup | None = None) -> None:
        self.process_group = process_group
        self.local_sq: Tensor | None = None
        self.global_sq: Tensor | None = None
        self.buckets = 0
        self.complete = False
        self._in_backward = False
        self._params: list[Tensor] = []
        self._written: dict[int, tuple[weakref.ref[Tensor], int]] = {}
        """id(param) -> (its gradient, weakly, so that `zero_grad` frees it; that gradient's
        version) when the pass finished."""
        # The all-reduces' callbacks may run on the process group's threads.
        self.lock = threading.Lock()

    def __getstate__(self) -> dict[str, object]:
        """A fresh state with the same settings (Lightning's `ddp_spawn` pickles it)."""
        if self.process_group is not None:
            raise TypeError("a BucketSquaredNorms with a process group cannot be pickled")
        return {}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__init__()  # type: ignore[misc]

    def mean_local_sq(self) -> Tensor:
        """This step's local squared norm averaged over the ranks (one scalar all-reduce)."""
        if self.local_sq is None:
            raise RuntimeError("no bucket has been all-reduced through the hook yet")
        mean = self.local_sq / dist.get_world_size(self.process_group)
        dist.all_reduce(mean, group=self.process_group)
        return mean

    def mismatch(self, params: Sequence[Tensor]) -> str | None:
        """Why `global_sq` is not the squared norm of the gradients of `params` (those with
        a gradient, all together) as they are now; None when it is."""
        if not self.complete:
            return "no backward pass that all-reduces through the hook has finished"
        with_grads = 0
        for p in params:
            if p.grad is None:
                continue
            with_grads += 1
            written = self._written.get(id(p))
            if written is None:
                return self._other_parameters()
            grad, version = written
            if grad() is not p.grad or p.grad._version != version:
                return (
                    "a gradient was written after the all-reduce (norm clipping, "
                    "GradScaler.unscale_ or zeroing)"
                )
        return None if with_grads == len(self._written) else self._other_parameters()

    def _other_parameters(self) -> str:
        return (
            "the optimizer's parameters with gradients are not the "
            f"{len(self._written)} whose gradients DDP all-reduced"
        )

    def _bucket_started(self, bucket: dist.GradBucket) -> None:  # type: ignore[name-defined]
        if not self._in_backward:
            self.local_sq = self.global_sq = None
            self.buckets = 0
            self.complete = False
            self._params = []
            self._written = {}
            _after_ddp_finishes(self._record_gradients)
            self._in_backward = True
        self._params.extend(bucket.parameters())
        self.buckets += 1

    def _record_gradients(self) -> None:
        self._written = {
            id(p): (weakref.ref(p.grad), p.grad._version)
            for p in self._params
            if p.grad is not None
        }
        self._params = []
        self._in_backward = False
        self.complete = True


def _after_ddp_finishes(callback: Callable[[], None]) -> None:
    """Run `callback` at the end of the current backward pass, after DDP's own finalizer.

    DDP queues its finalizer (which waits for the all-reduces and writes `.grad`) when the
    last bucket is ready, after the hook was first called; autograd runs the callbacks
    queued while its final callbacks run after those already queued, so a callback queued
    from the first one runs after DDP's.
    """
    engine = torch.autograd.Variable._execution_engine
    engine.queue_callback(lambda: engine.queue_callback(callback))


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
    state._bucket_started(bucket)
    buffer = bucket.buffer()
    dtype = torch.float64 if buffer.dtype == torch.float64 else torch.float32
    state.local_sq = _add(state.local_sq, torch.linalg.vector_norm(buffer, dtype=dtype).square())
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
