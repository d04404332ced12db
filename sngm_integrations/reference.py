"""A literal, slow twin of SNGM: Algorithm 1 of Zhao et al. (arXiv:2007.13985).

It exists so that the fast implementations in `sngm_integrations.sngm` can be held
to something short enough to check by eye. Use `sngm_integrations.SNGM` to train.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

__all__ = ["ReferenceSNGM"]


class ReferenceSNGM(Optimizer):
    """SNGM written out one parameter at a time, with no fast paths and no validation.

    Per step, for all parameters of all groups:

        d_i = (-g_i if maximize else g_i) + weight_decay * w_i
        n   = sqrt(sum_i ||d_i||^2)     (normalize="global"; "layer": n_i = ||d_i||)
        skip the step if n is not finite
        u_i = momentum * u_i + d_i / max(n, eps)
        w_i = w_i - lr * u_i            (nesterov: lr * (d_i / max(n, eps) + momentum * u_i))
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        *,
        nesterov: bool = False,
        maximize: bool = False,
        normalize: str = "global",
        eps: float = 1e-8,
    ) -> None:
        defaults = dict(
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            nesterov=nesterov,
            maximize=maximize,
        )
        super().__init__(params, defaults)
        self.normalize = normalize
        self.eps = eps
        self.skipped_steps = 0

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        directions: dict[Tensor, Tensor] = {}
        for group in self.param_groups:
            for w in group["params"]:
                if w.grad is None:
                    continue
                g = -w.grad if group["maximize"] else w.grad
                directions[w] = g + group["weight_decay"] * w

        def squared_norm(d: Tensor) -> float:
            return float(d.abs().double().square().sum())

        if self.normalize == "global":
            total = math.sqrt(sum(squared_norm(d) for d in directions.values()))
            norms = {w: total for w in directions}
        else:
            norms = {w: math.sqrt(squared_norm(d)) for w, d in directions.items()}
        if not all(math.isfinite(n) for n in norms.values()):
            self.skipped_steps += 1
            return loss

        for group in self.param_groups:
            for w in group["params"]:
                if w not in directions:
                    continue
                normalized = directions[w] / max(norms[w], self.eps)
                u = self.state[w].setdefault("momentum_buffer", torch.zeros_like(w))
                u.mul_(group["momentum"]).add_(normalized)
                update = normalized + group["momentum"] * u if group["nesterov"] else u
                w.sub_(group["lr"] * update)
        return loss
