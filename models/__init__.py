"""selfnorm models: theory and solver (numpy/scipy only), activations, layers, architectures.

Attributes are imported lazily so that ``python -m app solve`` never pays for importing torch.
"""
from __future__ import annotations

import importlib
from typing import Any

# public name -> submodule that defines it
_LAZY = {
    "solve": "models.solver",
    "Solution": "models.solver",
    "SolverError": "models.solver",
    "SeluFamily": "models.theory",
    "selu_family": "models.functional",
    "create_act": "models.activations",
    "list_acts": "models.activations",
    "create_model": "models.registry",
    "list_models": "models.registry",
    "register_model": "models.registry",
    "get_act_layer": "models.activations",
    "WCConv2d": "models.layers",
    "WCLinear": "models.layers",
    "ImageClassifier": "models.module",
    "TabularClassifier": "models.module",
    "Mixup": "models.mixup",
    "NormalizationMonitor": "models.monitor",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'models' has no attribute {name!r}")
