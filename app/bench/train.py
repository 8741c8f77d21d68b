"""``python -m app bench train``: training images/s of Conv MobileNet V1, SNN vs. BN+ReLU.

Times full training steps (forward, cross-entropy, backward, value clipping to
[−2, 2], SGD with momentum) on synthetic data that already lives on the device, so only the
model is measured. Two models of the same shape:

* ``sselu``: centralized sSELU (ε = 0.06), trainable λ, weight centralization, no norm — the
  paper's best ImageNet configuration;
* ``bn_relu``: BatchNorm + ReLU, the baseline.

each eager and, with ``--modes eager,compile``, under ``torch.compile``. On CUDA the default is
the paper's 224×224, bf16-mixed, channels_last, batch 256, cuDNN autotuning on (as the ImageNet
configs train); on CPU a small shape. sSELU runs the compiled op (an error if it is not built).
Candidates are timed round-robin in windows of ``--steps`` steps, so background load hits them
alike; the median window counts. Target: sselu ≥ 1.15× bn_relu images/s on an H100/H200
(without BatchNorm a step saves its statistics passes; Klambauer et al. promise a speed-up).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable

from app.errors import UserError

CONFIGS = {
    "sselu": dict(act="sselu", eps=0.06, central=True, trainable_lambda=True,
                  weight_centralization=True, norm="none"),
    "bn_relu": dict(act="relu", norm="batchnorm"),
}
MODES = ("eager", "compile")
TARGET = 1.15
# device type -> defaults for what the user does not set
DEFAULTS = {
    "cuda": dict(batch_size=256, image_size=224, width_mult=1.0, precision="bf16-mixed",
                 channels_last=True, modes="eager,compile", steps=20, warmup=10, repeats=5),
    "cpu": dict(batch_size=32, image_size=64, width_mult=0.25, precision="32",
                channels_last=False, modes="eager", steps=5, warmup=3, repeats=3),
}


@dataclass
class Result:
    config: str
    mode: str
    images_per_s: float
    ms_per_step: float
    peak_mem_gib: float | None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m app bench train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    p.add_argument("--batch-size", type=int, help="per-step batch (cuda 256, cpu 32)")
    p.add_argument("--image-size", type=int, help="square input side (cuda 224, cpu 64)")
    p.add_argument("--width-mult", type=float, help="Conv MobileNet V1 width (cuda 1.0, cpu 0.25)")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--precision", choices=("bf16-mixed", "32"), help="cuda bf16-mixed, cpu 32")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction,
                   help="NHWC memory format (cuda on, cpu off)")
    p.add_argument("--modes", help="comma list of eager, compile (cuda both, cpu eager)")
    p.add_argument("--configs", default="sselu,bn_relu", help="comma list of sselu, bn_relu")
    p.add_argument("--steps", type=int, help="steps per timed window")
    p.add_argument("--warmup", type=int, help="untimed steps first (compilation happens here)")
    p.add_argument("--repeats", type=int, help="timed windows per candidate, round-robin")
    p.add_argument("--json", help="also write the results to this file")
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The command line's options, unset ones left None for ``run`` to fill per device."""
    return _parser().parse_args(argv)


def _choices(text: str, allowed, flag: str) -> list[str]:
    items = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in items if s not in allowed]
    if bad or not items:
        raise UserError(f"{flag} {text!r} names {', '.join(bad) or 'nothing'}; choose from: "
                        f"{', '.join(allowed)}.")
    return items


def _settings(args: argparse.Namespace):
    import torch

    name = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    name = "cpu" if name == "auto" else name
    if name not in DEFAULTS:
        raise UserError(f"--device {args.device!r} is not one of auto, cpu, cuda.")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but no CUDA device is visible; use --device cpu.")
    for key, value in DEFAULTS[name].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for key in ("batch_size", "image_size", "steps", "repeats"):
        if getattr(args, key) < 1:
            raise UserError(f"--{key.replace('_', '-')} must be ≥ 1, got {getattr(args, key)}.")
    if args.warmup < 0 or args.width_mult <= 0:
        raise UserError("--warmup must be ≥ 0 and --width-mult positive.")
    args.modes = _choices(args.modes, MODES, "--modes")
    args.configs = _choices(args.configs, CONFIGS, "--configs")
    if "sselu" in args.configs:
        import cuda_ops

        built = cuda_ops.status.cuda if name == "cuda" else cuda_ops.status.cpu
        if built != "compiled":  # the figure would time the Python reference, not the op
            raise UserError(f"the compiled sSELU op is not built for {name} "
                            f"({cuda_ops.status.reason}); run `python -m cuda_ops build"
                            f"{' --require-cuda' if name == 'cuda' else ''}` first.")
    return torch.device(name)


def _train_step(config: str, mode: str, args, device) -> Callable[[], None]:
    import torch
    import torch.nn.functional as F

    from models import create_model

    torch.manual_seed(0)
    model = create_model("conv_mobilenet_v1", num_classes=args.num_classes,
                         width_mult=args.width_mult, **CONFIGS[config]).to(device)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    model.to(memory_format=fmt)
    if mode == "compile":
        model.compile()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=4e-5)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size,
                    device=device).contiguous(memory_format=fmt)
    y = torch.randint(args.num_classes, (args.batch_size,), device=device)
    bf16 = args.precision == "bf16-mixed"

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_value_(params, 2.0)  # the paper's clipping
        opt.step()
    return step


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def describe(device) -> str:
    import torch

    if device.type == "cuda":
        autotune = "on" if torch.backends.cudnn.benchmark else "off"
        return f"cuda: {torch.cuda.get_device_name(device)}, cudnn.benchmark {autotune}"
    return f"cpu ({torch.get_num_threads()} threads)"


def run(args: argparse.Namespace) -> tuple[str, list[Result]]:
    """Fill ``args``' unset options for the device, then time every candidate."""
    import torch

    device = _settings(args)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as training does (trainer.benchmark), for both
    cands = [(c, m) for m in args.modes for c in args.configs]
    steps, peak = {}, {}
    for cand in cands:  # build and warm up (compile) each, then time round-robin
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)  # the earlier candidates' state
        steps[cand] = _train_step(*cand, args, device)
        for _ in range(args.warmup):
            steps[cand]()
        _sync(device)
        peak[cand] = ((torch.cuda.max_memory_allocated(device) - before) / 2 ** 30
                      if device.type == "cuda" else None)
    windows: dict[tuple[str, str], list[float]] = {cand: [] for cand in cands}
    for _ in range(args.repeats):
        for cand in cands:
            _sync(device)
            start = time.perf_counter()
            for _ in range(args.steps):
                steps[cand]()
            _sync(device)
            windows[cand].append((time.perf_counter() - start) / args.steps)
    results = []
    for (config, mode), times in windows.items():
        t = statistics.median(times)
        results.append(Result(config, mode, args.batch_size / t, t * 1e3, peak[(config, mode)]))
    return describe(device), results


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    device, results = run(args)
    print(f"conv_mobilenet_v1 width {args.width_mult:g}, {args.image_size}×{args.image_size}, "
          f"batch {args.batch_size}, {'fp32' if args.precision == '32' else args.precision}, "
          f"{'channels_last' if args.channels_last else 'contiguous'}, {device}; "
          f"median of {args.repeats} windows × {args.steps} steps")
    print(f"{'config':<9} {'mode':<8} {'images/s':>10} {'ms/step':>9} {'peak GiB':>9}")
    by = {(r.config, r.mode): r for r in results}
    for r in results:
        mem = "—" if r.peak_mem_gib is None else f"{r.peak_mem_gib:.2f}"
        print(f"{r.config:<9} {r.mode:<8} {r.images_per_s:>10.1f} {r.ms_per_step:>9.2f} "
              f"{mem:>9}")
    for mode in args.modes:
        if ("sselu", mode) in by and ("bn_relu", mode) in by:
            ratio = by[("sselu", mode)].images_per_s / by[("bn_relu", mode)].images_per_s
            verdict = "meets" if ratio >= TARGET else "misses"
            print(f"{mode}: sselu / bn_relu = {ratio:.3f}× ({verdict} the {TARGET}× target, "
                  f"which is set for H100/H200)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"settings": {k: v for k, v in vars(args).items() if k != "json"},
                       "device": device, "results": [asdict(r) for r in results]}, f, indent=2)
    return 0
