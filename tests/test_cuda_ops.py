"""The compiled SELU-family op against the Python reference (cuda_ops.reference), on CPU and,
where a GPU is present, CUDA: values and both gradients per dtype, gradcheck, opcheck,
torch.compile, layouts and misaligned views, λ in another dtype, NaN/Inf, determinism of dL/dλ,
the error bound of the 16-bit fast expm1, the build cache and the fallback. CUDA only: multi-wave
and > 2³¹-element tensors, a second GPU, streams, AMP, host syncs and CUDA graphs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import cuda_ops
from cuda_ops.build import cuda_home
from cuda_ops.reference import selu_family as reference
from cuda_ops.reference import selu_family_grad as reference_grad  # f'(x)

ROOT = Path(__file__).resolve().parent.parent
SELU = (1.0507009873554805, 1.6732632423543772, 1.0, 0.0)  # λ, α, β, κ
# Parameter sets covering each branch of the kernels: SELU, sSELU-like (β ≠ 1), lSELU-like (κ ≠ 0),
# ReLU (α = κ = 0).
FAMILIES = {
    "selu": SELU,
    "sselu": (1.0418, 1.4812, 0.62, 0.0),
    "lselu": (1.0312, 1.5437, 1.0, 0.1835),
    "relu": (1.4142, 0.0, 1.0, 0.0),
}
# (rtol, atol) against the float64 reference: the relative tolerances; atol only covers
# results that round to (sub)normal zero in the low-precision formats.
TOLERANCE = {
    torch.float64: (1e-12, 1e-300),
    torch.float32: (1e-6, 1e-30),
    torch.bfloat16: (1e-2, 1e-30),
    torch.float16: (1e-2, 1e-7),
}
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
needs_two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, needs_gpu])]

if cuda_ops.status.cpu != "compiled":
    if torch.cuda.is_available():  # a GPU run must test kernels, never the reference itself
        pytest.fail(f"the compiled op is not built ({cuda_ops.status.reason}); run "
                    f"`python -m cuda_ops build --require-cuda`", pytrace=False)
    pytest.skip(f"the compiled op is not built here ({cuda_ops.status.reason})",
                allow_module_level=True)


@pytest.fixture(autouse=True)
def _cuda_tests_run_the_cuda_kernels(request):
    """Without compiled CUDA kernels, cuda_ops.selu_family runs the Python reference on CUDA
    tensors and every comparison would hold trivially: a CUDA test fails instead."""
    if request.node.get_closest_marker("cuda") is not None:
        assert cuda_ops.status.cuda == "compiled", (
            f"CUDA kernels not compiled ({cuda_ops.status.reason}); run "
            f"`python -m cuda_ops build --require-cuda`")


def inputs(dtype: torch.dtype, device: str, n: int = 4099, seed: int = 0) -> torch.Tensor:
    """Normal samples, a dense sweep through 0, and a wide range of negatives; odd length so the
    vector loops' tails run."""
    g = torch.Generator().manual_seed(seed)
    x = torch.cat([torch.randn(n, generator=g, dtype=torch.float64) * 3,
                   torch.linspace(-2, 2, 1001, dtype=torch.float64),
                   -torch.logspace(-8, 2, 301, dtype=torch.float64)])
    return x.to(device=device, dtype=dtype)


def assert_sum_close(actual: torch.Tensor, terms: torch.Tensor, rtol: float) -> None:
    """``actual`` equals ``terms.sum()`` (float64) within ``rtol`` of Σ|terms|: the error bound
    of any summation order. Relative to the sum itself it is unbounded when randomly signed terms
    nearly cancel, which says nothing about the kernel."""
    terms = terms.detach().double().cpu()
    expected, scale = terms.sum(), terms.abs().sum()
    torch.testing.assert_close(actual.detach().double().cpu(), expected, rtol=0,
                               atol=rtol * float(scale))


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype,
                   exponent: torch.Tensor | None = None) -> None:
    """``actual`` within the dtype's tolerance of ``expected``. Where f' holds e^{βx}, pass the
    exponent βx: e^{βx} then inherits the rounding of βx, |βx|·eps/2 relative, in any
    implementation in that dtype (1e-6 relative holds for float32 only while |βx| < ~10)."""
    rtol, atol = TOLERANCE[dtype]
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    if exponent is not None:
        rtol = rtol + exponent.detach().double().abs().cpu() * torch.finfo(dtype).eps / 2
    bound = atol + rtol * e.abs()
    ok = (a == e) | ((a - e).abs() <= bound) | (a.isnan() & e.isnan())
    if not ok.all():
        i = int(torch.argmax(((a - e).abs() - bound).nan_to_num(float("inf"))))
        raise AssertionError(f"{int((~ok).sum())}/{ok.numel()} elements off; worst: got "
                             f"{a.flatten()[i].item()!r}, expected {e.flatten()[i].item()!r}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", list(TOLERANCE))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_forward_and_gradients_match_reference(family, dtype, device):
    lam0, alpha, beta, kappa = FAMILIES[family]
    x = inputs(dtype, device).requires_grad_()
    lam_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    lam = torch.tensor(lam0, dtype=lam_dtype, device=device, requires_grad=True)
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(1),
                       dtype=torch.float64).to(device=device, dtype=dtype)
    y = cuda_ops.selu_family(x, lam, alpha, beta, kappa)
    y.backward(grad)

    x64, grad64 = x.detach().double(), grad.double()
    assert y.dtype == dtype and x.grad.dtype == dtype and lam.grad.dtype == lam_dtype
    assert_matches(y, reference(x64, lam0, alpha, beta, kappa), dtype)
    assert_matches(x.grad, grad64 * reference_grad(x64, lam0, alpha, beta, kappa), dtype,
                   exponent=beta * x64)
    # dL/dλ = Σ grad · f(x)/λ is summed in float (float64 for float64 inputs), so it keeps the
    # inputs' accuracy even for the 16-bit formats; λ's own dtype (float32) bounds it.
    assert_sum_close(lam.grad, grad64 * reference(x64, 1.0, alpha, beta, kappa),
                     rtol=max(TOLERANCE[dtype][0], 1e-6))


@pytest.mark.parametrize("device", DEVICES)
def test_float_and_tensor_lam_give_identical_results(device):
    lam0, alpha, beta, kappa = FAMILIES["lselu"]
    x = inputs(torch.float32, device)
    a = cuda_ops.selu_family(x, lam0, alpha, beta, kappa)
    b = cuda_ops.selu_family(x, torch.tensor(lam0, device=device), alpha, beta, kappa)
    c = cuda_ops.selu_family(x, torch.tensor([lam0], dtype=torch.float64), alpha, beta, kappa)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a, c, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", ["selu", "lselu"])
def test_gradcheck_float64(family, device):
    lam0, alpha, beta, kappa = FAMILIES[family]
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(3, 5, 7, generator=g, dtype=torch.float64) * 2).to(device).requires_grad_()
    lam = torch.tensor(lam0, dtype=torch.float64, device=device, requires_grad=True)
    fn = lambda x, lam: cuda_ops.selu_family(x, lam, alpha, beta, kappa)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, lam))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    lam0, alpha, beta, kappa = FAMILIES["lselu"]
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 4, 5, generator=g).to(device)
    grad = torch.randn(2, 3, 4, 5, generator=g).to(device)
    lam = torch.tensor(lam0, device=device)
    ops = torch.ops.selfnorm
    cases = [
        (ops.selu_family.default, (x.requires_grad_(), lam.requires_grad_(), alpha, beta, kappa)),
        (ops.selu_family.default, (x.to(memory_format=torch.channels_last).detach()
                                   .requires_grad_(), 1.0 * lam.detach(), alpha, beta, kappa)),
        (ops.selu_family_backward.default, (grad, x.detach(), lam.detach(), alpha, beta, kappa)),
        (ops.selu_family_backward_lam.default, (grad, x.detach(), lam.detach(), alpha, beta,
                                                kappa)),
        (ops.selu_family_backward_lam_only.default, (grad, x.detach(), lam.detach(), alpha, beta,
                                                     kappa)),
        # x without grad: autograd asks for dL/dλ only
        (ops.selu_family.default, (x.detach(), lam.detach().requires_grad_(), alpha, beta, kappa)),
    ]
    if device == "cpu":  # a CPU-only test hook
        cases.append((ops._fast_expm1.default, (torch.linspace(-3, 1, 60).reshape(3, 20),)))
    for op, args in cases:
        torch.library.opcheck(op, args)


class _Act(nn.Module):
    def __init__(self, trainable: bool) -> None:
        super().__init__()
        lam0, self.alpha, self.beta, self.kappa = FAMILIES["lselu"]
        self.lam = nn.Parameter(torch.tensor(lam0)) if trainable else lam0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cuda_ops.selu_family(x, self.lam, self.alpha, self.beta, self.kappa)


def _compile_matches_eager(backend: str, device: str, trainable: bool) -> None:
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), _Act(trainable), nn.Conv2d(8, 4, 3), _Act(trainable))
    model = model.to(device)
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    x = torch.randn(2, 3, 12, 12, device=device)
    (model(x) ** 2).sum().backward()
    eager = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    out = compiled(x)
    (out ** 2).sum().backward()
    torch.testing.assert_close(out, model(x))
    for name, p in model.named_parameters():
        # atol on the gradient's scale: the convs' float32 sums run in an order that depends on
        # the CPU's ISA (2e-7 of the largest entry differs on AVX2 even with nn.SELU).
        atol = 1e-5 * eager[name].abs().max().item()
        torch.testing.assert_close(p.grad, eager[name], rtol=1e-5, atol=atol, msg=name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("trainable", [True, False])
def test_compile_fullgraph_matches_eager(device, trainable):
    torch._dynamo.reset()
    _compile_matches_eager("aot_eager", device, trainable)


@pytest.mark.slow
@pytest.mark.parametrize("device,trainable", [
    ("cpu", True),
    pytest.param("cuda", True, marks=[pytest.mark.cuda, needs_gpu]),
    # a fixed λ is a CPU float64 constant made inside the graph, beside CUDA activations
    pytest.param("cuda", False, marks=[pytest.mark.cuda, needs_gpu]),
])
def test_inductor_fullgraph_matches_eager(device, trainable):
    torch._dynamo.reset()
    _compile_matches_eager("inductor", device, trainable=trainable)


def _misaligned_channels_last(t: torch.Tensor, offset: int) -> torch.Tensor:
    """A channels_last copy of ``t`` whose data starts ``offset`` elements into its storage."""
    like = t.to(memory_format=torch.channels_last)
    out = torch.empty(t.numel() + offset, dtype=t.dtype, device=t.device)[offset:]
    return out.as_strided(t.shape, like.stride()).copy_(t)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["channels_last", "transposed", "strided", "offset",
                                    "channels_last_offset"])
def test_layouts(layout, dtype, device):
    lam0, alpha, beta, kappa = FAMILIES["lselu"]
    base = torch.randn(4, 6, 10, 10, generator=torch.Generator().manual_seed(5)).to(device, dtype)
    grad = torch.randn(base.shape, generator=torch.Generator().manual_seed(8)).to(device, dtype)
    x = {
        "channels_last": base.to(memory_format=torch.channels_last),
        "transposed": base.transpose(1, 3),
        "strided": base[:, ::2, 1:, ::3],
        "offset": base.flatten()[3:-1],  # data pointer off the 16-byte vector alignment
        "channels_last_offset": _misaligned_channels_last(base, 3),
    }[layout].requires_grad_()
    if layout == "channels_last_offset":  # grad in the same misaligned layout as x
        grad = _misaligned_channels_last(grad, 3)
    else:
        grad = grad.flatten()[: x.numel()].reshape(x.shape)
    lam = torch.tensor(lam0, device=device, requires_grad=True)
    y = cuda_ops.selu_family(x, lam, alpha, beta, kappa)
    y.backward(grad)
    x64 = x.detach().double().requires_grad_()
    reference(x64, lam0, alpha, beta, kappa).backward(grad.double())
    if layout.startswith("channels_last"):
        assert y.is_contiguous(memory_format=torch.channels_last)
        assert x.grad.is_contiguous(memory_format=torch.channels_last)
    assert_matches(y, reference(x64.detach(), lam0, alpha, beta, kappa), dtype)
    assert_matches(x.grad, x64.grad, dtype, exponent=beta * x64.detach())
    assert_sum_close(lam.grad, grad.double() * reference(x64.detach(), 1.0, alpha, beta, kappa),
                     rtol=1e-6 if dtype == torch.float32 else 1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_misaligned_views(dtype, device):
    """x and grad as views that start 0..15 bytes past a 16-byte boundary, with the same and with
    different misalignments, over sizes around the 16-byte pack boundaries. On CUDA this covers
    every split of the vector loops: aligned packs after a scalar prologue (λ-only backward with a
    shared misalignment) and funnel-shifted loads for each byte shift, with their bounds."""
    lam0, alpha, beta, kappa = FAMILIES["lselu"]
    per = 16 // torch.empty(0, dtype=dtype).element_size()  # elements per 16 bytes
    sizes = [1, per - 1, per, per + 1, 2 * per - 1, 2 * per, 2 * per + 1, 3 * per + 2,
             4 * per + 3, 5 * per - 1, 1001]
    g = torch.Generator().manual_seed(13)
    length = max(sizes) + per
    x_base = (torch.randn(length, generator=g, dtype=torch.float64) * 3).to(device, dtype)
    g_base = torch.randn(length, generator=g, dtype=torch.float64).to(device, dtype)
    x64, g64 = x_base.double(), g_base.double()
    f64 = reference(x64, lam0, alpha, beta, kappa)
    f1 = reference(x64, 1.0, alpha, beta, kappa)
    d64 = reference_grad(x64, lam0, alpha, beta, kappa)
    lam = torch.tensor(lam0, dtype=torch.float64 if dtype == torch.float64 else torch.float32,
                       device=device)
    ops = torch.ops.selfnorm
    lam_rtol = 1e-6 if dtype in (torch.float32, torch.float64) else 1e-5
    for n in sizes:
        for ox in range(per):
            for og in range(per):
                x, grad = x_base[ox:ox + n], g_base[og:og + n]
                try:
                    y = ops.selu_family(x, lam, alpha, beta, kappa)
                    assert_matches(y, f64[ox:ox + n], dtype)
                    gx, glam = ops.selu_family_backward_lam(grad, x, lam, alpha, beta, kappa)
                    assert_matches(gx, g64[og:og + n] * d64[ox:ox + n], dtype,
                                   exponent=beta * x64[ox:ox + n])
                    gx_only = ops.selu_family_backward(grad, x, lam, alpha, beta, kappa)
                    assert torch.equal(gx_only, gx), "grad_x differs from the λ op's"
                    terms = g64[og:og + n] * f1[ox:ox + n]
                    assert_sum_close(glam, terms, rtol=lam_rtol)
                    glam_only = ops.selu_family_backward_lam_only(grad, x, lam, alpha, beta,
                                                                  kappa)
                    assert_sum_close(glam_only, terms, rtol=lam_rtol)
                except AssertionError as err:
                    raise AssertionError(f"n={n}, x offset {ox}, grad offset {og}: {err}") \
                        from None


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,lam_dtype", [
    (torch.bfloat16, torch.float32), (torch.float16, torch.float32),
    (torch.float32, torch.float64), (torch.float64, torch.float32),
    (torch.bfloat16, torch.bfloat16), (torch.float32, torch.float16),
    (torch.float32, torch.bfloat16), (torch.float16, torch.float64),
])
def test_lambda_of_another_dtype(dtype, lam_dtype, device):
    """λ is read in its own dtype (no cast kernel) and dL/dλ comes back in it; the results equal
    those with the same λ value as a CPU constant."""
    lam0, alpha, beta, kappa = FAMILIES["lselu"]
    x = inputs(dtype, device).requires_grad_()
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(1),
                       dtype=torch.float64).to(device=device, dtype=dtype)
    lam = torch.tensor(lam0, dtype=lam_dtype, device=device, requires_grad=True)
    lam_value = lam.item()  # λ0 rounded to lam_dtype
    y = cuda_ops.selu_family(x, lam, alpha, beta, kappa)
    y.backward(grad)
    assert y.dtype == dtype and lam.grad.dtype == lam_dtype and lam.grad.device == lam.device
    x64, grad64 = x.detach().double(), grad.double()
    assert_matches(y, reference(x64, lam_value, alpha, beta, kappa), dtype)
    assert_matches(x.grad, grad64 * reference_grad(x64, lam_value, alpha, beta, kappa), dtype,
                   exponent=beta * x64)
    rtol = max(TOLERANCE[dtype][0], 1e-6, torch.finfo(lam_dtype).eps)
    assert_sum_close(lam.grad, grad64 * reference(x64, 1.0, alpha, beta, kappa), rtol=rtol)

    host = torch.tensor(lam_value, dtype=lam_dtype, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    y2 = cuda_ops.selu_family(x2, host, alpha, beta, kappa)
    y2.backward(grad)
    assert torch.equal(y, y2) and torch.equal(x.grad, x2.grad)
    assert host.grad.device.type == "cpu" and host.grad.dtype == lam_dtype
    assert torch.equal(lam.grad.cpu(), host.grad)


class _CallLog(TorchDispatchMode):
    """Records the names of the ops dispatched while it is active."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.name())
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("device", DEVICES)
def test_backward_computes_only_the_gradients_asked_for(device):
    """A fixed λ skips the dL/dλ reduction, an x without grad skips grad_x (the λ-only op)."""
    lam0, alpha, beta, kappa = FAMILIES["lselu"]
    x0 = inputs(torch.float32, device)
    grad = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1)).to(device)
    expected = {(True, True): "selfnorm::selu_family_backward_lam",
                (True, False): "selfnorm::selu_family_backward",
                (False, True): "selfnorm::selu_family_backward_lam_only"}
    grads = {}
    for (need_x, need_lam), name in expected.items():
        x = x0.clone().requires_grad_(need_x)
        lam = torch.tensor(lam0, device=device, requires_grad=need_lam)
        y = cuda_ops.selu_family(x, lam, alpha, beta, kappa)
        with _CallLog() as log:
            y.backward(grad)
        ours = [n for n in log.names if n.startswith("selfnorm::")]
        assert ours == [name], ours
        assert (x.grad is not None) == need_x and (lam.grad is not None) == need_lam
        grads[need_x, need_lam] = (x.grad, lam.grad)
    torch.testing.assert_close(grads[True, False][0], grads[True, True][0], rtol=0, atol=0)
    torch.testing.assert_close(grads[False, True][1], grads[True, True][1])
    if device == "cpu":  # the same fixed chunks and lanes: bitwise the same sum
        assert torch.equal(grads[False, True][1], grads[True, True][1])


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph_lambda_only(device):
    """torch.compile of an activation on an input without grad: the backward graph holds the
    λ-only op (fake kernel included) and matches eager."""
    torch._dynamo.reset()
    act = _Act(trainable=True).to(device)
    x = torch.randn(2, 8, 6, 6, generator=torch.Generator().manual_seed(4)).to(device)
    (act(x) ** 2).sum().backward()
    eager = act.lam.grad.clone()
    act.lam.grad = None
    compiled = torch.compile(act, backend="aot_eager", fullgraph=True)
    out = compiled(x)
    (out ** 2).sum().backward()
    torch.testing.assert_close(out, act(x))
    torch.testing.assert_close(act.lam.grad, eager, rtol=1e-5, atol=0)


def test_fast_expm1_error_bound():
    """The 16-bit CUDA forward's e^t − 1 (csrc/fast_expm1.h), run on the host through the test
    hook selfnorm::_fast_expm1, on a dense grid of t ∈ [−30, 0] against float64 expm1. The
    polynomial half (|t| < 0.25) is the same float operations as on the GPU (explicit fmaf), so
    its measured error is the GPU's. The other half computes e^t with exp2f here and with
    ex2.approx (what __expf compiles to) there, so for the GPU it is bounded by __expf's
    documented worst case, 2 + ⌊1.173·|t|⌋ ulp, times e^t / |e^t − 1| for the subtraction,
    plus the subtraction's own rounding. The bound must sit far below the half-ulp of bfloat16 (2⁻⁸)
    and float16 (2⁻¹¹) that the result is rounded to."""
    t = torch.cat([torch.linspace(-30, 0, 3_000_001, dtype=torch.float64),
                   -torch.logspace(-30, 0, 100_001, dtype=torch.float64),
                   torch.linspace(-0.2505, -0.2495, 10_001, dtype=torch.float64)]).float()
    below = torch.nextafter(torch.tensor(-0.25), torch.tensor(0.0))  # the last polynomial t
    t = torch.cat([t, torch.tensor([-0.25]), below.reshape(1), torch.tensor([-0.0, 0.0])])
    got = torch.ops.selfnorm._fast_expm1(t).double()
    t64 = t.double()
    exact = torch.expm1(t64)
    rel = torch.where(got == exact, 0.0, (got - exact).abs() / exact.abs())
    poly = t64.abs() < 0.25
    assert bool(poly.any()) and bool((~poly).any())
    float_ulp = 2.0 ** -23  # an ulp of a float, relative to its value, at most
    expf_bound = ((2 + torch.floor(1.173 * t64.abs())) * float_ulp * torch.exp(t64)
                  / exact.abs() + 2.0 ** -24)
    # the host's exp2f is itself within __expf's bound, so the exponential half's formula holds
    assert bool((rel[~poly] <= expf_bound[~poly]).all()), float(rel[~poly].max())
    gpu_bound = torch.where(poly, rel, expf_bound)
    worst = float(gpu_bound.max())
    assert worst < 2e-6, worst  # the bound fast_expm1.h states
    assert worst < 2.0 ** -11 / 64 and worst < 2.0 ** -8 / 512
    assert float(rel[poly].max()) < 1.7e-6  # the Taylor remainder at |t| → 0.25 dominates


@pytest.mark.parametrize("device", DEVICES)
def test_empty_and_scalar_inputs(device):
    lam = torch.tensor(1.05, device=device, requires_grad=True)
    empty = torch.empty(0, 3, device=device, requires_grad=True)
    y = cuda_ops.selu_family(empty, lam, 1.67, 1.0, 0.1)
    y.sum().backward()
    assert y.shape == (0, 3) and empty.grad.shape == (0, 3) and lam.grad.item() == 0.0
    scalar = torch.tensor(-0.5, device=device, requires_grad=True)
    z = cuda_ops.selu_family(scalar, lam, 1.67, 1.0, 0.1)
    assert z.shape == ()
    assert_matches(z, reference(scalar.detach().double(), 1.05, 1.67, 1.0, 0.1), torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", list(TOLERANCE))
def test_nan_and_inf_like_torch_selu(dtype, device):
    lam0, alpha, _, _ = SELU
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 2.0, -2.0],
                     dtype=dtype, device=device, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    y = cuda_ops.selu_family(x, lam0, alpha)
    y_ref = F.selu(x_ref)
    grad = torch.ones_like(y)
    y.backward(grad)
    y_ref.backward(grad)
    rtol, atol = TOLERANCE[dtype]
    torch.testing.assert_close(y, y_ref, rtol=max(rtol, 1e-6), atol=atol, equal_nan=True)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=max(rtol, 1e-6), atol=atol,
                               equal_nan=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_lambda_gradient_with_infinite_inputs_matches_autograd(dtype, device):
    """An infinite term makes dL/dλ infinite, as in the reference's autograd; the Kahan
    compensation must not turn it into inf - inf = NaN."""
    lam0, alpha, beta, kappa = FAMILIES["lselu"]
    for values in ([1.0, float("inf"), -1.0], [0.5, -float("inf"), 2.0] * 700,
                   [float("inf"), -float("inf"), 1.0]):
        x = torch.tensor(values, dtype=dtype, device=device)
        grad = torch.ones_like(x)
        _, glam = torch.ops.selfnorm.selu_family_backward_lam(
            grad, x, torch.tensor(lam0, device=device), alpha, beta, kappa)
        lam64 = torch.tensor(lam0, dtype=torch.float64, requires_grad=True)
        reference(x.double().cpu(), lam64, alpha, beta, kappa).sum().backward()
        torch.testing.assert_close(glam.double().cpu(), lam64.grad, equal_nan=True)
        assert glam.isnan().item() == lam64.grad.isnan().item(), values[:3]


def test_lselu_at_minus_inf_is_minus_inf():
    lam0, alpha, beta, kappa = FAMILIES["lselu"]
    y = cuda_ops.selu_family(torch.tensor([-float("inf")]), lam0, alpha, beta, kappa)
    assert y.item() == -float("inf")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lambda_gradient_is_deterministic_across_thread_counts(dtype):
    x = torch.randn(3, 100_003, generator=torch.Generator().manual_seed(6)).to(dtype)
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(7)).to(dtype)
    lam = torch.tensor(1.05)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            gx, glam = torch.ops.selfnorm.selu_family_backward_lam(grad, x, lam, 1.6, 0.9, 0.2)
            results.append((gx, glam))
    finally:
        torch.set_num_threads(threads)
    for gx, glam in results[1:]:
        assert torch.equal(gx, results[0][0]) and torch.equal(glam, results[0][1])


def test_double_backward_fails_loudly():
    x = torch.randn(5, requires_grad=True)
    lam = torch.tensor(1.05, requires_grad=True)
    (g,) = torch.autograd.grad(cuda_ops.selu_family(x, lam, 1.6).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="no double backward"):
        g.sum().backward()


def test_rejects_bad_inputs():
    x = torch.randn(4)
    with pytest.raises(RuntimeError, match="one-element"):
        torch.ops.selfnorm.selu_family(x, torch.ones(2), 1.6, 1.0, 0.0)
    with pytest.raises(RuntimeError, match="float32, float64, float16 or bfloat16"):
        torch.ops.selfnorm.selu_family(torch.arange(4), torch.tensor(1.0), 1.6, 1.0, 0.0)
    with pytest.raises(RuntimeError, match="grad must match x"):
        torch.ops.selfnorm.selu_family_backward(torch.randn(3), x, torch.tensor(1.0), 1.6, 1.0,
                                                0.0)


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)


_CHECK_VARIANT = """
import torch, cuda_ops
from cuda_ops.reference import selu_family as ref, selu_family_grad as ref_grad
x = torch.cat([torch.randn(10007, generator=torch.Generator().manual_seed(0)) * 3,
               torch.linspace(-2, 2, 1001)])
for dtype, rtol in ((torch.float32, 1e-6), (torch.float64, 1e-12), (torch.bfloat16, 1e-2)):
    xd = x.to(dtype)
    x64 = xd.double()
    for lam0, a, b, k in ((1.0507, 1.6733, 1.0, 0.0), (1.0312, 1.5437, 0.7, 0.1835)):
        lam = torch.tensor(lam0, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
        grad = torch.ones_like(xd)
        y = cuda_ops.selu_family(xd, lam, a, b, k)
        gx, glam = torch.ops.selfnorm.selu_family_backward_lam(grad, xd, lam, a, b, k)
        torch.testing.assert_close(y.double(), ref(x64, lam0, a, b, k), rtol=rtol, atol=0)
        torch.testing.assert_close(gx.double(), ref_grad(x64, lam0, a, b, k), rtol=rtol, atol=0)
        torch.testing.assert_close(glam.double(), ref(x64, 1.0, a, b, k).sum(),
                                   rtol=max(rtol, 1e-6), atol=0)
        lam_only = torch.ops.selfnorm.selu_family_backward_lam_only(grad, xd, lam, a, b, k)
        assert torch.equal(lam_only, glam)  # the same chunks and lanes, without grad_x
print(torch.ops.selfnorm.cpu_variant())
"""


@pytest.mark.parametrize("capability", ["DEFAULT", "AVX2", "AVX512"])
def test_each_cpu_isa_build_matches_reference(capability):
    order = ["DEFAULT", "AVX2", "AVX512"]
    here = torch.backends.cpu.get_cpu_capability()
    if here not in order or order.index(capability) > order.index(here):
        pytest.skip(f"this CPU runs {here} kernels, not {capability}")
    done = _run(_CHECK_VARIANT, ATEN_CPU_CAPABILITY=capability.lower())
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == capability


def test_import_reuses_the_setup_build():
    done = _run("import cuda_ops; print(cuda_ops.status.build_seconds)")
    assert done.returncode == 0, done.stderr
    assert float(done.stdout) == 0.0
    assert "compiling" not in done.stderr


def test_info_json():
    done = _run("from cuda_ops.__main__ import main; main(['info', '--json'])")
    assert done.returncode == 0, done.stderr
    state = json.loads(done.stdout)
    assert state["cpu"] == "compiled"
    assert state["cuda"] in ("compiled", "not built", "fallback")
    assert state["cpu_kernel"] in ("DEFAULT", "AVX2", "AVX512")


@pytest.mark.skipif(torch.version.cuda is None or cuda_home() is None,
                    reason="needs nvcc and a CUDA build of torch")
def test_cuda_kernels_are_compiled_when_nvcc_and_cuda_torch_exist():
    """How CI (no GPU, but nvcc) proves the .cu file compiles and registers its kernels."""
    assert cuda_ops.status.cuda == "compiled", cuda_ops.status.reason
    for op in ("selu_family", "selu_family_backward", "selu_family_backward_lam",
               "selu_family_backward_lam_only"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"selfnorm::{op}", "CUDA")


def test_without_a_compiler_falls_back_to_the_reference_with_one_warning(tmp_path):
    code = """
import warnings, torch
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    import cuda_ops
    import models.layers.activations
from cuda_ops.reference import selu_family as ref
x = torch.randn(100)
assert torch.equal(cuda_ops.selu_family(x, 1.05, 1.67, 0.9, 0.1), ref(x, 1.05, 1.67, 0.9, 0.1))
ours = [str(w.message) for w in caught if "cuda_ops" in str(w.message)]
assert len(ours) == 1 and "no C++ compiler" in ours[0], ours
print(cuda_ops.info()["cpu"], cuda_ops.info()["cuda"])
"""
    done = _run(code, CXX=str(tmp_path / "no-such-compiler"), SELFNORM_OPS_DIR=str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["fallback", "fallback" if torch.version.cuda else "not built"]


def test_build_require_cuda_fails_without_the_cuda_kernels(tmp_path):
    """GPU images and GPU test runs use --require-cuda: no silent fallback to the reference."""
    no_toolchain = dict(CXX=str(tmp_path / "no-such-compiler"), SELFNORM_OPS_DIR=str(tmp_path))
    build = "import sys; from cuda_ops.__main__ import main; sys.exit(main({}))"
    plain = _run(build.format(["build"]), **no_toolchain)
    assert plain.returncode == 0, plain.stderr  # no toolchain: the documented fallback
    strict = _run(build.format(["build", "--require-cuda"]), **no_toolchain)
    assert strict.returncode == 1
    line = strict.stderr.strip().splitlines()[-1]
    assert line.startswith("error: the CUDA kernels are ") and "no C++ compiler" in line


@pytest.mark.cuda
@needs_gpu
def test_cuda_lambda_on_device_or_host_and_determinism():
    lam0, alpha, beta, kappa = FAMILIES["lselu"]
    gen = torch.Generator(device="cuda").manual_seed(9)
    x = torch.randn(8, 64, 56, 56, device="cuda", generator=gen)
    grad = torch.randn(x.shape, device="cuda", generator=gen)
    on_device = torch.tensor(lam0, device="cuda")
    on_host = torch.tensor(lam0)
    ops = torch.ops.selfnorm
    a = ops.selu_family(x, on_device, alpha, beta, kappa)
    b = ops.selu_family(x, on_host, alpha, beta, kappa)
    assert torch.equal(a, b)
    runs = [ops.selu_family_backward_lam(grad, x, on_device, alpha, beta, kappa) for _ in range(3)]
    for gx, glam in runs[1:]:
        assert torch.equal(gx, runs[0][0]) and torch.equal(glam, runs[0][1])
    assert runs[0][1].device.type == "cuda"
    _, glam_host = ops.selu_family_backward_lam(grad, x, on_host, alpha, beta, kappa)
    assert glam_host.device.type == "cpu"
    assert_sum_close(runs[0][1], grad.double() * reference(x.double(), 1.0, alpha, beta, kappa),
                     rtol=1e-6)
    # an unaligned view of the same values takes shifted vector loads: same result within rounding
    flat_x, flat_g = x.flatten()[1:], grad.flatten()[1:]
    _, glam_unaligned = ops.selu_family_backward_lam(flat_g, flat_x, on_device, alpha, beta, kappa)
    assert_sum_close(glam_unaligned, flat_g.double() * reference(flat_x.double(), 1.0, alpha, beta,
                                                                 kappa), rtol=1e-6)


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("family", ["selu", "lselu"])
def test_cuda_multi_wave_matches_reference(family, dtype):
    """12M elements: many grid-stride trips per thread (one wave is about 270k threads on an
    H100), both halves of the 16-bit fast expm1 and a full wave of partials in the reduction."""
    lam0, alpha, beta, kappa = FAMILIES[family]
    gen = torch.Generator(device="cuda").manual_seed(14)
    x = torch.cat([
        torch.randn(10_000_037, generator=gen, device="cuda", dtype=torch.float64) * 3,
        torch.linspace(-1, 1, 1_000_000, device="cuda", dtype=torch.float64),  # |βx| ≈ 0.25
        -torch.logspace(-8, 2, 1_000_000, device="cuda", dtype=torch.float64),
    ]).to(dtype).requires_grad_()
    grad = torch.randn(x.shape, generator=gen, device="cuda", dtype=torch.float64).to(dtype)
    lam = torch.tensor(lam0, device="cuda", requires_grad=True)
    y = cuda_ops.selu_family(x, lam, alpha, beta, kappa)
    y.backward(grad)
    x64, grad64 = x.detach().double(), grad.double()
    assert_matches(y, reference(x64, lam0, alpha, beta, kappa), dtype)
    assert_matches(x.grad, grad64 * reference_grad(x64, lam0, alpha, beta, kappa), dtype,
                   exponent=beta * x64)
    # the 16-bit inputs are exact in float, where the sum runs: it keeps float accuracy
    assert_sum_close(lam.grad, grad64 * reference(x64, 1.0, alpha, beta, kappa),
                     rtol=1e-6 if dtype == torch.float32 else 1e-5)


@pytest.mark.cuda
@pytest.mark.slow
@needs_gpu
def test_cuda_more_than_2_31_elements():
    """64-bit indexing: bfloat16 tensors of 2³¹ + 4099 elements (4 GiB each; 12 GiB at the
    peak), x and grad repeating a 2²⁰-element block so that any element's expected value is
    known, spot checks across index 2³¹ and the scalar tail, and dL/dλ over all of them."""
    lam0, alpha, beta, kappa = FAMILIES["lselu"]
    n, m = 2**31 + 4099, 2**20
    gen = torch.Generator(device="cuda").manual_seed(15)
    block = (torch.randn(m, generator=gen, device="cuda") * 3).to(torch.bfloat16)
    gblock = torch.randn(m, generator=gen, device="cuda").to(torch.bfloat16)
    x = block.repeat(n // m + 1)[:n]  # x[i] = block[i % m]
    grad = gblock.repeat(n // m + 1)[:n]
    lam = torch.tensor(lam0, device="cuda")
    picks = torch.tensor([0, 1, 7, 8, m - 1, m, 2**31 - 9, 2**31 - 1, 2**31, 2**31 + 1,
                          2**31 + 4095, n - 9, n - 2, n - 1], device="cuda")
    picks = torch.cat([picks, torch.randint(0, n, (4096,), generator=gen, device="cuda")])
    edge = slice(2**31 - 70_000, n)  # across 2³¹ to the end, the scalar tail included
    ops = torch.ops.selfnorm

    y = ops.selu_family(x, lam, alpha, beta, kappa)
    assert_matches(y[picks], reference(block[picks % m].double(), lam0, alpha, beta, kappa),
                   torch.bfloat16)
    assert_matches(y[edge], reference(x[edge].double(), lam0, alpha, beta, kappa),
                   torch.bfloat16)
    del y

    terms = gblock.double() * reference(block.double(), 1.0, alpha, beta, kappa)
    reps, rest = divmod(n, m)
    expected = reps * terms.sum() + terms[:rest].sum()
    scale = float(reps * terms.abs().sum() + terms[:rest].abs().sum())
    gx, glam = ops.selu_family_backward_lam(grad, x, lam, alpha, beta, kappa)
    d = reference_grad(block[picks % m].double(), lam0, alpha, beta, kappa)
    assert_matches(gx[picks], gblock[picks % m].double() * d, torch.bfloat16,
                   exponent=beta * block[picks % m].double())
    d = reference_grad(x[edge].double(), lam0, alpha, beta, kappa)
    assert_matches(gx[edge], grad[edge].double() * d, torch.bfloat16,
                   exponent=beta * x[edge].double())
    del gx
    assert abs(float(glam) - float(expected)) <= 1e-5 * scale, (float(glam), float(expected))
    glam_only = ops.selu_family_backward_lam_only(grad, x, lam, alpha, beta, kappa)
    assert abs(float(glam_only) - float(expected)) <= 1e-5 * scale


@pytest.mark.cuda
@needs_gpu
@needs_two_gpus
def test_cuda_x_on_the_second_gpu():
    """x on cuda:1 while cuda:0 is current: the op runs on x's GPU with λ there or on the CPU,
    refuses a λ on cuda:0, and leaves the current device as it was."""
    lam0, alpha, beta, kappa = FAMILIES["lselu"]
    torch.cuda.set_device(0)
    x = inputs(torch.float32, "cuda:1").requires_grad_()
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(16)).to("cuda:1")
    x64, grad64 = x.detach().double(), grad.double()
    for lam in (torch.tensor(lam0, device="cuda:1", requires_grad=True),
                torch.tensor(lam0, requires_grad=True)):
        x.grad = None
        y = cuda_ops.selu_family(x, lam, alpha, beta, kappa)
        y.backward(grad)
        assert torch.cuda.current_device() == 0
        assert y.device == x.grad.device == x.device and lam.grad.device == lam.device
        assert_matches(y, reference(x64, lam0, alpha, beta, kappa), torch.float32)
        assert_matches(x.grad, grad64 * reference_grad(x64, lam0, alpha, beta, kappa),
                       torch.float32, exponent=beta * x64)
        assert_sum_close(lam.grad, grad64 * reference(x64, 1.0, alpha, beta, kappa), rtol=1e-6)
    wrong = torch.tensor(lam0, device="cuda:0")
    ops = torch.ops.selfnorm
    calls = [lambda: ops.selu_family(x.detach(), wrong, alpha, beta, kappa)]
    calls += [lambda op=op: op(grad, x.detach(), wrong, alpha, beta, kappa)
              for op in (ops.selu_family_backward, ops.selu_family_backward_lam,
                         ops.selu_family_backward_lam_only)]
    for call in calls:
        with pytest.raises(RuntimeError, match="lam must be on cuda:1 or on the CPU"):
            call()
    assert torch.cuda.current_device() == 0


@pytest.mark.cuda
@needs_gpu
def test_cuda_runs_on_the_current_stream():
    """On a side stream held back by a sleep kernel, the op's kernels must queue behind the
    copies that fill their inputs: a kernel on another stream would read the zeros."""
    lam0, alpha, beta, kappa = FAMILIES["lselu"]
    gen = torch.Generator(device="cuda").manual_seed(17)
    src = torch.randn(1 << 22, generator=gen, device="cuda") * 3
    gsrc = torch.randn(src.shape, generator=gen, device="cuda")
    x, grad = torch.zeros_like(src), torch.zeros_like(src)
    lam = torch.tensor(lam0, device="cuda")
    ops = torch.ops.selfnorm
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(100_000_000)  # tens of ms
        x.copy_(src)
        grad.copy_(gsrc)
        y = ops.selu_family(x, lam, alpha, beta, kappa)
        fixed = ops.selu_family(x, torch.tensor(lam0, dtype=torch.float64), alpha, beta, kappa)
        gx, glam = ops.selu_family_backward_lam(grad, x, lam, alpha, beta, kappa)
        glam_only = ops.selu_family_backward_lam_only(grad, x, lam, alpha, beta, kappa)
    torch.cuda.synchronize()
    x64, g64 = src.double(), gsrc.double()
    assert_matches(y, reference(x64, lam0, alpha, beta, kappa), torch.float32)
    assert_matches(fixed, reference(x64, lam0, alpha, beta, kappa), torch.float32)
    assert_matches(gx, g64 * reference_grad(x64, lam0, alpha, beta, kappa), torch.float32,
                   exponent=beta * x64)
    terms = g64 * reference(x64, 1.0, alpha, beta, kappa)
    assert_sum_close(glam, terms, rtol=1e-6)
    assert_sum_close(glam_only, terms, rtol=1e-6)


@pytest.mark.cuda
@needs_gpu
def test_cuda_amp_bf16_block_matches_float32():
    """conv → selu_family → conv under bf16 autocast (bf16 x, float32 λ) against float32."""
    lam0, alpha, beta, kappa = FAMILIES["lselu"]

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(16, 32, 3, padding=1)
            self.lam = nn.Parameter(torch.tensor(lam0))
            # no bias: out is linear in λ, so dL/dλ = 2L/λ > 0 with L = Σ out², and a relative
            # comparison of it is well conditioned
            self.conv2 = nn.Conv2d(32, 16, 3, padding=1, bias=False)
            self.act_dtype = None

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.conv1(x)
            self.act_dtype = h.dtype
            return self.conv2(cuda_ops.selu_family(h, self.lam, alpha, beta, kappa))

    torch.manual_seed(18)
    model = Block().cuda()
    x = torch.randn(8, 16, 32, 32, device="cuda")

    def run(amp: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            out = model(x)
        (out.float() ** 2).sum().backward()
        return out.float(), {n: p.grad.clone() for n, p in model.named_parameters()}

    out32, grads32 = run(False)
    assert model.act_dtype == torch.float32
    out16, grads16 = run(True)
    assert model.act_dtype == torch.bfloat16 and grads16["lam"].dtype == torch.float32

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).norm() / b.norm())

    assert rel(out16, out32) < 2e-2
    for name, g in grads32.items():
        assert rel(grads16[name], g) < 3e-2, name


@pytest.mark.cuda
@needs_gpu
def test_cuda_op_does_not_sync_with_the_host():
    """Forward and backward with a trainable λ on the GPU, a fixed Python-float λ (a CPU
    scalar, read by value) and a λ-only backward, under sync debug mode "error"."""
    lam0, alpha, beta, kappa = FAMILIES["lselu"]
    gen = torch.Generator(device="cuda").manual_seed(19)
    x = torch.randn(4, 64, 28, 28, generator=gen, device="cuda").requires_grad_()
    grad = torch.randn(x.shape, generator=gen, device="cuda")
    x_fixed = x.detach().clone().requires_grad_()
    x_const = x.detach().clone()
    lam = torch.tensor(lam0, device="cuda", requires_grad=True)
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        cuda_ops.selu_family(x, lam, alpha, beta, kappa).backward(grad)
        cuda_ops.selu_family(x_fixed, lam0, alpha, beta, kappa).backward(grad)
        cuda_ops.selu_family(x_const, lam, alpha, beta, kappa).backward(grad)
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    assert x.grad is not None and x_fixed.grad is not None and lam.grad is not None
    torch.testing.assert_close(x.grad, x_fixed.grad, rtol=0, atol=0)


@pytest.mark.cuda
@needs_gpu
def test_cuda_graph_capture_replays_forward_and_backward():
    lam0, alpha, beta, kappa = FAMILIES["lselu"]
    gen = torch.Generator(device="cuda").manual_seed(20)
    x = torch.randn(2, 32, 40, 40, generator=gen, device="cuda").requires_grad_()
    grad = torch.randn(x.shape, generator=gen, device="cuda")
    lam = torch.tensor(lam0, device="cuda", requires_grad=True)

    def step() -> tuple[torch.Tensor, ...]:
        y = cuda_ops.selu_family(x, lam, alpha, beta, kappa)
        fixed = cuda_ops.selu_family(x.detach(), lam0, alpha, beta, kappa)
        gx, glam = torch.autograd.grad(y, (x, lam), grad)
        return y.detach(), fixed, gx, glam

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up, as capture requires
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    new_x = torch.randn(x.shape, generator=gen, device="cuda") * 3
    with torch.no_grad():
        x.copy_(new_x)
        grad.copy_(torch.randn(x.shape, generator=gen, device="cuda"))
    graph.replay()
    torch.cuda.synchronize()
    for got, want in zip(captured, step()):
        assert torch.equal(got, want)
    x64 = new_x.double()
    assert_matches(captured[0], reference(x64, lam0, alpha, beta, kappa), torch.float32)
    assert_matches(captured[2], grad.double() * reference_grad(x64, lam0, alpha, beta, kappa),
                   torch.float32, exponent=beta * x64)


@pytest.mark.slow
@pytest.mark.skipif(torch.version.cuda is None or cuda_home() is None,
                    reason="needs nvcc and a CUDA build of torch")
def test_build_fails_loudly_when_the_cuda_part_does_not_compile(tmp_path):
    """An unknown architecture makes the CUDA compile fail; ``build`` must exit 1 and say so,
    while the import still comes up on the CPU kernels."""
    done = subprocess.run([sys.executable, "-m", "cuda_ops", "build"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TORCH_CUDA_ARCH_LIST": "1.0",
                               "SELFNORM_OPS_DIR": str(tmp_path)})
    assert done.returncode == 1
    assert "error: compiling CPU + CUDA kernels failed" in done.stderr
    assert "Unknown CUDA arch" in done.stderr
    assert "unavailable for cuda tensors" in done.stderr


@pytest.mark.parametrize("device", DEVICES)
def test_bench_kernels_reports_every_candidate(device, capsys):
    """`python -m app bench kernels` end to end on a small shape: one JSON report per dtype with
    times, bandwidth and the two target ratios."""
    from app.bench import kernels

    assert kernels.main(["--device", device, "--shape", "4,8,16,16", "--no-compile",
                         "--repeats", "2", "--warmup", "1", "--inner", "2", "--json",
                         "--dtype", "float32", "--dtype", "bfloat16"]) == 0
    reports = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["dtype"] for r in reports] == ["float32", "bfloat16"]
    for r in reports:
        assert r["shape"] == [4, 8, 16, 16] and r["copy_GBps"] > 0
        assert {"F.selu", "selu_family, fixed λ", "selu_family, trainable λ",
                "ATen elu(x, α, λ, β)", "reference (Python)"} == set(r["results"])
        for passes in r["results"].values():
            for t in passes.values():
                assert t["ms"] > 0 and t["GBps"] > 0 and t["pct_copy"] > 0
        assert r["ratios"]["forward_vs_selu"] > 0 and r["ratios"]["trainable_fwd_bwd_vs_selu"] > 0


def test_bench_kernels_rejects_bad_arguments(capsys):
    from app.bench import kernels
    from app.errors import UserError

    with pytest.raises(SystemExit) as exit_:
        kernels.main(["--shape", "4,x"])
    assert exit_.value.code == 2
    assert "argument --shape: '4,x' is not a list of positive sizes" in capsys.readouterr().err
    with pytest.raises(UserError, match="--inner"):
        kernels.main(["--device", "cpu", "--inner", "0"])
