"""scikit-learn's bundled UCI handwritten digits, upscaled to RGB: the demo data, no download."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from data.errors import DataError
from data.sources import ImageSource, register_source


@register_source("digits")
class Digits(ImageSource):
    """1797 8×8 digits (16 grey levels), bilinearly upscaled to ``image_size`` and repeated to
    RGB. The split is a fixed stratified ``val_fraction`` split drawn with ``split_seed``."""

    recipe = "digits"
    write_mode = "raw"
    max_resolution = None
    needs_root = False

    @classmethod
    def count_classes(cls, root: Path | None, **options) -> int:
        return 10

    @classmethod
    def default_resolution(cls, image_size: int = 32, **options) -> int:
        return image_size

    def __init__(self, root: Path | None, split: str, image_size: int = 32,
                 val_fraction: float = 0.2, split_seed: int = 0):
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        if not (isinstance(image_size, int) and image_size >= 8):
            raise DataError(f"digits image_size must be an integer ≥ 8, got {image_size!r}")
        if not 0 < val_fraction < 1:
            raise DataError(f"digits val_fraction must lie in (0, 1), got {val_fraction!r}")

        digits = load_digits()
        train, val = train_test_split(np.arange(len(digits.target)), test_size=val_fraction,
                                      stratify=digits.target, random_state=split_seed)
        keep = np.sort(train if split == "train" else val)
        self.small = np.round(digits.images[keep] * (255.0 / 16.0)).astype(np.uint8)
        self.labels = digits.target[keep].astype(np.int64)
        self.index = keep
        self.image_size = int(image_size)
        self.class_names = [str(d) for d in range(10)]

    def image(self, index: int) -> np.ndarray:
        size = (self.image_size, self.image_size)
        grey = np.asarray(Image.fromarray(self.small[index]).resize(size, Image.BILINEAR))
        return np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2))

    def max_pixels(self) -> int:
        return self.image_size ** 2

    def describe(self, index: int) -> str:
        return f"digits[{self.index[index]}]"
