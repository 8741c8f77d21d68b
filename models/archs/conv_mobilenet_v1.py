"""Conv MobileNet V1: MobileNet V1 (Howard et al. 2017) with standard 3×3 convolutions.

The paper's section 6.3 model, following Chen et al. (2020b), whose code (GNEDNN_release,
``imagenet/models/mobilenet.py`` with ``--dense``) replaces each depthwise-separable block
(3×3 depthwise + 1×1 pointwise) by one full 3×3 convolution from the block's input to its
output channels. That is exactly what is built here: 14 convolutions, global average pool, fc.

Layer table at width 1.0, 224×224 input, 1000 classes (each conv is 3×3, padding 1, then norm
when ``norm='batchnorm'``, then the activation; params without norm, i.e. with conv biases):

======  ============  ======  =======  ============  ===============
layer   channels      stride  output   params        MACs
======  ============  ======  =======  ============  ===============
conv1   3 → 32        2       112²          896        10,838,016
conv2   32 → 64       1       112²       18,496       231,211,008
conv3   64 → 128      2       56²        73,856       231,211,008
conv4   128 → 128     1       56²       147,584       462,422,016
conv5   128 → 256     2       28²       295,168       231,211,008
conv6   256 → 256     1       28²       590,080       462,422,016
conv7   256 → 512     2       14²     1,180,160       231,211,008
conv8   512 → 512     1       14²     2,359,808       462,422,016
…       (conv8-12: 5 identical layers)
conv13  512 → 1024    2       7²      4,719,616       231,211,008
conv14  1024 → 1024   1       7²      9,438,208       462,422,016
pool    global average        1²             —                 —
fc      1024 → 1000   —       —       1,025,000         1,024,000
======  ============  ======  =======  ============  ===============

Total: 29,288,104 parameters and 4,867,293,184 multiply-accumulates per 224×224 image
(4.87 GMACs = 9.73 GFLOPs counting multiplies and adds separately; the pool's 50k adds are not
counted). With ``batchnorm`` the convs drop their biases and gain a scale and shift per channel:
29,294,088 parameters. Trainable λ adds one parameter per activation (14); the activation
choice changes nothing else. ``tests/test_models.py`` recomputes these figures by forward hooks.
The CPU demo model (``width_mult=0.25``, ``in_chans=1``, 10 classes, 32×32) has 1,770,154
parameters and 6.2 M MACs per image.

``width_mult`` scales every conv's channels (rounded to a multiple of 8, at least 8). Any input
size works (global pooling); five stride-2 convs reduce 224 to 7 and 32 to 1.
"""
from __future__ import annotations

from typing import Callable

from torch import Tensor, nn

from models.errors import ModelError
from models.layers.blocks import conv_norm_act
from models.layers.centralized import linear_layer
from models.layers.norm import Norm
from models.archs.registry import register_model

# (output channels, stride) of conv2..conv14; conv1 is (32, 2).
STEM = (32, 2)
BLOCKS = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
          (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1))


def scale_channels(channels: int, width_mult: float) -> int:
    """``channels·width_mult`` rounded to a multiple of 8 (tensor-core friendly), at least 8."""
    return max(8, int(round(channels * width_mult / 8)) * 8)


class ConvMobileNetV1(nn.Module):
    """conv1 → 13 convs (all 3×3) → global average pool → fc."""

    def __init__(self, num_classes: int, act_layer: Callable[[], nn.Module], norm: Norm,
                 weight_centralization: bool = False, width_mult: float = 1.0,
                 in_chans: int = 3) -> None:
        super().__init__()
        if not width_mult > 0:
            raise ModelError(f"width_mult must be positive, got {width_mult!r}; 1.0 is the "
                             f"paper's model, 0.25 the CPU demo's.")
        if not (isinstance(in_chans, int) and in_chans >= 1):
            raise ModelError(f"in_chans must be a positive integer, got {in_chans!r}.")
        kw = dict(act_layer=act_layer, norm=norm, weight_centralization=weight_centralization)
        chs = scale_channels(STEM[0], width_mult)
        layers = [conv_norm_act(in_chans, chs, STEM[1], **kw)]
        for out, stride in BLOCKS:
            out = scale_channels(out, width_mult)
            layers.append(conv_norm_act(chs, out, stride, **kw))
            chs = out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.num_features = chs
        self.fc = linear_layer(weight_centralization)(chs, num_classes)
        norm.init(self)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.features(x)

    def forward_head(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(x).flatten(1))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


@register_model
def conv_mobilenet_v1(*, num_classes: int, act_layer: Callable[[], nn.Module], norm: Norm,
                      weight_centralization: bool = False, width_mult: float = 1.0,
                      in_chans: int = 3) -> ConvMobileNetV1:
    """The paper's ImageNet model (section 6.3); ``width_mult=0.25`` is the CPU demo's."""
    return ConvMobileNetV1(num_classes, act_layer, norm, weight_centralization,
                           width_mult=width_mult, in_chans=in_chans)
