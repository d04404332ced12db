"""The SNGM optimizer: every implementation against the literal reference, numerics,
bad input, and the torch.optim conventions."""

from __future__ import annotations

import copy
import io
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from conftest import IMPLEMENTATIONS, flat, set_grads

from sngm_integrations import SNGM, ReferenceSNGM

CONFIGS = [
    dict(),
    dict(weight_decay=0.05),
    dict(nesterov=True),
    dict(maximize=True),
    dict(momentum=0.0),  # the second group keeps its own momentum, 0.5
    dict(nesterov=True, maximize=True, weight_decay=0.1),
    dict(normalize="layer", weight_decay=0.05),
    dict(normalize="layer", nesterov=True, maximize=True),
]


def make_model(dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(5, 7),
        torch.nn.Tanh(),
        torch.nn.Linear(7, 6),
        torch.nn.Tanh(),
        torch.nn.Linear(6, 3),
    )
    return model.to(dtype)


def param_groups(model: torch.nn.Module) -> list[dict[str, Any]]:
    """Three groups with their own lr, momentum and weight decay."""
    return [
        {"params": model[0].parameters()},
        {"params": model[2].parameters(), "lr": 0.05, "momentum": 0.5},
        {"params": model[4].parameters(), "lr": 0.2, "weight_decay": 0.0},
    ]


def train(
    optimizer_factory: Callable[[torch.nn.Module], torch.optim.Optimizer],
    dtype: torch.dtype,
    steps: int = 12,
) -> torch.nn.Module:
    model = make_model(dtype)
    optimizer = optimizer_factory(model)
    data = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(16, 5, generator=data).to(dtype)
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()
    return model


@pytest.mark.parametrize(
    "config", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "plain"
)
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_every_implementation_matches_the_reference(
    implementation: str, config: dict[str, Any], dtype: torch.dtype, rtol: float
) -> None:
    hyper = dict(lr=0.1, momentum=0.9, weight_decay=0.01) | config
    expected = train(lambda m: ReferenceSNGM(param_groups(m), **hyper), dtype)
    got = train(lambda m: SNGM(param_groups(m), **hyper, **IMPLEMENTATIONS[implementation]), dtype)
    assert not torch.equal(flat(expected), flat(make_model(dtype)))  # the run moved the weights
    # Relative to the weights' scale: entries near zero cannot be held to a relative bound.
    scale = flat(expected).abs().max().item()
    torch.testing.assert_close(flat(got), flat(expected), rtol=rtol, atol=rtol * scale)


def test_norm_is_global_across_parameter_groups() -> None:
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    optimizer = SNGM([{"params": [a]}, {"params": [b]}], lr=1.0, momentum=0.0)
    a.grad, b.grad = torch.tensor([3.0]), torch.tensor([4.0])
    optimizer.step()
    torch.testing.assert_close(torch.cat([a, b]).detach(), torch.tensor([-0.6, -0.8]))
    torch.testing.assert_close(optimizer.last_grad_norm, torch.tensor(5.0))


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_scaling_every_gradient_does_not_change_the_step(implementation: str) -> None:
    models = []
    for scale in (1.0, 1024.0):
        model = make_model()
        optimizer = SNGM(model.parameters(), lr=0.1, **IMPLEMENTATIONS[implementation])
        for step in range(3):
            set_grads(list(model.parameters()), seed=step, scale=scale)
            optimizer.step()
        models.append(flat(model))
    torch.testing.assert_close(models[0], models[1], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_zero_gradient_leaves_parameters_unchanged(implementation: str) -> None:
    model = make_model()
    before = flat(model).clone()
    optimizer = SNGM(model.parameters(), lr=0.1, **IMPLEMENTATIONS[implementation])
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    assert torch.equal(flat(model), before)
    assert not torch.isnan(flat(model)).any()


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("normalize", ["global", "layer"])
def test_non_finite_gradient_skips_the_whole_step(
    implementation: str, bad: float, normalize: str
) -> None:
    model = make_model()
    params = list(model.parameters())
    optimizer = SNGM(
        params, lr=0.1, weight_decay=0.01, normalize=normalize, **IMPLEMENTATIONS[implementation]
    )
    for step in range(2):
        set_grads(params, seed=step)
        optimizer.step()
    weights = [p.detach().clone() for p in params]
    momenta = [optimizer.state[p]["momentum_buffer"].clone() for p in params]

    set_grads(params, seed=7)
    params[2].grad[0, 0] = bad
    grads = [p.grad.clone() for p in params]
    optimizer.step()

    assert all(torch.equal(p, w) for p, w in zip(params, weights, strict=False))
    assert all(
        torch.equal(optimizer.state[p]["momentum_buffer"], m)
        for p, m in zip(params, momenta, strict=False)
    )
    if implementation != "fused":  # the fused path folds weight decay into p.grad (documented)
        assert all(
            torch.allclose(p.grad, g, rtol=0, atol=0, equal_nan=True)
            for p, g in zip(params, grads, strict=False)
        )
    assert optimizer.skipped_steps == 1
    assert not torch.isfinite(optimizer.last_grad_norm)

    set_grads(params, seed=8)
    optimizer.step()
    assert optimizer.skipped_steps == 1
    assert all(not torch.equal(p, w) for p, w in zip(params, weights, strict=False))
    assert all(torch.isfinite(p).all() for p in params)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_half_precision_accumulates_the_norm_in_float32(
    dtype: torch.dtype, implementation: str
) -> None:
    # 300^2 * 100 overflows float16's 65504 if squares were summed in float16.
    weights = torch.linspace(-1, 1, 100)
    grad = torch.full((100,), 300.0)
    p = torch.nn.Parameter(weights.to(dtype))
    p.grad = grad.to(dtype)
    optimizer = SNGM([p], lr=0.1, **IMPLEMENTATIONS[implementation])
    optimizer.step()
    assert optimizer.last_grad_norm.dtype == torch.float32
    torch.testing.assert_close(optimizer.last_grad_norm, torch.tensor(3000.0))
    expected = weights - 0.1 * grad / 3000.0
    torch.testing.assert_close(p.detach().float(), expected, rtol=1e-2, atol=1e-2)
    assert optimizer.skipped_steps == 0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(lr=-0.1), "lr=-0.1"),
        (dict(lr=0.1, momentum=1.0), "momentum=1.0"),
        (dict(lr=0.1, momentum=-0.5), "momentum=-0.5"),
        (dict(lr=0.1, weight_decay=-1e-4), "weight_decay=-0.0001"),
        (dict(lr=0.1, eps=0.0), "eps=0.0"),
        (dict(lr=0.1, eps=-1.0), "eps=-1.0"),
        (dict(lr=0.1, normalize="per_channel"), "normalize='per_channel'"),
        (dict(lr=0.1, nesterov=True, momentum=0.0), "nesterov=True"),
        (dict(lr=0.1, fused=True, foreach=True), "fused=True and foreach=True"),
        (dict(lr=torch.tensor([0.1, 0.2])), "lr="),
        (dict(lr=math.nan), "lr=nan"),
    ],
)
def test_invalid_hyperparameters_name_the_argument(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        SNGM([torch.nn.Parameter(torch.zeros(2))], **kwargs)


def test_invalid_hyperparameters_in_added_groups_are_rejected() -> None:
    optimizer = SNGM([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    with pytest.raises(ValueError, match="momentum=1.5"):
        optimizer.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))], "momentum": 1.5})
    with pytest.raises(ValueError, match="normalize must be the same"):
        optimizer.add_param_group(
            {"params": [torch.nn.Parameter(torch.zeros(2))], "normalize": "layer"}
        )
    with pytest.raises(ValueError, match="foreach must not differ"):
        SNGM(
            [{"params": [torch.nn.Parameter(torch.zeros(2))], "foreach": False},
             {"params": [torch.nn.Parameter(torch.zeros(2))], "foreach": True}],
            lr=0.1,
        )  # fmt: skip
    assert len(optimizer.param_groups) == 1  # the refused groups were not kept


def test_sparse_gradients_raise_a_clear_error() -> None:
    embedding = torch.nn.Embedding(10, 3, sparse=True)
    embedding(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        SNGM(embedding.parameters(), lr=0.1).step()


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_complex_parameters_match_the_reference(implementation: str) -> None:
    def run(factory: Callable[[list[torch.Tensor]], torch.optim.Optimizer]) -> torch.Tensor:
        g = torch.Generator().manual_seed(0)
        p = torch.nn.Parameter(torch.randn(4, 3, dtype=torch.complex128, generator=g))
        q = torch.nn.Parameter(torch.randn(5, dtype=torch.float64, generator=g))
        optimizer = factory([p, q])
        for _ in range(5):
            p.grad = torch.randn(4, 3, dtype=torch.complex128, generator=g)
            q.grad = torch.randn(5, dtype=torch.float64, generator=g)
            optimizer.step()
        return torch.cat([torch.view_as_real(p.detach()).flatten(), q.detach()])

    hyper = dict(lr=0.1, momentum=0.9, weight_decay=0.01)
    expected = run(lambda ps: ReferenceSNGM(ps, **hyper))
    got = run(lambda ps: SNGM(ps, **hyper, **IMPLEMENTATIONS[implementation]))
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_closure_runs_once_with_grad_enabled_and_its_loss_is_returned() -> None:
    model = make_model()
    optimizer = SNGM(model.parameters(), lr=0.1)
    calls = []

    def closure() -> torch.Tensor:
        calls.append(torch.is_grad_enabled())
        optimizer.zero_grad()
        loss = model(torch.ones(2, 5)).sum()
        loss.backward()
        return loss

    with torch.no_grad():
        loss = optimizer.step(closure)
    assert calls == [True]
    assert isinstance(loss, torch.Tensor) and loss.requires_grad
    assert optimizer.step() is None


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_skip_counters_of_half_precision_parameters_stay_exact_float32_on_load(
    implementation: str,
) -> None:
    """torch.optim casts floating-point state to the parameter's dtype on load; 1001 is
    not a bfloat16 number, so a cast counter would come back as 1000 or 1002."""
    params = [torch.nn.Parameter(torch.randn(4, 3).to(torch.bfloat16)) for _ in range(2)]
    optimizer = SNGM(params, lr=0.1, **IMPLEMENTATIONS[implementation])
    set_grads(params, seed=3)
    optimizer.step()
    for p in params:
        optimizer.state[p]["skipped_steps"].fill_(1001.0)
    saved = optimizer.state_dict()
    resumed = SNGM(params, lr=0.1, **IMPLEMENTATIONS[implementation])
    resumed.load_state_dict(saved)
    for p in params:
        counter = resumed.state[p]["skipped_steps"]
        assert counter.dtype == torch.float32 and counter.item() == 1001.0
        assert counter.data_ptr() != saved["state"][0]["skipped_steps"].data_ptr()
    assert resumed.state[params[0]]["momentum_buffer"].dtype == torch.bfloat16
    params[0].grad[0, 0] = math.nan
    resumed.step()
    assert resumed.skipped_steps == 1002


def test_state_dict_round_trip_loads_with_weights_only_and_continues_bit_identically() -> None:
    def batch(step: int) -> torch.Tensor:
        return torch.randn(8, 5, generator=torch.Generator().manual_seed(step))

    def step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, i: int) -> None:
        optimizer.zero_grad()
        model(batch(i)).square().mean().backward()
        optimizer.step()

    model = make_model()
    optimizer = SNGM(param_groups(model), lr=0.1, weight_decay=0.01, nesterov=True)
    for i in range(3):
        step(model, optimizer, i)
    set_grads(list(model.parameters()), seed=3)
    model[0].weight.grad[0, 0] = math.inf
    optimizer.step()  # skipped: the counter must survive the round trip too

    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed_model = make_model(seed=1)
    resumed_model.load_state_dict(saved["model"])
    resumed = SNGM(param_groups(resumed_model), lr=0.1, weight_decay=0.01, nesterov=True)
    resumed.load_state_dict(saved["optimizer"])
    assert resumed.skipped_steps == 1

    for i in range(3, 6):
        step(model, optimizer, i)
        step(resumed_model, resumed, i)
    assert torch.equal(flat(model), flat(resumed_model))


def test_add_param_group_steps_the_new_group() -> None:
    model = make_model()
    optimizer = SNGM(model[0].parameters(), lr=0.1)
    optimizer.add_param_group({"params": model[2].parameters(), "lr": 0.3})
    assert optimizer.param_groups[1]["momentum"] == 0.9
    before = model[2].weight.detach().clone()
    model(torch.ones(2, 5)).sum().backward()
    optimizer.step()
    assert not torch.equal(model[2].weight, before)


def test_step_hooks_run_around_each_step() -> None:
    p = torch.nn.Parameter(torch.ones(3))
    optimizer = SNGM([p], lr=0.1)
    seen: list[str] = []
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: seen.append("pre"))
    optimizer.register_step_post_hook(lambda opt, args, kwargs: seen.append("post"))
    p.grad = torch.ones(3)
    optimizer.step()
    assert seen == ["pre", "post"]


def test_deepcopy_gives_an_independent_optimizer() -> None:
    p = torch.nn.Parameter(torch.ones(3))
    optimizer = SNGM([p], lr=0.1)
    p.grad = torch.ones(3)
    optimizer.step()
    clone = copy.deepcopy(optimizer)
    clone_param = clone.param_groups[0]["params"][0]
    clone_param.grad = torch.ones(3)
    clone.step()
    assert not torch.equal(
        clone.state[clone_param]["momentum_buffer"], optimizer.state[p]["momentum_buffer"]
    )
    assert torch.equal(p.detach(), torch.ones(3) - 0.1 / math.sqrt(3))


def test_repr_shows_the_hyperparameters() -> None:
    text = repr(SNGM([torch.nn.Parameter(torch.zeros(1))], lr=0.25, momentum=0.8))
    assert text.startswith("SNGM (")
    assert "lr: 0.25" in text and "momentum: 0.8" in text and "normalize: global" in text


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_group_with_zero_lr_leaves_its_parameters_bit_identical(implementation: str) -> None:
    model = make_model()
    frozen = [p.detach().clone() for p in model[0].parameters()]
    optimizer = SNGM(
        [{"params": model[0].parameters(), "lr": 0.0}, {"params": model[2:].parameters()}],
        lr=0.1,
        weight_decay=0.01,
        **IMPLEMENTATIONS[implementation],
    )
    for step in range(3):
        set_grads(list(model.parameters()), seed=step)
        optimizer.step()
    assert all(torch.equal(p, f) for p, f in zip(model[0].parameters(), frozen, strict=False))


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_parameters_without_gradients_are_skipped(implementation: str) -> None:
    model = make_model()
    frozen = model[4].weight.detach().clone()
    optimizer = SNGM(model.parameters(), lr=0.1, **IMPLEMENTATIONS[implementation])
    model(torch.ones(2, 5)).sum().backward()
    model[4].weight.grad = None
    optimizer.step()
    assert torch.equal(model[4].weight, frozen)
    assert model[4].weight not in optimizer.state


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_tensor_learning_rate_matches_float_learning_rate(implementation: str) -> None:
    results = []
    for lr in (0.1, torch.tensor(0.1)):
        model = make_model()
        optimizer = SNGM(model.parameters(), lr=lr, **IMPLEMENTATIONS[implementation])
        for step in range(3):
            set_grads(list(model.parameters()), seed=step)
            optimizer.step()
        results.append(flat(model))
    torch.testing.assert_close(results[0], results[1])


def test_a_group_without_gradients_is_a_no_op() -> None:
    optimizer = SNGM([torch.nn.Parameter(torch.ones(2))], lr=0.1)
    assert optimizer.step() is None
    assert optimizer.last_grad_norm is None
    assert optimizer.skipped_steps == 0


@pytest.mark.parametrize("unscale_first", [False, True])
def test_grad_scaler_steps_like_unscaled_training(unscale_first: bool) -> None:
    def run(scaled: bool) -> torch.Tensor:
        model = make_model()
        optimizer = SNGM(model.parameters(), lr=0.1, weight_decay=0.01)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, enabled=scaled)
        for step in range(4):
            x = torch.randn(8, 5, generator=torch.Generator().manual_seed(step))
            optimizer.zero_grad()
            scaler.scale(model(x).square().mean()).backward()
            if unscale_first:
                scaler.unscale_(optimizer)
            scaler.step(optimizer)
            scaler.update()
        return flat(model)

    torch.testing.assert_close(run(scaled=True), run(scaled=False), rtol=1e-5, atol=1e-6)


def test_grad_scaler_skips_steps_with_overflowing_gradients() -> None:
    model = make_model()
    optimizer = SNGM(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    before = flat(model).clone()
    scaler.scale(model(torch.ones(2, 5)).sum() * math.inf).backward()
    scaler.step(optimizer)
    scaler.update()
    assert torch.equal(flat(model), before)
    assert scaler.get_scale() == 2.0**9


@pytest.mark.parametrize("form", ["method", "function"])
@pytest.mark.parametrize("implementation", ["foreach", "fused"])
def test_step_compiles_and_matches_eager(implementation: str, form: str) -> None:
    """torch.compile traces step() (aot_eager: no C++ compiler needed), as a method or
    inside a function in one graph; the fused path runs as foreach ops there, since
    neither fused kernel can be traced. The step's norm and skip count come out too."""
    torch._dynamo.reset()
    eager_model, compiled_model = make_model(), make_model()
    eager = SNGM(eager_model.parameters(), lr=0.1, weight_decay=0.01, foreach=True)
    compiled = SNGM(
        compiled_model.parameters(), lr=0.1, weight_decay=0.01, **IMPLEMENTATIONS[implementation]
    )
    if form == "method":
        compiled_step = torch.compile(compiled.step, backend="aot_eager")
    else:

        @torch.compile(backend="aot_eager", fullgraph=True)
        def compiled_step() -> None:
            compiled.step()

    for step in range(4):
        x = torch.randn(16, 5, generator=torch.Generator().manual_seed(step))
        for model in (eager_model, compiled_model):
            model.zero_grad()
            model(x).square().mean().backward()
            if step == 2:
                next(model.parameters()).grad[0, 0] = float("nan")
        eager.step()
        compiled_step()
        assert compiled.last_grad_norm is not None
        torch.testing.assert_close(compiled.last_grad_norm, eager.last_grad_norm, equal_nan=True)
    assert compiled.skipped_steps == eager.skipped_steps == 1
    for a, b in zip(eager_model.parameters(), compiled_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
