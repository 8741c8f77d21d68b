"""Per-layer statistics of a model: which layers, E[h²] and E[h] of their outputs, ‖∂L/∂W‖_F.

Shared by the training-time ``NormalizationMonitor``, the ``DivergenceGuard`` and ``diagnose``.
"""
from __future__ import annotations

import fnmatch
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from models.errors import ModelError

# The layers Figure 4 looks at; WCConv2d / WCLinear subclass these, so they are included.
LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
KINDS = ("h2", "mean", "grad_w")  # the columns of every statistics array, in this order


def select_layers(model: nn.Module, patterns: str | Sequence[str] | None = None
                  ) -> list[tuple[str, nn.Module]]:
    """The conv/linear layers of ``model`` in depth (registration) order, as (name, module).

    Names drop the prefix every layer shares (``model.`` inside a LightningModule). ``patterns``
    (fnmatch, e.g. ``"stages.*.conv"``) keeps the layers whose short or full name matches one.
    """
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, LAYER_TYPES)]
    if not found:
        raise ModelError(f"{type(model).__name__} has no conv or linear layer to monitor; "
                         f"monitor a model built from nn.Conv*d / nn.Linear layers.")
    prefix = _common_prefix([name for name, _ in found])
    layers = [(name[len(prefix):], name, m) for name, m in found]
    if patterns is not None:
        pats = [patterns] if isinstance(patterns, str) else list(patterns)
        layers = [x for x in layers
                  if any(fnmatch.fnmatchcase(n, p) for p in pats for n in x[:2])]
        if not layers:
            shown = ", ".join(name for name, _ in found[:6])
            raise ModelError(f"layer pattern(s) {pats!r} match no conv/linear layer; use fnmatch "
                             f"patterns over names like: {shown}.")
    return [(short, m) for short, _, m in layers]


def _common_prefix(names: list[str]) -> str:
    """The longest shared dotted prefix (ending in '.') that leaves every name non-empty."""
    if len(names) < 2:
        return ""
    parts = [n.split(".") for n in names]
    shared = 0
    while all(len(p) > shared + 1 for p in parts) and len({p[shared] for p in parts}) == 1:
        shared += 1
    return "".join(p + "." for p in parts[0][:shared])


def activation_label(model: nn.Module) -> str:
    """The activations in ``model`` for figure titles, e.g. ``sselu (central), ε = 0.06``."""
    labels: list[str] = []
    for m in model.modules():
        if hasattr(m, "family") and hasattr(m, "eps"):  # the SELU-family modules
            label = m.name + (" (central)" if getattr(m, "central", False) else "")
            if m.eps is not None:
                label += f", ε = {m.eps:g}"
        elif isinstance(m, (nn.ReLU, nn.SELU, nn.ELU, nn.LeakyReLU, nn.GELU, nn.SiLU)):
            label = type(m).__name__.lower()
        else:
            continue
        if label not in labels:
            labels.append(label)
    return "; ".join(labels) or "no known activation"


class LayerStats:
    """Forward hooks that accumulate Σh², Σh and the element count of each layer's output.

    Everything accumulates in place in one float32 tensor on the layers' device, so a hook
    never syncs. Hooks run eagerly: dynamo does not replay their effects from a cached graph,
    so inside a ``torch.compile``-d model a logging step breaks the graph at each monitored
    layer, while every other step runs the hook-free compiled graph (one more compile each).
    Calls in eval mode are ignored. ``inputs=True`` also records the layer input's Σx², Σx
    and count (``app diagnose`` starts the theory from a layer's input).
    """

    def __init__(self, layers: Sequence[tuple[str, nn.Module]], inputs: bool = False) -> None:
        self.layers = list(layers)
        self.inputs = inputs
        self._handles: list[Any] = []
        self._acc: Tensor | None = None  # [layers, (Σh², Σh, n_h[, Σx², Σx, n_x])]
        # one hook object per layer, reused on every attach (stable identity for torch.compile)
        self._hooks = [self._make_hook(i) for i in range(len(self.layers))]

    @property
    def device(self) -> torch.device:
        return self.layers[0][1].weight.device

    def reset(self) -> None:
        if self._acc is not None:
            self._acc.zero_()

    def attach(self) -> None:
        if self._acc is None or self._acc.device != self.device:
            self._acc = torch.zeros(len(self.layers), 6 if self.inputs else 3,
                                    device=self.device)
        if not self._handles:
            self._handles = [m.register_forward_hook(hook)
                             for (_, m), hook in zip(self.layers, self._hooks)]

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _make_hook(self, i: int):
        @torch.compiler.disable  # eager even inside a compiled model (class docstring)
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            if module.training:
                self._add(self._acc[i, :3], output)
                if self.inputs:
                    self._add(self._acc[i, 3:], args[0])
        return hook

    @staticmethod
    def _add(acc: Tensor, t: Tensor) -> None:
        t = t.detach()
        acc[:2] += torch.stack([torch.linalg.vector_norm(t, dtype=torch.float32).square(),
                                t.sum(dtype=torch.float32)])
        acc[2] += t.numel()

    def moments(self) -> Tensor:
        """[layers, 3 or 6] float32 on the device: E[h²], E[h], count of h (, E[x²], E[x],
        count of x); the means are NaN for a layer that did not run."""
        assert self._acc is not None, "attach() first"
        acc = self._acc.clone()
        for k in range(0, acc.shape[1], 3):
            acc[:, k:k + 2] /= acc[:, k + 2:k + 3]
        return acc


def grad_norms(layers: Sequence[tuple[str, nn.Module]], device: torch.device) -> Tensor:
    """‖∂L/∂W‖_F of each layer's weight as a float32 vector on ``device`` (0 where no grad)."""
    norms = [torch.linalg.vector_norm(m.weight.grad, dtype=torch.float32).to(device)
             if m.weight.grad is not None else torch.zeros((), device=device)
             for _, m in layers]
    return torch.stack(norms)
