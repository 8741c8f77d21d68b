"""Solve an activation's parameters from ε (paper section 4: eq. 11, eq. 13; Table 5).

Every activation reduces to a one-parameter curve of (λ, α, β, κ) on which the equality
constraints hold in closed form; the solver then works in one dimension:

* sselu, eq. 11: along β, E[f²] = 1 and φ(1) = 1 + ε fix α² and λ; minimise γ_{q=1}.
* lselu, eq. 11: along λ, φ(1) − E[f²] = λ²α²(2M(1) − ½) fixes α, a quadratic fixes κ
  (four sign branches); minimise γ_{q=1}.
* central (eq. 13): E[f] = 0 and E[f²] = 1 fix the curve (along β for sselu, along α for
  lselu); φ(1) = 1 + ε becomes a root-finding problem.
* selu (eq. 4) and dselu (eq. 5) have closed-form solutions.

Each curve is scanned on a dense grid (the multi-start: every local minimum or root bracket is a
start), then polished with bounded Brent / brentq. That is deterministic, global within the box,
and fast (all of Table 5 in milliseconds).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
from scipy.optimize import brentq, minimize_scalar

from models.errors import ModelError
from models import theory
from models.theory.moments import SeluFamily, mills

ACTIVATIONS = ("relu", "selu", "dselu", "sselu", "lselu")
EPS_RANGE = "the paper uses ε between 0.01 and 0.07; any ε in (0, 0.2] solves for sselu/lselu"

# c = φ(1) − E[f²] per unit λ²α² when β = 1 (selu, dselu, lselu): only the negative side differs.
_C1 = 2.0 * float(mills(1.0)) - 0.5
_D1 = float(mills(2.0)) + 0.5 - 2.0 * float(mills(1.0))  # E[(e^z − 1)²; z ≤ 0]
_M1, _M2 = float(mills(1.0)), float(mills(2.0))
_SQRT_2PI = math.sqrt(2.0 * math.pi)
_GRID = 4001


class SolverError(ModelError):
    """An infeasible or malformed request: the message says why and which range works."""


@dataclass(frozen=True)
class Solution:
    """Solved parameters of f and what they achieve at the fixed point q = 1."""

    activation: str
    eps: float            # φ(1) − 1 achieved (the request; SELU's own for selu)
    central: bool
    lam: float
    alpha: float
    beta: float           # exponent scale β of e^{βx} (1 for selu/dselu/lselu)
    kappa: float          # negative slope κ (lselu's paper-β; 0 otherwise)
    gamma: float          # γ_{q=1} = |dφ/dq(1) + 1|
    phi1: float           # φ(1)
    second_moment: float  # E[f(z)²]
    mean: float           # E[f(z)]
    lambda_min: float

    @property
    def family(self) -> SeluFamily:
        return SeluFamily(self.lam, self.alpha, self.beta, self.kappa)

    @property
    def paper_beta(self) -> float | None:
        """The paper's β: the exponent scale for sselu, the slope for lselu, none otherwise."""
        return {"sselu": self.beta, "lselu": self.kappa}.get(self.activation)

    def to_json(self) -> dict:
        return {"activation": self.activation, "eps": self.eps, "central": self.central,
                "lambda": self.lam, "alpha": self.alpha, "beta": self.paper_beta,
                "gamma": self.gamma, "phi1": self.phi1, "second_moment": self.second_moment,
                "mean": self.mean}


# --------------------------------------------------------------------------------------------
# The one-parameter curves. Each maps a grid t to SeluFamily arrays (NaN where undefined).

Curve = Callable[[np.ndarray], SeluFamily]


def _sselu_curve(eps: float) -> Curve:
    """κ = 0; from E[f²] = 1 and φ(1) = 1 + ε, w = 1/λ² and α² are rational in M(β), M(2β)."""
    def curve(beta: np.ndarray) -> SeluFamily:
        p = beta * beta * mills(2 * beta)         # φ's α²β²-coefficient
        d = mills(2 * beta) + 0.5 - 2 * mills(beta)  # E[f²]'s α²-coefficient
        with np.errstate(divide="ignore", invalid="ignore"):
            w = (p - d) / (2 * (p - (1 + eps) * d))
            alpha2 = (w - 0.5) / d
            ok = (w > 0) & (alpha2 > 0)
            lam = np.where(ok, 1 / np.sqrt(np.where(ok, w, 1.0)), np.nan)
            alpha = np.where(ok, np.sqrt(np.where(ok, alpha2, 1.0)), np.nan)
        return SeluFamily(lam, alpha, beta, 0.0)
    return curve


def _lselu_curve(eps: float, sign_alpha: float, sign_root: float) -> Curve:
    """β = 1; α² = ε/(λ²c) from φ(1) − E[f²] = ε, then E[f²] = 1 is quadratic in κ."""
    def curve(lam: np.ndarray) -> SeluFamily:
        alpha = sign_alpha * np.sqrt(eps / (lam * lam * _C1))
        # κ²/2 + 2αM(1)κ + α²D(1) + ½ − 1/λ² = 0
        b = 2 * alpha * _M1
        disc = b * b - 2 * (alpha * alpha * _D1 + 0.5 - 1 / (lam * lam))
        with np.errstate(invalid="ignore"):
            kappa = np.where(disc >= 0, -b + sign_root * np.sqrt(disc), np.nan)
        return SeluFamily(lam, alpha, 1.0, kappa)
    return curve


def _sselu_central_curve(beta: np.ndarray) -> SeluFamily:
    """κ = 0; E[f] = 0 fixes α(β), then E[f²] = 1 fixes λ(β)."""
    alpha = 1 / (_SQRT_2PI * (0.5 - mills(beta)))
    lam = 1 / np.sqrt(0.5 + alpha * alpha * (mills(2 * beta) + 0.5 - 2 * mills(beta)))
    return SeluFamily(lam, alpha, beta, 0.0)


def _lselu_central_curve(alpha: np.ndarray) -> SeluFamily:
    """β = 1; E[f] = 0 fixes κ(α), then E[f²] = 1 fixes λ(α)."""
    kappa = 1 + _SQRT_2PI * alpha * (_M1 - 0.5)
    s = 0.5 + alpha * alpha * _D1 + 0.5 * kappa * kappa + 2 * alpha * kappa * _M1
    with np.errstate(invalid="ignore", divide="ignore"):
        lam = np.where(s > 0, 1 / np.sqrt(np.abs(s)), np.nan)
    return SeluFamily(lam, alpha, 1.0, kappa)


# --------------------------------------------------------------------------------------------
# One-dimensional global search along a curve.

def _at(curve: Curve, t: float) -> SeluFamily:
    f = curve(np.array([t]))
    return SeluFamily(*(float(np.asarray(v).ravel()[0]) for v in
                        (f.lam, f.alpha, f.beta, f.kappa)))


def _feasible(f: SeluFamily, lambda_min: float) -> np.ndarray:
    lam = np.asarray(f.lam)
    ok = np.isfinite(lam) & np.isfinite(np.asarray(f.alpha) * np.ones_like(lam))
    ok &= np.isfinite(np.asarray(f.kappa) * np.ones_like(lam))
    return ok & (np.nan_to_num(lam, nan=-np.inf) >= lambda_min)


def _minimise_gamma(curve: Curve, lo: float, hi: float,
                    lambda_min: float) -> tuple[float, float] | None:
    """Global minimum of γ_{q=1} along the feasible part of the curve: (γ, t) or None."""
    t = np.linspace(lo, hi, _GRID)
    f = curve(t)
    ok = _feasible(f, lambda_min)
    if not ok.any():
        return None
    g = np.where(ok, theory.gamma_q1(f), np.inf)
    gam = lambda x: float(theory.gamma_q1(_at(curve, x)))  # noqa: E731
    best: tuple[float, float] | None = None
    for i in np.flatnonzero(ok):
        left_ok, right_ok = i > 0 and ok[i - 1], i + 1 < len(t) and ok[i + 1]
        cands = []
        if left_ok and right_ok and g[i] <= g[i - 1] and g[i] <= g[i + 1]:
            r = minimize_scalar(gam, bounds=(t[i - 1], t[i + 1]), method="bounded",
                                options={"xatol": 1e-13})
            cands.append(float(r.x))
        for j, side_ok in ((i - 1, left_ok), (i + 1, right_ok)):
            if 0 <= j < len(t) and not side_ok:  # edge of the feasible set: λ = λ_min or domain end
                cands.append(_edge(curve, t[i], t[j], lambda_min))
        if i in (0, len(t) - 1):
            cands.append(float(t[i]))
        for x in cands:
            gx = gam(x)
            if best is None or gx < best[0] - 1e-15:
                best = (gx, x)
    return best


def _edge(curve: Curve, t_in: float, t_out: float, lambda_min: float) -> float:
    """The boundary point between a feasible and an infeasible grid point, to machine precision."""
    def lam(x: float) -> float:
        return _at(curve, x).lam

    if _feasible(curve(np.array([t_out])), 0.0)[0]:  # out only because λ < λ_min: a smooth root
        x = float(brentq(lambda x: lam(x) - lambda_min, t_in, t_out, xtol=1e-15, rtol=1e-15))
        step = math.copysign(1e-15 * max(1.0, abs(x)), t_in - x)
        while lam(x) < lambda_min:  # land on the feasible side of the root, not a hair outside
            x, step = x + step, 2 * step
        return x
    for _ in range(60):  # the curve itself ends (α² < 0, no real κ): bisect on feasibility
        mid = 0.5 * (t_in + t_out)
        if _feasible(curve(np.array([mid])), lambda_min)[0]:
            t_in = mid
        else:
            t_out = mid
    return t_in


def _roots(curve: Curve, lo: float, hi: float, eps: float, lambda_min: float) -> list[float]:
    """All t where φ(1) = 1 + ε on the feasible part of the curve."""
    t = np.linspace(lo, hi, _GRID)
    f = curve(t)
    ok = _feasible(f, lambda_min)
    r = np.where(ok, theory.phi(f) - 1 - eps, np.nan)
    resid = lambda x: float(theory.phi(_at(curve, x))) - 1 - eps  # noqa: E731
    idx = np.flatnonzero(ok[:-1] & ok[1:] & (np.sign(r[:-1]) != np.sign(r[1:])))
    return [float(brentq(resid, t[i], t[i + 1], xtol=1e-15, rtol=1e-15)) for i in idx]


# --------------------------------------------------------------------------------------------
# Per-activation solvers (registry: name -> function(eps, central, lambda_min) -> SeluFamily).

def _solve_relu(eps, central, lambda_min) -> SeluFamily | None:
    # He et al.: λ = √2 gives E[f²] = 1; φ(q) ≡ 1 so ε = 0 and there is nothing to tune.
    return SeluFamily(math.sqrt(2.0), 0.0, 1.0, 0.0)


def _solve_selu(eps, central, lambda_min) -> SeluFamily | None:
    # Klambauer's fixed point (eq. 4): E[f] = 0, E[f²] = 1.
    alpha = 1 / (_SQRT_2PI * (0.5 - _M1))
    lam = 1 / math.sqrt(0.5 + alpha * alpha * _D1)
    return SeluFamily(lam, alpha, 1.0, 0.0)


def _solve_dselu(eps, central, lambda_min) -> SeluFamily | None:
    # eq. 5: φ(1) − E[f²] = λ²α²c = ε and E[f²] = λ²(½ + α²D) = 1.
    u = eps / _C1
    lam2 = 2 * (1 - u * _D1)
    if lam2 <= 0:
        return None
    lam = math.sqrt(lam2)
    return SeluFamily(lam, math.sqrt(u) / lam, 1.0, 0.0)


_BETA_BOX = (1e-4, 8.0)     # sselu's exponent scale
_LAM_SPAN = 4.0             # lselu's λ searched on [λ_min, λ_min + span]
_ALPHA_BOX = (-12.0, 12.0)  # central lselu's α


def _solve_sselu(eps, central, lambda_min) -> SeluFamily | None:
    if central:
        roots = _roots(_sselu_central_curve, *_BETA_BOX, eps, lambda_min)
        cands = [_at(_sselu_central_curve, b) for b in roots]
    else:
        curve = _sselu_curve(eps)
        best = _minimise_gamma(curve, *_BETA_BOX, lambda_min)
        cands = [] if best is None else [_at(curve, best[1])]
    return _best(cands)


def _solve_lselu(eps, central, lambda_min) -> SeluFamily | None:
    cands = []
    if central:
        for root in _roots(_lselu_central_curve, *_ALPHA_BOX, eps, lambda_min):
            cands.append(_at(_lselu_central_curve, root))
    else:
        lo, hi = lambda_min, lambda_min + _LAM_SPAN
        for sa in (1.0, -1.0):
            for sr in (1.0, -1.0):
                curve = _lselu_curve(eps, sa, sr)
                best = _minimise_gamma(curve, lo, hi, lambda_min)
                if best is not None:
                    cands.append(_at(curve, best[1]))
    return _best(cands)


def _best(cands: list[SeluFamily]) -> SeluFamily | None:
    if not cands:
        return None
    return min(cands, key=lambda f: float(theory.gamma_q1(f)))


# name -> function(eps, central, lambda_min) -> SeluFamily, or None where nothing is feasible
_SOLVERS: dict[str, Callable[[float | None, bool, float], SeluFamily | None]] = {
    "relu": _solve_relu, "selu": _solve_selu, "dselu": _solve_dselu,
    "sselu": _solve_sselu, "lselu": _solve_lselu,
}
_NEEDS_EPS = {"dselu", "sselu", "lselu"}
_CAN_CENTRAL = {"selu", "sselu", "lselu"}  # SELU is zero-mean by construction
_LAMBDA_FREE = {"sselu", "lselu"}  # only these have a free parameter that λ_min constrains


# --------------------------------------------------------------------------------------------

def _describe(name: str, central: bool, lambda_min: float) -> str:
    bound = f" with λ ≥ {lambda_min:g}" if name in _LAMBDA_FREE else ""
    return f"{name}{' (central)' if central else ''}{bound}"


@functools.lru_cache(maxsize=None)
def feasible_eps_range(activation: str, central: bool = False,
                       lambda_min: float = 1.0) -> tuple[float, float] | None:
    """The (lowest, highest) ε on a 0.001 grid in (0, 1] that solves, or None (error path only)."""
    good = [float(e) for e in np.round(np.arange(0.001, 1.0005, 0.001), 6)
            if _SOLVERS[activation](float(e), central, lambda_min) is not None]
    return (good[0], good[-1]) if good else None


def _infeasible(name, eps, central, lambda_min) -> SolverError:
    rng = feasible_eps_range(name, central, lambda_min)
    where = (f"ε in about [{rng[0]:g}, {rng[1]:g}] solves" if rng
             else "no ε solves; lower lambda_min")
    return SolverError(f"{_describe(name, central, lambda_min)} has no solution at ε={eps:g}; "
                       f"{where}.")


def _validate(activation: str, eps: float | None, central: bool, lambda_min: float) -> str:
    name = str(activation).lower()
    if name not in _SOLVERS:
        raise SolverError(f"unknown activation {activation!r}; choose one of: "
                          f"{', '.join(ACTIVATIONS)}.")
    if name in _NEEDS_EPS:
        if eps is None:
            raise SolverError(f"{name} needs ε (eps); {EPS_RANGE}.")
        if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
            raise SolverError(f"ε must be a positive number, got {eps!r}; {EPS_RANGE}.")
    elif eps is not None:
        raise SolverError(f"{name} has no free ε (its parameters are fixed); drop eps, or use "
                          f"dselu/sselu/lselu for ε={eps!r}.")
    if central and name not in _CAN_CENTRAL:
        raise SolverError(f"{name} cannot be centralized (it has no parameter left for E[f]=0); "
                          f"use sselu or lselu with central=True.")
    if not (math.isfinite(lambda_min) and lambda_min > 0):
        raise SolverError(f"lambda_min must be positive, got {lambda_min!r}; the paper uses 1.0.")
    return name


@functools.lru_cache(maxsize=1024)
def _solve_cached(name: str, eps: float | None, central: bool, lambda_min: float) -> Solution:
    f = _SOLVERS[name](eps, central, lambda_min)
    if f is None:
        raise _infeasible(name, eps, central, lambda_min)
    phi1 = float(theory.phi(f))
    sol = Solution(activation=name, eps=phi1 - 1 if eps is None else float(eps),
                   central=central, lam=float(f.lam), alpha=float(f.alpha), beta=float(f.beta),
                   kappa=float(f.kappa), gamma=float(theory.gamma_q1(f)), phi1=phi1,
                   second_moment=float(theory.second_moment(f)), mean=float(theory.mean(f)),
                   lambda_min=lambda_min)
    # The constraints are exact by construction; a violation is a solver bug, never user input.
    assert abs(sol.second_moment - 1) < 1e-9, sol
    assert name not in _NEEDS_EPS or abs(sol.phi1 - 1 - sol.eps) < 1e-9, sol
    assert not central or abs(sol.mean) < 1e-9, sol
    return sol


def solve(activation: str, eps: float | None = None, central: bool = False,
          lambda_min: float = 1.0) -> Solution:
    """Parameters of ``activation`` for a given ε (eq. 11; eq. 13 with ``central``), cached.

    relu and selu take no ε: relu is λ = √2 (E[f²] = 1), selu is Klambauer's fixed point.
    dselu is Chen et al.'s two equations (``lambda_min`` does not apply: nothing is free).
    """
    name = _validate(activation, eps, bool(central), float(lambda_min))
    return _solve_cached(name, None if eps is None else float(eps), bool(central),
                         float(lambda_min))


# The paper's Table 5 (printed to two decimals): (section, activation, ε, central, λ, |α|, β, γ).
TABLE5: tuple[tuple, ...] = (
    ("56-layer CNN", "selu", None, False, 1.05, 1.67, None, 0.806),
    ("56-layer CNN", "dselu", 0.01, False, 1.37, 0.48, None, 0.973),
    ("56-layer CNN", "dselu", 0.017, False, 1.34, 0.64, None, 0.954),
    ("56-layer CNN", "dselu", 0.03, False, 1.27, 0.89, None, 0.919),
    ("56-layer CNN", "dselu", 0.05, False, 1.17, 1.25, None, 0.865),
    ("56-layer CNN", "dselu", 0.07, False, 1.06, 1.64, None, 0.810),
    ("56-layer CNN", "sselu", 0.01, False, 1.00, 4.09, 0.31, 0.905),
    ("56-layer CNN", "sselu", 0.017, False, 1.00, 3.28, 0.41, 0.881),
    ("56-layer CNN", "sselu", 0.03, False, 1.02, 2.46, 0.58, 0.855),
    ("56-layer CNN", "sselu", 0.05, False, 1.00, 2.17, 0.75, 0.819),
    ("56-layer CNN", "sselu", 0.07, False, 1.06, 1.94, 0.92, 0.794),
    ("56-layer CNN", "lselu", 0.01, False, 1.00, 0.66, 0.65, 0.914),
    ("56-layer CNN", "lselu", 0.017, False, 1.00, 0.86, 0.55, 0.890),
    ("56-layer CNN", "lselu", 0.03, False, 1.00, 1.14, 0.39, 0.857),
    ("56-layer CNN", "lselu", 0.05, False, 1.00, 1.47, 0.21, 0.821),
    ("56-layer CNN", "lselu", 0.07, False, 1.00, 1.74, 0.07, 0.794),
    ("MobileNet V1", "selu", None, False, 1.05, 1.67, None, 0.806),
    ("MobileNet V1", "dselu", 0.06, False, 1.12, 1.44, None, 0.837),
    ("MobileNet V1", "sselu", 0.06, False, 1.00, 2.04, 0.84, 0.805),
    ("MobileNet V1", "lselu", 0.06, False, 1.00, 1.61, 0.14, 0.807),
    ("MobileNet V1", "sselu", 0.06, True, 1.05, 1.79, 0.89, 0.817),
    ("MobileNet V1", "lselu", 0.06, True, 1.05, 1.54, 0.08, 0.818),
)
