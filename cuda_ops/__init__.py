"""The SELU-family activation as one op: ``cuda_ops.selu_family(x, lam, alpha, beta, kappa)``.

Temporary face: routes to the Python reference until the compiled op lands.
"""
from __future__ import annotations

from models.functional import selu_family

__all__ = ["selu_family"]
