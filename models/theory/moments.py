"""Mean-field theory of the SELU family: closed forms for every quantity the paper uses.

f is the family of ``cuda_ops.reference`` (λ, α, β, κ; its docstring maps them to the paper's
names). For z ~ N(0, 1) every integral below has a closed form in the normal CDF Φ. They are
written with the scaled tail ``M(x) = e^{x²/2}·Φ(−x)`` (``erfcx``), which never overflows,
because E[e^{cz}; z ≤ 0] = M(c) and e^{x²/2}·φ_N(x) = 1/√(2π).

Only numpy/scipy here: ``python -m app solve`` imports this without torch.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import erfcx, ndtr

ArrayLike = float | np.ndarray

INV_SQRT_2PI = 1.0 / np.sqrt(2.0 * np.pi)


def mills(x: ArrayLike) -> ArrayLike:
    """M(x) = e^{x²/2}·Φ(−x), stable for large |x|."""
    return 0.5 * erfcx(np.asarray(x) / np.sqrt(2.0))


def mills_prime(x: ArrayLike) -> ArrayLike:
    """dM/dx = x·M(x) − 1/√(2π)."""
    return np.asarray(x) * mills(x) - INV_SQRT_2PI


@dataclass(frozen=True)
class SeluFamily:
    """Parameters (λ, α, β, κ) of f. Fields broadcast, so arrays describe many activations."""

    lam: ArrayLike
    alpha: ArrayLike
    beta: ArrayLike = 1.0
    kappa: ArrayLike = 0.0


def mean(f: SeluFamily, q: ArrayLike = 1.0) -> ArrayLike:
    """E[f(√q·z)] for z ~ N(0, 1)."""
    s = np.sqrt(q)
    b, k = f.beta * s, f.kappa * s
    return f.lam * ((s - k) * INV_SQRT_2PI + f.alpha * (mills(b) - 0.5))


def second_moment(f: SeluFamily, q: ArrayLike = 1.0) -> ArrayLike:
    """E[f(√q·z)²]; eq. 4/5's second constraint at q = 1."""
    s = np.sqrt(q)
    b, k = f.beta * s, f.kappa * s
    a = f.alpha
    neg = (a * a * (mills(2 * b) + 0.5 - 2 * mills(b))   # E[(α e^{bz} − α)²; z ≤ 0]
           + 0.5 * k * k                                 # E[(kz)²; z ≤ 0]
           + 2 * a * k * b * mills(b))                   # cross term, E[z e^{bz}; z≤0] + 1/√(2π)
    return f.lam ** 2 * (0.5 * q + neg)


def phi(f: SeluFamily, q: ArrayLike = 1.0) -> ArrayLike:
    """φ(q) = E[f'(√q·z)²] (eq. 6): the second moment of the activation's Jacobian."""
    b = f.beta * np.sqrt(q)
    ab = f.alpha * f.beta
    return f.lam ** 2 * (0.5 + ab * ab * mills(2 * b) + 2 * ab * f.kappa * mills(b)
                         + 0.5 * f.kappa ** 2)


def dphi_dq(f: SeluFamily, q: ArrayLike = 1.0) -> ArrayLike:
    """dφ/dq, from d/db of phi's terms and db/dq = β/(2√q)."""
    b = f.beta * np.sqrt(q)
    ab = f.alpha * f.beta
    dphi_db = f.lam ** 2 * (2 * ab * ab * mills_prime(2 * b) + 2 * ab * f.kappa * mills_prime(b))
    return dphi_db * f.beta / (2 * np.sqrt(q))


def one_plus_delta_q(f: SeluFamily, q: ArrayLike) -> ArrayLike:
    """1 + δ_q = q·φ(q) / E[f(√q·z)²] (eq. 2 / eq. 38): the per-layer gradient growth rate."""
    return q * phi(f, q) / second_moment(f, q)


def gamma_q1(f: SeluFamily) -> ArrayLike:
    """γ_{q=1} = |dφ/dq(1) + 1| (Proposition 3.1): smaller means stronger self-normalization."""
    return np.abs(dphi_dq(f, 1.0) + 1.0)


def output_mean(f: SeluFamily, mu: ArrayLike, var: ArrayLike) -> ArrayLike:
    """E[f(x)] for x ~ N(μ, σ²) (eq. 12; Figure 3 plots its absolute value)."""
    sigma = np.sqrt(var)
    t = np.asarray(mu) / sigma
    pdf = np.exp(-0.5 * t * t) * INV_SQRT_2PI
    pos = mu * ndtr(t) + sigma * pdf                           # E[x; x > 0]
    neg_lin = mu * ndtr(-t) - sigma * pdf                      # E[x; x ≤ 0]
    neg_exp = mills(t + f.beta * sigma) * np.exp(-0.5 * t * t)  # E[e^{βx}; x ≤ 0]
    return f.lam * (pos + f.alpha * neg_exp + f.kappa * neg_lin - f.alpha * ndtr(-t))
