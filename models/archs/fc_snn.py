"""The fully-connected SNN of the paper's Appendix E (64 layers, tabular data).

``depth`` counts the linear layers: depth − 1 hidden layers of ``width`` units (linear → (norm)
→ act → (alpha dropout)), then the linear classifier. The paper does not give the width; 256 is
the smallest of Klambauer et al.'s UCI grid (1024, 512, 256). ``drop_rate`` uses alpha dropout
matched to the activation (``models.dropout``), as Klambauer et al. do for SNNs.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable

from torch import Tensor, nn

from models.errors import ModelError
from models.layers.dropout import dropout_for
from models.layers.centralized import linear_layer
from models.layers.norm import Norm
from models.archs.registry import register_model


class FcSNN(nn.Module):
    """depth − 1 hidden fully-connected layers and a linear classifier."""

    def __init__(self, num_classes: int, act_layer: Callable[[], nn.Module], norm: Norm,
                 weight_centralization: bool = False, in_features: int | None = None,
                 depth: int = 64, width: int = 256, drop_rate: float = 0.0) -> None:
        super().__init__()
        if not (isinstance(in_features, int) and in_features >= 1):
            raise ModelError(f"fc_snn needs in_features, the number of input columns (a positive "
                             f"integer), got {in_features!r}.")
        if not (isinstance(depth, int) and depth >= 2):
            raise ModelError(f"fc_snn depth counts linear layers and must be at least 2, "
                             f"got {depth!r}.")
        if not (isinstance(width, int) and width >= 1):
            raise ModelError(f"fc_snn width must be a positive integer, got {width!r}.")
        if not 0.0 <= drop_rate < 1.0:
            raise ModelError(f"drop_rate must be in [0, 1), got {drop_rate!r}.")
        linear, norm_layer = linear_layer(weight_centralization), norm.layer(1)
        blocks, chs = [], in_features
        for _ in range(depth - 1):
            act = act_layer()
            parts = [("linear", linear(chs, width, bias=norm.bias))]
            if norm_layer is not None:
                parts.append(("norm", norm_layer(width)))
            parts += [("act", act), ("drop", dropout_for(act, drop_rate))]
            blocks.append(nn.Sequential(OrderedDict(parts)))
            chs = width
        self.layers = nn.Sequential(*blocks)
        self.num_features = chs
        self.fc = linear(chs, num_classes)
        norm.init(self)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.layers(x.flatten(1))

    def forward_head(self, x: Tensor) -> Tensor:
        return self.fc(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


@register_model
def fc_snn(*, num_classes: int, act_layer: Callable[[], nn.Module], norm: Norm,
           weight_centralization: bool = False, in_features: int | None = None,
           depth: int = 64, width: int = 256, drop_rate: float = 0.0) -> FcSNN:
    """Appendix E's 64-layer fully-connected SNN for tabular data."""
    return FcSNN(num_classes, act_layer, norm, weight_centralization, in_features=in_features,
                 depth=depth, width=width, drop_rate=drop_rate)
