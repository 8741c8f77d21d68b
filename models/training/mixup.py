"""Mixup (Zhang et al. 2018) and CutMix (Yun et al. 2019) as a Lightning callback.

The paper (section 5, Appendix C) mixes with γ ~ Beta(0.7, 0.7): it lowers the inputs' second
moment (less gradient explosion in an SNN) and regularizes. Mixing runs inside the training
step on the batch the step receives, i.e. on the device after transfer (FFCV's on-GPU pipeline
or Lightning's own copy): the callback hands the module a ``batch_mixer`` each batch and
withdraws it from ``stop_epoch`` on. Validation and test batches are never mixed.

Off by default (``alpha: 0``); the "+ Mixup" configs set ``mixup: {alpha: 0.7}``. Every draw (the
coefficient, the permutation, CutMix's box) comes from a generator seeded with the run's seed and
the optimizer step, so a run repeats exactly and a resumed run mixes as the uninterrupted one.
"""
from __future__ import annotations

import os

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from models.errors import ModelError


def soft_targets(y: Tensor, num_classes: int) -> Tensor:
    """Class indices as one-hot float32 rows; probability rows pass through."""
    return y.float() if y.is_floating_point() else F.one_hot(y.long(), num_classes).float()


def mixup(x: Tensor, y: Tensor, lam: float, perm: Tensor) -> tuple[Tensor, Tensor]:
    """λ·(x, y) + (1 − λ)·(x, y)[perm]; ``y`` are probability rows."""
    return x * lam + x[perm] * (1 - lam), y * lam + y[perm] * (1 - lam)


def cutmix_box(height: int, width: int, lam: float,
               rng: np.random.Generator | None = None) -> tuple[int, int, int, int]:
    """A random box of area ≈ (1 − λ)·H·W, clipped: (top, bottom, left, right)."""
    rng = np.random.default_rng() if rng is None else rng
    ratio = (1 - lam) ** 0.5
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy, cx = int(rng.integers(height)), int(rng.integers(width))
    return (max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height),
            max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width))


def cutmix(x: Tensor, y: Tensor, box: tuple[int, int, int, int],
           perm: Tensor) -> tuple[Tensor, Tensor]:
    """Paste ``box`` of x[perm] into x; targets mix by the pasted area (after clipping)."""
    top, bottom, left, right = box
    x = x.clone()
    x[..., top:bottom, left:right] = x[perm][..., top:bottom, left:right]
    lam = 1 - (bottom - top) * (right - left) / (x.shape[-2] * x.shape[-1])
    return x, y * lam + y[perm] * (1 - lam)


class Mixup(L.Callback):
    """Mix each training batch with a random permutation of itself.

    Args:
        alpha: Beta(α, α) for the mixup coefficient; 0.7 is the paper's; 0 (default): no mixup.
        cutmix_alpha: Beta(α, α) for CutMix's area; 0 (default) disables CutMix.
        switch_prob: with both enabled, the chance a batch uses CutMix rather than mixup.
        prob: the chance that a batch is mixed at all.
        stop_epoch: the first epoch trained without mixing (none: mix throughout).
        seed: seed of the draws (default: the run's ``seed_everything``).
    """

    def __init__(self, alpha: float = 0.0, cutmix_alpha: float = 0.0, switch_prob: float = 0.5,
                 prob: float = 1.0, stop_epoch: int | None = None,
                 seed: int | None = None) -> None:
        if alpha < 0 or cutmix_alpha < 0:
            raise ModelError(f"Mixup needs alpha ≥ 0 and cutmix_alpha ≥ 0 (0 turns it off), "
                             f"got alpha={alpha!r}, cutmix_alpha={cutmix_alpha!r}.")
        for name, p in (("switch_prob", switch_prob), ("prob", prob)):
            if not 0 <= p <= 1:
                raise ModelError(f"Mixup {name} must be a probability in [0, 1], got {p!r}.")
        if stop_epoch is not None and stop_epoch < 0:
            raise ModelError(f"Mixup stop_epoch must be ≥ 0 or null, got {stop_epoch!r}.")
        self.alpha, self.cutmix_alpha = float(alpha), float(cutmix_alpha)
        self.switch_prob, self.prob, self.stop_epoch = switch_prob, prob, stop_epoch
        self.seed = seed
        self._step, self._calls = 0, 0

    @property
    def enabled(self) -> bool:
        return self.alpha > 0 or self.cutmix_alpha > 0

    def active(self, epoch: int) -> bool:
        return self.enabled and (self.stop_epoch is None or epoch < self.stop_epoch)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.enabled and not hasattr(pl_module, "batch_mixer"):
            raise ModelError(f"the Mixup callback needs a models classifier, got "
                             f"{type(pl_module).__name__}; use ImageClassifier or "
                             f"TabularClassifier.")

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule,
                             batch: object, batch_idx: int) -> None:
        # per batch, not per epoch: a run resumed mid-epoch gets no epoch-start hook
        if hasattr(pl_module, "batch_mixer"):
            pl_module.batch_mixer = self if self.active(trainer.current_epoch) else None
        self._step, self._calls = trainer.global_step, 0

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if hasattr(pl_module, "batch_mixer"):
            pl_module.batch_mixer = None

    def _rng(self) -> np.random.Generator:
        """This call's generator: a function of the seed, the step and the call within it."""
        seed = self.seed if self.seed is not None else int(os.environ.get("PL_GLOBAL_SEED", 0))
        self._calls += 1
        return np.random.default_rng([seed % 2 ** 32, self._step, self._calls])

    def __call__(self, x: Tensor, y: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
        """Mixed inputs and soft targets (float32 rows summing to 1) for one batch."""
        y = soft_targets(y, num_classes)
        rng = self._rng()
        if not self.enabled or (self.prob < 1 and rng.random() >= self.prob):
            return x, y
        if not x.is_floating_point():
            raise ModelError(f"Mixup needs floating-point inputs, got {x.dtype}; normalize the "
                             f"images to float in the data pipeline first.")
        gen = torch.Generator(device=x.device).manual_seed(int(rng.integers(2 ** 63)))
        perm = torch.randperm(x.shape[0], device=x.device, generator=gen)
        use_cutmix = self.cutmix_alpha > 0 and (self.alpha == 0 or rng.random() < self.switch_prob)
        if use_cutmix:
            if x.dim() < 3:
                raise ModelError(f"CutMix needs images (N, C, H, W), got inputs of shape "
                                 f"{tuple(x.shape)}; set cutmix_alpha: 0 for tabular data.")
            lam = float(rng.beta(self.cutmix_alpha, self.cutmix_alpha))
            return cutmix(x, y, cutmix_box(x.shape[-2], x.shape[-1], lam, rng), perm)
        return mixup(x, y, float(rng.beta(self.alpha, self.alpha)), perm)
