"""``python -m app bench kernels``: the selu_family op against native SELU and friends.

Times forward and forward+backward of ``cuda_ops.selu_family`` (fixed and trainable λ) against
``torch.nn.functional.selu``, ATen's fused ``elu(x, α, λ, β)`` (sSELU with a fixed λ), the Python
reference and ``torch.compile`` of the reference, on the paper's shape [512, 64, 56, 56] on CUDA
(Appendix B, Table 3) or a smaller one on CPU. Reports the median time, the achieved bandwidth
(forward moves 2 tensors, forward+backward 5) and its share of the measured copy bandwidth.
Candidates are timed round-robin, so background load on a shared machine hits them alike; on
CUDA each sample is the mean of ``--inner`` back-to-back calls between two events.

Targets: on CUDA, forward ≥ 85% of copy bandwidth and trainable-λ forward+backward ≤ 1.05×
F.selu's; on CPU, no slower than F.selu.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

from app.errors import UserError

PAPER_SHAPE = (512, 64, 56, 56)
CPU_SHAPE = (32, 64, 56, 56)
DTYPES = ("float32", "bfloat16", "float16", "float64")


@dataclass
class Case:
    name: str
    forward: Callable[[], object]
    forward_backward: Callable[[], object]


def _parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in text.replace("x", ",").split(","))
    except ValueError:
        shape = ()
    if not shape or min(shape) < 1:
        # argparse reports it as "argument --shape: ..." with exit code 2
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of positive sizes; write e.g. "
                                         f"--shape 32,64,56,56")
    return shape


def _timer(device, inner: int) -> Callable[[Callable[[], object]], float]:
    import torch

    if device.type == "cuda":
        # `inner` calls back to back between two events, so the host's launch overhead (tens of
        # µs of Python and dispatch per call) overlaps the previous call's kernels, as in a
        # training step, instead of being counted as device time.
        def run(fn: Callable[[], object]) -> float:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            fn()  # the first call's launch gap falls before the start event
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3 / inner
    else:
        def run(fn: Callable[[], object]) -> float:
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0
    return run


def _cases(x, grad, act, with_compile: bool) -> list[Case]:
    import torch
    import torch.nn.functional as F

    import cuda_ops
    from cuda_ops.reference import selu_family as reference

    lam = torch.tensor(act.lam, device=x.device, requires_grad=True)
    xg = x.detach().clone().requires_grad_()
    a, b, k = act.alpha, act.beta, act.kappa

    def fwd_bwd(f: Callable) -> Callable[[], object]:
        def run() -> None:
            xg.grad = lam.grad = None
            f(xg).backward(grad)
        return run

    def ours_fixed(t):
        return cuda_ops.selu_family(t, act.lam, a, b, k)

    def ours_trainable(t):
        return cuda_ops.selu_family(t, lam, a, b, k)

    def ref(t):
        return reference(t, lam, a, b, k)

    cases = [
        Case("F.selu", lambda: F.selu(x), fwd_bwd(F.selu)),
        Case("selu_family, fixed λ", lambda: ours_fixed(x), fwd_bwd(ours_fixed)),
        Case("selu_family, trainable λ", lambda: ours_trainable(x), fwd_bwd(ours_trainable)),
    ]
    if k == 0:  # ATen's elu computes exactly sSELU/SELU with a fixed λ: λ·elu(βx; α)
        def elu(t):
            return torch._C._nn.elu(t, a, act.lam, b)
        cases.append(Case("ATen elu(x, α, λ, β)", lambda: elu(x), fwd_bwd(elu)))
    cases.append(Case("reference (Python)", lambda: ref(x.detach()), fwd_bwd(ref)))
    if with_compile:
        compiled = torch.compile(ref)
        cases.append(Case("reference, torch.compile", lambda: compiled(x.detach()),
                          fwd_bwd(compiled)))
    return cases


def _measure(cases: list[Case], copy: Callable[[], object], timer, repeats: int,
             warmup: int) -> tuple[dict[str, dict[str, float]], float]:
    """Median seconds per case and pass, and of ``copy``, all timed in the same rounds (so cache
    state and background load are alike for every candidate)."""
    for case in cases:
        for _ in range(warmup):
            case.forward()
            case.forward_backward()
    samples = {c.name: {"forward": [], "forward_backward": []} for c in cases}
    copies = []
    for _ in range(repeats):
        copies.append(timer(copy))
        for case in cases:
            samples[case.name]["forward"].append(timer(case.forward))
            samples[case.name]["forward_backward"].append(timer(case.forward_backward))
    medians = {name: {k: statistics.median(v) for k, v in s.items()} for name, s in samples.items()}
    return medians, statistics.median(copies)


def _device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return (f"{os.cpu_count()}-core CPU ({torch.backends.cpu.get_cpu_capability()}, "
            f"{torch.get_num_threads()} threads)")


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m app bench kernels", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: cuda when a GPU is visible, else cpu")
    p.add_argument("--shape", type=_parse_shape, default=None,
                   help=f"input shape (default {list(PAPER_SHAPE)} on CUDA, the paper's; "
                        f"{list(CPU_SHAPE)} on CPU)")
    p.add_argument("--dtype", action="append", choices=DTYPES, default=None,
                   help="repeatable (default: float32 and bfloat16)")
    p.add_argument("--act", choices=("sselu", "lselu", "selu"), default="sselu",
                   help="parameters from the solver at ε = 0.06 (selu: fixed)")
    p.add_argument("--repeats", type=int, default=20, help="timed calls per candidate")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--inner", type=int, default=10,
                   help="CUDA: calls per timed sample, back to back (their mean is the sample)")
    p.add_argument("--no-compile", action="store_true",
                   help="skip torch.compile of the reference (saves its compile time)")
    p.add_argument("--json", action="store_true", help="print one JSON object per dtype")
    args = p.parse_args(argv)

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda needs a visible GPU; use --device cpu")
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if use_cuda else "cpu")
    shape = args.shape or (PAPER_SHAPE if use_cuda else CPU_SHAPE)
    if min(args.repeats, args.inner) < 1 or args.warmup < 0:
        raise UserError("--repeats and --inner must be >= 1 and --warmup >= 0")
    for dtype_name in args.dtype or ["float32", "bfloat16"]:
        report = measure(device, shape, dtype_name, args.act, repeats=args.repeats,
                         warmup=args.warmup, inner=args.inner, with_compile=not args.no_compile)
        if args.json:
            print(json.dumps(report))
        else:
            _print(report)
    return 0


def measure(device, shape: tuple[int, ...], dtype_name: str, act_name: str = "sselu", *,
            repeats: int = 20, warmup: int = 3, inner: int = 10,
            with_compile: bool = True) -> dict:
    """One dtype's report: median times of every candidate, their bandwidth and share of the
    copy bandwidth measured in the same rounds, and the two target ratios (``selftest`` reuses
    this at a short setting)."""
    import torch

    from models.theory.solver import solve

    act = solve(act_name, eps=None if act_name == "selu" else 0.06)
    dtype = getattr(torch, dtype_name)
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(shape, generator=gen, device=device, dtype=dtype)
    grad = torch.randn(shape, generator=gen, device=device, dtype=dtype)
    out = torch.empty_like(x)
    times, copy_s = _measure(_cases(x, grad, act, with_compile), lambda: out.copy_(x),
                             _timer(device, inner), repeats, warmup)
    copy_bw = 2 * x.numel() * x.element_size() / copy_s
    nbytes = {"forward": 2 * x.numel() * x.element_size(),
              "forward_backward": 5 * x.numel() * x.element_size()}
    report = {
        "device": _device_name(device), "shape": list(shape), "dtype": dtype_name,
        "act": act_name, "copy_GBps": copy_bw / 1e9,
        "results": {name: {k: {"ms": t * 1e3, "GBps": nbytes[k] / t / 1e9,
                               "pct_copy": 100 * nbytes[k] / t / copy_bw}
                           for k, t in r.items()} for name, r in times.items()},
    }
    ours, selu = times["selu_family, trainable λ"], times["F.selu"]
    report["ratios"] = {
        "forward_vs_selu": times["selu_family, fixed λ"]["forward"] / selu["forward"],
        "trainable_fwd_bwd_vs_selu": ours["forward_backward"] / selu["forward_backward"],
    }
    return report


def _print(r: dict) -> None:
    print(f"selu_family kernels: {r['device']}, shape {r['shape']} {r['dtype']}, {r['act']}; "
          f"copy bandwidth {r['copy_GBps']:.1f} GB/s")
    print(f"  {'':<28}{'forward':>24}{'forward+backward':>28}")
    print(f"  {'':<28}{'ms':>9}{'GB/s':>8}{'%copy':>7}{'ms':>13}{'GB/s':>8}{'%copy':>7}")
    for name, res in r["results"].items():
        f, fb = res["forward"], res["forward_backward"]
        print(f"  {name:<28}{f['ms']:>9.3f}{f['GBps']:>8.1f}{f['pct_copy']:>7.1f}"
              f"{fb['ms']:>13.3f}{fb['GBps']:>8.1f}{fb['pct_copy']:>7.1f}")
    q = r["ratios"]
    print(f"  forward, fixed λ / F.selu: {q['forward_vs_selu']:.3f}x; forward+backward, "
          f"trainable λ / F.selu: {q['trainable_fwd_bwd_vs_selu']:.3f}x "
          f"(targets: CUDA forward >= 85% of copy, fwd+bwd <= 1.05x; CPU <= 1.0x)")
