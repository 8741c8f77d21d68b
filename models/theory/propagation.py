"""Mean-field propagation of E[h²] and ‖∂L/∂W‖_F through a network's layers (numpy only).

The theory (paper Appendix A, Proposition 3.1), layer by layer in depth order, where the link
from layer l−1 to layer l is one activation f (``models.theory``):

* forward: q_l = v_l·E[f(√q_{l−1}·z)²] with v_l = fan_in·E[W_l²] (1 under the paper's
  N(0, 1/fan_in) init); the first layer, or one reached through anything else (pooling, a
  norm layer), starts from its measured input: q_l = v_l·E[x_l²].
* backward: ‖∂L/∂W_l‖²_F = ‖∂L/∂W_{l+1}‖²_F·(1 + δ_{q_l})·fan_in_l·v_{l+1}/(fan_in_{l+1}·v_l),
  i.e. the (1 + δ_q) growth per layer of Prop. 3.1 (the shape factor is 1 between equal
  layers), anchored at the measured value of the deepest layer of each chain.

``propagate`` is that recursion on one number per layer. It treats a convolution as a dense
layer of fan-in C_in·k·k, which is exact only where every window lies inside the feature map:
zero padding feeds zeros into the windows at the border, so on small maps E[h²] falls well
below the fixed point (to about half on the 8×8 maps of the 56-layer CNN) although every
interior position is self-normalized. ``propagate_spatial`` is the same mean-field theory on a
map q_l(u) of E[h²] per output position u (the spatial second-moment field), since weights are
independent of the inputs and of each other:

* forward: q_l(u) = v_l·(1/K)·Σ_o m_{l−1}(s·u + d·o − p), the mean over the K kernel offsets
  o of the input's E[x²] at the position the offset reads, zero where it reads padding
  (``window_mean``), with m_{l−1} = E[f(√q_{l−1}·z)²] taken position by position, or the
  measured map at a chain start. A dense layer reads every position alike: q_l = v_l·mean(m).
* backward: with g_l(u) = E[(∂L/∂h_l(u))²], g_l = φ(q_l)·v_{l+1}·(C_{l+1}/C_l)·Aᵀ[g_{l+1}],
  where Aᵀ is the adjoint of layer l+1's window mean (``window_mean_adjoint``: positions near
  a zero border are read by fewer windows, so padding lowers the gradient there as well), and
  ‖∂L/∂W_l‖²_F ∝ (C_l·fan_in_l/v_l)·Σ_u g_l(u)·q_l(u). Terms of different positions are taken
  as uncorrelated (the usual gradient-independence assumption); with uniform maps, i.e. no
  padding, this reduces to ``propagate``'s (1 + δ_q) rule. Each chain's deepest layer anchors
  it at its measurement, with a uniform g map there (a global pool spreads the gradient evenly).
  That assumption is weakest next to a global pool, whose gradient is the same at every
  position of a channel, so the positions' terms add up coherently: over the last eight convs
  of the 56-layer CNN the measured per-sample ‖∂L/∂W‖ hardly grows toward the input, where
  both recursions grow it by √(1 + δ_q) per layer (the padding-aware one less so).
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from models import theory
from models.theory.moments import SeluFamily


def propagate(fan_in: np.ndarray, v: np.ndarray, links: Sequence[SeluFamily | None],
              input_h2: np.ndarray, grad_w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Predicted E[h²] and ‖∂L/∂W‖_F per layer, ignoring padding (module docstring).

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


# ---- the spatial theory -----------------------------------------------------------------------

# torch's padding modes as numpy.pad modes of an index vector (zeros: no source position)
_PAD_MODES = {"reflect": "reflect", "replicate": "edge", "circular": "wrap"}


@dataclass(frozen=True)
class ConvGeometry:
    """Where a convolution's outputs read its input: per spatial axis (torch's conventions)."""

    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    padding: tuple[tuple[int, int], ...]  # (before, after)
    in_size: tuple[int, ...]
    padding_mode: str = "zeros"           # or "reflect", "replicate", "circular"

    @property
    def out_size(self) -> tuple[int, ...]:
        return tuple((n + a + b - d * (k - 1) - 1) // s + 1 for n, (a, b), k, s, d
                     in zip(self.in_size, self.padding, self.kernel, self.stride, self.dilation))

    def _sources(self) -> tuple[list[np.ndarray], np.ndarray]:
        """Per axis, the input index each padded position copies (clipped), and the mask of
        padded positions that hold a real input (False: a zero)."""
        idx = []
        for n, (a, b) in zip(self.in_size, self.padding):
            if self.padding_mode == "zeros":
                idx.append(np.pad(np.arange(n), (a, b), constant_values=-1))
            else:
                idx.append(np.pad(np.arange(n), (a, b), mode=_PAD_MODES[self.padding_mode]))
        mask = np.ones((), dtype=bool)
        for i in idx:
            mask = np.multiply.outer(mask, i >= 0)
        return [np.maximum(i, 0) for i in idx], mask

    def _windows(self) -> list[tuple[slice, ...]]:
        """The padded input's slice that each kernel offset reads, one per offset."""
        out = self.out_size
        return [tuple(slice(d * o, d * o + s * (m - 1) + 1, s)
                      for o, d, s, m in zip(offset, self.dilation, self.stride, out))
                for offset in itertools.product(*(range(k) for k in self.kernel))]


def window_mean(m: np.ndarray, geom: ConvGeometry) -> np.ndarray:
    """Per output position, the mean of ``m`` (a per-position input map) over the kernel's
    offsets, reading 0 at zero padding and the copied position at other padding modes."""
    idx, mask = geom._sources()
    padded = np.where(mask, np.asarray(m, dtype=float)[np.ix_(*idx)], 0.0)
    windows = geom._windows()
    return sum(padded[w] for w in windows) / len(windows)


def window_mean_adjoint(r: np.ndarray, geom: ConvGeometry) -> np.ndarray:
    """The adjoint of ``window_mean``: ⟨window_mean(m), r⟩ = ⟨m, window_mean_adjoint(r)⟩."""
    idx, mask = geom._sources()
    padded = np.zeros(mask.shape)
    windows = geom._windows()
    for w in windows:
        padded[w] += r
    out = np.zeros(geom.in_size)
    np.add.at(out, np.ix_(*idx), np.where(mask, padded, 0.0))
    return out / len(windows)


def propagate_spatial(fan_in: np.ndarray, v: np.ndarray, channels: np.ndarray,
                      links: Sequence[SeluFamily | None],
                      geometry: Sequence[ConvGeometry | None],
                      input_maps: Sequence[np.ndarray], grad_w: np.ndarray
                      ) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """Predicted E[h²] (the mean over output positions) and ‖∂L/∂W‖_F per layer from the
    spatial recursion (module docstring), and the predicted E[h²] map of each layer.

    As ``propagate``, plus: ``channels[l]``, layer l's output channels (features of a dense
    layer); ``geometry[l]``, the layer's ``ConvGeometry`` (None: dense, every input position
    alike, one output position); ``input_maps[l]``, the measured E[x²] per position of layer l's
    input, used where its chain starts. An input map whose shape differs from the geometry's
    (something between the layers reshaped it) is replaced by its mean, evenly spread.
    """
    n = len(links)
    maps: list[np.ndarray] = []
    for i, (f, geom) in enumerate(zip(links, geometry)):
        x2 = (np.asarray(input_maps[i], dtype=float) if f is None
              else np.asarray(theory.second_moment(f, maps[i - 1]), dtype=float))
        if geom is None:
            maps.append(np.asarray(v[i] * x2.mean()))
            continue
        if x2.shape != geom.in_size:
            x2 = np.full(geom.in_size, x2.mean())
        maps.append(v[i] * window_mean(x2, geom))
    q = np.array([float(m.mean()) for m in maps])

    def energy(i: int, r: np.ndarray) -> float:  # ‖∂L/∂W_i‖²_F up to the chain's scale
        return channels[i] * fan_in[i] / v[i] * float((r * maps[i]).sum())

    g = np.full(n, math.nan)
    r, scale = np.ones(()), 1.0  # layer i+1's g map and the chain's scale
    for i in range(n - 1, -1, -1):
        f = links[i + 1] if i + 1 < n else None
        if f is None:  # nothing deeper predicts layer i: it anchors a new chain
            r = np.ones(maps[i].shape)
            scale = grad_w[i] ** 2 / energy(i, r)
            continue
        geom = geometry[i + 1]
        back = (np.full(maps[i].shape, float(r) / maps[i].size) if geom is None
                else window_mean_adjoint(r, geom))
        if back.shape != maps[i].shape:
            back = np.full(maps[i].shape, back.sum() / maps[i].size)
        r = (np.asarray(theory.phi(f, maps[i])) * v[i + 1] * channels[i + 1] / channels[i]
             * back)
        g[i] = math.sqrt(scale * energy(i, r))
    return q, g, maps
