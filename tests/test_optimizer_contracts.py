"""torch.optim's generic contracts, held for every SNGM implementation.

The way torch tests its own optimizers (`torch.testing._internal.common_optimizers`),
written for SNGM: implementations against each other and the reference over several
configs, finite steps for every finite gradient, Tensor learning rates of any one-element
shape, what state each path leaves, gradients never written, copies and pickles, state
loaded across paths, and compiled against eager. "triton" (SNGM's kernels) joins the
implementations on CUDA and under Triton's interpreter (`test_triton_sngm.py` runs this
module there too).
"""

from __future__ import annotations

import copy
import importlib
import io
import pickle
from typing import Any
from unittest import mock

import pytest
import torch
from conftest import HAS_TRITON, IMPLEMENTATIONS, TRITON_INTERPRETED, flat, set_grads

from sngm_integrations import SNGM, ReferenceSNGM

sngm_module = importlib.import_module("sngm_integrations.sngm")

DEVICE = "cuda" if torch.cuda.is_available() and not TRITON_INTERPRETED else "cpu"
ALL = dict(IMPLEMENTATIONS)
if HAS_TRITON and (DEVICE == "cuda" or TRITON_INTERPRETED):
    ALL["triton"] = dict(fused_backend="triton")
CONFIGS = {
    "plain": dict(),
    "weight-decay": dict(weight_decay=0.05),
    "maximize-weight-decay": dict(maximize=True, weight_decay=0.05),
    "nesterov-weight-decay": dict(nesterov=True, weight_decay=0.05),
    "no-momentum": dict(momentum=0.0, weight_decay=0.05),
    "no-momentum-maximize": dict(momentum=0.0, maximize=True),
}
FLOAT_DTYPES = [torch.float32, torch.bfloat16, torch.float64]


def make_params(dtype: torch.dtype = torch.float32, seed: int = 0) -> list[torch.nn.Parameter]:
    """A 0-dim tensor, small ones and one large enough for the CPU's dot-product route."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(), (7,), (5, 3), (300, 256)]
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(DEVICE, dtype)) for s in shapes]


def groups(params: list[torch.nn.Parameter]) -> list[dict[str, Any]]:
    return [{"params": params[:2]}, {"params": params[2:], "lr": 0.05}]


def skip_reason(implementation: str, dtype: torch.dtype) -> str | None:
    """Why an implementation cannot be held to the others at this dtype, if it cannot."""
    if implementation != "triton":
        return None
    if dtype == torch.float64:
        return "the Triton kernels take float32 and half precision only"
    if dtype == torch.bfloat16 and TRITON_INTERPRETED:
        return "Triton's interpreter truncates to bfloat16 instead of rounding"
    return None


def run(
    implementation: str,
    dtype: torch.dtype = torch.float32,
    steps: int = 5,
    scale: float = 1.0,
    **hyper: Any,
) -> tuple[list[torch.nn.Parameter], SNGM]:
    params = make_params(dtype)
    optimizer = SNGM(groups(params), **{"lr": 0.1} | hyper | ALL[implementation])
    for step in range(steps):
        set_grads(params, seed=step, scale=scale)
        optimizer.step()
    return params, optimizer


def run_reference(
    dtype: torch.dtype = torch.float32, steps: int = 5, scale: float = 1.0, **hyper: Any
) -> list[torch.nn.Parameter]:
    params = make_params(dtype)
    optimizer = ReferenceSNGM(groups(params), **{"lr": 0.1} | hyper)
    for step in range(steps):
        set_grads(params, seed=step, scale=scale)
        optimizer.step()
    return params


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    return {
        torch.float64: dict(rtol=1e-10, atol=1e-10),
        torch.float32: dict(rtol=1e-5, atol=1e-6),
        torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
    }[dtype]


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("implementation", ALL)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_implementations_agree_with_the_reference_and_each_other(
    implementation: str, config: str, dtype: torch.dtype
) -> None:
    if reason := skip_reason(implementation, dtype):
        pytest.skip(reason)
    params, optimizer = run(implementation, dtype, **CONFIGS[config])
    loop_params, loop = run("single", dtype, **CONFIGS[config])
    if dtype != torch.bfloat16:  # the reference steps in the parameters' own precision
        expected = run_reference(dtype, **CONFIGS[config])
        torch.testing.assert_close(flat(params), flat(expected), **tolerance(dtype))
    torch.testing.assert_close(flat(params), flat(loop_params), **tolerance(dtype))
    # The same state on every path: the same keys and the same buffers.
    for p, q in zip(params, loop_params, strict=True):
        state, loop_state = optimizer.state[p], loop.state[q]
        assert state.keys() == loop_state.keys()
        if "momentum_buffer" in state:
            torch.testing.assert_close(
                state["momentum_buffer"], loop_state["momentum_buffer"], **tolerance(dtype)
            )


@pytest.mark.parametrize("implementation", ALL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize(
    "values",
    [[2e19], [1e30] * 1000, [3e38, -3e38, 1.0]],
    ids=["2e19", "1000x1e30", "near-float32-max"],
)
@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_every_finite_gradient_takes_a_finite_step(
    implementation: str, dtype: torch.dtype, values: list[float], weight_decay: float
) -> None:
    if reason := skip_reason(implementation, dtype):
        pytest.skip(reason)
    grad = torch.tensor(values, dtype=torch.float64)
    p = torch.nn.Parameter(torch.ones(len(values), dtype=dtype, device=DEVICE))
    q = torch.nn.Parameter(torch.ones(len(values), dtype=torch.float64))
    optimizer = SNGM([p], lr=0.1, momentum=0.0, weight_decay=weight_decay, **ALL[implementation])
    reference = ReferenceSNGM([q], lr=0.1, momentum=0.0, weight_decay=weight_decay)
    p.grad = grad.to(DEVICE, dtype)
    q.grad = p.grad.detach().to("cpu", torch.float64)  # the same values, rounded to dtype
    optimizer.step()
    reference.step()
    assert optimizer.skipped_steps == 0
    assert torch.isfinite(p).all()
    torch.testing.assert_close(p.detach().cpu().double(), q.detach(), **tolerance(dtype))


@pytest.mark.parametrize("implementation", ALL)
@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_a_non_finite_gradient_still_skips(implementation: str, bad: float) -> None:
    params, optimizer = run(implementation, steps=2, weight_decay=0.01)
    weights = [p.detach().clone() for p in params]
    buffers = [optimizer.state[p]["momentum_buffer"].clone() for p in params]
    set_grads(params, seed=9, scale=1e25)  # large enough to overflow a float32 sum too
    params[-1].grad[3, 4] = bad
    optimizer.step()
    assert optimizer.skipped_steps == 1
    assert all(torch.equal(p, w) for p, w in zip(params, weights, strict=True))
    assert all(
        torch.equal(optimizer.state[p]["momentum_buffer"], u)
        for p, u in zip(params, buffers, strict=True)
    )


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_decayed_norm_that_cancels_is_exact(implementation: str) -> None:
    """g = -λw + a small remainder: the CPU's expanded norm would lose it to rounding."""
    params = make_params()
    twins = make_params()
    optimizer = SNGM(params, lr=0.1, weight_decay=0.5, **ALL[implementation])
    reference = ReferenceSNGM(twins, lr=0.1, weight_decay=0.5)
    g = torch.Generator().manual_seed(4)
    for p, q in zip(params, twins, strict=True):
        remainder = 1e-4 * torch.randn(p.shape, generator=g).to(p.device)
        p.grad = -0.5 * p.detach() + remainder
        q.grad = p.grad.clone()
    optimizer.step()
    reference.step()
    torch.testing.assert_close(optimizer.last_grad_norm.cpu().double().reshape(()),
                               torch.cat([(q.grad + 0.5 * p0).reshape(-1) for q, p0 in
                                          zip(twins, make_params(), strict=True)]).double().norm(),
                               rtol=1e-4, atol=0.0)  # fmt: skip
    torch.testing.assert_close(flat(params), flat(twins), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("implementation", ALL)
@pytest.mark.parametrize(
    "lr", [torch.tensor(0.1), torch.tensor([0.1]), torch.tensor([[0.1]])], ids=["0d", "1d", "2d"]
)
def test_tensor_lr_of_any_one_element_shape(implementation: str, lr: torch.Tensor) -> None:
    params, _ = run(implementation, lr=lr.to(DEVICE))
    expected, _ = run(implementation, lr=0.1)
    torch.testing.assert_close(flat(params), flat(expected), rtol=1e-6, atol=1e-7)


def test_tensor_lr_with_several_elements_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match=r"Invalid lr: lr=.*one element.*\(2,\)"):
        SNGM(make_params(), lr=torch.tensor([0.1, 0.2]))


@pytest.mark.parametrize("implementation", ALL)
@pytest.mark.parametrize("config", CONFIGS)
def test_gradients_are_never_written(implementation: str, config: str) -> None:
    for dtype in FLOAT_DTYPES:
        if implementation == "triton" and dtype == torch.float64:
            continue
        for scale in (1.0, 1e9, 1e30):  # the host-inverse, huge-norm and overflow routes
            params = make_params(dtype)
            optimizer = SNGM(groups(params), lr=0.1, **CONFIGS[config], **ALL[implementation])
            for step in range(2):
                set_grads(params, seed=step, scale=scale)
                before = [p.grad.clone() for p in params]
                optimizer.step()
                assert all(torch.equal(p.grad, b) for p, b in zip(params, before, strict=True))


@pytest.mark.parametrize("implementation", ALL)
def test_momentum_zero_keeps_no_buffer_and_raising_it_later_agrees(implementation: str) -> None:
    params, optimizer = run(implementation, momentum=0.0)
    assert all("momentum_buffer" not in optimizer.state[p] for p in params)
    for group in optimizer.param_groups:
        group["momentum"] = 0.9
    for step in range(3):
        set_grads(params, seed=20 + step)
        optimizer.step()
    loop_params, loop = run("single", momentum=0.0)
    for group in loop.param_groups:
        group["momentum"] = 0.9
    for step in range(3):
        set_grads(loop_params, seed=20 + step)
        loop.step()
    torch.testing.assert_close(flat(params), flat(loop_params), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("implementation", ALL)
def test_state_saved_by_one_path_loads_into_another(implementation: str) -> None:
    params, saver = run("single", steps=3, weight_decay=0.01)
    saved = torch.load(io.BytesIO(_saved(saver)), weights_only=True)
    resumed_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    resumed = SNGM(groups(resumed_params), lr=0.1, weight_decay=0.01, **ALL[implementation])
    resumed.load_state_dict(saved)
    for step in range(3, 6):
        set_grads(params, seed=step)
        set_grads(resumed_params, seed=step)
        saver.step()
        resumed.step()
    torch.testing.assert_close(flat(resumed_params), flat(params), rtol=1e-5, atol=1e-6)


def _saved(optimizer: SNGM) -> bytes:
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("implementation", ALL)
def test_lr_changed_in_a_group_mid_run_is_used(implementation: str) -> None:
    params, optimizer = run(implementation, steps=2)
    optimizer.param_groups[1]["lr"] = 0.0
    frozen = [p.detach().clone() for p in params[2:]]
    set_grads(params, seed=5)
    optimizer.step()
    assert all(torch.equal(p, f) for p, f in zip(params[2:], frozen, strict=True))


@pytest.mark.parametrize("implementation", ALL)
def test_complex_parameters_step_as_their_real_view(implementation: str) -> None:
    if implementation == "triton":
        pytest.skip("the Triton kernels take real tensors; complex ones go to torch's kernel")
    z = torch.nn.Parameter(torch.randn(6, dtype=torch.complex64, device=DEVICE))
    r = torch.nn.Parameter(torch.view_as_real(z.detach()).clone())
    optimizer = SNGM([z], lr=0.1, weight_decay=0.01, **ALL[implementation])
    twin = SNGM([r], lr=0.1, weight_decay=0.01, **ALL[implementation])
    for step in range(3):
        (grad,) = torch.view_as_real(torch.randn(6, dtype=torch.complex64)).unsqueeze(0).to(DEVICE)
        z.grad, r.grad = torch.view_as_complex(grad.contiguous()) * (step + 1), grad * (step + 1)
        optimizer.step()
        twin.step()
    torch.testing.assert_close(torch.view_as_real(z.detach()), r.detach())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(lr=-1.0), "lr=-1.0"),
        (dict(momentum=1.0), "momentum=1.0"),
        (dict(weight_decay=-0.1), "weight_decay=-0.1"),
        (dict(eps=0.0), "eps=0.0"),
        (dict(normalize="unit"), "normalize='unit'"),
        (dict(fused_backend="cuda"), "fused_backend='cuda'"),
        (dict(fused=True, foreach=True), "fused=True and foreach=True"),
        (dict(momentum=0.0, nesterov=True), "nesterov=True"),
    ],
)
def test_error_inputs_name_the_argument(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        SNGM(make_params(), **{"lr": 0.1} | kwargs)


def test_unset_foreach_or_fused_takes_the_other_groups_choice() -> None:
    params = make_params()
    optimizer = SNGM([{"params": params[:2], "foreach": True}, {"params": params[2:]}], lr=0.1)
    set_grads(params, seed=0)
    with mock.patch.object(
        sngm_module, "_multi_tensor_sngm", wraps=sngm_module._multi_tensor_sngm
    ) as foreach:
        optimizer.step()
    assert foreach.call_count == 1
    optimizer.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))], "fused": None})
    with pytest.raises(ValueError, match="foreach must not differ"):
        optimizer.add_param_group(
            {"params": [torch.nn.Parameter(torch.zeros(2))], "foreach": False}
        )
    assert len(optimizer.param_groups) == 3  # the refused group was not kept


@pytest.mark.parametrize("copier", ["deepcopy", "pickle"])
def test_copies_keep_every_constructor_setting(copier: str) -> None:
    optimizer = SNGM(
        make_params(),
        lr=0.1,
        momentum=0.5,
        weight_decay=0.01,
        nesterov=True,
        eps=1e-6,
        maximize=True,
        foreach=True,
        fused_backend="torch",
    )
    if copier == "deepcopy":
        copied = copy.deepcopy(optimizer)
    else:
        copied = pickle.loads(pickle.dumps(optimizer))
    assert copied.fused_backend == "torch"
    # torch.optim's __setstate__ adds its own keys (differentiable); SNGM's all survive
    assert all(copied.defaults[k] == v for k, v in optimizer.defaults.items())
    for group, copied_group in zip(optimizer.param_groups, copied.param_groups, strict=True):
        assert {k: v for k, v in group.items() if k != "params"} == {
            k: v for k, v in copied_group.items() if k != "params"
        }
    set_grads(copied.param_groups[0]["params"], seed=0)
    copied.step()  # a copy steps


@pytest.mark.parametrize("implementation", ["foreach", "fused"])
def test_compiled_step_leaves_the_state_eager_leaves(implementation: str) -> None:
    eager_params, eager = run(implementation, steps=0, momentum=0.0, weight_decay=0.01)
    compiled_params, compiled = run(implementation, steps=0, momentum=0.0, weight_decay=0.01)
    step = torch.compile(compiled.step, fullgraph=True)
    for i in range(3):
        set_grads(eager_params, seed=i)
        set_grads(compiled_params, seed=i)
        eager.step()
        step()
    torch.testing.assert_close(flat(compiled_params), flat(eager_params), rtol=1e-5, atol=1e-6)
    for p, q in zip(eager_params, compiled_params, strict=True):
        assert eager.state[p].keys() == compiled.state[q].keys()


@pytest.mark.parametrize("config", ["plain", "weight-decay", "nesterov-weight-decay"])
@pytest.mark.parametrize("implementation", ALL)
def test_a_given_squared_norm_is_the_one_divided_by(implementation: str, config: str) -> None:
    """`sngm(squared_norm=...)` takes the caller's `||d||^2`: the measured one gives the
    optimizer's step, four times it a step half as long (from a zero momentum buffer)."""
    hyper = CONFIGS[config]
    measured, optimizer = run(implementation, steps=1, **hyper)
    wanted_norm = optimizer.last_grad_norm
    assert wanted_norm is not None
    start = make_params()
    for factor, shrink in ((1.0, 1.0), (4.0, 0.5)):
        params = [torch.nn.Parameter(p.detach().clone()) for p in start]
        set_grads(params, seed=0)
        squared = (wanted_norm.double() ** 2 * factor).reshape(())
        param_groups = [
            sngm_module.SNGMParamGroup(
                params=[p.detach() for p in part],
                grads=[p.grad for p in part],
                momentum_buffers=[torch.zeros_like(p) for p in part],
                lr=lr,
                momentum=0.9,
                weight_decay=hyper.get("weight_decay", 0.0),
                nesterov=hyper.get("nesterov", False),
            )
            for part, lr in ((params[:2], 0.1), (params[2:], 0.05))
        ]
        stats = sngm_module.sngm(param_groups, squared_norm=squared, **ALL[implementation])
        torch.testing.assert_close(stats.grad_norm, wanted_norm * factor**0.5)
        for p, q, p0 in zip(params, measured, start, strict=True):
            torch.testing.assert_close(p0 - p, shrink * (p0 - q), rtol=1e-5, atol=1e-6)


def test_a_given_squared_norm_needs_the_global_norm() -> None:
    params = make_params()
    set_grads(params, seed=0)
    group = sngm_module.SNGMParamGroup(
        params=[p.detach() for p in params],
        grads=[p.grad for p in params],
        momentum_buffers=[],
        lr=0.1,
        momentum=0.0,
    )
    with pytest.raises(ValueError, match="normalize='layer'"):
        sngm_module.sngm([group], normalize="layer", squared_norm=torch.tensor(1.0))
