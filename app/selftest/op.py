"""The compiled op's checks: built for this machine (CPU, and each GPU's architecture), and
equal to the Python reference in fp32 and bf16."""
from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from app.selftest.core import Env, Failed, check
from app.selftest.versions import gpu_list

if TYPE_CHECKING:
    import torch

# Parameter sets that reach every branch of the kernels: β ≠ 1 (sSELU), κ ≠ 0 (lSELU); λ ≠ 1 so
# that a kernel which drops or doubles λ shows. (λ, α, β, κ)
FAMILIES = {"sselu": (1.0418, 1.4812, 0.62, 0.0), "lselu": (1.0312, 1.5437, 1.0, 0.1835)}
OP_ELEMENTS = 300_000
# (rtol, atol) of the op's values and grad_x against the float64 reference: fp32 keeps a few
# ulp; bf16 rounds each result once to its 8-bit mantissa (half an ulp is 2⁻⁸ relative).
OP_TOLERANCE = {"float32": (1e-5, 1e-6), "bfloat16": (1e-2, 1e-5)}
# dL/dλ is a sum: its error is bounded relative to Σ|terms|, whatever the summation order
GRAD_LAM_RTOL = 1e-5


def _worst(actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float) -> float:
    """The largest error as a multiple of the allowed one (≤ 1 passes)."""
    import torch

    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    ratio = (a - e).abs() / (atol + rtol * e.abs())
    ratio = torch.where(a.isnan() & e.isnan(), torch.zeros_like(ratio), ratio)
    return float(ratio.nan_to_num(float("inf")).max())


def op_inputs(n: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Normal samples ×3, a dense sweep through 0 (0 itself included) and tiny negatives."""
    import torch

    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(n, generator=g, dtype=torch.float64) * 3,
                   torch.linspace(-2, 2, 1001, dtype=torch.float64),
                   -torch.logspace(-8, 1, 99, dtype=torch.float64)])
    return x.to(device=device, dtype=dtype)


def compare_with_reference(device: torch.device, n: int = OP_ELEMENTS) -> dict[str, float]:
    """Forward, grad_x and grad_λ of ``cuda_ops.selu_family`` against the float64 reference on
    the same inputs, per family and dtype: the worst error / allowed error of each. Raises
    Failed naming the first result out of tolerance."""
    import torch

    import cuda_ops
    from cuda_ops.reference import selu_family as reference

    worst: dict[str, float] = {}
    for family, (lam0, alpha, beta, kappa) in FAMILIES.items():
        for dtype_name, (rtol, atol) in OP_TOLERANCE.items():
            x = op_inputs(n, device, getattr(torch, dtype_name)).requires_grad_()
            lam = torch.tensor(lam0, device=device, requires_grad=True)
            grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(1),
                               dtype=torch.float64).to(device=device, dtype=x.dtype)
            y = cuda_ops.selu_family(x, lam, alpha, beta, kappa)
            gx, gl = torch.autograd.grad(y, (x, lam), grad)
            xr = x.detach().double().requires_grad_()
            lr = torch.tensor(lam0, dtype=torch.float64, device=device, requires_grad=True)
            yr = reference(xr, lr, alpha, beta, kappa)
            gxr, glr = torch.autograd.grad(yr, (xr, lr), grad.double())
            terms = (grad.double() * yr.detach() / lam0).abs().sum()
            key = f"{family}/{dtype_name}"
            worst[f"{key}/forward"] = _worst(y, yr, rtol, atol)
            worst[f"{key}/grad_x"] = _worst(gx, gxr, rtol, atol)
            worst[f"{key}/grad_lam"] = _worst(gl, glr, 0.0, GRAD_LAM_RTOL * float(terms))
            if y.dtype != x.dtype or y.device != x.device or gl.device != lam.device:
                raise Failed(f"{key}: the op returned {y.dtype} on {y.device} for {x.dtype} on "
                             f"{x.device}", {"worst": worst})
    bad = {k: v for k, v in worst.items() if not v <= 1.0}
    if bad:
        name, ratio = max(bad.items(), key=lambda kv: kv[1])
        raise Failed(f"{len(bad)} of {len(worst)} results differ from the reference on {device}; "
                     f"worst: {name.replace('/', ' ')}, {ratio:.3g}× the tolerance",
                     {"worst": worst})
    return worst


def _match_line(n: int) -> str:
    return (f"forward, grad_x, grad_λ match the reference in fp32 and bf16 ({n:,} elements, "
            f"sSELU and lSELU)")


@check("op-cpu", "the op's CPU kernels are compiled and match the Python reference")
def check_op_cpu(env: Env) -> tuple[str, dict[str, Any]]:
    import torch

    import cuda_ops

    if cuda_ops.status.cpu != "compiled":
        raise Failed(f"the CPU kernels are not compiled ({cuda_ops.status.reason}), so the "
                     f"Python reference runs; run `python -m cuda_ops build`",
                     {"info": cuda_ops.info()})
    worst = compare_with_reference(torch.device("cpu"))
    variant = torch.ops.selfnorm.cpu_variant()
    return f"compiled ({variant}); {_match_line(OP_ELEMENTS)}", {"info": cuda_ops.info(),
                                                                "worst": worst}


def arch_support(capability: tuple[int, int], arch_list: str) -> str | None:
    """How a GPU of ``capability`` runs a build for ``arch_list`` (``TORCH_CUDA_ARCH_LIST``):
    its own code, code of an older minor of the same major (binary compatible), a JIT of PTX of
    an older architecture, or None when nothing in the build can run on it."""
    native, ptx = [], []
    for entry in re.split(r"[;,\s]+", arch_list or ""):
        m = re.fullmatch(r"(\d+)\.(\d+)([af]?)(\+PTX)?", entry.strip())
        if not m:
            continue
        arch, variant = (int(m[1]), int(m[2])), m[3]
        # 'a' builds run on exactly their architecture; plain (and family) ones on later minors
        if arch == capability or (variant != "a" and arch[0] == capability[0]
                                  and arch[1] <= capability[1]):
            native.append(arch)
        if m[4] and arch <= capability:
            ptx.append(arch)
    sm = f"sm_{capability[0]}{capability[1]}"
    if capability in native:
        return f"{sm} code"
    if native:
        best = max(native)
        return f"sm_{best[0]}{best[1]} code (binary compatible with {sm})"
    if ptx:
        best = max(ptx)
        return f"PTX of {best[0]}.{best[1]}, JIT-compiled for {sm} at first load"
    return None


@check("op-cuda", "the op is compiled for this GPU's architecture and matches the reference",
       gpu=True)
def check_op_cuda(env: Env) -> tuple[str, dict[str, Any]]:
    import torch

    import cuda_ops

    status = cuda_ops.status
    if status.cuda != "compiled":
        raise Failed(f"the CUDA kernels are {status.cuda} ({status.reason}), so CUDA tensors run "
                     f"the Python reference; run `python -m cuda_ops build --require-cuda`",
                     {"info": cuda_ops.info()})
    data: dict[str, Any] = {"info": cuda_ops.info(), "gpus": {}}
    hows = set()
    for gpu in gpu_list():
        cap = tuple(int(v) for v in gpu["capability"].split("."))
        how = arch_support(cap, status.cuda_arch_list or "")
        if how is None:
            raise Failed(f"GPU {gpu['index']} ({gpu['name']}) is sm_{cap[0]}{cap[1]}, but the op "
                         f"is compiled for {status.cuda_arch_list} only; rebuild with "
                         f"TORCH_CUDA_ARCH_LIST=\"{cap[0]}.{cap[1]}\" python -m cuda_ops build",
                         data)
        worst = compare_with_reference(torch.device("cuda", gpu["index"]))
        data["gpus"][gpu["index"]] = {"name": gpu["name"], "runs": how, "worst": worst}
        hows.add(f"{gpu['name']}: {how}")
    return (f"compiled for {status.cuda_arch_list} ({'; '.join(sorted(hows))}); on "
            f"{env.gpus} GPU(s) {_match_line(OP_ELEMENTS)}", data)
