"""The gradient noise scale against the ground truth of linear regression (see the worker)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from conftest import run_cpu_ranks

from sngm_integrations.noise_scale import GradientNoiseScale, GradientNoiseScaleMeter

WORKER = Path(__file__).parent / "distributed" / "noise_scale_worker.py"
sys.path.insert(0, str(WORKER.parent))
import noise_scale_worker as problem  # noqa: E402


def assert_near(estimate: float, sigma: float) -> None:
    truth = problem.true_noise_scale(sigma)
    assert abs(estimate - truth) / truth < 0.15, (estimate, truth)


def test_accumulation_alone_matches_ground_truth() -> None:
    torch.manual_seed(0)
    (estimate,) = problem.run(steps=400, micro_batch=16, accumulation=4, sigmas=[1.0])
    assert_near(estimate, 1.0)


def test_estimate_follows_a_change_of_the_noise() -> None:
    low, high = problem.run(steps=400, micro_batch=16, accumulation=4, sigmas=[1.0, 3.0])
    assert_near(low, 1.0)
    assert_near(high, 3.0)


def test_loss_scale_of_the_micro_batches_cancels() -> None:
    """Losses not divided by the accumulation steps give the same estimate."""
    model = torch.nn.Linear(problem.DIM, 1, bias=False)
    meters = []
    for divide in (True, False):
        torch.nn.init.zeros_(model.weight)
        meter = GradientNoiseScaleMeter(model.parameters())
        generator = torch.Generator().manual_seed(3)
        for _ in range(5):
            model.zero_grad()
            meter.arm()
            for _ in range(4):
                x = torch.randn(8, problem.DIM, generator=generator)
                loss = (model(x).squeeze(1) - x.sum(1)).square().mean() * 1024.0
                (loss / 4 if divide else loss).backward()
            meter.measure(8)
        meter.remove()
        meters.append(meter)
    assert meters[0].noise_scale is not None and meters[1].noise_scale is not None
    torch.testing.assert_close(meters[0].noise_scale, meters[1].noise_scale)


def test_unscaled_grad_takes_grad_scale() -> None:
    model = torch.nn.Linear(3, 1, bias=False)
    meter = GradientNoiseScaleMeter(model.parameters())
    x = torch.randn(4, 3)
    meter.arm()
    for half in (x[:2], x[2:]):
        (model(half).sum() * 8.0).backward()
    model.weight.grad.div_(8.0)  # type: ignore[union-attr]
    meter.measure(2, grad_scale=8.0)
    assert meter.small_sq is not None and meter.big_sq is not None
    g1, g2 = x[:2].sum(0), x[2:].sum(0)
    torch.testing.assert_close(meter.small_sq, (g1.square().sum() + g2.square().sum()) / 2)
    torch.testing.assert_close(meter.big_sq, ((g1 + g2) / 2).square().sum())


def test_unarmed_steps_are_not_measured() -> None:
    model = torch.nn.Linear(3, 1)
    meter = GradientNoiseScaleMeter(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    assert not meter.measure(4)
    assert meter.noise_scale is None


def test_one_batch_size_is_refused() -> None:
    model = torch.nn.Linear(3, 1)
    meter = GradientNoiseScaleMeter(model.parameters())
    meter.arm()
    model(torch.randn(4, 3)).sum().backward()
    with pytest.raises(ValueError, match="accumulation 1, world size 1"):
        meter.measure(4)


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="ema_decay"):
        GradientNoiseScale(ema_decay=1.0)
    with pytest.raises(ValueError, match="big_batch"):
        GradientNoiseScale().update(torch.ones(()), 4, torch.ones(()), 4)


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[float]]:
    out = tmp_path_factory.mktemp("noise_scale_ddp")
    run_cpu_ranks(WORKER, str(out))
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert ranks[0] == ranks[1]  # the estimate is the same on every rank
    return ranks[0]  # type: ignore[no-any-return]


@pytest.mark.slow
def test_ddp_two_ranks_matches_ground_truth(ddp_results: dict[str, list[float]]) -> None:
    assert_near(ddp_results["ddp"][0], 1.0)


@pytest.mark.slow
def test_ddp_with_accumulation_matches_ground_truth(ddp_results: dict[str, list[float]]) -> None:
    assert_near(ddp_results["ddp_accumulation"][0], 1.0)


@pytest.mark.slow
def test_ddp_follows_a_change_of_the_noise(ddp_results: dict[str, list[float]]) -> None:
    low, high = ddp_results["ddp_sigma_change"]
    assert_near(low, 1.0)
    assert_near(high, 3.0)


def test_a_non_finite_step_leaves_the_averages() -> None:
    estimator = GradientNoiseScale(ema_decay=0.9)
    estimator.update(torch.tensor(3.0), 4, torch.tensor(1.0), 16)
    before = estimator.noise_scale
    estimator.update(torch.tensor(float("inf")), 4, torch.tensor(float("nan")), 16)
    assert before is not None and estimator.noise_scale is not None
    torch.testing.assert_close(estimator.noise_scale, before)
    # |G|² = (16 - 4*3)/12 = 1/3 and S = (3 - 1)/(1/4 - 1/16) = 32/3: B_simple = 32.
    torch.testing.assert_close(before, torch.tensor(32.0, dtype=torch.float64))


def test_state_dict_round_trip() -> None:
    estimator = GradientNoiseScale()
    estimator.update(torch.tensor(3.0), 4, torch.tensor(1.0), 16)
    restored = GradientNoiseScale(ema_decay=0.5)
    restored.load_state_dict(estimator.state_dict())
    assert restored.ema_decay == estimator.ema_decay and restored.updates == 1
    torch.testing.assert_close(restored.noise_scale, estimator.noise_scale)
