"""Activation registry: relu, selu, dselu, sselu (eq. 9), lselu (eq. 10), built by name.

``create_act("sselu", eps=0.06, central=True)`` solves λ, α, β from ε with ``models.theory.solver``
(cached) and returns one module; ``get_act_layer(...)`` returns the factory that architectures
take as ``act_layer`` (one module, hence one trainable λ, per activation site). Architectures
never branch on activation names.

Parameters are those of ``cuda_ops.reference`` (λ, α, β, κ). Explicit ``lam=``/``alpha=``/
``beta=``/``kappa=`` override the solver; when every free parameter of a family is given, no ε
is needed.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

import cuda_ops
from models.errors import ModelError
from models import theory
from models.theory.solver import solve

ActLayer = Callable[[], nn.Module]


@dataclass(frozen=True)
class _Family:
    """Which of (lam, alpha, beta, kappa) a named activation may set; the rest are fixed."""

    fixed: dict[str, float]
    equation: str


# Fixed parameters per family: a user value for one of these would change the activation's kind.
_SELU_FAMILY: dict[str, _Family] = {
    "selu": _Family({"beta": 1.0, "kappa": 0.0}, "eq. 4"),
    "dselu": _Family({"beta": 1.0, "kappa": 0.0}, "eq. 5"),
    "sselu": _Family({"kappa": 0.0}, "eq. 9"),
    "lselu": _Family({"beta": 1.0}, "eq. 10"),
}
_PARAMS = ("lam", "alpha", "beta", "kappa")


class SeluFamilyAct(nn.Module):
    """f(x) = λx (x > 0), λ(α e^{βx} + κx − α) (x ≤ 0) by the compiled ``selu_family`` op.

    ``trainable_lambda`` makes λ an ``nn.Parameter`` (initialised from the solution, saved in
    the state dict); α, β, κ stay constants so the kernel takes them as scalars.
    """

    def __init__(self, name: str, lam: float, alpha: float, beta: float = 1.0,
                 kappa: float = 0.0, eps: float | None = None, central: bool = False,
                 trainable_lambda: bool = False) -> None:
        super().__init__()
        self.name, self.eps, self.central = name, eps, central
        self.alpha, self.beta, self.kappa = float(alpha), float(beta), float(kappa)
        if trainable_lambda:
            self.lam: Tensor | float = nn.Parameter(torch.tensor(float(lam)))
        else:
            self.lam = float(lam)

    @property
    def trainable_lambda(self) -> bool:
        return isinstance(self.lam, nn.Parameter)

    @property
    def lam_value(self) -> float:
        """λ as a float (the parameter's current value when trainable)."""
        return float(self.lam.detach()) if isinstance(self.lam, Tensor) else self.lam

    def family(self) -> theory.SeluFamily:
        """The current parameters as the theory's ``SeluFamily``."""
        return theory.SeluFamily(self.lam_value, self.alpha, self.beta, self.kappa)

    def forward(self, x: Tensor) -> Tensor:
        return cuda_ops.selu_family(x, self.lam, self.alpha, self.beta, self.kappa)

    def extra_repr(self) -> str:
        eps = "none" if self.eps is None else f"{self.eps:g}"
        lam = f"{self.lam_value:.4f}" + (" (trainable)" if self.trainable_lambda else "")
        return (f"{self.name}{' (central)' if self.central else ''}, lam={lam}, "
                f"alpha={self.alpha:.4f}, beta={self.beta:.4f}, kappa={self.kappa:.4f}, eps={eps}")


def _relu(eps: float | None, central: bool, trainable_lambda: bool, lambda_min: float,
          **params: float) -> nn.Module:
    # ReLU's scale is BatchNorm's job, or the init's without a norm (He: N(0, 2/fan_in), which is
    # the solver's λ = √2 put in the weights), so there is nothing to solve or train here.
    solve("relu", eps, central=central)  # the solver's one-sentence errors for eps / central
    if trainable_lambda or params:
        given = ["trainable_lambda"] * trainable_lambda + sorted(params)
        raise ModelError(f"relu has no λ, α, β or κ to set or train (got {', '.join(given)}); "
                         f"drop them, or use selu/dselu/sselu/lselu.")
    # Not in place: forward hooks (app diagnose) keep the conv output that ReLU would overwrite.
    return nn.ReLU()


def _selu_family(name: str, eps: float | None, central: bool, trainable_lambda: bool,
                 lambda_min: float, **params: float) -> nn.Module:
    fam = _SELU_FAMILY[name]
    for key, value in params.items():
        if not (isinstance(value, (int, float)) and math.isfinite(value)):
            raise ModelError(f"{key} must be a finite number, got {value!r}.")
        if key in fam.fixed and value != fam.fixed[key]:
            raise ModelError(f"{name} ({fam.equation}) fixes {key}={fam.fixed[key]:g}, got "
                             f"{key}={value!r}; drop {key}, or pick the activation that frees it.")
    free = [p for p in _PARAMS if p not in fam.fixed]
    if eps is None and all(p in params for p in free):
        if central:
            raise ModelError(f"central=True solves {name}'s parameters for E[f] = 0, but all of "
                             f"{', '.join(free)} were given; drop central or one of them.")
        values = {**fam.fixed, **params}
    else:
        sol = solve(name, eps, central=central, lambda_min=lambda_min)
        values = {"lam": sol.lam, "alpha": sol.alpha, "beta": sol.beta, "kappa": sol.kappa,
                  **params}
        eps = sol.eps
    if values["lam"] <= 0:
        raise ModelError(f"lam must be positive, got {values['lam']!r}.")
    return SeluFamilyAct(name, eps=eps, central=central, trainable_lambda=trainable_lambda,
                         **values)


_ACTS: dict[str, Callable[..., nn.Module]] = {
    "relu": _relu,
    **{name: functools.partial(_selu_family, name) for name in _SELU_FAMILY},
}


def list_acts() -> list[str]:
    """Registered activation names."""
    return sorted(_ACTS)


def create_act(name: str, eps: float | None = None, central: bool = False,
               trainable_lambda: bool = False, lambda_min: float = 1.0,
               **params: float) -> nn.Module:
    """Build one activation module; parameters from ``solve(name, eps, central, lambda_min)``.

    ``params`` (``lam``, ``alpha``, ``beta``, ``kappa``) override the solved values.
    """
    key = str(name).lower()
    if key not in _ACTS:
        raise ModelError(f"unknown activation {name!r}; choose one of: {', '.join(list_acts())}.")
    unknown = set(params) - set(_PARAMS)
    if unknown:
        raise ModelError(f"unknown activation parameter(s) {', '.join(sorted(unknown))}; "
                         f"the parameters are: {', '.join(_PARAMS)}.")
    return _ACTS[key](eps=eps, central=bool(central), trainable_lambda=bool(trainable_lambda),
                      lambda_min=float(lambda_min), **params)


def get_act_layer(name: str | ActLayer, eps: float | None = None, central: bool = False,
                  trainable_lambda: bool = False, lambda_min: float = 1.0,
                  **params: float) -> ActLayer:
    """The ``act_layer`` factory for architectures: each call builds a fresh module.

    A callable passes through unchanged (timm's ``get_act_layer``). The first module is built
    here, so a bad name or an infeasible ε fails before any model is constructed.
    """
    if callable(name):
        return name
    create_act(name, eps, central, trainable_lambda, lambda_min, **params)
    return functools.partial(create_act, name, eps, central, trainable_lambda, lambda_min,
                             **params)
