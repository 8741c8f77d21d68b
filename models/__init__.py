"""selfnorm models, in four layers that import downward only:

* ``models.theory``: closed forms, the ε solver, mean-field propagation (numpy/scipy, no torch);
* ``models.layers``: activations (the registry), weight-centralized layers, norms, dropout;
* ``models.archs``: the architecture registry and the architectures;
* ``models.training``: the LightningModules and callbacks (mixup, monitoring, the divergence
  guard) and ``diagnose``.

Attributes are imported lazily, so ``python -m app solve`` never pays for importing torch.
"""
from __future__ import annotations

import importlib
from typing import Any

# public name -> submodule that defines it
_LAZY = {
    "ModelError": "models.errors",
    "TrainingDiverged": "models.errors",
    "solve": "models.theory.solver",
    "Solution": "models.theory.solver",
    "SolverError": "models.theory.solver",
    "SeluFamily": "models.theory.moments",
    "create_act": "models.layers.activations",
    "list_acts": "models.layers.activations",
    "get_act_layer": "models.layers.activations",
    "WCConv2d": "models.layers.centralized",
    "WCLinear": "models.layers.centralized",
    "create_model": "models.archs.registry",
    "list_models": "models.archs.registry",
    "register_model": "models.archs.registry",
    "ImageClassifier": "models.training.module",
    "TabularClassifier": "models.training.module",
    "Mixup": "models.training.mixup",
    "NormalizationMonitor": "models.training.monitor",
    "DivergenceGuard": "models.training.guard",
    "diagnose": "models.training.diagnose",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'models' has no attribute {name!r}")
