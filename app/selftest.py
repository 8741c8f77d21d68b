"""``python -m app selftest``: check an install where it runs, and say what was checked.

For a cluster admin, the Docker image's smoke test (``docker run --gpus all selfnorm selftest``)
and the first run on a new GPU node. The checks: the versions of the stack; the compiled op
(built for this GPU's architecture, equal to the Python reference in fp32 and bf16); the FFCV
pipeline on a small generated .beton; one DDP step; the kernel and train benchmarks at a short
setting. Without a GPU the CPU checks run and the GPU ones are listed as skipped.

``--full`` adds the CUDA test suite and the full benchmarks, whose outputs go to ``--out`` with
the report (Markdown and JSON). ``--only NAME[,NAME]`` runs some checks (a name, or a group such
as ``op``); with ``--out`` their results replace those of the same names in the report there, so
a failed check is rerun alone. Each check runs even when an earlier one failed, and records
pass, fail or skip, its seconds and a one-line detail. Exit code 0: every check that ran passed;
1: a check failed; 2: a usage error.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import importlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.errors import UserError
from app.paths import check_output_folder

if TYPE_CHECKING:
    import torch

ROOT = Path(__file__).resolve().parents[1]
PASS, FAIL, SKIP = "pass", "fail", "skip"
REPORT_JSON, REPORT_MD = "report.json", "report.md"
# Parameter sets that reach every branch of the kernels: β ≠ 1 (sSELU), κ ≠ 0 (lSELU); λ ≠ 1 so
# that a kernel which drops or doubles λ shows. (λ, α, β, κ)
FAMILIES = {"sselu": (1.0418, 1.4812, 0.62, 0.0), "lselu": (1.0312, 1.5437, 1.0, 0.1835)}
OP_ELEMENTS = 300_000
# (rtol, atol) of the op's values and grad_x against the float64 reference: fp32 keeps a few
# ulp; bf16 rounds each result once to its 8-bit mantissa (half an ulp is 2⁻⁸ relative).
OP_TOLERANCE = {"float32": (1e-5, 1e-6), "bfloat16": (1e-2, 1e-5)}
# dL/dλ is a sum: its error is bounded relative to Σ|terms|, whatever the summation order
GRAD_LAM_RTOL = 1e-5
# Below this share of the copy bandwidth the CUDA forward is not running as built (the target
# is 85%): the Python reference runs instead, or the build is broken.
CUDA_MIN_PCT_COPY = 50.0
# Seconds each full run may take; they run in this order, the train benchmark (torch.compile of
# two models) last, so that a short --budget cuts the longest one.
FULL_TIMEOUTS = {"pytest-cuda": 240, "bench-kernels": 180, "bench-loader": 150,
                 "bench-train": 300}


class Skipped(Exception):
    """The check does not apply here (no GPU, one GPU only, ...); the message says why."""


class Stopped(BaseException):
    """SIGTERM arrived (a scheduler, ``timeout``): not a check's failure, so nothing catches it
    until the report of the checks so far is written."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise Stopped(signal.Signals(signum).name)


class Failed(Exception):
    """The check ran and found a problem: ``detail`` is its one line, ``data`` the evidence."""

    def __init__(self, detail: str, data: dict[str, Any] | None = None):
        super().__init__(detail)
        self.detail, self.data = detail, data or {}


@dataclass
class Result:
    name: str
    status: str
    seconds: float
    detail: str
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class Env:
    """What the checks share: the visible GPUs, where files go and the time left."""

    gpus: int
    gpu_note: str             # why no GPU is visible, or the GPUs' names
    scratch: Path             # temporary files, removed at the end
    out: Path | None          # the report's folder (--out)
    full: bool
    deadline: float | None    # time.monotonic() by which checks must have ended (--budget)

    def file(self, name: str) -> Path:
        """Where a check keeps an output file: in --out when given, else in the scratch folder."""
        return (self.out or self.scratch) / name

    def timeout(self, cap: float) -> float:
        """``cap`` seconds, or what is left of the budget when that is less."""
        if self.deadline is None:
            return cap
        return max(1.0, min(cap, self.deadline - time.monotonic()))


@dataclass(frozen=True)
class Check:
    name: str
    group: str
    help: str
    run: Callable[[Env], tuple[str, dict[str, Any]]]
    gpu: bool = False          # needs a CUDA GPU: skipped without one
    cpu_only: bool = False     # where a GPU is visible its -cuda twin covers this (unless named)
    full: bool = False         # only with --full (or when named in --only)


CHECKS: dict[str, Check] = {}


def check(name: str, help: str, **flags: bool) -> Callable:
    """Register a check: ``run(env) -> (detail, data)``; raises Skipped or Failed."""
    def register(fn: Callable[[Env], tuple[str, dict[str, Any]]]) -> Callable:
        group = "full" if flags.get("full") else name.split("-")[0]
        CHECKS[name] = Check(name, group, help, fn, **flags)
        return fn
    return register


def one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".rstrip(": ")


# ---- versions ---------------------------------------------------------------------------------

def _nvidia_smi(*query: str) -> list[list[str]] | None:
    """Rows of an ``nvidia-smi --query-*`` (csv, no header), or None without a usable nvidia-smi."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        done = subprocess.run(["nvidia-smi", *query, "--format=csv,noheader,nounits"],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    return [[c.strip() for c in line.split(",")] for line in done.stdout.splitlines()
            if line.strip()]


def _cudnn_version() -> str | None:
    import torch

    v = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    if v is None:
        return None
    base = 10000 if v >= 90000 else 1000  # cuDNN 9 packs major·10000 + minor·100 + patch
    return f"{v // base}.{v % base // 100}.{v % 100}"


def _nccl_version() -> str | None:
    import torch

    try:
        v = torch.cuda.nccl.version()
    except Exception:  # noqa: BLE001 (a CPU build of torch has no NCCL)
        return None
    return ".".join(map(str, v)) if isinstance(v, tuple) else str(v)


def _package(name: str) -> str:
    """``name``'s version after importing it (an import that fails raises)."""
    importlib.import_module(name)
    return importlib.metadata.version(name)


def gpu_list() -> list[dict[str, Any]]:
    """The GPUs torch sees: index, name, compute capability, memory and UUID (no CUDA context)."""
    import torch

    gpus = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        gpus.append({"index": i, "name": p.name, "capability": f"{p.major}.{p.minor}",
                     "memory_gib": round(p.total_memory / 2**30, 1),
                     "uuid": str(getattr(p, "uuid", ""))})
    return gpus


@check("versions", "torch, CUDA, cuDNN, NCCL, driver, GPUs, lightning, ffcv")
def check_versions(env: Env) -> tuple[str, dict[str, Any]]:
    import torch

    data: dict[str, Any] = {
        "python": platform.python_version(), "platform": platform.platform(),
        "cpus": os.cpu_count(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "cudnn": _cudnn_version(), "nccl": _nccl_version(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_cuda_arch_list": torch.cuda.get_arch_list() if env.gpus else None,
        "gpus": gpu_list() if env.gpus else [],
    }
    problems = []
    for name in ("lightning", "torchvision", "ffcv", "numba", "numpy"):
        try:
            data[name] = _package(name)
        except Exception as err:  # noqa: BLE001 (report every missing piece, not the first)
            data[name] = None
            problems.append(f"{name} does not import ({one_line(err)})")
    smi = _nvidia_smi("--query-gpu=name,driver_version,uuid")
    data["nvidia_smi"] = smi
    data["driver"] = smi[0][1] if smi else None
    if smi and not env.gpus:
        why = "a CPU build of torch" if torch.version.cuda is None else env.gpu_note
        problems.append(f"nvidia-smi lists {len(smi)} GPU(s) but torch sees none ({why})")
    stack = (f"torch {data['torch']} (CUDA {data['cuda'] or '-'}, cuDNN {data['cudnn'] or '-'}, "
             f"NCCL {data['nccl'] or '-'}), lightning {data['lightning'] or '-'}, "
             f"ffcv {data['ffcv'] or '-'}, Python {data['python']}")
    where = (f"driver {data['driver'] or '?'}, {env.gpu_note}" if env.gpus
             else f"{env.gpu_note}")
    if problems:
        raise Failed(f"{'; '.join(problems)}; {stack}", data)
    return f"{stack}; {where}", data


# ---- the compiled op --------------------------------------------------------------------------

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


# ---- work in fresh processes ------------------------------------------------------------------

def _child(target: Callable[[int, dict], dict], rank: int, payload: dict, path: str) -> None:
    """Entry of a spawned process: ``target``'s result, or its error, as JSON in ``path``."""
    os.dup2(2, 1)  # the parent's stdout carries the table or the JSON: child output goes to stderr
    try:
        result = target(rank, payload)
    except BaseException as err:  # noqa: BLE001 (the parent reports what went wrong here)
        result = {"error": one_line(err), "traceback": traceback.format_exc()}
    Path(path).write_text(json.dumps(result))


def spawn(target: Callable[[int, dict], dict], payloads: list[dict], folder: Path,
          timeout: float) -> list[dict]:
    """``target(rank, payload)`` in one fresh process per payload (spawned: no CUDA state or
    threads of this process are inherited), all at once; their results. Raises Failed when one
    raised, died or outlived ``timeout`` (then all are stopped)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    paths = [folder / f"result-{os.getpid()}-{time.monotonic_ns()}-{r}.json"
             for r in range(len(payloads))]
    procs = [ctx.Process(target=_child, args=(target, r, p, str(paths[r])), daemon=True)
             for r, p in enumerate(payloads)]
    try:
        for proc in procs:
            proc.start()
        deadline = time.monotonic() + timeout
        for proc in procs:
            proc.join(max(0.0, deadline - time.monotonic()))
        late = [r for r, proc in enumerate(procs) if proc.is_alive()]
    finally:  # also when this process is stopped: no rank outlives the check
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
                if proc.is_alive():
                    proc.kill()
                    proc.join()
    if late:
        raise Failed(f"rank(s) {', '.join(map(str, late))} still running after {timeout:.0f} s; "
                     f"stopped")
    results = []
    for r, (proc, path) in enumerate(zip(procs, paths)):
        if not path.is_file():
            raise Failed(f"rank {r} exited with code {proc.exitcode} without a result")
        result = json.loads(path.read_text())
        path.unlink()
        if "error" in result:
            raise Failed(f"rank {r}: {result['error']}", {"traceback": result.get("traceback")})
        results.append(result)
    return results


# ---- the FFCV pipeline ------------------------------------------------------------------------

def write_beton(env: Env, images: int, side: int, classes: int = 10) -> Path:
    """A generated JPEG .beton in the scratch folder (once per size)."""
    from data.prepare import prepare

    path = env.scratch / f"synthetic-{images}x{side}.beton"
    if not path.is_file():
        prepare("synthetic", "train", path, progress=False,
                source_options={"num_classes": classes, "num_samples": images,
                                "image_size": side})
    return path


def _cuda_contexts(pid: int) -> list[str] | None:
    """UUIDs of the GPUs on which process ``pid`` holds a CUDA context (None: no nvidia-smi)."""
    rows = _nvidia_smi("--query-compute-apps=pid,gpu_uuid")
    if rows is None:
        return None
    return sorted({row[1] for row in rows if len(row) >= 2 and row[0] == str(pid)})


def _uuid_key(uuid: str) -> str:
    return uuid.lower().removeprefix("gpu-")


def loader_epochs(rank: int, payload: dict) -> dict:
    """One epoch to warm up (numba compiles the pipeline) whose every batch is checked, then
    ``epochs`` timed ones; on CUDA also the GPUs this process holds a context on."""
    import torch

    from data.datamodule import FFCVImageDataModule

    device = torch.device(payload["device"])
    if device.type == "cuda":
        torch.cuda.set_device(device)  # as each DDP rank does
    dtype = getattr(torch, payload["dtype"])
    side, batch, classes = payload["resolution"], payload["batch_size"], payload["classes"]
    dm = FFCVImageDataModule(train_path=payload["beton"], val_path=payload["beton"],
                             batch_size=batch, num_workers=payload["workers"],
                             augment="imagenet", resolution=side)
    dm.setup("fit")
    loader = dm.build_loader("train", device=device, dtype=dtype)
    try:
        problems, seen = [], 0
        for x, y in loader:
            seen += x.shape[0]
            if (x.shape != (batch, 3, side, side) or x.dtype != dtype or x.device != device
                    or y.device != device):
                problems.append(f"a batch of {tuple(x.shape)} {x.dtype} on {x.device} (labels on "
                                f"{y.device}); expected ({batch}, 3, {side}, {side}) {dtype} on "
                                f"{device}")
            elif not x.is_contiguous(memory_format=torch.channels_last):
                problems.append("a batch not in channels_last")
            elif not bool(torch.isfinite(x).all()) or float(x.float().abs().mean()) > 5:
                problems.append("a batch with non-finite or unnormalised pixels")
            elif int(y.min()) < 0 or int(y.max()) >= classes:
                problems.append(f"labels outside [0, {classes})")
            if problems:
                break
        expected = len(loader) * batch
        if not problems and seen != expected:
            problems.append(f"{seen} images in the epoch, expected {expected}")
        timed, start = 0, time.perf_counter()
        for _ in range(payload["epochs"]):
            for x, _ in loader:
                timed += x.shape[0]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
    finally:
        loader.close()
    result = {"problems": problems, "images": timed, "seconds": seconds,
              "images_per_s": timed / seconds if seconds > 0 else 0.0,
              "batches_per_epoch": len(loader)}
    if device.type == "cuda":
        result["pid"] = os.getpid()
        result["own_uuid"] = str(torch.cuda.get_device_properties(device).uuid)
        result["contexts"] = _cuda_contexts(os.getpid())
    return result


def _loader_payload(env: Env, device: str, images: int, side: int, batch: int,
                    dtype: str) -> dict:
    from data.writer import usable_cores

    return {"beton": str(write_beton(env, images, side)), "device": device, "dtype": dtype,
            "resolution": side, "batch_size": batch, "classes": 10, "epochs": 2,
            "workers": min(8, usable_cores())}


def _loader_detail(result: dict, what: str) -> str:
    if result["problems"]:
        raise Failed(f"{what}: {result['problems'][0]}", result)
    return (f"{what}: {result['images_per_s']:,.0f} images/s over 2 epochs of "
            f"{result['batches_per_epoch']} batches (after a warm-up epoch, every batch checked)")


@check("loader-cpu", "FFCV CPU pipeline on a generated .beton: batches and images/s")
def check_loader_cpu(env: Env) -> tuple[str, dict[str, Any]]:
    payload = _loader_payload(env, "cpu", images=256, side=32, batch=32, dtype="float32")
    result = loader_epochs(0, payload)
    return _loader_detail(result, "256 JPEGs, 32 px, batch 32, float32 on the CPU"), result


@check("loader-cuda", "FFCV GPU pipeline: batches, images/s, no CUDA context on other GPUs",
       gpu=True)
def check_loader_cuda(env: Env) -> tuple[str, dict[str, Any]]:
    # The loader goes on the last GPU, in a process of its own, so that a context that ffcv
    # opens on GPU 0 (as it did before data.loader's patch) is this process's only one there.
    index = env.gpus - 1
    payload = _loader_payload(env, f"cuda:{index}", images=2048, side=160, batch=128,
                              dtype="bfloat16")
    (result,) = spawn(loader_epochs, [payload], env.scratch, env.timeout(240))
    detail = _loader_detail(result, f"2048 JPEGs, 160 px, batch 128, bf16 on cuda:{index}")
    contexts = result["contexts"]
    if env.gpus == 1:
        note = "context check skipped: one GPU"
    elif contexts is None:
        note = "context check skipped: no nvidia-smi"
    elif not contexts:
        note = "context check not verifiable: nvidia-smi lists no process with this pid"
    elif {_uuid_key(u) for u in contexts} != {_uuid_key(result["own_uuid"])}:
        raise Failed(f"the loader's process holds CUDA contexts on {', '.join(contexts)}, not "
                     f"only on its own cuda:{index} ({result['own_uuid']})", result)
    else:
        note = "a CUDA context on the loader's GPU only"
    return f"{detail}; {note}", result


# ---- one DDP step -----------------------------------------------------------------------------

def ddp_step(rank: int, payload: dict) -> dict:
    """One SGD step of a tiny conv net with trainable-λ sSELU (the compiled op) under DDP, each
    rank on its own batch. Checks that DDP's all-reduce gave every rank the mean of the local
    gradients and that all ranks end with the same weights, λ included."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel

    import cuda_ops
    from models import create_act

    backend, world = payload["backend"], payload["world"]
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(1)  # the ranks share the cores
    dist.init_process_group(backend, init_method=payload["init"], rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=payload["timeout"]))
    try:
        torch.manual_seed(0)
        act = create_act("sselu", eps=0.06, central=True, trainable_lambda=True)
        model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), act, nn.AdaptiveAvgPool2d(1),
                              nn.Flatten(), nn.Linear(8, 10)).to(device)
        ddp = DistributedDataParallel(model, device_ids=[rank] if device.type == "cuda" else None)
        gen = torch.Generator().manual_seed(1 + rank)  # a batch of its own per rank
        x = torch.randn(8, 3, 16, 16, generator=gen).to(device)
        y = torch.randint(10, (8,), generator=gen).to(device)

        def grads() -> torch.Tensor:
            return torch.cat([p.grad.reshape(-1) for p in model.parameters()])

        def gather(t: torch.Tensor) -> list[torch.Tensor]:
            out = [torch.empty_like(t) for _ in range(world)]
            dist.all_gather(out, t.contiguous())
            return out

        with ddp.no_sync():  # this rank's own gradient, for the mean DDP must produce
            F.cross_entropy(ddp(x), y).backward()
        local = grads().clone()
        model.zero_grad(set_to_none=True)
        F.cross_entropy(ddp(x), y).backward()
        reduced = grads()
        locals_ = gather(local)
        mean = torch.stack(locals_).mean(0)
        lam_before = float(act.lam.detach())
        torch.optim.SGD(model.parameters(), lr=0.5).step()
        weights = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        everyone = gather(weights)
        locals_differ = world > 1 and not all(torch.equal(g, local) for g in locals_)
        compiled = cuda_ops.status.cuda if device.type == "cuda" else cuda_ops.status.cpu
        return {"rank": rank, "op": compiled,
                "grad_error": float((reduced - mean).abs().max() / mean.abs().max()),
                "weights_equal": all(torch.equal(w, weights) for w in everyone),
                "lam": [lam_before, float(act.lam.detach())],
                "locals_differ": locals_differ, "parameters": weights.numel()}
    finally:
        dist.destroy_process_group()


def _ddp(env: Env, backend: str, world: int) -> tuple[str, dict[str, Any]]:
    init = f"file://{env.scratch / f'ddp-{backend}-{time.monotonic_ns()}'}"
    payload = {"backend": backend, "world": world, "init": init, "timeout": 60}
    results = spawn(ddp_step, [payload] * world, env.scratch, env.timeout(180))
    data = {"ranks": results}
    first = results[0]
    if any(r["op"] != "compiled" for r in results):
        raise Failed(f"the op is {first['op']} in the ranks: the step ran the Python reference",
                     data)
    if max(r["grad_error"] for r in results) > 1e-5:
        raise Failed(f"DDP's gradient differs from the mean of the ranks' own gradients "
                     f"(relative error {max(r['grad_error'] for r in results):.2g})", data)
    if not all(r["weights_equal"] for r in results):
        raise Failed("the ranks' weights differ after the step", data)
    if first["lam"][0] == first["lam"][1]:
        raise Failed("λ did not change in the step: it got no gradient", data)
    if world > 1 and not first["locals_differ"]:
        raise Failed("the ranks' own gradients were equal: the check would hold trivially", data)
    spread = "different batches, " if world > 1 else "one rank (one GPU), "
    return (f"{backend}, world size {world}: {spread}DDP's gradient = the ranks' mean, one SGD "
            f"step, identical weights on every rank ({first['parameters']} parameters, λ "
            f"{first['lam'][0]:.5f} → {first['lam'][1]:.5f})"), data


@check("ddp-cpu", "a 2-process gloo DDP step on the CPU", cpu_only=True)
def check_ddp_cpu(env: Env) -> tuple[str, dict[str, Any]]:
    return _ddp(env, "gloo", 2)


@check("ddp-cuda", "an NCCL DDP step across all visible GPUs", gpu=True)
def check_ddp_cuda(env: Env) -> tuple[str, dict[str, Any]]:
    import torch.distributed as dist

    if not dist.is_nccl_available():
        raise Failed("this torch has no NCCL")
    return _ddp(env, "nccl", env.gpus)


# ---- short benchmarks -------------------------------------------------------------------------

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


# ---- --full: the CUDA test suite and the full benchmarks, each in its own process -------------

def run_command(argv: list[str], log: Path, timeout: float,
                header: str | None = None) -> tuple[int | None, str]:
    """Run ``argv`` from the checkout with its output appended to ``log``; (exit code or None
    when stopped at ``timeout``, this run's output). Its whole process group is stopped at the
    timeout, so no worker it started outlives it."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log, "a") as f:
        if header:
            f.write(f"\n==== {header} ({datetime.datetime.now():%Y-%m-%d %H:%M:%S}): "
                    f"{' '.join(argv)}\n")
            f.flush()
        start = f.tell()
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        code: int | None = None
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        finally:  # at the timeout, and when this process is stopped
            if proc.poll() is None:
                _stop_group(proc)
    with open(log) as f:
        f.seek(start)
        return code, f.read()


def _stop_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _app(*args: str) -> list[str]:
    return [sys.executable, "-m", "app", *args]


def _finished(name: str, code: int | None, output: str, timeout: float, log: Path) -> None:
    if code is None:
        raise Failed(f"stopped after {timeout:.0f} s (see {log.name})")
    if code != 0:
        tail = [line for line in output.strip().splitlines() if line.strip()][-1:] or [""]
        raise Failed(f"{name} exited with code {code}: {tail[0][:200]} (see {log.name})")


PYTEST_COUNT = re.compile(r"(\d+) (passed|failed|skipped|deselected|xfailed|xpassed|errors?)\b")


def pytest_counts(output: str) -> dict[str, int]:
    """The counts of pytest's last summary line ("3 failed, 70 passed, 6 skipped in 80.1s")."""
    for line in reversed(output.strip().splitlines()):
        found = PYTEST_COUNT.findall(line)
        if found and " in " in line:
            counts = {kind if kind != "error" else "errors": int(n) for n, kind in found}
            return counts
    return {}


@check("pytest-cuda", "the CUDA test suite: python -m pytest -m cuda tests/", gpu=True, full=True)
def check_pytest_cuda(env: Env) -> tuple[str, dict[str, Any]]:
    tests = ROOT / "tests"
    if not tests.is_dir():
        raise Failed(f"no tests/ folder in {ROOT} (an installed copy, not a checkout)")
    if importlib.util.find_spec("pytest") is None:
        raise Failed("pytest is not installed; pip install -e '.[dev]'")
    log = env.file("pytest-cuda.log")
    log.unlink(missing_ok=True)
    timeout = env.timeout(FULL_TIMEOUTS["pytest-cuda"])
    # tests/test_selftest.py's GPU test repeats the GPU checks that this run has just done
    code, output = run_command([sys.executable, "-m", "pytest", "-m", "cuda", str(tests), "-q",
                                "-rfE", "-p", "no:cacheprovider",
                                f"--ignore={tests / 'test_selftest.py'}"], log, timeout)
    counts = pytest_counts(output)
    data = {"exit_code": code, "counts": counts, "log": str(log)}
    summary = ", ".join(f"{n} {kind}" for kind, n in counts.items()) or "no summary line"
    if code is None:
        raise Failed(f"stopped after {timeout:.0f} s ({summary} so far; see {log.name})", data)
    if code != 0 or counts.get("failed") or counts.get("errors"):
        failed = [ln.split(" ", 2)[1] for ln in output.splitlines()
                  if ln.startswith(("FAILED ", "ERROR "))]
        data["failed"] = failed
        raise Failed(f"exit code {code}: {summary}; first: {failed[0] if failed else '-'} "
                     f"(see {log.name})", data)
    return f"{summary} (log: {log.name})", data


def _json_line(line: str) -> dict | None:
    """The object a benchmark printed on ``line``, or None for its other output."""
    if not line.startswith("{"):
        return None
    try:
        found = json.loads(line)
    except ValueError:
        return None
    return found if isinstance(found, dict) else None


def _bench_device(env: Env) -> str:
    return "cuda" if env.gpus else "cpu"


@check("bench-kernels", "python -m app bench kernels (the paper's shape on a GPU)", full=True)
def check_bench_kernels(env: Env) -> tuple[str, dict[str, Any]]:
    log, timeout = env.file("bench.log"), env.timeout(FULL_TIMEOUTS["bench-kernels"])
    code, output = run_command(_app("bench", "kernels", "--json", "--device", _bench_device(env)),
                               log, timeout, header="bench kernels")
    _finished("bench kernels", code, output, timeout, log)
    reports = [r for r in map(_json_line, output.splitlines()) if r and "dtype" in r]
    if not reports:
        raise Failed(f"bench kernels printed no report (see {log.name})")
    env.file("bench-kernels.json").write_text(json.dumps(reports, indent=2))
    parts = []
    for r in reports:
        fwd = r["results"]["selu_family, fixed λ"]["forward"]
        fb = r["ratios"]["trainable_fwd_bwd_vs_selu"]
        parts.append(f"{r['dtype']} forward {fwd['pct_copy']:.0f}% of copy "
                     f"({r['copy_GBps']:,.0f} GB/s), trainable fwd+bwd {fb:.3f}× F.selu")
    shape = reports[0]["shape"]
    return f"{shape}: " + "; ".join(parts) + " (bench-kernels.json)", {"reports": reports}


@check("bench-loader", "python -m app bench loader (FFCV vs torchvision)", full=True)
def check_bench_loader(env: Env) -> tuple[str, dict[str, Any]]:
    log, timeout = env.file("bench.log"), env.timeout(FULL_TIMEOUTS["bench-loader"])
    code, output = run_command(_app("bench", "loader", "--device", _bench_device(env)), log,
                               timeout, header="bench loader")
    _finished("bench loader", code, output, timeout, log)
    results = [r for r in map(_json_line, output.splitlines()) if r and r.get("bench") == "loader"]
    if not results:
        raise Failed(f"bench loader printed no result line (see {log.name})")
    data = results[-1]
    env.file("bench-loader.json").write_text(json.dumps(data, indent=2))
    rates = data["images_per_s"]
    ratio = rates["ffcv"] / rates["torchvision"]
    return (f"{data['device']}, {data['workers']} workers, {data['resolution']} px: FFCV "
            f"{rates['ffcv']:,.0f} images/s, torchvision {rates['torchvision']:,.0f}: "
            f"{ratio:.2f}× (bench-loader.json)"), data


@check("bench-train", "python -m app bench train with its defaults", full=True)
def check_bench_train(env: Env) -> tuple[str, dict[str, Any]]:
    log, timeout = env.file("bench.log"), env.timeout(FULL_TIMEOUTS["bench-train"])
    result = env.file("bench-train.json")
    result.unlink(missing_ok=True)
    code, output = run_command(_app("bench", "train", "--device", _bench_device(env), "--json",
                                    str(result)), log, timeout, header="bench train")
    _finished("bench train", code, output, timeout, log)
    data = json.loads(result.read_text())
    rate = {(r["config"], r["mode"]): r["images_per_s"] for r in data["results"]}
    parts = [f"{mode}: sSELU {rate[('sselu', mode)]:,.0f} images/s = "
             f"{rate[('sselu', mode)] / rate[('bn_relu', mode)]:.2f}× BN+ReLU"
             for mode in dict.fromkeys(m for _, m in rate) if ('bn_relu', mode) in rate]
    s = data["settings"]
    precision = "fp32" if s["precision"] == "32" else s["precision"]
    return (f"{s['image_size']} px, batch {s['batch_size']}, {precision}: "
            + "; ".join(parts) + " (bench-train.json)"), data


# ---- selection, running, reporting ------------------------------------------------------------

def select(only: str | None, full: bool) -> tuple[list[Check], set[str]]:
    """The checks to run, in their order, and the names the user gave one by one."""
    if only is None:
        return [c for c in CHECKS.values() if full or not c.full], set()
    names = [s.strip() for s in only.split(",") if s.strip()]
    groups = {c.group for c in CHECKS.values()}
    bad = [n for n in names if n not in CHECKS and n not in groups]
    if bad or not names:
        raise UserError(f"--only {only!r} names {', '.join(map(repr, bad)) or 'nothing'}; choose "
                        f"from: {', '.join(CHECKS)} (or a group: "
                        f"{', '.join(sorted(groups - set(CHECKS)))})")
    chosen = {c.name for c in CHECKS.values() if c.name in names or c.group in names}
    return [c for c in CHECKS.values() if c.name in chosen], set(names) & set(CHECKS)


def skip_reason(c: Check, env: Env, named: set[str]) -> str | None:
    if c.gpu and not env.gpus:
        return env.gpu_note
    if c.cpu_only and env.gpus and c.name not in named:
        return f"a GPU is visible: {c.group}-cuda covers it (name {c.name} in --only to run it)"
    if env.deadline is not None and time.monotonic() >= env.deadline:
        return "not started: the --budget was spent"
    return None


def _free_gpu_memory() -> None:
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.empty_cache()  # the next check (or its subprocess) gets the memory


def run_check(c: Check, env: Env, named: set[str]) -> Result:
    reason = skip_reason(c, env, named)
    if reason:
        return Result(c.name, SKIP, 0.0, reason)
    start = time.perf_counter()
    data: dict[str, Any] = {}
    try:
        # whatever a check prints goes to stderr: stdout carries the table or the JSON
        with contextlib.redirect_stdout(sys.stderr):
            detail, data = c.run(env)
        status = PASS
    except Skipped as why:
        status, detail = SKIP, str(why)
    except Failed as err:
        status, detail, data = FAIL, err.detail, err.data
    except Exception as err:  # noqa: BLE001 (one failing check must not stop the others)
        status, detail, data = FAIL, one_line(err), {"traceback": traceback.format_exc()}
    finally:
        _free_gpu_memory()
    return Result(c.name, status, round(time.perf_counter() - start, 2), detail, data)


def make_env(args: argparse.Namespace, scratch: Path) -> Env:
    import warnings

    import torch

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus:
        names = [g["name"] for g in gpu_list()]
        note = ", ".join(f"{names.count(n)}× {n}" for n in dict.fromkeys(names))
    elif torch.version.cuda is None:
        note = "no CUDA GPU: this torch is a CPU build"
    elif caught:
        note = f"no CUDA GPU visible ({str(caught[0].message).strip().splitlines()[0]})"
    elif os.environ.get("CUDA_VISIBLE_DEVICES") is not None:
        note = f"no CUDA GPU visible (CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']!r})"
    else:
        note = "no CUDA GPU visible"
    deadline = time.monotonic() + args.budget if args.budget else None
    return Env(gpus=gpus, gpu_note=note, scratch=scratch, out=args.out, full=args.full,
               deadline=deadline)


def machine(env: Env) -> str:
    import torch

    return (f"torch {torch.__version__} on {platform.node() or 'this host'}: {os.cpu_count()} CPU "
            f"cores, {env.gpu_note}")


def report(results: list[Result], env: Env, started: str, seconds: float) -> dict[str, Any]:
    counts = {s: sum(r.status == s for r in results) for s in (PASS, FAIL, SKIP)}
    return {"selftest": "selfnorm", "started": started, "seconds": round(seconds, 1),
            "machine": machine(env), "gpus": env.gpus, "full": env.full,
            "passed": counts[FAIL] == 0, "counts": counts,
            "checks": [asdict(r) for r in results]}


def merged(previous: Path, current: dict[str, Any]) -> dict[str, Any]:
    """``current``'s checks in place of those of the same names in the report at ``previous``,
    the others kept (marked with the run they come from), so a rerun with --only completes it."""
    try:
        old = json.loads(previous.read_text())
        old_checks = list(old["checks"])
    except (OSError, ValueError, KeyError, TypeError):
        return current
    new = {c["name"]: c for c in current["checks"]}
    checks = []
    for c in old_checks:
        if c.get("name") in new:
            checks.append(new.pop(c["name"]))
        else:
            checks.append({**c, "from_run": c.get("from_run", old.get("started"))})
    checks += new.values()
    counts = {s: sum(c.get("status") == s for c in checks) for s in (PASS, FAIL, SKIP)}
    return {**current, "checks": checks, "counts": counts, "passed": counts[FAIL] == 0}


def markdown(rep: dict[str, Any]) -> str:
    lines = [f"# selftest, {rep['started']}", "", rep["machine"] + ".", "",
             f"{rep['counts'][PASS]} passed, {rep['counts'][FAIL]} failed, "
             f"{rep['counts'][SKIP]} skipped{' (with --full)' if rep['full'] else ''}.", "",
             "| check | status | seconds | detail |", "|---|---|---|---|"]
    for c in rep["checks"]:
        detail = c["detail"].replace("|", "\\|")
        if c.get("from_run"):
            detail += f" *(from the run of {c['from_run']})*"
        lines.append(f"| {c['name']} | {c['status']} | {c['seconds']:.1f} | {detail} |")
    lines += ["", "## Data", ""]
    for c in rep["checks"]:
        if c.get("data"):
            lines += [f"### {c['name']}", "", "```json", json.dumps(c["data"], indent=1,
                                                                     default=str), "```", ""]
    return "\n".join(lines)


def write_report(out: Path, rep: dict[str, Any], merge: bool) -> None:
    if merge:
        rep = merged(out / REPORT_JSON, rep)
    for name, text in ((REPORT_JSON, json.dumps(rep, indent=1, default=str)),
                       (REPORT_MD, markdown(rep))):
        tmp = out / f".{name}.partial"
        tmp.write_text(text)
        tmp.replace(out / name)  # a run stopped mid-write leaves the previous report whole


ROW = "{:<14} {:<6} {:>8}  {}"


def print_row(r: Result) -> None:
    print(ROW.format(r.name, r.status, f"{r.seconds:.1f}", r.detail), flush=True)


def summary(results: list[Result], env: Env, seconds: float) -> str:
    counts = {s: sum(r.status == s for r in results) for s in (PASS, FAIL, SKIP)}
    line = (f"{counts[PASS]} passed, {counts[FAIL]} failed, {counts[SKIP]} skipped in "
            f"{seconds:.1f} s")
    if not env.gpus and any(CHECKS[r.name].gpu for r in results):
        line += f"; GPU checks skipped: {env.gpu_note}"
    return line


def rerun_hint(results: list[Result], args: argparse.Namespace) -> str | None:
    failed = [r.name for r in results if r.status == FAIL]
    if not failed:
        return None
    extra = (" --full" if args.full else "") + (f" --out {args.out}" if args.out else "")
    return f"rerun the failed checks: python -m app selftest{extra} --only {','.join(failed)}"


def _parser() -> argparse.ArgumentParser:
    names = "\n".join(f"  {c.name:<14} {c.help}" + (" (--full)" if c.full else "")
                      for c in CHECKS.values())
    p = argparse.ArgumentParser(prog="python -m app selftest", description=__doc__,
                                epilog=f"checks:\n{names}",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true",
                   help="also the CUDA test suite and the full benchmarks (about 8 minutes on "
                        "one H200)")
    p.add_argument("--only", metavar="NAME[,NAME]",
                   help="run only these checks or groups (op, loader, ddp, kernels, train, "
                        "full); with --out, merged into the report there")
    p.add_argument("--out", type=Path, metavar="DIR",
                   help="write report.md, report.json and the full runs' outputs here")
    p.add_argument("--json", action="store_true", help="print one JSON object, not the table")
    p.add_argument("--budget", type=float, metavar="SECONDS",
                   help="checks not started after this many seconds are skipped, and the full "
                        "runs stop at it")
    return p


@contextlib.contextmanager
def _sigterm_stops() -> Iterator[None]:
    """SIGTERM raises Stopped here, so the check in progress stops its processes and the report
    is written, instead of Python dying on the spot with its subprocesses left running."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _scratch() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="selfnorm-selftest-") as tmp:
        yield Path(tmp)


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    checks, named = select(args.only, args.full)
    if args.budget is not None and args.budget <= 0:
        raise UserError(f"--budget {args.budget:g} must be a positive number of seconds")
    if args.out is not None:
        check_output_folder(args.out, "--out")
        try:
            args.out.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UserError(f"cannot create --out {args.out} ({err.strerror or err}); choose a "
                            f"writable folder") from None
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    t0 = time.perf_counter()
    stopped = None
    with _scratch() as scratch, _sigterm_stops():
        env = make_env(args, scratch)
        if not args.json:
            print(f"selftest: {machine(env)}")
            print(ROW.format("check", "status", "seconds", "detail"), flush=True)
        results: list[Result] = []
        for c in checks:
            begun = time.perf_counter()
            try:
                results.append(run_check(c, env, named))
            except Stopped as sig:
                stopped = sig
                results.append(Result(c.name, FAIL, round(time.perf_counter() - begun, 2),
                                      f"stopped by {sig} while running"))
            if not args.json:
                print_row(results[-1])
            if args.out is not None:  # after every check: a run stopped later keeps these
                write_report(args.out, report(results, env, started, time.perf_counter() - t0),
                             merge=args.only is not None)
            if stopped:
                break
    seconds = time.perf_counter() - t0
    if args.json:
        print(json.dumps(report(results, env, started, seconds), default=str))
    else:
        print(summary(results, env, seconds))
        hint = rerun_hint(results, args)
        if hint:
            print(hint)
        if args.out is not None:
            print(f"report: {args.out / REPORT_MD}")
    if stopped:
        return 128 + signal.SIGTERM
    return 1 if any(r.status == FAIL for r in results) else 0
