"""The SELU family as one compiled op: ``cuda_ops.selu_family(x, lam, alpha, beta, kappa)``.

f and its parameters are defined once, in ``cuda_ops.reference`` (the Python reference the
kernels are tested against). ``lam`` is a float or a one-element tensor; a trainable one gets its
gradient from the backward kernel (paper, Appendix B). The op is ``torch.ops.selfnorm.selu_family``,
with CPU and CUDA kernels, autograd and fake kernels, so ``torch.compile(fullgraph=True)`` traces
it without breaks. This package imports nothing else of the project.

Importing it loads the compiled library, building it first if this machine never built this
version (``python -m cuda_ops build`` does that ahead of time). A backend that could not be built
(no compiler, no nvcc) runs the reference instead, announced by one warning at import; tensors on
other devices (meta, mps, ...) always use the reference. ``python -m cuda_ops info`` shows what
runs where.
"""
from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

from cuda_ops.build import Status, ensure
from cuda_ops import reference

__all__ = ["selu_family", "reference", "status", "info"]  # reference: the module

status: Status = ensure()
if status.cpu == "compiled":
    import cuda_ops.ops  # noqa: F401  (registers autograd and fake kernels)
if status.fallbacks:
    warnings.warn(f"cuda_ops: the compiled SELU-family op is unavailable for "
                  f"{' and '.join(status.fallbacks)} tensors ({status.reason}); they use the "
                  f"slower Python reference. `python -m cuda_ops info` shows details.",
                  RuntimeWarning, stacklevel=2)

# Device types whose tensors run the compiled kernels.
_COMPILED = frozenset(d for d, s in (("cpu", status.cpu), ("cuda", status.cuda))
                      if s == "compiled")


def selu_family(x: Tensor, lam: float | Tensor, alpha: float, beta: float = 1.0,
                kappa: float = 0.0) -> Tensor:
    """f(x) with the compiled op where it is built, else the Python reference (same math)."""
    if x.device.type not in _COMPILED:
        return reference.selu_family(x, lam, alpha, beta, kappa)
    if not isinstance(lam, Tensor):
        # A CPU scalar: the kernels read it on the host, with no copy to the GPU.
        lam = torch.tensor(float(lam), dtype=torch.float64)
    return torch.ops.selfnorm.selu_family(x, lam, float(alpha), float(beta), float(kappa))


def info() -> dict[str, Any]:
    """Which backends run compiled kernels, and the build they come from."""
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    cpu_kernel = torch.ops.selfnorm.cpu_variant() if status.cpu == "compiled" else None
    return {"cpu": status.cpu, "cuda": status.cuda, "cpu_kernel": cpu_kernel,
            "cuda_arch_list": status.cuda_arch_list, "gpu": gpu, "torch": torch.__version__,
            "library": status.library, "reason": status.reason}
