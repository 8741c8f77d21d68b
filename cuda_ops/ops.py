"""Python face of ``torch.ops.selfnorm``: fake kernels for torch.compile and autograd.

Imported by ``cuda_ops`` once the compiled library is loaded. The backward is itself a
registered op (three of them: grad_x, grad_x and dL/dlam, dL/dlam only), so autograd,
torch.compile and AOT tracing all see kernels, never Python math, and no kernel computes a
gradient nobody asked for.
"""
from __future__ import annotations

import torch
from torch import Tensor

_ops = torch.ops.selfnorm


@torch.library.register_fake("selfnorm::selu_family")
def _(x: Tensor, lam: Tensor, alpha: float, beta: float, kappa: float) -> Tensor:
    return torch.empty_like(x)


@torch.library.register_fake("selfnorm::selu_family_backward")
def _(grad: Tensor, x: Tensor, lam: Tensor, alpha: float, beta: float, kappa: float) -> Tensor:
    return torch.empty_like(x)


@torch.library.register_fake("selfnorm::selu_family_backward_lam")
def _(grad: Tensor, x: Tensor, lam: Tensor, alpha: float, beta: float,
      kappa: float) -> tuple[Tensor, Tensor]:
    return torch.empty_like(x), torch.empty_like(lam)


@torch.library.register_fake("selfnorm::selu_family_backward_lam_only")
def _(grad: Tensor, x: Tensor, lam: Tensor, alpha: float, beta: float, kappa: float) -> Tensor:
    return torch.empty_like(lam)


@torch.library.register_fake("selfnorm::_fast_expm1")
def _(t: Tensor) -> Tensor:
    return torch.empty_like(t, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs: tuple, output: Tensor) -> None:
    x, lam, alpha, beta, kappa = inputs
    ctx.save_for_backward(x, lam)
    ctx.coeffs = (alpha, beta, kappa)


def _backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
    x, lam = ctx.saved_tensors
    need_x, need_lam = ctx.needs_input_grad[:2]
    grad_x = grad_lam = None
    if need_x and need_lam:
        grad_x, grad_lam = _ops.selu_family_backward_lam(grad, x, lam, *ctx.coeffs)
    elif need_lam:
        grad_lam = _ops.selu_family_backward_lam_only(grad, x, lam, *ctx.coeffs)
    elif need_x:
        grad_x = _ops.selu_family_backward(grad, x, lam, *ctx.coeffs)
    return grad_x, grad_lam, None, None, None


torch.library.register_autograd("selfnorm::selu_family", _backward, setup_context=_setup_context)


def _no_double_backward(ctx, *grads: Tensor) -> tuple[Tensor | None, ...]:
    raise RuntimeError("cuda_ops.selu_family has no double backward; use the Python reference "
                       "cuda_ops.reference.selu_family where second derivatives are needed")


# Registered so that create_graph=True fails loudly instead of silently dropping the second-order
# terms (without a formula, autograd would treat the backward ops as constants).
for _name in ("selu_family_backward", "selu_family_backward_lam",
              "selu_family_backward_lam_only"):
    torch.library.register_autograd(f"selfnorm::{_name}", _no_double_backward)
