"""The gradient noise scale `B_simple = tr(Σ) / |G|²` measured while training.

McCandlish et al., "An Empirical Model of Large-Batch Training" (2018), appendix A: with
`|G_b|²` the squared norm of a gradient over `b` examples and `|G_B|²` over `B > b`
examples, taken at the same weights,

    |G|² ≈ (B |G_B|² - b |G_b|²) / (B - b)
    S    ≈ (|G_b|² - |G_B|²) / (1/b - 1/B)        (S = tr Σ, the per-example variance)

are unbiased, and `B_simple = EMA(S) / EMA(|G|²)` (each averaged over steps, then divided).

`GradientNoiseScale` holds the two averages. `GradientNoiseScaleMeter` measures the two
gradients without an extra backward pass: a tensor hook on each parameter sees each
micro-batch's local gradient before it is added to `.grad` (the small batch: one
micro-batch on one rank) and `.grad` at the optimizer step is the accumulated, all-reduced
gradient (the big batch: every micro-batch on every rank).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from sngm_integrations.distributed import global_squared_norm

__all__ = ["GradientNoiseScale", "GradientNoiseScaleMeter"]


class GradientNoiseScale:
    """Exponential moving averages of `tr Σ` and `|G|²`, and their ratio `B_simple`.

    The averages are kept on the device of the norms passed in, so `update` does not
    synchronise with the host; read `noise_scale` when the value is needed.

    Args:
        ema_decay: Weight of the past in each average, in `[0, 1)`. The averages are
            bias-corrected, so the first steps are not pulled towards 0.
    """

    def __init__(self, ema_decay: float = 0.95) -> None:
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay!r}")
        self.ema_decay = ema_decay
        self.updates = 0
        self._trace_sigma: Tensor | None = None
        self._true_grad_sq: Tensor | None = None
        self._weight: Tensor | None = None

    def update(self, small_sq: Tensor, small_batch: int, big_sq: Tensor, big_batch: int) -> None:
        """Add one step's pair of squared gradient norms.

        Args:
            small_sq: `|G_b|²`, the squared norm of a gradient over `small_batch` examples
                (or the mean of several such squared norms, taken at the same weights).
            small_batch: `b`, examples in the small batch.
            big_sq: `|G_B|²`, the squared norm of a gradient over `big_batch` examples.
            big_batch: `B`, examples in the big batch, more than `small_batch`.
        """
        if small_batch < 1:
            raise ValueError(f"small_batch must be at least 1, got {small_batch!r}")
        if big_batch <= small_batch:
            raise ValueError(
                f"big_batch must exceed small_batch ({small_batch}), got {big_batch!r}: the "
                "noise scale needs gradient accumulation or more than one data-parallel rank"
            )
        b, big = float(small_batch), float(big_batch)
        small_sq, big_sq = small_sq.detach().double(), big_sq.detach().double()
        true_grad_sq = (big * big_sq - b * small_sq) / (big - b)
        trace_sigma = (small_sq - big_sq) / (1.0 / b - 1.0 / big)
        decay = self.ema_decay
        if self._trace_sigma is None or self._true_grad_sq is None or self._weight is None:
            zero = torch.zeros_like(trace_sigma)
            self._trace_sigma, self._true_grad_sq, self._weight = zero, zero, zero
        # A step with a non-finite gradient (an AMP overflow) leaves the averages as they are.
        finite = torch.isfinite(trace_sigma) & torch.isfinite(true_grad_sq)
        keep = torch.where(finite, decay, 1.0)
        self._trace_sigma = keep * self._trace_sigma + (1.0 - keep) * trace_sigma.nan_to_num()
        self._true_grad_sq = keep * self._true_grad_sq + (1.0 - keep) * true_grad_sq.nan_to_num()
        self._weight = keep * self._weight + (1.0 - keep)
        self.updates += 1

    @property
    def trace_sigma(self) -> Tensor | None:
        """The average of `S`, the estimate of `tr Σ` (None before the first update)."""
        if self._trace_sigma is None or self._weight is None:
            return None
        return self._trace_sigma / self._weight

    @property
    def true_grad_sq(self) -> Tensor | None:
        """The average of the estimate of `|G|²` (None before the first update)."""
        if self._true_grad_sq is None or self._weight is None:
            return None
        return self._true_grad_sq / self._weight

    @property
    def noise_scale(self) -> Tensor | None:
        """`B_simple`, in examples (None before the first update)."""
        if self._trace_sigma is None or self._true_grad_sq is None:
            return None
        return self._trace_sigma / self._true_grad_sq

    def state_dict(self) -> dict[str, object]:
        return {
            "ema_decay": self.ema_decay,
            "updates": self.updates,
            "weight": self._weight,
            "trace_sigma": self._trace_sigma,
            "true_grad_sq": self._true_grad_sq,
        }

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.ema_decay = float(state["ema_decay"])  # type: ignore[arg-type]
        self.updates = int(state["updates"])  # type: ignore[call-overload]
        weight, trace_sigma, true_grad_sq = (
            state["weight"],
            state["trace_sigma"],
            state["true_grad_sq"],
        )
        self._weight = weight if isinstance(weight, Tensor) else None
        self._trace_sigma = trace_sigma if isinstance(trace_sigma, Tensor) else None
        self._true_grad_sq = true_grad_sq if isinstance(true_grad_sq, Tensor) else None


class GradientNoiseScaleMeter:
    """Measures `B_simple` from micro-batch and rank-local gradients during training.

    Call `arm` before the backward passes of a step to be measured and `measure` once they
    are done, before gradients are clipped or the optimizer steps. Unarmed steps cost one
    Python call per parameter and backward (the hook returns at once) and never
    synchronise with the host.

    The small batch is one micro-batch on one rank: the meter averages `|g|²` over the
    micro-batches (counted by the hooks) and over ranks. The big batch is the gradient in
    `.grad`, which is the sum of the `A` micro-batch gradients (averaged over ranks by
    DDP); the meter compares it as `.grad / A`. Any factor that multiplies every
    micro-batch's loss alike (dividing by the accumulation steps, HF's
    `num_items_in_batch`, a constant AMP loss scale) therefore cancels. A loss scale that
    `.grad` no longer carries (the gradients were unscaled before `measure`) is passed as
    `grad_scale`.

    Args:
        params: The parameters whose gradients are measured (those with `requires_grad`).
        ema_decay: See `GradientNoiseScale`.
        process_group: The data-parallel group whose ranks' gradients are averaged into
            `.grad` (the default group when initialized); None or a group of one rank for
            accumulation alone.
    """

    def __init__(
        self,
        params: Iterable[Tensor],
        ema_decay: float = 0.95,
        process_group: dist.ProcessGroup | None = None,
    ) -> None:
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError("params must contain at least one tensor that requires grad")
        self.estimator = GradientNoiseScale(ema_decay)
        self.process_group = process_group
        self.small_sq: Tensor | None = None
        self.big_sq: Tensor | None = None
        self._armed = False
        self._micro_sq: list[Tensor] = []
        self._calls: dict[int, int] = {}
        self._handles: list[RemovableHandle] = [
            p.register_hook(self._hook(index))  # type: ignore[no-untyped-call]
            for index, p in enumerate(self.params)
        ]

    def _hook(self, index: int) -> Callable[[Tensor], None]:
        def hook(grad: Tensor) -> None:
            if not self._armed:
                return
            self._calls[index] = self._calls.get(index, 0) + 1
            self._micro_sq.append(
                torch.linalg.vector_norm(grad.detach(), dtype=torch.float32).square()
            )

        return hook

    def arm(self) -> None:
        """Measure the micro-batch gradients of the backward passes until `measure`."""
        self._armed = True
        self._micro_sq = []
        self._calls = {}

    @property
    def armed(self) -> bool:
        return self._armed

    def _world_size(self) -> int:
        if not dist.is_available() or not dist.is_initialized():
            return 1
        return dist.get_world_size(self.process_group)

    def measure(self, micro_batch_size: int, grad_scale: float | Tensor = 1.0) -> bool:
        """Compare the armed micro-batch gradients with `.grad` and update the estimate.

        Args:
            micro_batch_size: Examples in one micro-batch on one rank.
            grad_scale: The factor the hooked gradients carry and `.grad` no longer does
                (the AMP loss scale when `.grad` was unscaled since); 1 otherwise.

        Returns:
            Whether the estimate was updated (False when not armed or no gradient came).
        """
        if not self._armed:
            return False
        self._armed = False
        micro_sq, self._micro_sq = self._micro_sq, []
        if not micro_sq or not self._calls:
            return False
        accumulation = max(self._calls.values())
        world = self._world_size()
        if accumulation * world < 2:
            raise ValueError(
                "the gradient noise scale needs two batch sizes: use gradient accumulation or "
                f"more than one data-parallel rank (accumulation {accumulation}, world size "
                f"{world})"
            )
        device = micro_sq[0].device
        small = torch.stack([t.to(device) for t in micro_sq]).sum() / accumulation
        small = small / (float(grad_scale) ** 2)
        if world > 1:
            small = small / world
            dist.all_reduce(small, group=self.process_group)
        grads = [p.grad for p in self.params if p.grad is not None]
        big = global_squared_norm(grads).to(device, small.dtype) / accumulation**2
        self.small_sq, self.big_sq = small, big
        self.estimator.update(small, micro_batch_size, big, micro_batch_size * accumulation * world)
        return True

    @property
    def noise_scale(self) -> Tensor | None:
        return self.estimator.noise_scale

    def remove(self) -> None:
        """Remove the parameters' hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
