"""Reading one image file as the RGB uint8 array FFCV's RGBImageField stores."""
from __future__ import annotations

import os
import warnings

import numpy as np
from PIL import Image

# What torchvision's ImageFolder accepts, so the same folders work with both.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class BadImage(Exception):
    """An image file that cannot be decoded (corrupt, truncated, not an image)."""


def is_image_file(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def load_rgb(path: str | os.PathLike) -> np.ndarray:
    """Decode ``path`` to H×W×3 uint8; grayscale, palette, RGBA, CMYK and 16-bit become RGB."""
    try:
        with warnings.catch_warnings():
            # A few ImageNet files carry broken EXIF or are huge; both decode fine.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            warnings.simplefilter("ignore", UserWarning)
            with Image.open(path) as im:
                im.load()
                if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                    # convert("RGB") would clip 16-bit values to 255, i.e. a white image.
                    arr = np.asarray(im, dtype=np.float64)
                    top = max(arr.max(), 1.0)
                    im = Image.fromarray(np.round(arr * (255.0 / top)).astype(np.uint8))
                rgb = np.asarray(im.convert("RGB"))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise BadImage(f"{path}: {err}") from None
    if rgb.ndim != 3 or min(rgb.shape[:2]) == 0:
        raise BadImage(f"{path}: empty image")
    return np.ascontiguousarray(rgb)
