"""Normalization at initialisation: measured per-layer statistics beside the mean-field theory.

``diagnose(model, batches)`` runs forward/backward passes at initialisation (no optimizer step)
and measures, per conv/linear layer, E[h²], the mean of h and ‖∂L/∂W‖_F, then predicts the same
with ``models.theory.propagation`` (``python -m app diagnose`` prints and plots the result).

The backward theory is about one sample's gradient: in a batch gradient the samples' terms
partly cancel, so it grows more slowly with depth. Diagnose therefore also measures per-sample
gradients (single-sample passes over the first batch's first few samples; skipped for models
with batch norm, which has no single-sample statistics) and compares the theory with those.
Zero padding lowers E[h²] of convolutions on small feature maps, which the theory ignores.
"""
from __future__ import annotations

import math
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import move_data_to_device
from torch import Tensor, nn

from models.errors import ModelError
from models.theory.moments import SeluFamily
from models.theory.propagation import propagate
from models.training.plot import figure4
from models.training.stats import LayerStats, grad_norms, select_layers

# models.layers.dropout.AlphaDropout and nn.AlphaDropout keep the fixed point's moments by design
_PASS_THROUGH_NAMES = ("Identity", "Flatten", "AlphaDropout")


@dataclass
class Diagnosis:
    """Measured statistics ([batches or samples, layers]) and the theory ([layers])."""

    names: list[str]
    links: list[str]            # the theory's input: the activation from the layer before, or
    #                             "measured" (the layer's measured input restarts the chain)
    h2: np.ndarray
    mean: np.ndarray
    grad_w: np.ndarray          # of each batch's loss
    input_h2: np.ndarray
    grad_w_sample: np.ndarray   # of single samples' losses ([0, layers] when not measured)
    theory_h2: np.ndarray
    theory_grad_w: np.ndarray   # per sample; NaN at each chain's anchor (its measurement)

    def columns(self) -> dict[str, np.ndarray]:
        """Per-layer summary: means over batches, RMS over samples, and the theory."""
        sample = (np.sqrt((self.grad_w_sample ** 2).mean(0)) if len(self.grad_w_sample)
                  else np.full(len(self.names), math.nan))
        return {"h2": self.h2.mean(0), "h2_theory": self.theory_h2,
                "mean": self.mean.mean(0), "grad_w": self.grad_w.mean(0),
                "grad_w_sample": sample, "grad_w_theory": self.theory_grad_w}

    def figure(self, title: str) -> Any:
        """Figure 4 over the batches, with the theory; gradients per sample when measured
        (what the theory predicts), else per batch."""
        per_sample = len(self.grad_w_sample) > 0
        return figure4(self.h2, self.grad_w_sample if per_sample else self.grad_w, self.names,
                       title, self.theory_h2, self.theory_grad_w,
                       grad_label="‖∂L/∂W‖_F per sample" if per_sample else "‖∂L/∂W‖_F",
                       chain_starts=[i for i, link in enumerate(self.links)
                                     if link == "measured"])

    def to_json(self) -> dict:
        cols = self.columns()
        return {"layers": [{"index": i, "name": n, "theory_from": link,
                            **{k: _num(c[i]) for k, c in cols.items()}}
                           for i, (n, link) in enumerate(zip(self.names, self.links))]}


def _fmt(v: float, width: int) -> str:
    return f"{'—':>{width}}" if math.isnan(v) else f"{v:>{width}.4g}"


def _num(v: float) -> float | None:
    return None if math.isnan(v) else float(v)


# ---- measurement ------------------------------------------------------------------------------

def classifier_loss(model: nn.Module, batch: Sequence[Any]) -> Tensor:
    """Cross-entropy of an ``(inputs, labels, ...)`` batch, with the model's own ``loss`` and
    ``batch_mixer`` (mixup) when it has them (the ``models.module`` classifiers do)."""
    x, y = batch[0], batch[1]
    y = y if y.is_floating_point() else y.reshape(-1).long()
    mixer = getattr(model, "batch_mixer", None)
    if mixer is not None:
        x, y = mixer(x, y, model.num_classes)
    logits = model(x)
    loss = getattr(model, "loss", None)
    return loss(logits, y) if callable(loss) else F.cross_entropy(logits.float(), y)


def diagnose(model: nn.Module, batches: Iterable[Any], layers: str | list[str] | None = None,
             step_loss: Callable[[nn.Module, Any], Tensor] = classifier_loss,
             context: Callable[[], AbstractContextManager] = nullcontext,
             per_sample: int = 8) -> Diagnosis:
    """Forward/backward ``model`` on each batch (train mode, no optimizer step), then on the
    first batch's first ``per_sample`` samples alone, and compare every monitored layer with
    the theory. ``context`` wraps each forward (the trainer's autocast)."""
    selected = select_layers(model, layers)
    device = next(model.parameters()).device
    stats = LayerStats(selected, inputs=True)
    trace = _Trace(model)
    was_training = model.training
    model.train()
    try:
        rows, first = [], None
        for batch in batches:
            batch = move_data_to_device(batch, device)
            with trace if first is None else nullcontext():  # the first forward shows the links
                rows.append(_measure(model, batch, selected, stats, step_loss, context))
            first = batch if first is None else first
        if first is None:
            raise ModelError("diagnose got no batch from the data; check the data module's "
                            "train set")
        links = _links(trace.order, selected)
        samples = []
        if any(links) and not any(isinstance(m, _BATCH_NORMS) for m in model.modules()):
            for i in range(min(per_sample, len(first[0]))):
                one = [t[i:i + 1] if isinstance(t, Tensor) else t for t in first]
                samples.append(_measure(model, one, selected, stats, step_loss, context)[:, 4])
    finally:
        stats.detach()
        model.zero_grad(set_to_none=True)
        model.train(was_training)

    data = torch.stack(rows).double().numpy()  # [batches, layers, (h2, mean, x2, x, grad)]
    h2, mean, x2, grad = data[..., 0], data[..., 1], data[..., 2], data[..., 4]
    grad_sample = (torch.stack(samples).double().numpy() if samples
                   else np.empty((0, len(selected))))
    families = [link[0] if link else None for link in links]
    th2, tgrad = _theory(selected, families, x2.mean(0), np.sqrt((grad_sample ** 2).mean(0))
                         if samples else grad.mean(0))
    if not samples:
        tgrad[:] = math.nan  # the theory predicts single-sample gradients, not a batch's
    return Diagnosis([n for n, _ in selected], [link[1] if link else "measured" for link in links],
                     h2, mean, grad, x2, grad_sample, th2, tgrad)


_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def _measure(model: nn.Module, batch: Any, selected: list[tuple[str, nn.Module]],
             stats: LayerStats, step_loss: Callable[[nn.Module, Any], Tensor],
             context: Callable[[], AbstractContextManager]) -> Tensor:
    """One forward/backward: [layers, (E[h²], E[h], E[x²], E[x], ‖∂L/∂W‖_F)] on the host."""
    model.zero_grad(set_to_none=True)
    stats.attach()
    stats.reset()
    try:
        with context():
            loss = step_loss(model, batch)
    finally:
        stats.detach()
    loss.backward()
    moments = stats.moments()[:, [0, 1, 3, 4]]
    return torch.cat([moments, grad_norms(selected, stats.device)[:, None]], dim=1).cpu()


class _Trace:
    """Records the order in which leaf modules run (to see what lies between two layers)."""

    def __init__(self, model: nn.Module) -> None:
        self.leaves = [m for m in model.modules() if next(m.children(), None) is None]
        self.order: list[nn.Module] = []
        self._handles: list[Any] = []

    def __enter__(self) -> _Trace:
        self.order = []
        self._handles = [m.register_forward_hook(lambda mod, a, o: self.order.append(mod))
                         for m in self.leaves]
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()


def act_family(module: nn.Module) -> SeluFamily | None:
    """The activation's parameters as ``theory.SeluFamily``, or None if it is not one."""
    if callable(getattr(module, "family", None)):  # the models.activations modules
        return module.family()
    if isinstance(module, nn.ReLU):
        return SeluFamily(1.0, 0.0)
    if isinstance(module, nn.LeakyReLU):
        return SeluFamily(1.0, 0.0, 1.0, module.negative_slope)
    if isinstance(module, nn.ELU):
        return SeluFamily(1.0, module.alpha)
    if isinstance(module, nn.SELU):  # torch's constants (Klambauer et al. 2017)
        return SeluFamily(1.0507009873554805, 1.6732632423543772)
    return None


def _links(order: list[nn.Module], selected: list[tuple[str, nn.Module]]
           ) -> list[tuple[SeluFamily, str] | None]:
    """Per layer: (f, its name) when h_{l−1} → f → layer l, else None (the chain restarts)."""
    ids = {id(m): i for i, (_, m) in enumerate(selected)}
    links: list[tuple[SeluFamily, str] | None] = [None] * len(selected)
    prev, between = None, []
    for mod in order:
        i = ids.get(id(mod))
        if i is None:
            between.append(mod)
            continue
        if prev is not None and i == prev + 1 and links[i] is None:
            acts = [(f, getattr(m, "name", None) or type(m).__name__.lower())
                    for m in between if (f := act_family(m)) is not None]
            others = [m for m in between if act_family(m) is None
                      and type(m).__name__ not in _PASS_THROUGH_NAMES]
            if len(acts) == 1 and not others:
                links[i] = acts[0]
        prev, between = i, []
    return links


def _theory(selected: list[tuple[str, nn.Module]], links: list[SeluFamily | None],
            input_h2: np.ndarray, grad_w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Predicted E[h²] and ‖∂L/∂W‖_F per layer from the layers' weights (``propagate``)."""
    fan_in = np.array([m.weight[0].numel() for _, m in selected], dtype=float)
    v = fan_in * [float(m.weight.detach().double().pow(2).mean()) for _, m in selected]
    return propagate(fan_in, v, links, input_h2, grad_w)
