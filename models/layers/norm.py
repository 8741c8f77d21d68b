"""The norm registry and the initialisation that goes with each choice.

``none``: self-normalizing networks, weights N(0, 1/fan_in) and zero biases (paper Appendix C);
``batchnorm``: the BN+ReLU baselines, Kaiming init as torchvision's ResNet.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn


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
