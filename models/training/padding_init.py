"""``PaddingAwareInit``: scale each convolution so that the padding-aware theory puts E[h²] at 1.

Beyond the paper. The paper's N(0, 1/fan_in) initialisation makes E[h²] = 1 a fixed point for a
dense layer, but a convolution with zero padding reads zeros at the border of its input map, so
its E[h²] is only the window-mean of the input's per-position E[x²]: 4/9 of it on a 2×2 map
with a 3×3 kernel, about 0.69 on 4×4, 0.82 on 7×7. Small inputs (Conv MobileNet V1 at 64 px
ends on 2×2 maps) therefore start far below the fixed point at depth, which the activations
only partly restore (``python -m app diagnose`` shows it, with the padding-aware theory of
``models.theory.propagation.propagate_spatial`` beside it).

``padding_aware_init_`` multiplies each convolution's weights by one scalar gain, chosen layer
by layer in depth order so that the padding-aware prediction of the layer's mean E[h²] (over
output positions) is ``target``, given the already-scaled layers before it: q_l(u) =
g_l²·v_l·window_mean(E[f(√q_{l−1})²])(u). Positions at the border stay below the interior ones;
it is the layer's mean that is put at the fixed point. The theory reads each conv's kernel,
stride, padding and input size (``models.training.diagnose``) from one forward pass of the
given batch; a layer whose input does not come from the previous one through a single
activation (the first layer, one after a pool or a norm layer) starts its chain from that
input's measured per-position E[x²]. Dense layers (the classifier) are left as they are.

The callback applies it once, on the first training batch before the first optimizer step,
at that batch's input size and before Mixup mixes it (Mixup's lower input moment is part of the
recipe, not something to undo). A resumed run keeps its trained weights. Under DDP each gain is
averaged over the ranks, so every rank scales alike. From a config::

    trainer:
      callbacks+:
        - class_path: models.training.padding_init.PaddingAwareInit
"""
from __future__ import annotations

import math
from typing import Any, Callable

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from models import theory
from models.errors import ModelError
from models.theory.propagation import window_mean
from models.training.diagnose import activation_links, conv_geometry, InputMaps, ModuleOrder
from models.training.stats import select_layers


def padding_aware_init_(model: nn.Module, x: Tensor, target: float = 1.0,
                        layers: str | list[str] | None = None,
                        reduce: Callable[[float], float] = float) -> dict[str, float]:
    """Scale each conv of ``model`` in place (module docstring); returns the gain per conv.

    ``x`` is an input batch (its size sets each map's size; its per-position E[x²] starts the
    chains); ``reduce`` makes a gain the same on every process (the mean under DDP).
    """
    if not target > 0:
        raise ModelError(f"PaddingAwareInit target must be positive, got {target!r}.")
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    if param is not None and x.is_floating_point():
        x = x.to(param.dtype)  # a mixed-precision (bf16/fp16) batch: no autocast out here
    selected = select_layers(model, layers)
    state = _measure(model, x, selected)
    gains: dict[str, float] = {}
    scaled_since_measure = False
    q_prev: np.ndarray | None = None
    for i, (name, module) in enumerate(selected):
        family = state["families"][i]
        if family is None:  # a chain start reads its measured input, after the gains so far
            if scaled_since_measure:
                state, scaled_since_measure = _measure(model, x, selected), False
            x2 = np.asarray(state["maps"][i], dtype=float)
        else:
            x2 = np.asarray(theory.second_moment(family, q_prev), dtype=float)
        geom = state["geometry"][i]
        v = module.weight[0].numel() * float(module.weight.detach().double().pow(2).mean())
        if geom is None:  # dense: every input position alike; not scaled
            q_prev = np.asarray(v * x2.mean())
            continue
        if x2.shape != geom.in_size:  # something between reshaped the map
            x2 = np.full(geom.in_size, x2.mean())
        q = v * window_mean(x2, geom)
        gain = reduce(math.sqrt(target / float(q.mean())))
        with torch.no_grad():
            module.weight.mul_(gain)
        gains[name] = gain
        scaled_since_measure = True
        q_prev = q * gain ** 2
    return gains


def _measure(model: nn.Module, x: Tensor, selected: list[tuple[str, nn.Module]]
             ) -> dict[str, Any]:
    """One forward of ``x`` (train mode, no grad, buffers such as BN statistics restored):
    each layer's activation link, conv geometry and input E[x²] map."""
    buffers = {k: b.detach().clone() for k, b in model.named_buffers()}
    was_training = model.training
    maps, trace = InputMaps(selected), ModuleOrder(model)
    model.train()
    try:
        with torch.no_grad(), trace, maps:
            model(x)
    finally:
        model.train(was_training)
        with torch.no_grad():
            for k, b in model.named_buffers():
                b.copy_(buffers[k])
    links = activation_links(trace.order, selected)
    fallback = np.ones(len(selected))
    return {"families": [link[0] if link else None for link in links],
            "geometry": [conv_geometry(m, maps.in_size(i)) for i, (_, m) in enumerate(selected)],
            "maps": maps.means(fallback)}


class PaddingAwareInit(L.Callback):
    """Scale each conv at the start of training so that the padding-aware theory predicts
    E[h²] = ``target`` at every conv layer (module docstring); not part of the paper's recipe.

    Args:
        target: the E[h²] each conv's mean should have (1: the fixed point).
        layers: fnmatch pattern(s) of the layers the theory follows (default: all conv/linear;
            only convolutions are scaled).
    """

    def __init__(self, target: float = 1.0, layers: str | list[str] | None = None) -> None:
        if not (isinstance(target, (int, float)) and target > 0):
            raise ModelError(f"PaddingAwareInit target must be positive, got {target!r}.")
        self.target = float(target)
        self.layers = layers
        self.gains: dict[str, float] = {}
        self.applied = False

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        if self.applied:
            return
        self.applied = True
        if trainer.global_step > 0:  # resumed: the checkpoint's weights are the trained ones
            return
        x = batch[0]
        net = getattr(pl_module, "model", pl_module)

        def reduce(gain: float) -> float:
            t = torch.tensor(gain, dtype=torch.float64, device=x.device)
            return float(trainer.strategy.reduce(t, reduce_op="mean"))

        self.gains = padding_aware_init_(net, x, self.target, self.layers, reduce)
        if self.gains:
            values = list(self.gains.values())
            rank_zero_info(f"PaddingAwareInit: {len(values)} convs scaled for "
                           f"{'×'.join(map(str, x.shape[2:]))} inputs, gains "
                           f"{min(values):.3f} to {max(values):.3f}")

    def state_dict(self) -> dict[str, Any]:
        return {"applied": self.applied, "gains": dict(self.gains)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.applied = bool(state_dict.get("applied", False))
        self.gains = dict(state_dict.get("gains") or {})
