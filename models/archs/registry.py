"""Architecture registry: ``create_model(name, ...)`` is the single door (timm's ``_registry``).

Each architecture lives in its own module and registers a small entry point with
``@register_model``. Entry points take the built pieces (``act_layer``, ``norm``,
``weight_centralization``) plus their own keywords; they never see activation names.
"""
from __future__ import annotations

import importlib
import inspect
from typing import Callable

from torch import nn

from models.errors import ModelError
from models.layers.activations import get_act_layer
from models.layers.norm import NORMS, norm_for

_ARCH_MODULES = ("models.archs.conv_mobilenet_v1", "models.archs.serial_cnn",
                 "models.archs.fc_snn")
_MODELS: dict[str, Callable[..., nn.Module]] = {}
# What every entry point receives from create_model; the rest of its signature is arch_kw.
_COMMON = {"num_classes", "act_layer", "norm", "weight_centralization"}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register ``fn`` under its own name."""
    _MODELS[fn.__name__] = fn
    return fn


def _load() -> None:
    for module in _ARCH_MODULES:
        importlib.import_module(module)


def list_models() -> list[str]:
    """Registered architecture names."""
    _load()
    return sorted(_MODELS)


def arch_kwargs(name: str) -> list[str]:
    """The architecture keywords ``name`` accepts (beyond create_model's common ones)."""
    _load()
    return [p for p in inspect.signature(_MODELS[name]).parameters if p not in _COMMON]


def create_model(name: str, *, num_classes: int, act: str = "sselu", eps: float | None = None,
                 central: bool = False, trainable_lambda: bool = False,
                 weight_centralization: bool = False, norm: str = "none",
                 lambda_min: float = 1.0, **arch_kw) -> nn.Module:
    """Build architecture ``name`` with activation ``act`` (parameters solved from ``eps``).

    ``lambda_min`` is the solver's λ ≥ λ_min constraint (eq. 11; the paper's ablation uses 0.5).
    ``norm`` is ``none`` (self-normalizing init, conv biases; He init for ``relu``) or
    ``batchnorm`` (Kaiming init, no conv biases); ``weight_centralization`` swaps in
    ``WCConv2d`` / ``WCLinear``.
    """
    _load()
    if name not in _MODELS:
        raise ModelError(f"unknown model {name!r}; choose one of: {', '.join(sorted(_MODELS))}.")
    if norm not in NORMS:
        raise ModelError(f"unknown norm {norm!r}; choose one of: {', '.join(NORMS)}.")
    if not (isinstance(num_classes, int) and num_classes >= 1):
        raise ModelError(f"num_classes must be a positive integer, got {num_classes!r}.")
    allowed = arch_kwargs(name)
    unknown = sorted(set(arch_kw) - set(allowed))
    if unknown:
        raise ModelError(f"{name} takes no option(s) {', '.join(unknown)}; its options are: "
                         f"{', '.join(allowed)}.")
    act_layer = get_act_layer(act, eps=eps, central=central, trainable_lambda=trainable_lambda,
                              lambda_min=lambda_min)
    return _MODELS[name](num_classes=num_classes, act_layer=act_layer, norm=norm_for(norm, act),
                         weight_centralization=bool(weight_centralization), **arch_kw)
