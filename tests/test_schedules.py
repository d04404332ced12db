"""Warmup and decay schedules and the batch-size scaling rule."""

from __future__ import annotations

import math
import pickle

import pytest
import torch

from sngm_integrations import SNGM, scale_lr, warmup_decay_schedule
from sngm_integrations.schedules import WarmupDecay


@pytest.mark.parametrize("schedule", ["constant", "cosine", "linear", "poly"])
def test_warmup_rises_linearly_then_decays_to_the_final_fraction(schedule: str) -> None:
    f = WarmupDecay(total_steps=100, warmup_steps=10, schedule=schedule, final_fraction=0.1)
    assert [f(s) for s in range(3)] == pytest.approx([0.1, 0.2, 0.3])
    assert f(10) == pytest.approx(1.0)
    values = [f(s) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))
    assert f(100) == pytest.approx(1.0 if schedule == "constant" else 0.1)


def test_cosine_is_halfway_at_the_middle_of_the_decay() -> None:
    f = WarmupDecay(total_steps=110, warmup_steps=10, schedule="cosine")
    assert f(60) == pytest.approx(0.5)
    assert WarmupDecay(100, 0, "poly", power=2.0)(50) == pytest.approx(0.25)


def test_scheduler_drives_the_optimizer_lr_and_survives_a_pickle() -> None:
    optimizer = SNGM([torch.nn.Parameter(torch.zeros(1))], lr=0.8)
    scheduler = warmup_decay_schedule(optimizer, total_steps=20, warmup_steps=4)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.2)
    for _ in range(4):
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.8)
    assert pickle.loads(pickle.dumps(scheduler.multiplier))(4) == pytest.approx(1.0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(total_steps=0), "total_steps=0"),
        (dict(total_steps=10, warmup_steps=11), "warmup_steps=11"),
        (dict(total_steps=10, schedule="step"), "schedule='step'"),
        (dict(total_steps=10, final_fraction=2.0), "final_fraction=2.0"),
        (dict(total_steps=10, power=0.0), "power=0.0"),
    ],
)
def test_bad_schedule_arguments_are_named(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        WarmupDecay(**kwargs)


def test_scale_lr_rules() -> None:
    assert scale_lr(0.5, 4096, 1024, "linear") == pytest.approx(2.0)
    assert scale_lr(0.5, 4096, 1024, "sqrt") == pytest.approx(1.0)
    assert scale_lr(0.5, 4096, 1024, "none") == 0.5
    assert scale_lr(0.5, 256, 1024, "sqrt") == pytest.approx(0.5 * math.sqrt(0.25))
    with pytest.raises(ValueError, match="rule='cubic'"):
        scale_lr(0.5, 1, 1, "cubic")
    with pytest.raises(ValueError, match="batch_size=0"):
        scale_lr(0.5, 0, 1, "linear")
