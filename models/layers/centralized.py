"""Weight-centralized layers (paper section 5), initialisation, and the norm registry.

``WCConv2d`` / ``WCLinear`` subtract each output unit's mean weight over its fan-in in every
forward, so gradients flow through the centralization and the stored weights stay free. They
subclass ``nn.Conv2d`` / ``nn.Linear``, so hooks and tools looking for those still find them.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

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


def snn_init_(model: nn.Module) -> None:
    """Self-normalizing init (paper Appendix C): weights N(0, 1/fan_in), biases zero."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            fan_in = m.weight[0].numel()
            nn.init.normal_(m.weight, 0.0, fan_in ** -0.5)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def kaiming_init_(model: nn.Module) -> None:
    """The usual BN+ReLU init (torchvision ResNet): Kaiming-normal fan-out convs, unit BN.

    Linear layers keep PyTorch's default, as torchvision's ResNet does.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


@dataclass(frozen=True)
class Norm:
    """A normalization choice: its layer per spatial rank (None: no norm) and the matching init."""

    layers: dict[int, type[nn.Module]] | None
    init: Callable[[nn.Module], None]

    @property
    def bias(self) -> bool:
        """Convs/linears carry a bias only without a norm (BN's shift replaces it)."""
        return self.layers is None

    def layer(self, rank: int) -> Callable[[int], nn.Module] | None:
        """The norm factory for 1-d features (rank 1) or images (rank 2)."""
        return None if self.layers is None else self.layers[rank]


NORMS: dict[str, Norm] = {
    "none": Norm(None, snn_init_),
    "batchnorm": Norm({1: nn.BatchNorm1d, 2: nn.BatchNorm2d}, kaiming_init_),
}


def conv_norm_act(in_chs: int, out_chs: int, stride: int = 1, *, act_layer: Callable[[], nn.Module],
                  norm: Norm, weight_centralization: bool, kernel_size: int = 3) -> nn.Sequential:
    """conv → (norm) → act, with submodules named ``conv``, ``norm``, ``act``."""
    conv = conv_layer(weight_centralization)(in_chs, out_chs, kernel_size, stride,
                                             padding=kernel_size // 2, bias=norm.bias)
    norm_layer = norm.layer(2)
    parts = [("conv", conv)]
    if norm_layer is not None:
        parts.append(("norm", norm_layer(out_chs)))
    parts.append(("act", act_layer()))
    return nn.Sequential(OrderedDict(parts))
