"""One DDP step (gloo on the CPU, NCCL across the GPUs) with the compiled op's trainable λ."""
from __future__ import annotations

import datetime
import time
from typing import Any

from app.selftest.core import Env, Failed, check
from app.selftest.procs import spawn


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
