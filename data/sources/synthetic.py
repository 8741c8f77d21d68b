"""Generated, learnable images for throughput runs and tests: no files, any size and count."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from data.errors import DataError
from data.sources import ImageSource, register_source


@register_source("synthetic")
class Synthetic(ImageSource):
    """Class ``c`` is a smooth random colour field (a 4×4 grid upscaled); each sample shifts it,
    scales its brightness and adds pixel noise, so a small CNN learns it in a few epochs.
    Sample ``i`` has label ``i % num_classes``; train and val are drawn from different seeds."""

    write_mode = "jpg"
    max_resolution = None
    needs_root = False

    @classmethod
    def count_classes(cls, root: Path | None, num_classes: int = 100, **options) -> int:
        return num_classes

    @classmethod
    def default_resolution(cls, image_size: int = 256, **options) -> int:
        return min(224, image_size)

    def __init__(self, root: Path | None, split: str, num_classes: int = 100,
                 num_samples: int | None = None, image_size: int = 256, seed: int = 0):
        n = num_samples if num_samples is not None else (10_000 if split == "train" else 2_000)
        for name, value, low in (("num_classes", num_classes, 1), ("num_samples", n, 1),
                                 ("image_size", image_size, 8)):
            if not (isinstance(value, int) and value >= low):
                raise DataError(f"synthetic {name} must be an integer ≥ {low}, got {value!r}")
        self.labels = np.arange(n, dtype=np.int64) % num_classes
        self.class_names = [f"class_{c}" for c in range(num_classes)]
        self.size = int(image_size)
        self.seed = seed
        self.split_id = 0 if split == "train" else 1

    def max_pixels(self) -> int:
        return self.size ** 2

    def prototype(self, label: int) -> np.ndarray:
        grid = np.random.default_rng([self.seed, label]).uniform(40, 215, (4, 4, 3))
        return cv2.resize(grid.astype(np.float32), (self.size, self.size),
                          interpolation=cv2.INTER_CUBIC)

    def image(self, index: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, self.split_id, index])
        shift = rng.integers(-(self.size // 8), self.size // 8 + 1, size=2)
        img = np.roll(self.prototype(int(self.labels[index])), tuple(shift), axis=(0, 1))
        img = img * rng.uniform(0.8, 1.2) + rng.normal(0.0, 20.0, img.shape)
        return np.clip(img, 0, 255).astype(np.uint8)
