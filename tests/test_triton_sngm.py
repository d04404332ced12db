"""SNGM's Triton kernels against the reference, on CUDA or, without a GPU, on the CPU
through Triton's interpreter.

`TRITON_INTERPRET=1` must be set before Triton is imported, so on a machine without CUDA
`test_kernels_under_the_interpreter` runs this module again in a child process with it
set; the other tests run in-process only on CUDA or inside that child.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import HAS_TRITON, TRITON_INTERPRETED, set_grads

from sngm_integrations import SNGM, ReferenceSNGM, SNGMParamGroup, sngm

INTERPRETED = TRITON_INTERPRETED
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRETED else "cpu"
kernels_run_here = pytest.mark.skipif(
    not HAS_TRITON or (DEVICE == "cpu" and not INTERPRETED),
    reason="needs Triton, and CUDA or TRITON_INTERPRET=1",
)
TRITON = dict(fused_backend="triton")
# Shapes that cover the chunk table: a tensor over one chunk (65,536 elements), an empty
# one, a 4-d one, and tensors smaller than one block.
SHAPES = [(64, 33), (64,), (3, 5, 7, 9), (0,), (70_001,), (10, 64), (10,)]
CONFIGS = {
    "plain": dict(),
    "nesterov-maximize": dict(nesterov=True, maximize=True),
    "no-momentum": dict(momentum=0.0),
    "no-weight-decay": dict(weight_decay=0.0),
    "tensor-lr": dict(lr=torch.tensor(0.1)),
}


@pytest.mark.skipif(
    not HAS_TRITON or torch.cuda.is_available() or INTERPRETED,
    reason="runs only where the kernels cannot run natively",
)
@pytest.mark.slow
@pytest.mark.parametrize(
    "module, selection",
    [("test_triton_sngm.py", []), ("test_optimizer_contracts.py", ["-k", "triton"])],
)
def test_kernels_under_the_interpreter(module: str, selection: list[str]) -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    path = str(Path(__file__).with_name(module))
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", path]
    proc = subprocess.run(cmd + selection, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and "needs Triton, and CUDA" not in proc.stdout, proc.stdout


def make_params(dtype: torch.dtype, seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(DEVICE, dtype)) for s in SHAPES]


def run(optimizer_cls: type, dtype: torch.dtype, steps: int = 12, **kwargs: Any) -> torch.Tensor:
    params = make_params(dtype)
    groups = [
        {"params": params[:4]},
        {"params": params[4:], "lr": 0.05, "momentum": 0.5, "weight_decay": 0.0},
    ]
    optimizer = optimizer_cls(groups, **kwargs)
    for step in range(steps):
        set_grads(params, step)
        optimizer.step()
    return torch.cat([p.detach().double().flatten() for p in params])


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).norm() / want.norm()).item()


@kernels_run_here
@pytest.mark.parametrize("config", CONFIGS)
def test_float32_matches_the_reference(config: str) -> None:
    hyper = dict(lr=0.1, momentum=0.9, weight_decay=0.01) | CONFIGS[config]
    expected = run(ReferenceSNGM, torch.float32, **hyper)
    assert relative_error(run(SNGM, torch.float32, **hyper, **TRITON), expected) < 1e-5


@kernels_run_here
@pytest.mark.parametrize(
    "dtype",
    [
        torch.float16,
        pytest.param(
            torch.bfloat16,
            # The interpreter rounds float32 to bfloat16 toward zero; GPUs round to nearest.
            marks=pytest.mark.skipif(INTERPRETED, reason="interpreter truncates to bfloat16"),
        ),
    ],
)
def test_half_precision_is_as_accurate_as_the_foreach_path(dtype: torch.dtype) -> None:
    hyper = dict(lr=0.1, momentum=0.9, weight_decay=0.01)
    exact = run(ReferenceSNGM, torch.float64, **hyper)
    foreach_error = relative_error(run(SNGM, dtype, **hyper, foreach=True), exact)
    triton_error = relative_error(run(SNGM, dtype, **hyper, **TRITON), exact)
    assert triton_error < 1.5 * foreach_error + 1e-4


@kernels_run_here
def test_gradients_are_left_untouched() -> None:
    params = make_params(torch.float32)
    optimizer = SNGM(params, lr=0.1, weight_decay=0.01, **TRITON)
    for step in range(2):
        set_grads(params, step)
        before = [p.grad.clone() for p in params]
        optimizer.step()
        assert all(torch.equal(p.grad, b) for p, b in zip(params, before, strict=True))


@kernels_run_here
@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_non_finite_gradient_skips_the_step_bit_exactly(bad: float) -> None:
    """The update kernels skip, count the skip in every tensor's counter (an empty
    tensor's included) and report the norm, in each of two buckets."""
    params = make_params(torch.float32)
    groups = [{"params": params[:4]}, {"params": params[4:], "weight_decay": 0.0}]
    optimizer = SNGM(groups, lr=0.1, weight_decay=0.01, **TRITON)
    set_grads(params, 0)
    optimizer.step()
    weights = [p.detach().clone() for p in params]
    momenta = [optimizer.state[p]["momentum_buffer"].clone() for p in params]
    set_grads(params, 1)
    params[4].grad[-1] = bad
    optimizer.step()
    assert all(torch.equal(p, w) for p, w in zip(params, weights, strict=True))
    assert all(
        torch.equal(optimizer.state[p]["momentum_buffer"], m)
        for p, m in zip(params, momenta, strict=True)
    )
    assert [optimizer.state[p]["skipped_steps"].item() for p in params] == [1.0] * len(params)
    assert optimizer.skipped_steps == 1
    assert not torch.isfinite(optimizer.last_grad_norm)
    set_grads(params, 2)
    directions = [p.grad + 0.01 * p.detach() for p in params[:4]] + [p.grad for p in params[4:]]
    expected_norm = torch.cat([d.flatten() for d in directions]).norm()
    optimizer.step()
    assert optimizer.skipped_steps == 1
    torch.testing.assert_close(optimizer.last_grad_norm, expected_norm)


@kernels_run_here
def test_functional_step_without_skip_counters() -> None:
    """`sngm()` called directly, with no counters to keep, takes the optimizer's step and
    still skips a non-finite one."""
    params = make_params(torch.float32)
    set_grads(params, 0)
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for twin, p in zip(twins, params, strict=True):
        twin.grad = p.grad.clone()
    optimizer = SNGM(twins, lr=0.1, weight_decay=0.01, **TRITON)
    optimizer.step()
    weights = [p.detach() for p in params]
    group = SNGMParamGroup(
        params=weights,
        grads=[p.grad for p in params],
        momentum_buffers=[torch.zeros_like(p) for p in params],
        lr=0.1,
        momentum=0.9,
        weight_decay=0.01,
    )
    stats = sngm([group], fused_backend="triton")
    assert stats.found_inf.item() == 0.0
    torch.testing.assert_close(stats.grad_norm, optimizer.last_grad_norm)
    assert all(torch.equal(w, t) for w, t in zip(weights, twins, strict=True))
    before = [w.clone() for w in weights]
    params[0].grad[0] = math.nan
    stats = sngm([group], fused_backend="triton")
    assert stats.found_inf.item() == 1.0
    assert all(torch.equal(w, b) for w, b in zip(weights, before, strict=True))


@kernels_run_here
def test_resumed_half_precision_optimizer_counts_skips_in_the_kernel() -> None:
    params = make_params(torch.float16)
    optimizer = SNGM(params, lr=0.1, **TRITON)
    set_grads(params, 0)
    optimizer.step()
    resumed = SNGM(params, lr=0.1, **TRITON)
    resumed.load_state_dict(optimizer.state_dict())
    set_grads(params, 1)
    params[0].grad[0, 0] = math.inf
    resumed.step()
    assert [resumed.state[p]["skipped_steps"].item() for p in params] == [1.0] * len(params)


@kernels_run_here
def test_zero_gradient_leaves_parameters_unchanged() -> None:
    params = make_params(torch.float32)
    optimizer = SNGM(params, lr=0.1, **TRITON)
    weights = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    assert all(torch.equal(p, w) for p, w in zip(params, weights, strict=True))


@kernels_run_here
def test_tables_are_reused_and_rebuilt_when_gradients_move() -> None:
    params = make_params(torch.float32)
    optimizer = SNGM(params, lr=0.1, **TRITON)
    reference = SNGM(make_params(torch.float32), lr=0.1, foreach=True)
    for step in range(4):
        for group in (params, reference.param_groups[0]["params"]):
            kept_grads = [p.grad for p in group]
            set_grads(group, step)
            if step > 0:  # the same gradient tensors as the step before, new values
                for p, grad in zip(group, kept_grads, strict=True):
                    p.grad = grad.copy_(p.grad)
        if step == 2:  # gradients at new addresses while the old ones are still alive
            kept = [p.grad for p in params]
            for p in params:
                p.grad = p.grad.clone()
        optimizer.step()
        reference.step()
    # one plan for the first addresses (reused by step 1), one for the moved gradients
    assert optimizer._triton_plans is not None and len(optimizer._triton_plans) == 2
    for p, q in zip(params, reference.param_groups[0]["params"], strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    del kept


@kernels_run_here
def test_channels_last_parameters_are_walked_in_memory_order() -> None:
    g = torch.Generator().manual_seed(0)
    weights = torch.randn(8, 4, 3, 3, generator=g).to(DEVICE)
    grad = torch.randn(8, 4, 3, 3, generator=g).to(DEVICE)
    results = []
    for kwargs in (dict(foreach=True), TRITON):
        p = torch.nn.Parameter(weights.clone().contiguous(memory_format=torch.channels_last))
        p.grad = grad.clone().contiguous(memory_format=torch.channels_last)
        optimizer = SNGM([p], lr=0.1, weight_decay=0.01, **kwargs)
        optimizer.step()
        results.append(p.detach())
    torch.testing.assert_close(results[1], results[0], rtol=1e-5, atol=1e-6)


@kernels_run_here
def test_views_at_unaligned_offsets_are_updated_correctly() -> None:
    """Parameters and gradients that are views into flat buffers at odd offsets (as flat
    shards can be) cannot use 16-byte vector accesses; the kernels must notice."""
    g = torch.Generator().manual_seed(0)
    flat_weights = torch.randn(3 * 70_001 + 1, generator=g).to(DEVICE)
    flat_grads = torch.randn(3 * 70_001 + 1, generator=g).to(DEVICE)
    results = []
    for kwargs in (dict(foreach=True), TRITON):
        weights, grads = flat_weights.clone(), flat_grads.clone()
        params = [
            torch.nn.Parameter(weights[1 + i * 70_001 : 1 + (i + 1) * 70_001]) for i in range(3)
        ]
        for i, p in enumerate(params):
            p.grad = grads[1 + i * 70_001 : 1 + (i + 1) * 70_001]
        assert params[0].data_ptr() % 16 != 0
        optimizer = SNGM(params, lr=0.1, weight_decay=0.01, **kwargs)
        for _ in range(2):
            optimizer.step()
        results.append(torch.cat([p.detach() for p in params]))
    torch.testing.assert_close(results[1], results[0], rtol=1e-5, atol=1e-6)


@kernels_run_here
def test_a_gradient_in_another_layout_falls_back_or_is_refused() -> None:
    p = torch.nn.Parameter(torch.randn(6, 4, device=DEVICE))
    p.grad = torch.randn(4, 6, device=DEVICE).t()  # the transposed layout of p's
    with pytest.raises(RuntimeError, match="fused_backend='triton'.*layout"):
        SNGM([p], lr=0.1, **TRITON).step()


@kernels_run_here
def test_layer_normalization_and_float64_are_refused_by_name() -> None:
    p = torch.nn.Parameter(torch.randn(3, device=DEVICE))
    p.grad = torch.randn(3, device=DEVICE)
    with pytest.raises(RuntimeError, match="normalize='layer'"):
        SNGM([p], lr=0.1, normalize="layer", **TRITON).step()
    q = torch.nn.Parameter(torch.randn(3, device=DEVICE, dtype=torch.float64))
    q.grad = torch.randn(3, device=DEVICE, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="torch.float64 parameter"):
        SNGM([q], lr=0.1, **TRITON).step()


def compile_for_hopper(kernel: Any, types: dict[str, str], constants: dict[str, Any]) -> str:
    """PTX of `kernel` compiled for sm_90 by Triton's own toolchain: no GPU needed."""
    from triton import compile as triton_compile
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from sngm_integrations import triton_sngm

    signature = types | dict.fromkeys(constants, "constexpr")
    source = ASTSource(fn=kernel, signature=signature, constexprs=constants)
    options = {"num_warps": triton_sngm.NUM_WARPS}
    return triton_compile(source, target=GPUTarget("cuda", 90, 32), options=options).asm["ptx"]


@pytest.mark.skipif(not HAS_TRITON or INTERPRETED, reason="needs Triton, not its interpreter")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("aligned", [True, False])
def test_kernels_compile_for_hopper_with_16_byte_accesses_when_aligned(
    dtype: str, aligned: bool
) -> None:
    import triton.language as tl

    from sngm_integrations import triton_sngm

    common = dict(
        DTYPE=getattr(tl, dtype),
        HAS_WEIGHT_DECAY=True,
        ALIGNED=aligned,
        BLOCK=triton_sngm.BLOCK,
        CHUNK=triton_sngm.CHUNK,
    )
    try:
        norm_ptx = compile_for_hopper(
            triton_sngm._squared_norm_kernel,
            {
                "table": "*i64",
                "chunks": "*i64",
                "partials": "*fp32",
                "weight_decay_coefficient": "fp32",
            },
            common,
        )
        update_ptx = compile_for_hopper(
            triton_sngm._update_kernel,
            {"table": "*i64", "chunks": "*i64", "squared_norm": "*fp32", "stats": "*fp32",
             "eps": "fp32", "lr_tensor": "*fp32", "lr": "fp32", "momentum": "fp32",
             "grad_sign": "fp32", "weight_decay": "fp32"},
            common | dict(HAS_MOMENTUM=True, NESTEROV=True, LR_IS_TENSOR=True,
                          WRITE_STATS=True, COUNT_SKIPS=True),
        )  # fmt: skip
    except (ImportError, TypeError) as error:  # another Triton's ahead-of-time API
        pytest.skip(f"this Triton cannot compile ahead of time here: {error}")
    for ptx in (norm_ptx, update_ptx):
        assert ("ld.global.v4.b32" in ptx) == aligned
    assert ("st.global.v4.b32" in update_ptx) == aligned
    assert "sqrt.rn.f64" in update_ptx  # the norm is taken in float64


def test_unknown_fused_backend_is_named() -> None:
    with pytest.raises(ValueError, match="fused_backend='cuda'"):
        SNGM([torch.zeros(2, requires_grad=True)], lr=0.1, fused_backend="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_default_on_cuda_uses_the_triton_kernels() -> None:
    if not HAS_TRITON:
        pytest.skip("needs Triton")
    params = make_params(torch.float32)
    optimizer = SNGM(params, lr=0.1)
    set_grads(params, 0)
    optimizer.step()
    assert optimizer._triton_plans is not None and len(optimizer._triton_plans) == 1


def test_default_on_cpu_never_reaches_the_triton_kernels() -> None:
    p = torch.nn.Parameter(torch.randn(5))
    p.grad = torch.randn(5)
    optimizer = SNGM([p], lr=0.1, nesterov=True)
    optimizer.step()
    assert optimizer._triton_plans is None  # made on the first step that may use them
