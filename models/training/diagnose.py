"""Normalization at initialisation: measured per-layer statistics beside the mean-field theory.

``diagnose(model, batches)`` runs forward/backward passes at initialisation (no optimizer step)
and measures, per conv/linear layer, E[h²], the mean of h and ‖∂L/∂W‖_F, then predicts the same
with ``models.theory.propagation`` (``python -m app diagnose`` prints and plots the result).

The backward theory is about one sample's gradient: in a batch gradient the samples' terms
partly cancel, so it grows more slowly with depth. Diagnose therefore also measures per-sample
gradients (single-sample passes over the first batch's first few samples; skipped for models
with batch norm, which has no single-sample statistics) and compares the theory with those.

Zero padding lowers E[h²] of convolutions at the border of each feature map, and on small maps
the border is much of the map (about half of E[h²] on 8×8 maps). The theory that applies is
therefore ``propagate_spatial``, which carries a map of E[h²] per position through each conv's
kernel, stride, dilation, padding and input size (read from the forward hooks' inputs);
the plain one-number recursion (``propagate``) is kept beside it, as ``*_plain``. The two agree
for dense layers. A layer after a global pool restarts from its measured input ("measured"),
since the pooled features' second moment depends on how positions correlate, which the
per-position theory does not follow.
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
from models.theory.propagation import ConvGeometry, propagate, propagate_spatial
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
    theory_h2: np.ndarray       # the theory that applies: padding-aware (spatial)
    theory_grad_w: np.ndarray   # per sample; NaN at each chain's anchor (its measurement)
    theory_h2_plain: np.ndarray         # the one-number recursion, blind to padding
    theory_grad_w_plain: np.ndarray
    geometry: list[ConvGeometry | None]  # None: a dense layer (or a conv whose input was not seen)
    theory_kind: list[str]      # "padding-aware" where a conv's geometry shaped the prediction,
    #                             "plain" where both theories are the same recursion

    def columns(self) -> dict[str, np.ndarray]:
        """Per-layer summary: means over batches, RMS over samples, and the theory."""
        sample = (np.sqrt((self.grad_w_sample ** 2).mean(0)) if len(self.grad_w_sample)
                  else np.full(len(self.names), math.nan))
        return {"h2": self.h2.mean(0), "h2_theory": self.theory_h2,
                "h2_theory_plain": self.theory_h2_plain,
                "mean": self.mean.mean(0), "grad_w": self.grad_w.mean(0),
                "grad_w_sample": sample, "grad_w_theory": self.theory_grad_w,
                "grad_w_theory_plain": self.theory_grad_w_plain}

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
                            "theory": kind, **_geometry_json(geom),
                            **{k: _num(c[i]) for k, c in cols.items()}}
                           for i, (n, link, kind, geom) in enumerate(
                               zip(self.names, self.links, self.theory_kind, self.geometry))]}


def _geometry_json(geom: ConvGeometry | None) -> dict:
    if geom is None:
        return {"in_size": None, "out_size": None}
    return {"in_size": list(geom.in_size), "out_size": list(geom.out_size),
            "kernel": list(geom.kernel), "stride": list(geom.stride),
            "padding": [list(p) for p in geom.padding], "padding_mode": geom.padding_mode}


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
    maps = InputMaps(selected)
    trace = ModuleOrder(model)
    was_training = model.training
    model.train()
    try:
        rows, first = [], None
        for batch in batches:
            batch = move_data_to_device(batch, device)
            with trace if first is None else nullcontext(), maps:  # the first shows the links
                rows.append(_measure(model, batch, selected, stats, step_loss, context))
            first = batch if first is None else first
        if first is None:
            raise ModelError("diagnose got no batch from the data; check the data module's "
                            "train set")
        links = activation_links(trace.order, selected)
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
    geometry = [conv_geometry(m, maps.in_size(i)) for i, (_, m) in enumerate(selected)]
    anchors = np.sqrt((grad_sample ** 2).mean(0)) if samples else grad.mean(0)
    fan_in = np.array([m.weight[0].numel() for _, m in selected], dtype=float)
    channels = np.array([m.weight.shape[0] for _, m in selected], dtype=float)
    v = fan_in * [float(m.weight.detach().double().pow(2).mean()) for _, m in selected]
    th2_plain, tgrad_plain = propagate(fan_in, v, families, x2.mean(0), anchors)
    th2, tgrad, _ = propagate_spatial(fan_in, v, channels, families, geometry,
                                      maps.means(x2.mean(0)), anchors)
    if not samples:  # the theory predicts single-sample gradients, not a batch's
        tgrad[:] = tgrad_plain[:] = math.nan
    kind, spatial = [], False
    for f, geom in zip(families, geometry):
        spatial = geom is not None or (f is not None and spatial)
        kind.append("padding-aware" if spatial else "plain")
    return Diagnosis([n for n, _ in selected], [link[1] if link else "measured" for link in links],
                     h2, mean, grad, x2, grad_sample, th2, tgrad, th2_plain, tgrad_plain,
                     geometry, kind)


def pool(draws: Sequence[Diagnosis]) -> Diagnosis:
    """Several weight draws of one model on the same batches as one Diagnosis: the measured rows
    of all draws together, the theory averaged over the draws. The theory is an expectation
    over weight draws; a single draw of a narrow layer on correlated inputs (real images) can
    sit far from it, since the cross terms Σ w_i w_j E[x_i x_j] only cancel on average."""
    if not draws:
        raise ValueError("pool needs at least one Diagnosis")
    first = draws[0]
    if any(d.names != first.names or d.links != first.links for d in draws):
        raise ValueError("pool: the draws are of different models")

    def cat(key: str) -> np.ndarray:
        return np.concatenate([getattr(d, key) for d in draws], axis=0)

    def mean(key: str) -> np.ndarray:
        return np.mean([getattr(d, key) for d in draws], axis=0)

    return Diagnosis(first.names, first.links, cat("h2"), cat("mean"), cat("grad_w"),
                     cat("input_h2"), cat("grad_w_sample"), mean("theory_h2"),
                     mean("theory_grad_w"), mean("theory_h2_plain"), mean("theory_grad_w_plain"),
                     first.geometry, first.theory_kind)


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


class InputMaps:
    """Forward hooks that record each layer's input size and E[x²] per position (the mean over
    samples and channels), summed over the forwards they are entered for."""

    def __init__(self, layers: list[tuple[str, nn.Module]]) -> None:
        self.layers = layers
        self.in_sizes: list[tuple[int, ...] | None] = [None] * len(layers)
        self._sums: list[Tensor | None] = [None] * len(layers)
        self._counts = [0] * len(layers)
        self._consistent = [True] * len(layers)
        self._handles: list[Any] = []

    def __enter__(self) -> InputMaps:
        self._handles = [m.register_forward_hook(self._hook(i))
                         for i, (_, m) in enumerate(self.layers)]
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _hook(self, i: int) -> Callable[..., None]:
        dims = _spatial_dims(self.layers[i][1])

        @torch.compiler.disable  # eager even inside a compiled model, as LayerStats' hooks
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            x = args[0].detach() if args and isinstance(args[0], Tensor) else None
            if x is None or not module.training or (dims and x.dim() < dims + 1):
                return
            size = tuple(x.shape[x.dim() - dims:]) if dims else ()
            if self.in_sizes[i] not in (None, size):  # one module at several sizes
                self._consistent[i] = False
                return
            self.in_sizes[i] = size
            over = tuple(range(x.dim() - dims))  # samples and channels (all of a dense input)
            x2 = torch.linalg.vector_norm(x, dim=over, dtype=torch.float32).square()
            x2 = x2 / (x.numel() // max(1, x2.numel()))
            self._sums[i] = x2 if self._sums[i] is None else self._sums[i] + x2
            self._counts[i] += 1
        return hook

    def in_size(self, i: int) -> tuple[int, ...] | None:
        """Layer i's input size (None: it never ran, or ran at several sizes)."""
        return self.in_sizes[i] if self._consistent[i] else None

    def means(self, fallback: np.ndarray) -> list[np.ndarray]:
        """Each layer's mean E[x²] map; ``fallback[i]`` (its E[x²]) where none was recorded."""
        return [(s / c).double().cpu().numpy() if s is not None and ok
                else np.asarray(fallback[i])
                for i, (s, c, ok) in enumerate(zip(self._sums, self._counts, self._consistent))]


def _spatial_dims(module: nn.Module) -> int:
    """How many trailing dims of the input are positions: the conv's rank, 0 for dense."""
    return len(module.kernel_size) if isinstance(module, nn.modules.conv._ConvNd) else 0


def conv_geometry(module: nn.Module, in_size: tuple[int, ...] | None) -> ConvGeometry | None:
    """The conv's ``ConvGeometry`` at the input size it ran at (None: dense, or never ran)."""
    dims = _spatial_dims(module)
    if not dims or in_size is None or getattr(module, "transposed", False):
        return None
    # torch stores the padding per axis as (before, after), last axis first (also for 'same')
    rp = module._reversed_padding_repeated_twice
    padding = tuple((int(rp[2 * (dims - 1 - a)]), int(rp[2 * (dims - 1 - a) + 1]))
                    for a in range(dims))
    geom = ConvGeometry(tuple(module.kernel_size), tuple(module.stride), tuple(module.dilation),
                        padding, tuple(in_size), module.padding_mode)
    return geom if all(n >= 1 for n in geom.out_size) else None


class ModuleOrder:
    """Records the order in which leaf modules run (to see what lies between two layers)."""

    def __init__(self, model: nn.Module) -> None:
        self.leaves = [m for m in model.modules() if next(m.children(), None) is None]
        self.order: list[nn.Module] = []
        self._handles: list[Any] = []

    def __enter__(self) -> ModuleOrder:
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


def activation_links(order: list[nn.Module], selected: list[tuple[str, nn.Module]]
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
