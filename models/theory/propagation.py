"""Mean-field propagation of E[h²] and ‖∂L/∂W‖_F through a network's layers (numpy only).

The theory (paper Appendix A, Proposition 3.1), layer by layer in depth order, where the link
from layer l−1 to layer l is one activation f (``models.theory``):

* forward: q_l = v_l·E[f(√q_{l−1}·z)²] with v_l = fan_in·E[W_l²] (1 under the paper's
  N(0, 1/fan_in) init); the first layer, or one reached through anything else (pooling, a
  norm layer), starts from its measured input: q_l = v_l·E[x_l²].
* backward: ‖∂L/∂W_l‖²_F = ‖∂L/∂W_{l+1}‖²_F·(1 + δ_{q_l})·fan_in_l·v_{l+1}/(fan_in_{l+1}·v_l),
  i.e. the (1 + δ_q) growth per layer of Prop. 3.1 (the shape factor is 1 between equal
  layers), anchored at the measured value of the deepest layer of each chain.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from models import theory
from models.theory.moments import SeluFamily


def propagate(fan_in: np.ndarray, v: np.ndarray, links: Sequence[SeluFamily | None],
              input_h2: np.ndarray, grad_w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Predicted E[h²] and ‖∂L/∂W‖_F per layer (module docstring).

    ``fan_in[l]`` and ``v[l] = fan_in·E[W_l²]`` describe layer l; ``links[l]`` is the f between
    layers l−1 and l (None: the chain restarts from the measured ``input_h2[l]``); ``grad_w``
    holds the measured gradient norms that anchor each chain's backward recursion.
    """
    n = len(links)
    q = np.empty(n)
    for i, f in enumerate(links):
        q[i] = v[i] * (input_h2[i] if f is None else float(theory.second_moment(f, q[i - 1])))
    g = np.full(n, math.nan)
    above = grad_w[n - 1]  # layer i+1's value: its prediction, or its measurement at an anchor
    for i in range(n - 2, -1, -1):
        f = links[i + 1]
        if f is None:
            above = grad_w[i]  # nothing deeper predicts layer i: it anchors a new chain
            continue
        growth = (float(theory.one_plus_delta_q(f, q[i]))
                  * fan_in[i] * v[i + 1] / (fan_in[i + 1] * v[i]))
        above = g[i] = above * math.sqrt(growth)
    return q, g
