"""The step metrics every monitor logs (sngm_integrations.monitoring), in plain PyTorch."""

from __future__ import annotations

import math

import torch

from sngm_integrations import SNGM
from sngm_integrations.monitoring import StepMeasurement, innermost_optimizer


def measured_step(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    record = StepMeasurement(optimizer, per_tensor=True)
    record.before_step()
    optimizer.step()
    record.after_step()
    return {name: float(value) for name, value in record.metrics("sngm/").items()}


def test_update_norm_is_the_weight_change_for_sngm_and_sgd() -> None:
    for make in (
        lambda p: SNGM(p, lr=0.5, momentum=0.9, weight_decay=0.01),
        lambda p: torch.optim.SGD(p, lr=0.5, momentum=0.9),
    ):
        layer = torch.nn.Linear(3, 2)
        optimizer = make(layer.parameters())
        layer(torch.randn(4, 3)).sum().backward()
        grad_norm = math.sqrt(sum(float(p.grad.square().sum()) for p in layer.parameters()))
        before = [p.detach().clone() for p in layer.parameters()]
        metrics = measured_step(optimizer)
        change = math.sqrt(
            sum(
                float((p - b).square().sum())
                for p, b in zip(layer.parameters(), before, strict=True)
            )
        )
        assert math.isclose(metrics["sngm/update_norm"], change, rel_tol=1e-5)
        assert metrics["sngm/lr"] == 0.5
        if isinstance(optimizer, SNGM):
            # The first SNGM step has length lr; its norm includes the weight decay.
            assert math.isclose(change, 0.5, rel_tol=1e-5)
            assert math.isclose(
                metrics["sngm/effective_lr"], 0.5 / metrics["sngm/grad_norm"], rel_tol=1e-6
            )
        else:
            assert math.isclose(metrics["sngm/grad_norm"], grad_norm, rel_tol=1e-5)
            assert "sngm/effective_lr" not in metrics
        assert len([name for name in metrics if name.startswith("sngm/update_norm/")]) == 2


def test_a_skipped_sngm_step() -> None:
    layer = torch.nn.Linear(3, 2)
    optimizer = SNGM(layer.parameters(), lr=0.5, momentum=0.9)
    layer(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    layer.weight.grad.fill_(float("nan"))  # type: ignore[union-attr]
    metrics = measured_step(optimizer)
    assert math.isnan(metrics["sngm/grad_norm"])
    assert metrics["sngm/skipped_steps"] == 1
    assert metrics["sngm/update_norm"] == 0.0 and metrics["sngm/effective_lr"] == 0.0


def test_innermost_optimizer_follows_wrappers() -> None:
    optimizer = torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.1)

    class Wrapper:
        def __init__(self, inner: object) -> None:
            self.optimizer = inner

    assert innermost_optimizer(Wrapper(Wrapper(optimizer))) is optimizer  # type: ignore[arg-type]
