"""conv → (norm) → act, the block every convolutional architecture here is built from."""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable

from torch import nn

from models.layers.centralized import conv_layer
from models.layers.norm import Norm


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
