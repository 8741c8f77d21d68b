"""Short kernel and train benchmarks: the op runs at the speed it was built for."""
from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from app.selftest.core import Env, Failed, check

if TYPE_CHECKING:
    import torch

# Below this share of the copy bandwidth the CUDA forward is not running as built (the target
# is 85%): the Python reference runs instead, or the build is broken.
CUDA_MIN_PCT_COPY = 50.0


def _kernels(device: torch.device, shape: tuple[int, ...], repeats: int,
             inner: int) -> tuple[str, dict[str, Any]]:
    from app.bench.kernels import measure

    reports = [measure(device, shape, dtype, repeats=repeats, warmup=1, inner=inner,
                       with_compile=False) for dtype in ("float32", "bfloat16")]
    parts, problems = [], []
    for r in reports:
        fwd = r["results"]["selu_family, fixed λ"]["forward"]
        ours = r["results"]["selu_family, trainable λ"]["forward_backward"]["ms"]
        ref = r["results"]["reference (Python)"]["forward_backward"]["ms"]
        parts.append(f"{r['dtype']} forward {fwd['GBps']:,.0f} GB/s = {fwd['pct_copy']:.0f}% of "
                     f"copy, trainable fwd+bwd {r['ratios']['trainable_fwd_bwd_vs_selu']:.2f}× "
                     f"F.selu")
        if ours > ref:  # the compiled op slower than Python: it is not the compiled op running
            problems.append(f"{r['dtype']}: trainable fwd+bwd {ours:.2f} ms, slower than the "
                            f"Python reference's {ref:.2f} ms")
        if device.type == "cuda" and fwd["pct_copy"] < CUDA_MIN_PCT_COPY:
            problems.append(f"{r['dtype']} forward at {fwd['pct_copy']:.0f}% of the copy "
                            f"bandwidth (target 85%; under {CUDA_MIN_PCT_COPY:.0f}% the kernels "
                            f"are not running as built)")
    data = {"reports": reports}
    if problems:
        raise Failed("; ".join(problems), data)
    copy = reports[0]["copy_GBps"]
    return f"{list(shape)}, copy {copy:,.0f} GB/s; " + "; ".join(parts), data


@check("kernels-cpu", "short kernel benchmark on the CPU: GB/s against copy", cpu_only=True)
def check_kernels_cpu(env: Env) -> tuple[str, dict[str, Any]]:
    import torch

    return _kernels(torch.device("cpu"), (8, 64, 56, 56), repeats=5, inner=1)


@check("kernels-cuda", "short kernel benchmark at the paper's shape: GB/s against copy",
       gpu=True)
def check_kernels_cuda(env: Env) -> tuple[str, dict[str, Any]]:
    import torch

    from app.bench.kernels import PAPER_SHAPE

    return _kernels(torch.device("cuda"), PAPER_SHAPE, repeats=5, inner=5)


def _train(argv: list[str]) -> tuple[str, dict[str, Any]]:
    from app.bench import train

    args = train.parse_args(argv)
    device, results = train.run(args)
    rate = {r.config: r.images_per_s for r in results}
    if not all(v > 0 and v == v and v != float("inf") for v in rate.values()):
        raise Failed(f"a training step rate is not a positive number: {rate}")
    ratio = rate["sselu"] / rate["bn_relu"]
    data = {"device": device, "results": [asdict(r) for r in results],
            "settings": {k: v for k, v in vars(args).items() if k != "json"}}
    return (f"{args.image_size} px, batch {args.batch_size}, width {args.width_mult:g}, "
            f"{'fp32' if args.precision == '32' else args.precision}, eager: sSELU "
            f"{rate['sselu']:,.0f} images/s, BN+ReLU {rate['bn_relu']:,.0f}: {ratio:.2f}× "
            f"(target {train.TARGET}× on H100/H200)"), data


@check("train-cpu", "short train benchmark on the CPU: images/s sSELU vs BN+ReLU", cpu_only=True)
def check_train_cpu(env: Env) -> tuple[str, dict[str, Any]]:
    return _train(["--device", "cpu", "--image-size", "32", "--batch-size", "8",
                   "--num-classes", "10", "--steps", "2", "--warmup", "1", "--repeats", "1"])


@check("train-cuda", "short train benchmark on the GPU: images/s sSELU vs BN+ReLU", gpu=True)
def check_train_cuda(env: Env) -> tuple[str, dict[str, Any]]:
    return _train(["--device", "cuda", "--modes", "eager", "--batch-size", "128",
                   "--steps", "5", "--warmup", "5", "--repeats", "3"])
