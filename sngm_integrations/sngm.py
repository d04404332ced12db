"""SNGM: stochastic normalized gradient descent with momentum.

Zhao, Shi, Xie and Li, "Stochastic Normalized Gradient Descent with Momentum for
Large-Batch Training" (arXiv:2007.13985). One step, for the gradient `g_t` of the whole
model (all parameter groups together), is

    d_t     = g_t + lambda * w_t
    u_{t+1} = beta * u_t + d_t / ||d_t||
    w_{t+1} = w_t - lr * u_{t+1}

This module follows the layout of `torch.optim.SGD`: `SNGM` validates arguments and
gathers tensors; the functional `sngm` computes the norm once and dispatches to
`_single_tensor_sngm` (a readable per-tensor loop), `_multi_tensor_sngm` (foreach kernels)
or a fused path: `_fused_sngm_triton` (two multi-tensor Triton launches, see
`sngm_integrations.triton_sngm`) where it applies, else `_fused_sngm` (torch's fused SGD
kernel, fed the norm as its `grad_scale`).
`sngm_integrations.reference` holds a literal twin that the tests hold all three to.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from itertools import chain
from typing import TYPE_CHECKING, Any, NamedTuple, cast

import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim import Optimizer
from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

from sngm_integrations import sharding
from sngm_integrations.distributed import (
    accumulation_dtype,
    all_reduce_and_sum,
    any_dtensor,
    global_squared_norm,
    local_tensor,
    per_tensor_squared_norms,
    reduction_classes,
    sum_on,
)

if TYPE_CHECKING:
    from sngm_integrations.triton_sngm import BucketPlan

__all__ = ["SNGM", "PlanCache", "SNGMParamGroup", "SNGMStepStats", "sngm"]

NORMALIZE_MODES = ("global", "layer")
FUSED_BACKENDS = ("auto", "triton", "torch")
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None
_HALF_DTYPES = (torch.float16, torch.bfloat16)
_MIN_HOST_INVERSE_NORM = 2.0**-24


def _validate_hyperparameters(
    lr: float | Tensor,
    momentum: float,
    weight_decay: float,
    nesterov: bool,
    normalize: str,
    eps: float,
) -> None:
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError(f"lr must be a float or a one-element Tensor, got lr={lr}")
        lr_value = float(lr)  # validation runs once, at construction, never in step()
    else:
        lr_value = float(lr)
    if not lr_value >= 0.0:
        raise ValueError(f"Invalid learning rate: lr={lr} (must be >= 0)")
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"Invalid momentum: momentum={momentum} (SNGM needs 0 <= momentum < 1)")
    if not weight_decay >= 0.0:
        raise ValueError(f"Invalid weight_decay: weight_decay={weight_decay} (must be >= 0)")
    if not eps > 0.0:
        raise ValueError(f"Invalid eps: eps={eps} (must be > 0)")
    if normalize not in NORMALIZE_MODES:
        raise ValueError(
            f"Invalid normalize: normalize={normalize!r} (choose one of {NORMALIZE_MODES})"
        )
    if nesterov and momentum == 0.0:
        raise ValueError(
            f"Invalid nesterov: nesterov={nesterov} needs momentum > 0, got momentum={momentum}"
        )


def _validate_fused_backend(fused_backend: str) -> None:
    if fused_backend not in FUSED_BACKENDS:
        raise ValueError(
            f"Invalid fused_backend: fused_backend={fused_backend!r} "
            f"(choose one of {FUSED_BACKENDS})"
        )


class SNGM(Optimizer):
    """Stochastic normalized gradient descent with momentum (Zhao et al., 2020).

    For the gradient `g` of all parameters this optimizer holds, in every group:

        d       = g + weight_decay * w          (-g instead of g if maximize)
        u_{t+1} = momentum * u_t + d / max(||d||, eps)
        w_{t+1} = w_t - lr * u_{t+1}            (nesterov: lr * (d / ||d|| + momentum * u_{t+1}))

    `||d||` is **one** L2 norm over every tensor of every parameter group
    (`normalize="global"`, the paper's algorithm). Weight decay is folded into the gradient
    before the norm, as `torch.optim.SGD` does, so the step normalizes the gradient of the
    regularized objective the paper analyses.

    Learning rates are not MSGD learning rates. Every normalized gradient has length 1 and
    there is no dampening, so the momentum buffer's norm can reach `1 / (1 - momentum)` (10
    for momentum 0.9) when successive gradients point the same way; the weights move by at
    most `lr / (1 - momentum)` per step, whatever the gradient's size.

    Because the gradient is divided by its norm, multiplying every gradient by one positive
    number changes nothing (up to `eps`, and apart from the folded weight decay): norm
    clipping, loss division by accumulation steps and AMP loss scales are no-ops.

    A step whose gradient norm is not finite (an inf or nan anywhere) is skipped on the
    device, without a host synchronisation: parameters and momentum buffers keep their
    exact values, and `skipped_steps` counts it. (Only the CPU path reads the norm on the
    host, where there is no device to wait for.)

    Args:
        params: Parameters or parameter groups (dicts) to optimize.
        lr: Learning rate (a float, or a one-element Tensor).
        momentum: The momentum factor, in [0, 1). Kept under the key `"momentum"` in every
            param group, where learning-rate monitors look for it.
        weight_decay: L2 penalty, folded into the gradient before the norm.
        nesterov: Use Nesterov momentum (needs `momentum > 0`).
        normalize: `"global"` (the paper: one norm over all parameters) or `"layer"`
            (each tensor divided by its own norm, a LARS-like variant that is *not* the
            paper's algorithm).
        eps: Floor of the norm: a gradient with norm below `eps` is divided by `eps`,
            so a zero gradient gives a zero step instead of `0/0`.
        maximize: Maximize the objective instead of minimizing it.
        foreach: Use the foreach (multi-tensor) implementation.
        fused: Use the fused implementation. The default, when neither `foreach` nor
            `fused` is given, is fused on devices torch has fused kernels for (CPU and
            CUDA among them), otherwise foreach.
        fused_backend: Which kernels the fused implementation uses. `"auto"` (default):
            SNGM's Triton kernels for float32/float16/bfloat16 CUDA tensors with
            `normalize="global"` when Triton is installed, otherwise torch's fused SGD
            kernel. `"triton"` insists on the Triton kernels (an error where they do not
            apply); `"torch"` always uses torch's kernel. In a CUDA graph capture before
            any eager step, torch's kernel is used. Under `torch.compile`, which can
            trace neither kernel, the fused path runs as the foreach implementation and
            the compiler fuses it.
        process_group: The group over which each rank's flat shards are summed to give
            the global norm, for flat shards no engine SNGM knows produced, and for FSDP1's
            hybrid sharding (its shard group). Leave `None` otherwise: SNGM recognises FSDP1,
            DeepSpeed ZeRO 0-3 and DTensor (FSDP2) parameters by itself (see
            docs/sharded-engines.md), and DDP needs none.

    Warning:
        The fused implementation on torch's kernel (the default on CPU, and on CUDA where
        the Triton kernels do not apply) may change `p.grad`. Weight decay is folded into
        it in place (it then holds `d`, to save a copy), and where the kernel takes the
        global norm as its `grad_scale` it writes `d / ||d||` back: for float32 and
        half-precision tensors on CUDA, and on the CPU for half precision, Nesterov
        momentum, momentum 0 and norms above 2**24 (CPU float32 steps otherwise hand the
        kernel `1/||d||` as a host number and leave `g` as it was). The next `zero_grad()`
        clears it as usual, and norm clipping or loss scaling before `step()` are
        unaffected, but code that reads `p.grad` *after* `step()` can see these values.
        The Triton kernels and `foreach=True` (or `fused=False`) leave gradients untouched.

    Example:
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = SNGM(model.parameters(), lr=0.5, momentum=0.9, weight_decay=5e-4)
        >>> model(torch.randn(8, 4)).square().mean().backward()
        >>> opt.step()
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Tensor,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        *,
        nesterov: bool = False,
        normalize: str = "global",
        eps: float = 1e-8,
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        fused_backend: str = "auto",
        process_group: dist.ProcessGroup | None = None,
    ) -> None:
        _validate_hyperparameters(lr, momentum, weight_decay, nesterov, normalize, eps)
        _validate_fused_backend(fused_backend)
        if fused and foreach:
            raise ValueError("fused=True and foreach=True cannot both be set: choose one")
        if process_group is not None and normalize == "layer":
            raise ValueError(
                "normalize='layer' cannot be used with process_group (flat-sharded "
                "parameters): a shard's norm is not its tensor's norm"
            )
        defaults = dict(
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            nesterov=nesterov,
            maximize=maximize,
            normalize=normalize,
            eps=eps,
            foreach=foreach,
            fused=fused,
        )
        self.process_group = process_group
        self.fused_backend = fused_backend
        # Held in a dict that step() writes into: torch.compile loses (or refuses) an
        # attribute assigned on the optimizer inside a traced step, but keeps dict writes.
        self._last_step: dict[str, Tensor | None] = {"grad_norm": None}
        self._triton_plans = PlanCache()
        super().__init__(params, defaults)

    @property
    def last_grad_norm(self) -> Tensor | None:
        """The norm the last step divided by (of the weight-decayed gradient, reduced across
        ranks where SNGM reduces it): a 0-dim tensor on the parameters' device, inf or nan
        for a skipped step, None before the first step. Reading its value synchronises."""
        return self._last_step["grad_norm"]

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a parameter group; its hyperparameters are validated like the constructor's."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        _validate_hyperparameters(
            group["lr"],
            group["momentum"],
            group["weight_decay"],
            group["nesterov"],
            group["normalize"],
            group["eps"],
        )
        first = self.param_groups[0]
        # One step updates every group together, with one norm and one implementation.
        for key in ("normalize", "eps", "foreach", "fused"):
            if group[key] != first[key]:
                raise ValueError(
                    f"{key} must be the same in every param group (one step, one shared "
                    f"norm): got {key}={group[key]!r} and {key}={first[key]!r}"
                )

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict; the skip counters are kept in float32 with their exact values.

        torch.optim casts floating-point state to its parameter's dtype, which would turn
        the counters of half-precision parameters into half-precision numbers (inexact
        past 256 in bfloat16, and unusable by the Triton kernels).
        """
        saved = state_dict["state"]
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        counters = {
            p: saved[i]["skipped_steps"]
            for i, p in zip(saved_ids, params, strict=False)
            if "skipped_steps" in saved.get(i, {})
        }
        super().load_state_dict(state_dict)
        for p, counter in counters.items():
            self.state[p]["skipped_steps"] = counter.to(
                dtype=torch.float32, device=local_tensor(p).device, copy=True
            )

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("process_group", None)
        self.__dict__.setdefault("fused_backend", "auto")
        self.__dict__.setdefault("_last_step", {"grad_norm": None})
        if self.__dict__.get("_triton_plans") is None:
            self._triton_plans = PlanCache()
        for group in self.param_groups:
            group.setdefault("nesterov", False)
            group.setdefault("maximize", False)
            group.setdefault("normalize", "global")
            group.setdefault("eps", 1e-8)
            group.setdefault("foreach", None)
            group.setdefault("fused", None)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state = dict(state)
        state["process_group"] = None  # process groups cannot be copied or pickled
        state["_triton_plans"] = None  # tables of device pointers, rebuilt on demand
        return state

    @property
    def skipped_steps(self) -> int:
        """How many steps were skipped because the gradient norm was not finite.

        Reading it synchronises the host with the device; the optimizer never does.
        """
        for group in self.param_groups:
            for p in group["params"]:
                counter = self.state.get(p, {}).get("skipped_steps")
                if counter is not None:
                    return int(counter.item())
        return 0

    def _init_group(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        buffers: list[Tensor],
        skip_counters: list[Tensor],
    ) -> bool:
        """Append the group's tensors that have gradients, and their skip counters.

        Like torch.optim's optimizers, it fills the lists it is given and returns a plain
        value (whether the group has any gradient): torch.compile runs a method of this
        name eagerly and expects exactly that.
        """
        for p in group["params"]:
            grad = p.grad
            if grad is None:
                continue
            if grad.is_sparse:
                raise RuntimeError(
                    "SNGM does not support sparse gradients; use dense gradients "
                    "(for nn.Embedding, sparse=False)"
                )
            state = self.state[p]
            buffer = state.get("momentum_buffer")
            if buffer is None:
                buffer = state["momentum_buffer"] = torch.zeros_like(
                    p, memory_format=torch.preserve_format
                )
                state["skipped_steps"] = torch.zeros(
                    (), dtype=torch.float32, device=local_tensor(p).device
                )
            skip_counters.append(state["skipped_steps"])
            if p.is_complex():
                p, grad, buffer = (torch.view_as_real(t) for t in (p, grad, buffer))
            params.append(p)
            grads.append(grad)
            buffers.append(buffer)
        return bool(params)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Take one SNGM step.

        Args:
            closure: Optional callable that recomputes the loss (and its gradients). It is
                called exactly once, with gradients enabled, and its result is returned.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        groups: list[SNGMParamGroup] = []
        for group in self.param_groups:
            params: list[Tensor] = []
            grads: list[Tensor] = []
            buffers: list[Tensor] = []
            skip_counters: list[Tensor] = []
            if self._init_group(group, params, grads, buffers, skip_counters):
                groups.append(
                    SNGMParamGroup(
                        params=params,
                        grads=grads,
                        momentum_buffers=buffers,
                        lr=group["lr"],
                        momentum=group["momentum"],
                        weight_decay=group["weight_decay"],
                        nesterov=group["nesterov"],
                        maximize=group["maximize"],
                        skip_counters=skip_counters,
                    )
                )
        # Engines that shard the optimizer's tensors: reduction group, deferred groups.
        plan = sharding.plan_step(self, groups, self.process_group, self._last_step)
        groups = plan.groups
        if not groups:
            return loss
        first = self.param_groups[0]
        stats = sngm(
            groups,
            normalize=first["normalize"],
            eps=first["eps"],
            process_group=plan.process_group,
            foreach=first["foreach"],
            fused=first["fused"],
            fused_backend=self.fused_backend,
            triton_plans=self._triton_plans,
        )
        self._last_step["grad_norm"] = stats.grad_norm
        plan.finish()
        return loss


@dataclass
class SNGMParamGroup:
    """The tensors and hyperparameters of one parameter group, for `sngm`."""

    params: list[Tensor]
    grads: list[Tensor]
    momentum_buffers: list[Tensor]
    lr: float | Tensor
    momentum: float
    weight_decay: float = 0.0
    nesterov: bool = False
    maximize: bool = False
    skip_counters: list[Tensor] | None = None
    """Optional float32 0-dim counters, one per tensor (SNGM keeps them in
    `state["skipped_steps"]`): each is incremented when the step is skipped."""


class SNGMStepStats(NamedTuple):
    """What one SNGM step measured, as device tensors (reading them synchronises)."""

    grad_norm: Tensor
    """The global norm of the (weight-decayed) gradient, `||d||`."""
    found_inf: Tensor
    """1.0 when the step was skipped because the norm was not finite, else 0.0."""


class _Directions(NamedTuple):
    """Per group: the vectors to normalize, and the sign the gradient still needs."""

    vectors: list[list[Tensor]]
    signs: list[float]


def _descent_directions(groups: Sequence[SNGMParamGroup], in_place: bool) -> _Directions:
    """`d = ±g + λw` for each group, without copying `g` when `λ = 0`.

    With `λ = 0` the vector is the gradient itself and the sign of `maximize` is left to
    the update (the norm does not depend on it); with `λ > 0` the sign is folded in, into
    a new tensor, or into `g` itself when `in_place` (the fused path, which overwrites
    `g` anyway and so saves an allocation and a pass).
    """
    vectors: list[list[Tensor]] = []
    signs: list[float] = []
    for group in groups:
        if group.weight_decay == 0.0:
            vectors.append(group.grads)
            signs.append(-1.0 if group.maximize else 1.0)
            continue
        if in_place:
            if group.maximize:
                torch._foreach_neg_(group.grads)
            torch._foreach_add_(group.grads, group.params, alpha=group.weight_decay)
            vectors.append(group.grads)
        else:
            grads = torch._foreach_neg(group.grads) if group.maximize else group.grads
            vectors.append(list(torch._foreach_add(grads, group.params, alpha=group.weight_decay)))
        signs.append(1.0)
    return _Directions(vectors, signs)


class _Scale(NamedTuple):
    """The device scalars of one step: the norm, whether it is finite, and 1/norm."""

    grad_norm: Tensor
    finite: Tensor
    found_inf: Tensor  # float32: 1.0 when the step is skipped
    inverse_norms: list[Tensor]  # one per tensor ("layer") or a single one ("global")
    norm_floor: Tensor | None  # max(norm, eps), for "global" only


def _compute_scale(
    vectors: Sequence[Tensor],
    normalize: str,
    eps: float,
    process_group: dist.ProcessGroup | None,
) -> _Scale:
    acc_dtype = accumulation_dtype(vectors)
    if normalize == "global":
        norm = global_squared_norm(vectors, acc_dtype, process_group).sqrt()
        finite = torch.isfinite(norm)
        floor = norm.clamp(min=eps)
        inverse = torch.where(finite, floor.reciprocal(), 0.0)
        return _Scale(norm, finite, (~finite).to(torch.float32), [inverse], floor)
    if process_group is not None:
        raise ValueError(
            "normalize='layer' cannot be used with process_group (flat-sharded parameters)"
        )
    norms = torch.stack(per_tensor_squared_norms(vectors, acc_dtype)).sqrt()
    finite = torch.isfinite(norms).all()
    inverse = torch.where(finite, norms.clamp(min=eps).reciprocal(), 0.0)
    grad_norm = norms.square().sum().sqrt()
    return _Scale(grad_norm, finite, (~finite).to(torch.float32), list(inverse.unbind()), None)


class _OnDevice:
    """Caches copies of the step's device scalars on each device that holds parameters."""

    def __init__(self) -> None:
        # The source tensor is kept alive with its copy, so that its id stays unique.
        self._cache: dict[tuple[int, torch.device], tuple[Tensor, Tensor]] = {}

    def __call__(self, value: Tensor, device: torch.device) -> Tensor:
        if value.device == device:
            return value
        key = (id(value), device)
        if key not in self._cache:
            self._cache[key] = (value, value.to(device, non_blocking=True))
        return self._cache[key][1]


class _Bucket(NamedTuple):
    """The local tensors of one group that share a device and a dtype (one foreach call)."""

    device: torch.device
    dtype: torch.dtype
    params: list[Tensor]
    grads: list[Tensor]
    buffers: list[Tensor]
    indices: list[int]
    """The tensors' positions in the group."""


def _buckets(group: SNGMParamGroup) -> list[_Bucket]:
    """`group`'s tensors bucketed by device and dtype, by torch.optim's own (C++) helper."""
    lists: list[list[Tensor]] = [group.params, group.grads, group.momentum_buffers]
    if any_dtensor(group.params):
        lists = [[local_tensor(t) for t in ts] for ts in lists]
    # While compiling, the helper returns one bucket and leaves the rest to Inductor.
    grouped = Optimizer._group_tensors_by_device_and_dtype(
        cast(list[list[Tensor | None]], lists), with_indices=True
    )
    buckets = []
    for bucket_lists, indices in grouped.values():
        params, grads, buffers = cast(list[list[Tensor]], bucket_lists)
        buckets.append(_Bucket(params[0].device, params[0].dtype, params, grads, buffers, indices))
    return buckets


def _bucket_vectors(bucket: _Bucket, group: SNGMParamGroup, vectors: list[Tensor]) -> list[Tensor]:
    """The bucket's part of the group's vectors to normalize (its gradients when they are)."""
    if vectors is group.grads:
        return bucket.grads
    return [local_tensor(vectors[i]) for i in bucket.indices]


def _first_unfusable(buckets: Iterable[_Bucket]) -> _Bucket | None:
    """The first bucket torch's fused kernel cannot take, or None if it takes them all."""
    supported = _get_fused_kernels_supported_devices()
    for bucket in buckets:
        if bucket.device.type not in supported or not bucket.dtype.is_floating_point:
            return bucket
    return None


def sngm(
    groups: Sequence[SNGMParamGroup],
    *,
    normalize: str = "global",
    eps: float = 1e-8,
    process_group: dist.ProcessGroup | None = None,
    foreach: bool | None = None,
    fused: bool | None = None,
    fused_backend: str = "auto",
    triton_plans: PlanCache | None = None,
) -> SNGMStepStats:
    r"""Functional SNGM: update `groups` in place with one shared gradient norm.

    See `SNGM` for the algorithm and the arguments. The norm is computed once (on the
    device, reduced over shards when needed), then every group is updated by the chosen
    implementation, and each group's `skip_counters` (when given) are incremented if the
    norm is not finite. `triton_plans` keeps the Triton kernels' pointer tables from one
    step to the next; without it they are rebuilt every step.

    Returns:
        The step's gradient norm and whether it was skipped, as device tensors.
    """
    _validate_fused_backend(fused_backend)
    if fused and foreach:
        raise ValueError("fused=True and foreach=True cannot both be set: choose one")
    if not foreach and fused is not False:
        plans = _triton_bucket_plans(groups, normalize, process_group, fused_backend, triton_plans)
        if plans is not None:
            return _fused_sngm_triton(groups, plans, eps)
    buckets = [_buckets(group) for group in groups] if fused is not False or foreach else []
    if fused is None and foreach is None:
        fused = _first_unfusable(chain.from_iterable(buckets)) is None
    elif fused and (unfusable := _first_unfusable(chain.from_iterable(buckets))) is not None:
        raise RuntimeError(
            "fused=True needs floating-point parameters on one of "
            f"{_get_fused_kernels_supported_devices()}; got a {unfusable.dtype} parameter "
            f"on {unfusable.device}"
        )
    # Neither fused kernel can be traced; under torch.compile Inductor fuses the foreach ops.
    fused_kernel = bool(fused) and not torch.compiler.is_compiling()
    directions = _descent_directions(groups, in_place=fused_kernel)
    scale = _compute_scale(
        [v for vectors in directions.vectors for v in vectors], normalize, eps, process_group
    )
    if fused_kernel:
        _fused_sngm(groups, buckets, directions, scale)
    elif fused or foreach:
        _multi_tensor_sngm(groups, buckets, directions, scale)
    else:
        _single_tensor_sngm(groups, directions, scale)
    _count_skips(groups, scale.found_inf)
    return SNGMStepStats(scale.grad_norm, scale.found_inf)


def _inverse_norms_for(scale: _Scale, start: int, count: int) -> list[Tensor]:
    """The inverse norms of `count` tensors that start at flat index `start`."""
    if len(scale.inverse_norms) == 1:
        return scale.inverse_norms * count
    return scale.inverse_norms[start : start + count]


def _single_tensor_sngm(
    groups: Sequence[SNGMParamGroup], directions: _Directions, scale: _Scale
) -> None:
    """One tensor at a time: the readable implementation."""
    to_device = _OnDevice()
    start = 0
    for group, vectors, sign in zip(groups, directions.vectors, directions.signs, strict=True):
        inverses = _inverse_norms_for(scale, start, len(vectors))
        start += len(vectors)
        beta = group.momentum
        for p, d, u, inverse in zip(
            group.params, vectors, group.momentum_buffers, inverses, strict=True
        ):
            p, d, u = local_tensor(p), local_tensor(d), local_tensor(u)
            finite = to_device(scale.finite, p.device)
            normalized = d * (to_device(inverse, p.device) * sign)
            new_u = u * beta + normalized
            update = normalized + beta * new_u if group.nesterov else new_u
            lr = to_device(group.lr, p.device) if isinstance(group.lr, Tensor) else group.lr
            new_p = p - lr * update
            u.copy_(torch.where(finite, new_u, u))
            p.copy_(torch.where(finite, new_p, p))


def _multi_tensor_sngm(
    groups: Sequence[SNGMParamGroup],
    buckets: Sequence[list[_Bucket]],
    directions: _Directions,
    scale: _Scale,
) -> None:
    """Foreach kernels over each bucket of tensors that share a device and a dtype."""
    to_device = _OnDevice()
    start = 0
    for group, group_buckets, vectors, sign in zip(
        groups, buckets, directions.vectors, directions.signs, strict=True
    ):
        inverses = _inverse_norms_for(scale, start, len(vectors))
        start += len(vectors)
        beta = group.momentum
        for bucket in group_buckets:
            device, params, bufs = bucket.device, bucket.params, bucket.buffers
            vecs = _bucket_vectors(bucket, group, vectors)
            scalar_dtype = torch.float64 if bucket.dtype == torch.float64 else torch.float32
            keep = to_device(scale.finite, device).to(scalar_dtype)
            if len(scale.inverse_norms) == 1:
                normalized = list(torch._foreach_mul(vecs, to_device(inverses[0], device) * sign))
            else:
                normalized = list(
                    torch._foreach_mul(
                        vecs, [to_device(inverses[i], device) * sign for i in bucket.indices]
                    )
                )
            # On a skipped step the inverse norm is 0, but 0 * inf is nan: clear those.
            for t in normalized:
                t.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
            torch._foreach_mul_(bufs, 1.0 + keep * (beta - 1.0))
            torch._foreach_add_(bufs, normalized)
            update = (
                list(torch._foreach_add(normalized, torch._foreach_mul(bufs, beta)))
                if group.nesterov
                else bufs
            )
            lr = to_device(group.lr, device) if isinstance(group.lr, Tensor) else group.lr
            torch._foreach_add_(params, torch._foreach_mul(update, -lr * keep))


def _fused_sngm(
    groups: Sequence[SNGMParamGroup],
    buckets: Sequence[list[_Bucket]],
    directions: _Directions,
    scale: _Scale,
) -> None:
    """Torch's fused SGD kernel with the norm as `grad_scale` and the skip as `found_inf`.

    The kernel divides the gradient by `grad_scale` on the device, so the normalized
    gradient is never materialized: after the norm's one read of the gradient, the kernel
    reads p, g and u and writes p and u (and g, see the warning in `SNGM`). The
    scale is a float32 input of the kernel; float64 tensors and `normalize="layer"`
    are therefore normalized beforehand, into a temporary.

    On the CPU, float32 buckets with momentum (not Nesterov) get `1/||d||` as the kernel's
    `1 - dampening` instead, read on the host (there is no device to wait for): the
    kernel then forms `u = beta * u + d / ||d||` itself and does not write `g` back,
    which saves one of its six passes over the data.
    """
    to_device = _OnDevice()
    host_inverse = _host_inverse_norm(scale)
    start = 0
    for group, group_buckets, vectors, sign in zip(
        groups, buckets, directions.vectors, directions.signs, strict=True
    ):
        inverses = _inverse_norms_for(scale, start, len(vectors))
        start += len(vectors)
        for bucket in group_buckets:
            device, params, bufs = bucket.device, bucket.params, bucket.buffers
            vecs = _bucket_vectors(bucket, group, vectors)
            grad_scale: Tensor | None = None
            dampening = 0.0
            maximize = sign < 0
            if (
                host_inverse is not None
                and device.type == "cpu"
                and bucket.dtype == torch.float32
                and group.momentum != 0.0
                and not group.nesterov
            ):
                dampening = 1.0 - host_inverse
            elif scale.norm_floor is not None and bucket.dtype != torch.float64:
                grad_scale = to_device(scale.norm_floor.to(torch.float32), device)
            else:
                scales = [to_device(inverses[i], device) * sign for i in bucket.indices]
                vecs = list(torch._foreach_mul(vecs, scales))
                maximize = False
            lr = to_device(group.lr, device) if isinstance(group.lr, Tensor) else group.lr
            torch._fused_sgd_(
                params,
                vecs,
                bufs if group.momentum != 0.0 else [],  # the kernel takes none without momentum
                weight_decay=0.0,
                momentum=group.momentum,
                lr=cast(Any, lr),
                dampening=dampening,
                nesterov=group.nesterov,
                maximize=maximize,
                is_first_step=False,
                grad_scale=grad_scale,
                found_inf=to_device(scale.found_inf, device),
            )


def _host_inverse_norm(scale: _Scale) -> float | None:
    """`1/||d||` as a Python float when the global norm is on the CPU and at most 2**24.

    The kernel takes it as `1 - dampening`, a double, and computes `1 - dampening` back:
    the round trip is exact to about `1e-16 * ||d||` relative, so larger norms (and
    skipped steps, whose inverse is 0) keep the `grad_scale` route.
    """
    if scale.norm_floor is None or scale.norm_floor.device.type != "cpu":
        return None
    inverse = float(scale.inverse_norms[0])
    return inverse if inverse >= _MIN_HOST_INVERSE_NORM else None


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


_TritonPlans = list[tuple[list[dist.ProcessGroup], list[tuple[int, "BucketPlan"]]]]
"""For each reduction class: the groups its squared sum is all-reduced over, and its
buckets as (group index, plan) pairs."""


def _triton_bucket_plans(
    groups: Sequence[SNGMParamGroup],
    normalize: str,
    process_group: dist.ProcessGroup | None,
    backend: str,
    cache: PlanCache | None,
) -> _TritonPlans | None:
    """The Triton kernels' plans for this step, or None when torch's fused kernel takes it.

    A step's plan, or the reason it has none, is cached under the addresses of all its
    tensors, so that a step like the last one costs only building that key.
    """

    def unavailable(reason: str) -> _TritonPlans | None:
        if backend == "triton":
            raise RuntimeError(f"fused_backend='triton' cannot take this step: {reason}")
        return None

    if backend == "torch" or torch.compiler.is_compiling():
        return None
    first = local_tensor(groups[0].params[0])
    if backend == "auto" and not first.is_cuda:  # CPU tensors run only in the interpreter
        return None
    if normalize != "global":
        return unavailable(f"normalize={normalize!r} (the kernels take 'global' only)")
    if not _TRITON_INSTALLED:
        return unavailable("Triton is not installed")

    full_grads = [g for group in groups for g in group.grads]
    params = [p for group in groups for p in group.params]
    grads = full_grads
    buffers = [u for group in groups for u in group.momentum_buffers]
    counters = [c for group in groups for c in group.skip_counters or ()]
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
        found = _plan_triton_step(
            groups, full_grads, params, grads, buffers, process_group, backend
        )
        if cache is not None:
            cache.put(key, found)
    if isinstance(found, str):
        return unavailable(found)
    return cast(_TritonPlans, found)


def _plan_triton_step(
    groups: Sequence[SNGMParamGroup],
    full_grads: list[Tensor],
    params: list[Tensor],
    grads: list[Tensor],
    buffers: list[Tensor],
    process_group: dist.ProcessGroup | None,
    backend: str,
) -> _TritonPlans | str:
    """Bucket the step's local tensors by reduction class, group and dtype, and build each
    bucket's tables; or say why the kernels cannot take the step."""
    from sngm_integrations import triton_sngm

    for p in params:
        if not triton_sngm.supports(p) or (backend == "auto" and not p.is_cuda):
            return f"a {p.dtype} parameter on {p.device}"
    group_of = [i for i, group in enumerate(groups) for _ in group.params]
    counter_of: list[Tensor | None] = []
    for group in groups:
        counter_of += group.skip_counters or [None] * len(group.params)
    plans: _TritonPlans = []
    for class_groups, indices in reduction_classes(full_grads, process_group):
        buckets: dict[tuple[int, torch.device, torch.dtype], list[int]] = {}
        for i in indices:
            buckets.setdefault((group_of[i], params[i].device, params[i].dtype), []).append(i)
        class_plans: list[tuple[int, BucketPlan]] = []
        plans.append((class_groups, class_plans))
        for (group_index, _, _), members in buckets.items():
            counts_skips = groups[group_index].skip_counters is not None
            plan = triton_sngm.plan_bucket(
                [params[i] for i in members],
                [grads[i] for i in members],
                [buffers[i] for i in members],
                [cast(Tensor, counter_of[i]) for i in members] if counts_skips else None,
            )
            if plan is None:
                return "a gradient or momentum buffer does not share its parameter's dense layout"
            class_plans.append((group_index, plan))
    return plans


def _fused_sngm_triton(
    groups: Sequence[SNGMParamGroup], plans: _TritonPlans, eps: float
) -> SNGMStepStats:
    """SNGM's Triton kernels: one norm launch and one update launch per bucket.

    `d = ±g + λw` is formed inside the kernels, so nothing is materialized and `p.grad`
    is left as it was. The update kernels also count skipped steps and report the norm,
    so that a step costs the host no more launches than these and one sum.
    """
    from sngm_integrations import triton_sngm

    device = local_tensor(groups[0].grads[0]).device
    coefficient = [-g.weight_decay if g.maximize else g.weight_decay for g in groups]
    local_sums = []
    for class_groups, class_plans in plans:
        sums = [triton_sngm.squared_norm(plan, coefficient[i]) for i, plan in class_plans]
        local_sums.append((class_groups, sum_on(sums, device)))
    squared = all_reduce_and_sum(local_sums, device)
    stats = torch.empty(2, dtype=torch.float32, device=device)  # the norm and the skip flag
    stats_written = False
    to_device = _OnDevice()
    for _, class_plans in plans:
        for group_index, plan in class_plans:
            group = groups[group_index]
            plan_device = plan.table.device
            lr = to_device(group.lr, plan_device) if isinstance(group.lr, Tensor) else group.lr
            write_stats = not stats_written and plan_device == device
            triton_sngm.update(
                plan,
                to_device(squared, plan_device),
                stats if write_stats else None,
                eps,
                lr,
                group.momentum,
                group.weight_decay,
                group.nesterov,
                group.maximize,
            )
            stats_written |= write_stats
    return SNGMStepStats(*stats.unbind())


def _count_skips(groups: Sequence[SNGMParamGroup], found_inf: Tensor) -> None:
    """Add the step's skip flag to the groups' skip counters, one foreach launch per device."""
    counters = [c for group in groups for c in group.skip_counters or ()]
    if not counters:
        return
    # All float32: torch.optim's (C++) bucketing by device and dtype buckets them by device.
    grouped = Optimizer._group_tensors_by_device_and_dtype([cast(list[Tensor | None], counters)])
    to_device = _OnDevice()
    for (bucket,), _ in grouped.values():
        on_device = cast(list[Tensor], bucket)
        flag = to_device(found_inf, on_device[0].device)
        # A list, not one tensor: torch's foreach add of a tensor scalar reads the scalar
        # on the host on CUDA (a synchronisation, and an error in graph capture).
        torch._foreach_add_(on_device, [flag] * len(on_device))
