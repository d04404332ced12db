"""SNGM: stochastic normalized gradient descent with momentum.

Zhao, Shi, Xie and Li, "Stochastic Normalized Gradient Descent with Momentum for
Large-Batch Training" (arXiv:2007.13985). One step, for the gradient `g_t` of the whole
model (all parameter groups together), is

    d_t     = g_t + lambda * w_t
    u_{t+1} = beta * u_t + d_t / ||d_t||
    w_{t+1} = w_t - lr * u_{t+1}

This module follows the layout of `torch.optim.SGD`: `SNGM` validates arguments and
gathers tensors; the functional `sngm` computes the norm once and dispatches to one of
three implementations with one signature: `_single_tensor_sngm` (a readable per-tensor
loop), `_multi_tensor_sngm` (foreach kernels) and `_fused_sngm` (torch's fused SGD
kernel). Fused steps of CUDA tensors go to SNGM's own Triton kernels first
(`sngm_integrations.triton_sngm.fused_step`); CPU steps never reach them.
`sngm_integrations.reference` holds a literal twin that the tests hold all of them to.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
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
    any_dtensor,
    global_squared_norm,
    local_tensor,
    per_tensor_squared_norms,
)
from sngm_integrations.norms import accumulation_dtype, decayed_squared_norms, squared_norms

if TYPE_CHECKING:
    from sngm_integrations.comm_hooks import BucketSquaredNorms
    from sngm_integrations.triton_sngm import PlanCache

__all__ = ["SNGM", "SNGMParamGroup", "SNGMStepStats", "sngm"]

NORMALIZE_MODES = ("global", "layer")
FUSED_BACKENDS = ("auto", "triton", "torch")
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
            raise ValueError(
                f"Invalid lr: lr={lr} (a Tensor lr must have one element, "
                f"got shape {tuple(lr.shape)})"
            )
        lr_value = float(lr)  # validation runs at construction, never in step()
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


def _validate_implementation(
    foreach: bool | None, fused: bool | None, fused_backend: str, normalize: str
) -> None:
    if fused and foreach:
        raise ValueError("fused=True and foreach=True cannot both be set: choose one")
    if fused_backend not in FUSED_BACKENDS:
        raise ValueError(
            f"Invalid fused_backend: fused_backend={fused_backend!r} "
            f"(choose one of {FUSED_BACKENDS})"
        )
    if normalize not in NORMALIZE_MODES:
        raise ValueError(
            f"Invalid normalize: normalize={normalize!r} (choose one of {NORMALIZE_MODES})"
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
    clipping, loss division by accumulation steps and AMP loss scales are no-ops. Every
    finite gradient gives a finite step: the squared norm is accumulated in float64 where
    the hardware has it, and on the CPU a float32 sum that overflows is measured again.

    A step whose gradient holds an inf or nan is skipped on the device, without a host
    synchronisation: parameters and momentum buffers keep their exact values, and
    `skipped_steps` counts it. (The CPU path reads the norm on the host, where there is
    no device to wait for.) No implementation writes to `p.grad`.

    With `momentum=0` no momentum buffer is kept (as in `torch.optim.SGD`); a group whose
    momentum is raised later starts its buffer from zero.

    Args:
        params: Parameters or parameter groups (dicts) to optimize.
        lr: Learning rate (a float, or a one-element Tensor, used as a 0-dim one).
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
            CUDA among them), otherwise foreach. A param group that leaves `foreach` or
            `fused` unset (None) takes the choice of the groups that set it; two groups
            that set different values are refused.
        fused_backend: Which kernels the fused implementation uses on CUDA. `"auto"`
            (default): SNGM's Triton kernels for float32/float16/bfloat16 CUDA tensors
            with `normalize="global"` when Triton is installed, otherwise torch's fused
            SGD kernel. `"triton"` insists on the Triton kernels (an error where they do
            not apply); `"torch"` always uses torch's kernel. In a CUDA graph capture
            before any eager step, torch's kernel is used. Under `torch.compile`, which
            can trace neither kernel, the fused path runs as the foreach implementation
            and the compiler fuses it. Kept by copies and pickles of the optimizer.
        process_group: The group over which each rank's flat shards are summed to give
            the global norm, for flat shards no engine SNGM knows produced, and for FSDP1's
            hybrid sharding (its shard group). Leave `None` otherwise: SNGM recognises FSDP1,
            DeepSpeed ZeRO 0-3 and DTensor (FSDP2) parameters by itself (see
            docs/sharded-engines.md), and DDP needs none. Kept by `copy.deepcopy`; a
            pickled optimizer has none.
        allreduce_norms: The `comm_hooks.BucketSquaredNorms` of a DDP model that
            all-reduces through `comm_hooks.squared_norm_allreduce_hook`: a step then
            divides by the squared norm the hook measured instead of reading the gradients
            once more, when that norm is still the one of the gradients the step uses (the
            same parameters, no gradient written since the all-reduce) and no group has
            weight decay (the norm of `g + λw` reads `g` and `w` whatever else is known).
            Otherwise the step measures the norm itself and warns once per reason;
            `allreduce_norm_steps` counts the steps that took the hook's norm. Kept by
            `copy.deepcopy`; a pickled optimizer has none.

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
        allreduce_norms: BucketSquaredNorms | None = None,
    ) -> None:
        _validate_hyperparameters(lr, momentum, weight_decay, nesterov, normalize, eps)
        _validate_implementation(foreach, fused, fused_backend, normalize)
        if process_group is not None and normalize == "layer":
            raise ValueError(
                "normalize='layer' cannot be used with process_group (flat-sharded "
                "parameters): a shard's norm is not its tensor's norm"
            )
        if allreduce_norms is not None and normalize == "layer":
            raise ValueError(
                "normalize='layer' cannot be used with allreduce_norms: the hook measures "
                "the norm of the whole gradient, not of each tensor"
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
        self.allreduce_norms = allreduce_norms
        self.allreduce_norm_steps = 0
        self._allreduce_warnings: set[str] = set()
        self.fused_backend = fused_backend
        # Held in a dict that step() writes into: torch.compile loses (or refuses) an
        # attribute assigned on the optimizer inside a traced step, but keeps dict writes.
        self._last_step: dict[str, Tensor | None] = {"grad_norm": None}
        self._triton_plans: PlanCache | None = None
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
        try:
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
            for key in ("normalize", "eps"):
                if group[key] != first[key]:
                    raise ValueError(
                        f"{key} must be the same in every param group (one step, one shared "
                        f"norm): got {key}={group[key]!r} and {key}={first[key]!r}"
                    )
            _implementation_flags(self.param_groups)
        except ValueError:
            self.param_groups.pop()  # a refused group leaves the optimizer as it was
            raise

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
        self.__dict__.setdefault("allreduce_norms", None)
        self.__dict__.setdefault("allreduce_norm_steps", 0)
        self.__dict__.setdefault("_allreduce_warnings", set())
        self.__dict__.setdefault("fused_backend", "auto")
        self.__dict__.setdefault("_last_step", {"grad_norm": None})
        self.__dict__.setdefault("_triton_plans", None)
        for group in self.param_groups:
            group.setdefault("nesterov", False)
            group.setdefault("maximize", False)
            group.setdefault("normalize", "global")
            group.setdefault("eps", 1e-8)
            group.setdefault("foreach", None)
            group.setdefault("fused", None)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(super().__getstate__())
        state["fused_backend"] = self.fused_backend
        # Process groups (and the hook's state, which holds a lock) cannot be pickled; a
        # plan holds device pointers, rebuilt on demand.
        state["process_group"] = None
        state["allreduce_norms"] = None
        state["_triton_plans"] = None
        return state

    def __deepcopy__(self, memo: dict[int, Any]) -> SNGM:
        """A deep copy that keeps the process group and the hook's state (handles, not state,
        and not copyable)."""
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        new.__setstate__(copy.deepcopy(self.__getstate__(), memo))
        new.process_group = self.process_group
        new.allreduce_norms = self.allreduce_norms
        return new

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

        Momentum buffers are gathered (and made at zero) only when the group has momentum.
        Like torch.optim's optimizers, it fills the lists it is given and returns a plain
        value (whether the group has any gradient): torch.compile runs a method of this
        name eagerly and expects exactly that.
        """
        has_momentum = group["momentum"] != 0.0
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
            if "skipped_steps" not in state:
                state["skipped_steps"] = torch.zeros(
                    (), dtype=torch.float32, device=local_tensor(p).device
                )
            skip_counters.append(state["skipped_steps"])
            buffer = None
            if has_momentum:
                buffer = state.get("momentum_buffer")
                if buffer is None:
                    buffer = state["momentum_buffer"] = torch.zeros_like(
                        p, memory_format=torch.preserve_format
                    )
            if p.is_complex():
                p, grad = torch.view_as_real(p), torch.view_as_real(grad)
                buffer = torch.view_as_real(buffer) if buffer is not None else None
            params.append(p)
            grads.append(grad)
            if buffer is not None:
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
        foreach, fused = _implementation_flags(self.param_groups)
        if self._triton_plans is None and _may_use_triton(
            groups, foreach, fused, self.fused_backend
        ):
            from sngm_integrations.triton_sngm import PlanCache

            self._triton_plans = PlanCache()
        first = self.param_groups[0]
        stats = _dispatch(
            groups,
            normalize=first["normalize"],
            eps=first["eps"],
            squared_norm=self._allreduce_squared_norm(groups),
            process_group=plan.process_group,
            foreach=foreach,
            fused=fused,
            fused_backend=self.fused_backend,
            triton_plans=self._triton_plans,
        )
        self._last_step["grad_norm"] = stats.grad_norm
        plan.finish()
        return loss

    def _allreduce_squared_norm(self, groups: Sequence[SNGMParamGroup]) -> Tensor | None:
        """The hook's squared norm when it is this step's `||d||^2`, else None (warning once
        per reason)."""
        norms = self.allreduce_norms
        if norms is None or torch.compiler.is_compiling():
            return None
        reason: str | None
        if any(group.weight_decay != 0.0 for group in groups):
            reason = "weight decay is on: the norm of g + weight_decay * w is measured here"
        else:
            reason = norms.mismatch([p for group in self.param_groups for p in group["params"]])
        if reason is None and norms.global_sq is not None:
            self.allreduce_norm_steps += 1
            return norms.global_sq
        if reason is not None and reason not in self._allreduce_warnings:
            self._allreduce_warnings.add(reason)
            warnings.warn(
                f"SNGM(allreduce_norms=...) measures the gradient norm itself: {reason}",
                stacklevel=3,
            )
        return None


def _may_use_triton(
    groups: Sequence[SNGMParamGroup], foreach: bool | None, fused: bool | None, backend: str
) -> bool:
    """Whether the step goes to the Triton kernels first: fused CUDA steps (CPU tensors
    only with `fused_backend="triton"`, under Triton's interpreter), never when compiling."""
    if foreach or fused is False or backend == "torch" or torch.compiler.is_compiling():
        return False
    return backend == "triton" or local_tensor(groups[0].params[0]).is_cuda


def _implementation_flags(
    param_groups: Sequence[dict[str, Any]],
) -> tuple[bool | None, bool | None]:
    """The `foreach` and `fused` the groups agree on: a group's None takes the others' choice."""
    flags: list[bool | None] = []
    for key in ("foreach", "fused"):
        chosen = {group[key] for group in param_groups if group[key] is not None}
        if len(chosen) > 1:
            raise ValueError(
                f"{key} must not differ between param groups (one step, one implementation): "
                f"got {key}=True in one group and {key}=False in another"
            )
        flags.append(chosen.pop() if chosen else None)
    foreach, fused = flags
    if foreach and fused:
        raise ValueError(
            "fused=True and foreach=True cannot both be set (across param groups): choose one"
        )
    return foreach, fused


@dataclass
class SNGMParamGroup:
    """The tensors and hyperparameters of one parameter group, for `sngm`."""

    params: list[Tensor]
    grads: list[Tensor]
    momentum_buffers: list[Tensor]
    """One per parameter; empty when `momentum` is 0 (no buffer is kept then)."""
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


def sngm(
    groups: Sequence[SNGMParamGroup],
    *,
    normalize: str = "global",
    eps: float = 1e-8,
    squared_norm: Tensor | None = None,
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
    norm is not finite. `triton_plans` (a `triton_sngm.PlanCache`) keeps the Triton
    kernels' pointer tables from one step to the next; without it they are rebuilt.
    `squared_norm`, when the caller has measured it (a DDP comm hook's total, say), is
    `||d||^2` over every group (already reduced across ranks): the step divides by its
    root and reads no gradient to measure it. Only with `normalize="global"`.

    Returns:
        The step's gradient norm and whether it was skipped, as device tensors.
    """
    _validate_implementation(foreach, fused, fused_backend, normalize)
    if squared_norm is not None and normalize != "global":
        raise ValueError(
            f"squared_norm is the norm of the whole step: it needs normalize='global', "
            f"got normalize={normalize!r}"
        )
    for group in groups:
        if len(group.momentum_buffers) not in (0, len(group.params)) or (
            group.momentum != 0.0 and not group.momentum_buffers
        ):
            raise ValueError(
                "momentum_buffers must hold one tensor per parameter when momentum != 0 "
                f"(or none when it is 0), got {len(group.momentum_buffers)} for "
                f"{len(group.params)} parameters with momentum={group.momentum}"
            )
    return _dispatch(
        groups,
        normalize=normalize,
        eps=eps,
        squared_norm=squared_norm,
        process_group=process_group,
        foreach=foreach,
        fused=fused,
        fused_backend=fused_backend,
        triton_plans=triton_plans,
    )


def _dispatch(
    groups: Sequence[SNGMParamGroup],
    *,
    normalize: str,
    eps: float,
    squared_norm: Tensor | None,
    process_group: dist.ProcessGroup | None,
    foreach: bool | None,
    fused: bool | None,
    fused_backend: str,
    triton_plans: PlanCache | None,
) -> SNGMStepStats:
    """`sngm` after validation: choose the implementation, measure the norm, update."""
    compiling = torch.compiler.is_compiling()
    if _may_use_triton(groups, foreach, fused, fused_backend):
        from sngm_integrations import triton_sngm

        taken = triton_sngm.fused_step(
            groups, normalize, eps, process_group, fused_backend, triton_plans, squared_norm
        )
        if taken is not None:
            return SNGMStepStats(*taken)
    buckets = [_buckets(group) for group in groups]
    if fused is None and foreach is None:
        fused = _first_unfusable(chain.from_iterable(buckets)) is None
    elif fused and (unfusable := _first_unfusable(chain.from_iterable(buckets))) is not None:
        raise RuntimeError(
            "fused=True needs floating-point parameters on one of "
            f"{_get_fused_kernels_supported_devices()}; got a {unfusable.dtype} parameter "
            f"on {unfusable.device}"
        )
    # Neither fused kernel can be traced; under torch.compile Inductor fuses the foreach ops.
    fused_kernel = bool(fused) and not compiling
    on_host = (
        not compiling
        and normalize == "global"
        and all(b.device.type == "cpu" for b in chain.from_iterable(buckets))
    )
    # The CPU kernel takes weight decay itself and its norm comes from dot products, so
    # there `d` is never written; elsewhere it is formed once, into new tensors.
    directions = _descent_directions(groups, materialize=not (fused_kernel and on_host))
    scale = _compute_scale(groups, directions, normalize, eps, process_group, squared_norm)
    steps = _bucket_steps(groups, buckets, directions, scale)
    if fused_kernel:
        _fused_sngm(steps, scale, on_host)
    elif fused or foreach:
        _multi_tensor_sngm(steps, scale, on_host)
    else:
        _single_tensor_sngm(steps, scale, on_host)
    _count_skips(groups, scale.found_inf)
    return SNGMStepStats(scale.grad_norm, scale.found_inf)


class _Directions(NamedTuple):
    """Per group: the vectors whose norm is taken and the sign `g` still needs in them.

    With weight decay, and unless the CPU kernel forms `d` itself, the vectors are
    `d = ±g + λw` in new tensors (sign 1); otherwise they are the gradients, with the
    sign of `maximize` (the norm does not depend on it) and `λ` left to the update.
    """

    vectors: list[list[Tensor]]
    signs: list[float]
    decay_folded: list[bool]


def _descent_directions(groups: Sequence[SNGMParamGroup], materialize: bool) -> _Directions:
    vectors: list[list[Tensor]] = []
    signs: list[float] = []
    folded: list[bool] = []
    for group in groups:
        sign = -1.0 if group.maximize else 1.0
        if group.weight_decay == 0.0 or not materialize:
            vectors.append(group.grads)
            signs.append(sign)
            folded.append(group.weight_decay == 0.0)
            continue
        grads = torch._foreach_neg(group.grads) if group.maximize else group.grads
        vectors.append(list(torch._foreach_add(grads, group.params, alpha=group.weight_decay)))
        signs.append(1.0)
        folded.append(True)
    return _Directions(vectors, signs, folded)


class _Scale(NamedTuple):
    """The step's scalars: the norm, whether it is finite, and 1/norm."""

    grad_norm: Tensor
    finite: Tensor
    found_inf: Tensor  # float32: 1.0 when the step is skipped
    inverse_norms: list[Tensor]  # one per tensor ("layer") or a single one ("global")
    host_inverse: float | None
    """`1/max(||d||, eps)` as a number, for CPU steps (0.0 for a skipped one)."""


def _compute_scale(
    groups: Sequence[SNGMParamGroup],
    directions: _Directions,
    normalize: str,
    eps: float,
    process_group: dist.ProcessGroup | None,
    squared_norm: Tensor | None,
) -> _Scale:
    vectors = [v for group_vectors in directions.vectors for v in group_vectors]
    report_dtype = accumulation_dtype(vectors)
    if normalize == "layer":
        if process_group is not None:
            raise ValueError(
                "normalize='layer' cannot be used with process_group (flat-sharded parameters)"
            )
        norms = torch.stack(per_tensor_squared_norms(vectors)).sqrt()
        finite = torch.isfinite(norms).all()
        inverse = torch.where(finite, norms.clamp(min=eps).reciprocal(), 0.0).to(report_dtype)
        grad_norm = norms.square().sum().sqrt().to(report_dtype)
        return _Scale(grad_norm, finite, (~finite).to(torch.float32), list(inverse.unbind()), None)
    if squared_norm is not None:
        device = local_tensor(vectors[0]).device
        norm = squared_norm.to(device, torch.float64, non_blocking=True).sqrt()
    else:
        norm = _measured_norm(groups, directions, process_group)
    finite = torch.isfinite(norm)
    inverse = torch.where(finite, norm.clamp(min=eps).reciprocal(), 0.0)
    host_inverse = float(inverse) if norm.device.type == "cpu" and _on_host(vectors) else None
    return _Scale(
        norm.to(report_dtype),
        finite,
        (~finite).to(torch.float32),
        [inverse.to(report_dtype)],
        host_inverse,
    )


def _measured_norm(
    groups: Sequence[SNGMParamGroup],
    directions: _Directions,
    process_group: dist.ProcessGroup | None,
) -> Tensor:
    """`||d||` over every group, reduced across shards, in float64 on the first tensor's device."""
    vectors = [v for group_vectors in directions.vectors for v in group_vectors]
    local_squares = None
    if not all(directions.decay_folded):
        local_squares = torch.cat(
            [
                squared_norms([local_tensor(v) for v in group_vectors])
                if folded
                else decayed_squared_norms(
                    [local_tensor(g) for g in group.grads],
                    [local_tensor(p) for p in group.params],
                    sign,
                    group.weight_decay,
                )
                for group, group_vectors, sign, folded in zip(
                    groups,
                    directions.vectors,
                    directions.signs,
                    directions.decay_folded,
                    strict=True,
                )
            ]
        )
    return global_squared_norm(vectors, process_group, local_squares).sqrt()


def _on_host(tensors: Sequence[Tensor]) -> bool:
    return not torch.compiler.is_compiling() and all(
        local_tensor(t).device.type == "cpu" for t in tensors
    )


class _Bucket(NamedTuple):
    """The local tensors of one group that share a device and a dtype (one foreach call)."""

    device: torch.device
    dtype: torch.dtype
    params: list[Tensor]
    grads: list[Tensor]
    buffers: list[Tensor]  # empty without momentum
    indices: list[int]
    """The tensors' positions in the group."""


def _buckets(group: SNGMParamGroup) -> list[_Bucket]:
    """`group`'s tensors bucketed by device and dtype, by torch.optim's own (C++) helper."""
    lists: list[list[Tensor]] = [group.params, group.grads]
    if group.momentum_buffers:
        lists.append(group.momentum_buffers)
    if any_dtensor(group.params):
        lists = [[local_tensor(t) for t in ts] for ts in lists]
    # While compiling, the helper returns one bucket and leaves the rest to Inductor.
    grouped = Optimizer._group_tensors_by_device_and_dtype(
        cast(list[list[Tensor | None]], lists), with_indices=True
    )
    buckets = []
    for bucket_lists, indices in grouped.values():
        params, grads, *buffers = cast(list[list[Tensor]], bucket_lists)
        device, dtype = params[0].device, params[0].dtype
        buckets.append(
            _Bucket(device, dtype, params, grads, buffers[0] if buffers else [], indices)
        )
    return buckets


def _first_unfusable(buckets: Iterable[_Bucket]) -> _Bucket | None:
    """The first bucket torch's fused kernel cannot take, or None if it takes them all."""
    supported = _get_fused_kernels_supported_devices()
    for bucket in buckets:
        if bucket.device.type not in supported or not bucket.dtype.is_floating_point:
            return bucket
    return None


class _BucketStep(NamedTuple):
    """What an implementation needs to update one bucket: its tensors, its vectors (the
    gradients or `d`), the step's scalars on its device, and its group's settings."""

    bucket: _Bucket
    vectors: list[Tensor]
    inverse_norms: list[Tensor]  # one per tensor, on the bucket's device
    keep: Tensor  # 1.0 to take the step, 0.0 to skip it (on the bucket's device)
    lr: float | Tensor
    momentum: float
    nesterov: bool
    weight_decay: float  # still to add to the vectors: 0 when folded into them
    maximize: bool  # the vectors still need negating


def _bucket_steps(
    groups: Sequence[SNGMParamGroup],
    buckets: Sequence[list[_Bucket]],
    directions: _Directions,
    scale: _Scale,
) -> Iterator[_BucketStep]:
    """Each bucket's `_BucketStep`, with the step's scalars copied once to each device."""
    copies: dict[tuple[int, torch.device], Tensor] = {}
    keep_alive = []

    def on(value: Tensor, device: torch.device) -> Tensor:
        if value.device == device:
            return value
        key = (id(value), device)
        if key not in copies:
            keep_alive.append(value)  # so that its id stays unique while it is cached
            copies[key] = value.to(device, non_blocking=True)
        return copies[key]

    start = 0
    for group, group_buckets, vectors, sign, folded in zip(
        groups,
        buckets,
        directions.vectors,
        directions.signs,
        directions.decay_folded,
        strict=True,
    ):
        inverses = scale.inverse_norms
        if len(inverses) > 1:
            inverses = inverses[start : start + len(vectors)]
        start += len(vectors)
        for bucket in group_buckets:
            device = bucket.device
            if vectors is group.grads:
                bucket_vectors = bucket.grads
            else:
                bucket_vectors = [local_tensor(vectors[i]) for i in bucket.indices]
            if len(inverses) == 1:
                bucket_inverses = [on(inverses[0], device)] * len(bucket.indices)
            else:
                bucket_inverses = [on(inverses[i], device) for i in bucket.indices]
            lr = group.lr
            if isinstance(lr, Tensor):
                lr = on(lr, device).reshape(())
            yield _BucketStep(
                bucket=bucket,
                vectors=bucket_vectors,
                inverse_norms=bucket_inverses,
                keep=on(scale.finite, device),
                lr=lr,
                momentum=group.momentum,
                nesterov=group.nesterov,
                weight_decay=0.0 if folded else group.weight_decay,
                maximize=sign < 0,
            )


def _signed(step: _BucketStep) -> list[Tensor]:
    """The bucket's normalized directions `d / ||d||` in new tensors (0 on a skipped step)."""
    vectors = step.vectors
    if step.weight_decay != 0.0:
        grads = torch._foreach_neg(vectors) if step.maximize else vectors
        vectors = list(torch._foreach_add(grads, step.bucket.params, alpha=step.weight_decay))
    elif step.maximize:
        vectors = list(torch._foreach_neg(vectors))
    normalized = list(torch._foreach_mul(vectors, step.inverse_norms))
    # On a skipped step the inverse norm is 0, but 0 * inf is nan: clear those.
    for t in normalized:
        t.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
    return normalized


def _single_tensor_sngm(steps: Iterable[_BucketStep], scale: _Scale, on_host: bool) -> None:
    """One tensor at a time: the readable implementation."""
    for step in steps:
        if on_host and scale.host_inverse == 0.0:
            continue  # a skipped step
        bucket = step.bucket
        buffers: Sequence[Tensor | None] = bucket.buffers or [None] * len(bucket.params)
        for p, d, u, inverse in zip(
            bucket.params, step.vectors, buffers, step.inverse_norms, strict=True
        ):
            direction = -d if step.maximize else d
            if step.weight_decay != 0.0:
                direction = direction + step.weight_decay * p
            normalized = torch.nan_to_num(direction * inverse, nan=0.0, posinf=0.0, neginf=0.0)
            update = normalized
            if u is not None:
                new_u = u * step.momentum + normalized
                update = normalized + step.momentum * new_u if step.nesterov else new_u
                u.copy_(torch.where(step.keep, new_u, u))
            p.copy_(torch.where(step.keep, p - step.lr * update, p))


def _multi_tensor_sngm(steps: Iterable[_BucketStep], scale: _Scale, on_host: bool) -> None:
    """Foreach kernels over each bucket of tensors that share a device and a dtype."""
    for step in steps:
        if on_host and scale.host_inverse == 0.0:
            continue  # a skipped step
        bucket = step.bucket
        scalar_dtype = torch.float64 if bucket.dtype == torch.float64 else torch.float32
        keep = step.keep.to(scalar_dtype)
        normalized = _signed(step)
        update = normalized
        if bucket.buffers:
            torch._foreach_mul_(bucket.buffers, 1.0 + keep * (step.momentum - 1.0))
            torch._foreach_add_(bucket.buffers, normalized)
            update = bucket.buffers
            if step.nesterov:
                update = list(torch._foreach_add(normalized, bucket.buffers, alpha=step.momentum))
        torch._foreach_add_(bucket.params, torch._foreach_mul(update, -step.lr * keep))


def _fused_sngm(steps: Iterable[_BucketStep], scale: _Scale, on_host: bool) -> None:
    """Torch's fused SGD kernel, fed SNGM's scale so that `p.grad` is only read.

    On the CPU (`on_host`) the inverse norm is a host number and the kernel gets it in
    one of three ways, with `λ` as its own weight decay so that `d` is never written:

    * momentum, no Nesterov, float32, `1/||d|| >= 2**-24`: as its `1 - dampening`, so
      the kernel forms `u = beta * u + d / ||d||` itself (its five passes, like SGD's);
    * no momentum: folded into the learning rate;
    * otherwise (Nesterov, half precision, float64, huge norms): the gradients are
      scaled into a temporary and the kernel gets `λ/||d||` as its weight decay.

    A skipped step does not call the kernel. Elsewhere (CUDA without the Triton kernels)
    the normalized direction is formed in a temporary and the kernel's `found_inf` skips
    the step on the device.
    """
    for step in steps:
        bucket = step.bucket
        momentum_buffers = bucket.buffers  # the kernel takes none without momentum
        kernel: dict[str, Any] = dict(
            weight_decay=0.0,
            momentum=step.momentum,
            lr=step.lr,
            dampening=0.0,
            nesterov=step.nesterov,
            maximize=False,
            is_first_step=False,
        )
        if on_host and scale.host_inverse is not None:
            inverse = scale.host_inverse
            if inverse == 0.0:
                continue  # a skipped step (or a zero-length one)
            kernel.update(weight_decay=step.weight_decay, maximize=step.maximize)
            grads = step.vectors
            if (
                step.momentum != 0.0
                and not step.nesterov
                and bucket.dtype == torch.float32
                and inverse >= _MIN_HOST_INVERSE_NORM
            ):
                kernel["dampening"] = 1.0 - inverse
            elif step.momentum == 0.0:
                kernel["lr"] = step.lr * inverse
            else:
                grads = list(torch._foreach_mul(step.vectors, inverse))
                kernel["weight_decay"] = step.weight_decay * inverse
        else:
            grads = _signed(step)
            kernel["found_inf"] = (~step.keep).to(torch.float32)
        torch._fused_sgd_(bucket.params, grads, momentum_buffers, **kernel)


def _count_skips(groups: Sequence[SNGMParamGroup], found_inf: Tensor) -> None:
    """Add the step's skip flag to the groups' skip counters, one foreach launch per device."""
    counters = [c for group in groups for c in group.skip_counters or ()]
    if not counters:
        return
    # All float32: torch.optim's (C++) bucketing by device and dtype buckets them by device.
    grouped = Optimizer._group_tensors_by_device_and_dtype([cast(list[Tensor | None], counters)])
    for (bucket,), _ in grouped.values():
        on_device = cast(list[Tensor], bucket)
        flag = found_inf.to(on_device[0].device, non_blocking=True)
        # A list, not one tensor: torch's foreach add of a tensor scalar reads the scalar
        # on the host on CUDA (a synchronisation, and an error in graph capture).
        torch._foreach_add_(on_device, [flag] * len(on_device))
