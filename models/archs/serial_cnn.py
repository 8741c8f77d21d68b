"""The paper's serial (plain, no shortcuts) CNN of Table 4 (Appendix C), 56 layers by default.

conv1 (3×3, 16, stride 1) → three stages of two-conv 3×3 blocks at 16 / 32 / 64 channels →
global average pool → fc. ``depth = 6n + 2``: n blocks per stage, the first block of stages 2
and 3 is the downsampling block (``ds1``, ``ds2``: its first conv has stride 2). This follows
Chen et al.'s ``serialNet`` (GNEDNN_release ``cifar/models/serial_net.py``: 56 → 9 blocks per
stage), which Table 4 abbreviates as one ``ds`` block plus eight ordinary ones.
"""
from __future__ import annotations

from typing import Callable

from torch import Tensor, nn

from models.errors import ModelError
from models.layers.blocks import conv_norm_act
from models.layers.centralized import linear_layer
from models.layers.norm import Norm
from models.archs.registry import register_model

STAGE_CHANNELS = (16, 32, 64)


class SerialCNN(nn.Module):
    """A plain stack of 3×3 conv → (norm) → act layers."""

    def __init__(self, num_classes: int, act_layer: Callable[[], nn.Module], norm: Norm,
                 weight_centralization: bool = False, depth: int = 56,
                 in_chans: int = 3) -> None:
        super().__init__()
        if not (isinstance(depth, int) and depth >= 8 and (depth - 2) % 6 == 0):
            raise ModelError(f"serial_cnn depth must be 6n + 2 with n ≥ 1 (8, 14, 20, …, 56), "
                             f"got {depth!r}.")
        if not (isinstance(in_chans, int) and in_chans >= 1):
            raise ModelError(f"in_chans must be a positive integer, got {in_chans!r}.")
        blocks_per_stage = (depth - 2) // 6
        kw = dict(act_layer=act_layer, norm=norm, weight_centralization=weight_centralization)
        chs = STAGE_CHANNELS[0]
        self.conv1 = conv_norm_act(in_chans, chs, 1, **kw)
        stages = []
        for i, out in enumerate(STAGE_CHANNELS):
            blocks = []
            for j in range(blocks_per_stage):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(nn.Sequential(conv_norm_act(chs, out, stride, **kw),
                                            conv_norm_act(out, out, 1, **kw)))
                chs = out
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.num_features = chs
        self.fc = linear_layer(weight_centralization)(chs, num_classes)
        norm.init(self)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.stages(self.conv1(x))

    def forward_head(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(x).flatten(1))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


@register_model
def serial_cnn(*, num_classes: int, act_layer: Callable[[], nn.Module], norm: Norm,
               weight_centralization: bool = False, depth: int = 56,
               in_chans: int = 3) -> SerialCNN:
    """Table 4's 56-layer CNN (CIFAR 32×32, Tiny ImageNet 64×64); ``depth`` = 6n + 2."""
    return SerialCNN(num_classes, act_layer, norm, weight_centralization, depth=depth,
                     in_chans=in_chans)
