"""Weight-centralized layers (paper section 5): W − mean(W) in every forward.

``WCConv2d`` / ``WCLinear`` subtract each output unit's mean weight over its fan-in in every
forward, so gradients flow through the centralization and the stored weights stay free. They
subclass ``nn.Conv2d`` / ``nn.Linear``, so hooks and tools looking for those still find them.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


def centralize(weight: Tensor) -> Tensor:
    """W − mean(W) over each output unit's fan-in (every dim but the first)."""
    return weight - weight.mean(dim=tuple(range(1, weight.dim())), keepdim=True)


class WCConv2d(nn.Conv2d):
    """``nn.Conv2d`` whose effective weight is centralized per output channel."""

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, centralize(self.weight), self.bias)


class WCLinear(nn.Linear):
    """``nn.Linear`` whose effective weight is centralized per output unit."""

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, centralize(self.weight), self.bias)


def conv_layer(weight_centralization: bool) -> type[nn.Conv2d]:
    return WCConv2d if weight_centralization else nn.Conv2d


def linear_layer(weight_centralization: bool) -> type[nn.Linear]:
    return WCLinear if weight_centralization else nn.Linear
