"""The SELU family in plain torch: the single source of truth of the activation math.

Every activation of the paper is one function of four parameters,

    f(x) = λ·x                      for x > 0
    f(x) = λ·(α·e^{βx} + κ·x − α)   for x ≤ 0

ReLU (α = κ = 0), SELU and dSELU (β = 1, κ = 0), sSELU (eq. 9: κ = 0) and lSELU (eq. 10:
β = 1). The paper writes both new activations with a "β": sSELU's β scales the exponent and is
β here; lSELU's β is a negative slope and is κ here. Everything else in the project (the
compiled kernels, the closed forms of ``models.theory``, the solver) uses these four names.

The compiled op (``cuda_ops.selu_family``) is tested against this reference, and this reference
against an independent quadrature of the same formula (``tests/test_theory.py``).
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
    """Reference f'(x) (the derivative the backward kernels compute)."""
    neg = alpha * beta * torch.exp(beta * torch.where(x > 0, torch.zeros_like(x), x)) + kappa
    return lam * torch.where(x > 0, torch.ones_like(x), neg)
