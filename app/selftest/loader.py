"""The FFCV pipeline's checks on a small generated .beton: batches, images/s and, on a GPU, no
CUDA context on the other GPUs."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from app.selftest.core import Env, Failed, check
from app.selftest.procs import spawn
from app.selftest.versions import nvidia_smi


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
    rows = nvidia_smi("--query-compute-apps=pid,gpu_uuid")
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
