"""The ``versions`` check: the stack (torch, CUDA, cuDNN, NCCL, driver, GPUs, lightning, ffcv)."""
from __future__ import annotations

import importlib
import importlib.metadata
import os
import platform
import shutil
import subprocess
from typing import Any

from app.selftest.core import Env, Failed, check, one_line


def nvidia_smi(*query: str) -> list[list[str]] | None:
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
    smi = nvidia_smi("--query-gpu=name,driver_version,uuid")
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
