"""SNGM on CUDA: every path against the reference, no host synchronisation, CUDA graphs
and torch.compile. Skipped where no CUDA device is present.

"fused" is the default fused path (SNGM's Triton kernels where they apply, on float32 and
bfloat16 with normalize="global"); "fused-torch" forces torch's fused SGD kernel.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from conftest import CUDA_IMPLEMENTATIONS, seeded_grads

from sngm_integrations import SNGM, ReferenceSNGM

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

IMPLEMENTATIONS = CUDA_IMPLEMENTATIONS


def make_params(dtype: torch.dtype) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    shapes = [(64, 32), (64,), (10, 64), (10,)]
    return [torch.nn.Parameter(torch.randn(s, generator=g).to("cuda", dtype)) for s in shapes]


def run(optimizer_cls: type, dtype: torch.dtype, steps: int = 10, **kwargs: Any) -> torch.Tensor:
    params = make_params(dtype)
    optimizer = optimizer_cls(
        [{"params": params[:2]}, {"params": params[2:], "lr": 0.05, "weight_decay": 0.0}], **kwargs
    )
    for step in range(steps):
        for p, grad in zip(params, seeded_grads(params, step), strict=False):
            p.grad = grad
        optimizer.step()
    return torch.cat([p.detach().float().flatten() for p in params])


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize(
    "dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-5), (torch.bfloat16, 2e-2)]
)
@pytest.mark.parametrize(
    "config", [dict(), dict(nesterov=True, maximize=True), dict(normalize="layer")]
)
def test_cuda_paths_match_the_reference(
    implementation: str, dtype: torch.dtype, tol: float, config: dict[str, Any]
) -> None:
    hyper = dict(lr=0.1, momentum=0.9, weight_decay=0.01) | config
    expected = run(ReferenceSNGM, dtype, **hyper)
    got = run(SNGM, dtype, **hyper, **IMPLEMENTATIONS[implementation])
    scale = expected.abs().max().item()
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_step_never_synchronises_with_the_host(implementation: str) -> None:
    params = make_params(torch.float32)
    optimizer = SNGM(params, lr=0.1, weight_decay=0.01, **IMPLEMENTATIONS[implementation])
    for p, grad in zip(params, seeded_grads(params, 0), strict=False):
        p.grad = grad
    optimizer.step()  # allocates the state outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            optimizer.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_non_finite_gradient_is_skipped_on_the_device(implementation: str) -> None:
    params = make_params(torch.float32)
    optimizer = SNGM(params, lr=0.1, **IMPLEMENTATIONS[implementation])
    for p, grad in zip(params, seeded_grads(params, 0), strict=False):
        p.grad = grad
    optimizer.step()
    before = [p.detach().clone() for p in params]
    momenta = [optimizer.state[p]["momentum_buffer"].clone() for p in params]
    params[0].grad[0, 0] = math.nan
    optimizer.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before, strict=False))
    assert all(
        torch.equal(optimizer.state[p]["momentum_buffer"], m)
        for p, m in zip(params, momenta, strict=False)
    )
    assert optimizer.skipped_steps == 1


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_step_can_be_captured_in_a_cuda_graph(implementation: str) -> None:
    eager_params = make_params(torch.float32)
    graph_params = make_params(torch.float32)
    eager = SNGM(eager_params, lr=0.1, foreach=True)
    captured = SNGM(graph_params, lr=0.1, **IMPLEMENTATIONS[implementation])
    static_grads = [torch.zeros_like(p) for p in graph_params]
    for p, grad in zip(graph_params, static_grads, strict=False):
        p.grad = grad

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up creates the state outside the graph
        for grad in static_grads:
            grad.zero_()
        captured.step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured.step()

    for step in range(5):
        for p, grad, static in zip(
            eager_params, seeded_grads(eager_params, step), static_grads, strict=False
        ):
            p.grad = grad.clone()
            static.copy_(grad)
        eager.step()
        graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(eager_params, graph_params, strict=False):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("implementation", ["foreach", "fused"])
def test_compiled_step_matches_eager(implementation: str) -> None:
    eager_params = make_params(torch.float32)
    compiled_params = make_params(torch.float32)
    eager = SNGM(eager_params, lr=0.1, weight_decay=0.01, foreach=True)
    compiled = SNGM(compiled_params, lr=0.1, weight_decay=0.01, **IMPLEMENTATIONS[implementation])

    @torch.compile(fullgraph=False)
    def compiled_step() -> None:
        compiled.step()

    for step in range(4):
        for params in (eager_params, compiled_params):
            for p, grad in zip(params, seeded_grads(params, step), strict=False):
                p.grad = grad
        eager.step()
        compiled_step()
        assert compiled.last_grad_norm is not None
        torch.testing.assert_close(compiled.last_grad_norm, eager.last_grad_norm)
    for a, b in zip(eager_params, compiled_params, strict=False):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_gradient_in_another_layout_falls_back_to_torchs_kernel() -> None:
    p = torch.nn.Parameter(torch.randn(6, 4, device="cuda"))
    q = torch.nn.Parameter(p.detach().clone())
    p.grad = torch.randn(4, 6, device="cuda").t()  # the transposed layout of p's
    q.grad = p.grad.contiguous()
    optimizer = SNGM([p], lr=0.1)  # fused_backend="auto": no error, torch's kernel steps
    reference = ReferenceSNGM([q], lr=0.1)
    optimizer.step()
    reference.step()
    torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert optimizer._triton_plans is not None
    (reason,) = optimizer._triton_plans._entries.values()
    assert isinstance(reason, str) and "layout" in reason


def test_a_graph_captured_before_any_eager_step_uses_torchs_kernel() -> None:
    params = make_params(torch.float32)
    twins = make_params(torch.float32)
    optimizer = SNGM(params, lr=0.1, weight_decay=0.01)
    reference = SNGM(twins, lr=0.1, weight_decay=0.01, foreach=True)
    static_grads = [torch.zeros_like(p) for p in params]
    for p, grad in zip(params, static_grads, strict=True):
        p.grad = grad
    optimizer.state.clear()
    for p in params:  # the state exists before the capture, but no Triton plan does
        optimizer.state[p]["momentum_buffer"] = torch.zeros_like(p)
        optimizer.state[p]["skipped_steps"] = torch.zeros((), device="cuda")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        optimizer.step()
    for step in range(3):
        for static, twin, grad in zip(static_grads, twins, seeded_grads(params, step), strict=True):
            static.copy_(grad)
            twin.grad = grad.clone()
        graph.replay()
        reference.step()
    torch.cuda.synchronize()
    for a, b in zip(params, twins, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
