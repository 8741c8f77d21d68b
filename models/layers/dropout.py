"""Alpha dropout for self-normalizing networks (Klambauer et al. 2017), for any SELU-family f.

Ordinary dropout changes the variance of the activations and breaks the fixed point. Alpha
dropout sets dropped units to the negative saturation α' = −λα and then applies the affine map
a·z + b that restores the fixed-point mean and variance. ``torch.nn.AlphaDropout`` hard-codes
SELU's α' and a zero mean; here α', the mean and the second moment come from the activation's
own parameters (non-central sSELU/lSELU have a non-zero mean at the fixed point).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from models import theory
from models.layers.activations import SeluFamilyAct


class AlphaDropout(nn.Module):
    """Drop with probability ``p`` to ``drop_value``, then keep E[x] = ``mean``, Var[x] unchanged.

    With keep probability q and z = d·x + (1 − d)·α': E[z] = qμ + (1 − q)α',
    E[z²] = q·m₂ + (1 − q)α'²; a = √(Var x / Var z), b = μ − a·E[z].
    """

    def __init__(self, p: float, drop_value: float, mean: float = 0.0,
                 second_moment: float = 1.0) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p, self.drop_value = float(p), float(drop_value)
        q = 1.0 - self.p
        var_x = second_moment - mean * mean
        mean_z = q * mean + (1 - q) * drop_value
        var_z = q * second_moment + (1 - q) * drop_value ** 2 - mean_z ** 2
        self.a = math.sqrt(var_x / var_z) if var_z > 0 else 1.0
        self.b = mean - self.a * mean_z

    @classmethod
    def for_activation(cls, act: SeluFamilyAct, p: float) -> AlphaDropout:
        """Fixed-point statistics (q = 1) of ``act``; α' = −λα, its negative saturation.

        lSELU (κ > 0) has no saturation; −λα is still the value of its knee (e^{x} ≈ 0), the
        natural stand-in.
        """
        fam = act.family()
        return cls(p, drop_value=-fam.lam * fam.alpha, mean=float(theory.mean(fam)),
                   second_moment=float(theory.second_moment(fam)))

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = torch.rand_like(x, dtype=torch.float32) >= self.p
        return torch.where(keep, x, self.drop_value) * self.a + self.b

    def extra_repr(self) -> str:
        return f"p={self.p:g}, drop_value={self.drop_value:.4f}, a={self.a:.4f}, b={self.b:.4f}"


def dropout_for(act: nn.Module, p: float) -> nn.Module:
    """The dropout that keeps ``act``'s statistics: alpha dropout for the SELU family."""
    if p == 0.0:
        return nn.Identity()
    if isinstance(act, SeluFamilyAct):
        return AlphaDropout.for_activation(act, p)
    return nn.Dropout(p)
