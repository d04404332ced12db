"""Squared L2 norms of one rank's local tensors, finite for every finite input.

A float32 sum of squares overflows once the norm passes about 1.8e19, although every
value is finite; SNGM's promise that scaling the gradient changes nothing must hold there
too (an unscaled fp16 loss scale times a large gradient gets there). So the squares are
returned in float64, and

* on CUDA (and other devices with float64 arithmetic), and under `torch.compile`, each
  tensor is reduced with float64 accumulation: one read, no overflow possible for
  float32 and half-precision values, and no host synchronisation;
* on the CPU, the fast float32 reductions run first (a dot product reads memory faster
  there than `_foreach_norm`), their results are checked on the host (there is no device
  to wait for), and only a tensor whose float32 sum overflowed is measured again, scaled
  by its largest magnitude.

`decayed_squared_norms` gives `||s g + c w||^2` per tensor without writing `s g + c w`
anywhere, from `||g||^2 + 2 s c <g, w> + c^2 ||w||^2` (CPU only, where the checks that
keep it exact run on the host).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import cast

import torch
from torch import Tensor
from torch.optim import Optimizer

__all__ = ["accumulation_dtype", "decayed_squared_norms", "squared_norms"]

_DOT_DTYPES = (torch.float32, torch.float64)
_CPU_DOT_MIN_NUMEL = 65536
_NARROW_DEVICES = ("cpu", "mps")  # CPU: checked on the host; MPS: no float64 arithmetic
_CANCELLATION_LIMIT = 1.0 / 16.0


def accumulation_dtype(tensors: Iterable[Tensor]) -> torch.dtype:
    """The dtype norms of `tensors` are reported in: float64 if any is float64, else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _buckets(
    lists: list[list[Tensor]],
) -> list[tuple[torch.device | None, list[list[Tensor]], list[int]]]:
    """`lists` bucketed by device and dtype by torch.optim's (C++) helper, with indices.

    While compiling, the helper returns one bucket without a key (device None).
    """
    grouped = Optimizer._group_tensors_by_device_and_dtype(
        cast(list[list[Tensor | None]], lists), with_indices=True
    )
    return [
        (key[0] if key is not None else None, cast(list[list[Tensor]], bucket_lists), indices)
        for key, (bucket_lists, indices) in grouped.items()
    ]


def _host_checked(device: torch.device | None) -> bool:
    return (
        device is not None
        and device.type in _NARROW_DEVICES
        and not (torch.compiler.is_compiling())
    )


def _wide_squares(tensors: list[Tensor]) -> Tensor:
    """Squared norms with float64 accumulation: one read of each tensor."""
    return torch.stack(torch._foreach_norm(tensors, 2, dtype=torch.float64)).square()


def _narrow_squares(tensors: list[Tensor]) -> Tensor:
    """Squared norms by the CPU's fast float32 reductions (float64 tensors in float64),
    returned in float64: a dot product for large float tensors, one `_foreach_norm` for
    the rest (its host cost is lower for small tensors)."""
    out = torch.empty(len(tensors), dtype=torch.float64)
    large = [i for i, t in enumerate(tensors) if t.numel() >= _CPU_DOT_MIN_NUMEL]
    small = [i for i, t in enumerate(tensors) if t.numel() < _CPU_DOT_MIN_NUMEL]
    if large and tensors[0].dtype in _DOT_DTYPES:
        flats = [tensors[i].reshape(-1) for i in large]  # a copy when not contiguous: once
        out[large] = torch.stack([torch.dot(f, f) for f in flats]).to(torch.float64)
    else:
        small = list(range(len(tensors)))
    if small:
        dtype = None if tensors[0].dtype in _DOT_DTYPES else torch.float32
        norms = torch._foreach_norm([tensors[i] for i in small], 2, dtype=dtype)
        out[small] = torch.stack(norms).to(torch.float64).square()
    return out


def _rescaled_square(tensor: Tensor) -> Tensor:
    """`||t||^2` in float64 for a tensor whose plain sum of squares overflowed."""
    largest = tensor.abs().amax().to(torch.float64)
    if not torch.isfinite(largest) or largest == 0:
        return largest.square()  # inf or nan stays so; an all-zero tensor gives 0
    scaled = (tensor / largest.to(tensor.dtype)).reshape(-1).to(torch.float64)
    return torch.dot(scaled, scaled) * largest.square()


def _repair_overflow(squares: Tensor, tensors: list[Tensor]) -> Tensor:
    """Re-measure (on the host's word) the tensors whose float32 sum came out as inf."""
    if not bool(torch.isinf(squares.sum())):
        return squares
    for i in torch.isinf(squares).nonzero().flatten().tolist():
        squares[i] = _rescaled_square(tensors[i])
    return squares


def squared_norms(tensors: Sequence[Tensor]) -> Tensor:
    """Squared L2 norm of each tensor, as one 1-D float64 tensor in input order.

    The result is on the first tensor's device (the tensors' devices when they all share
    one); inf or nan only when a tensor holds inf or nan.
    """
    out: list[Tensor | None] = [None] * len(tensors)
    for device, (bucket,), indices in _buckets([list(tensors)]):
        if _host_checked(device):
            squares = _repair_overflow(_narrow_squares(bucket), bucket)
        elif device is not None and device.type == "mps":
            squares = _narrow_squares(bucket)
        else:
            squares = _wide_squares(bucket)
        for i, square in zip(indices, squares.unbind(), strict=True):
            out[i] = square
    first = tensors[0].device
    return torch.stack([cast(Tensor, t).to(first, non_blocking=True) for t in out])


def decayed_squared_norms(
    grads: Sequence[Tensor], params: Sequence[Tensor], grad_sign: float, coefficient: float
) -> Tensor:
    """`||grad_sign * g + coefficient * w||^2` of each pair of CPU tensors, float64, in
    input order, without writing the sum anywhere.

    Large float32/float64 tensors take three dot products, `g.g`, `g.w` and `w.w`; smaller
    ones are summed into a temporary, as are tensors whose expansion cancels (its result
    below 1/16 of `g.g + c^2 w.w`, where the dots' rounding would show) or overflows.
    """
    out = torch.empty(len(grads), dtype=torch.float64)
    for device, (bucket_grads, bucket_params), indices in _buckets([list(grads), list(params)]):
        if not _host_checked(device) or device is None or device.type != "cpu":
            raise ValueError(f"decayed_squared_norms needs CPU tensors, got tensors on {device}")
        exact = list(range(len(indices)))
        if bucket_grads[0].dtype in _DOT_DTYPES:
            large = [k for k, g in enumerate(bucket_grads) if g.numel() >= _CPU_DOT_MIN_NUMEL]
            if large:
                exact = [k for k, g in enumerate(bucket_grads) if g.numel() < _CPU_DOT_MIN_NUMEL]
                terms = torch.stack(
                    [
                        torch.stack([torch.dot(g, g), torch.dot(g, w), torch.dot(w, w)])
                        for g, w in (
                            (bucket_grads[k].reshape(-1), bucket_params[k].reshape(-1))
                            for k in large
                        )
                    ]
                ).to(torch.float64)
                gg, gw, ww = terms.unbind(1)
                magnitude = gg + coefficient**2 * ww
                squares = magnitude + 2.0 * grad_sign * coefficient * gw
                unreliable = ~torch.isfinite(squares) | (squares < _CANCELLATION_LIMIT * magnitude)
                for k, square, redo in zip(
                    large, squares.tolist(), unreliable.tolist(), strict=True
                ):
                    if redo:
                        exact.append(k)
                    else:
                        out[indices[k]] = square
        if exact:
            sums = torch._foreach_add(
                torch._foreach_mul([bucket_grads[k] for k in exact], grad_sign),
                [bucket_params[k] for k in exact],
                alpha=coefficient,
            )
            for k, square in zip(exact, squared_norms(sums).unbind(), strict=True):
                out[indices[k]] = square
    return out
