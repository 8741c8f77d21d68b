"""The norm registry and the initialisation that goes with each choice.

``none``: self-normalizing networks, weights N(0, 1/fan_in) and zero biases (paper Appendix C);
with ReLU, He init instead (``he_init_``: ReLU has no fixed point at N(0, 1/fan_in));
``batchnorm``: the BN+ReLU baselines, Kaiming init as torchvision's ResNet.

Where this differs from Chen et al.'s code (GNEDNN_release ``ops/initialization.py``, applied to
every module of their models): they draw every ``nn.Linear`` weight, the classifier's included,
from N(0, 2/fan_in) (``kaiming_normal_(nonlinearity='relu')``) whatever the activation, and leave
all biases at PyTorch's default (uniform in ±1/√fan_in). Here the classifier of an SNN is drawn
from N(0, 1/fan_in) like every other layer and all biases start at zero, as the paper's
Appendix C states. Their convs match ours: fan-in Kaiming normal with gain 1 for the SELU
family (N(0, 1/fan_in)) and √2 for their serial CNN's ReLU baseline without a norm, which is
``he_init_`` (N(0, 2/fan_in) for convs and linears alike; our biases stay zero there too).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn


def snn_init_(model: nn.Module) -> None:
    """Self-normalizing init (paper Appendix C): weights N(0, 1/fan_in), biases zero."""
    _normal_fan_in_(model, 1.0)


def he_init_(model: nn.Module) -> None:
    """ReLU without a norm: weights N(0, 2/fan_in) (He et al. 2015), biases zero.

    E[relu(√q·z)²] = q/2, so under N(0, 1/fan_in) E[h²] halves per layer (1e-21 at the 56-layer
    CNN's fc). The factor 2 is the fixed point that ``solve('relu')`` reports as λ = √2, put in
    the weights rather than in the activation, so the activation stays ``nn.ReLU`` as in the
    BN+ReLU baseline and in Chen et al.'s ReLU baseline, which uses this init on every layer.
    Then E[relu(h)²] = E[x²] of the input at every layer, i.e. E[h²] = 2·E[x²] (λ·relu(h) =
    relu(λh): the same network as λ = √2 ReLU, except that every h is √2 larger).
    """
    _normal_fan_in_(model, 2.0)


def _normal_fan_in_(model: nn.Module, gain2: float) -> None:
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            fan_in = m.weight[0].numel()
            nn.init.normal_(m.weight, 0.0, (gain2 / fan_in) ** 0.5)
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
# the init of ``none`` for activations without a self-normalizing fixed point at N(0, 1/fan_in)
_NO_NORM_INIT: dict[str, Callable[[nn.Module], None]] = {"relu": he_init_}


def norm_for(norm: str, act: str) -> Norm:
    """The ``Norm`` named ``norm`` (a key of ``NORMS``), with its init for activation ``act``."""
    choice = NORMS[norm]
    init = _NO_NORM_INIT.get(str(act).lower()) if choice.layers is None else None
    return choice if init is None else Norm(choice.layers, init)
