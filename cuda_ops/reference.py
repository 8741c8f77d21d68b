"""The Python reference of the SELU family: the single source of truth for the activation math.

f(x) = λ·x                      for x > 0
f(x) = λ·(α·e^{βx} + κ·x − α)   for x ≤ 0

covers ReLU (α = κ = 0), SELU / dSELU (β = 1, κ = 0), sSELU (eq. 9: κ = 0) and lSELU (eq. 10:
β = 1, the paper's β is κ here). The compiled op in ``cuda_ops`` is tested against this.
"""
from __future__ import annotations

import torch
from torch import Tensor


def selu_family(x: Tensor, lam: float | Tensor, alpha: float, beta: float = 1.0,
                kappa: float = 0.0) -> Tensor:
    """Reference f(x); differentiable in ``x`` and in ``lam`` when it is a tensor."""
    # expm1 keeps α·(e^{βx} − 1) accurate for small |x|; zeroing the positive side keeps e^{βx}
    # finite on the discarded branch (so torch.where's gradient never sees inf·0) while x = 0
    # itself keeps the left derivative λ(αβ + κ), as the kernels do.
    xn = torch.where(x > 0, torch.zeros_like(x), x)
    neg = alpha * torch.expm1(beta * xn)
    if kappa != 0:  # skipped at κ = 0 so that x = −inf gives −λα (as F.selu), not 0·(−inf)
        neg = neg + kappa * x
    return lam * torch.where(x > 0, x, neg)


def selu_family_grad(x: Tensor, lam: float | Tensor, alpha: float, beta: float = 1.0,
                     kappa: float = 0.0) -> Tensor:
    """Reference f'(x) (the derivative used by backward kernels and by φ(q) in the theory)."""
    neg = alpha * beta * torch.exp(beta * torch.where(x > 0, torch.zeros_like(x), x)) + kappa
    return lam * torch.where(x > 0, torch.ones_like(x), neg)
