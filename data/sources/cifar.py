"""CIFAR-10 / CIFAR-100 from the "python version" pickle batches in a local folder."""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import ClassVar

import numpy as np

from data.errors import DataError
from data.sources import ImageSource, register_source


class _Cifar(ImageSource):
    resolution = 32
    recipe = "pad_crop"
    write_mode = "raw"
    max_resolution = None

    folder: ClassVar[str]                 # what the official archive extracts to
    files: ClassVar[dict[str, tuple[str, ...]]]
    label_key: ClassVar[bytes]
    meta_file: ClassVar[str]
    names_key: ClassVar[bytes]
    classes: ClassVar[int]

    @classmethod
    def _base(cls, root: Path) -> Path:
        for base in (root, root / cls.folder):
            if (base / cls.meta_file).is_file():
                return base
        raise DataError(f"{str(root)!r} holds no CIFAR {cls.meta_file!r}; point --root at the "
                        f"extracted {cls.folder} folder of the python version")

    @staticmethod
    def _load(path: Path) -> dict:
        if not path.is_file():
            raise DataError(f"CIFAR batch {str(path)!r} is missing; re-extract the archive")
        try:
            with open(path, "rb") as fh:
                return pickle.load(fh, encoding="bytes")
        except (pickle.UnpicklingError, EOFError, ValueError) as err:
            raise DataError(f"CIFAR batch {str(path)!r} cannot be read ({err}); re-extract "
                            f"the archive") from None

    @classmethod
    def count_classes(cls, root: Path | None, **options) -> int:
        return cls.classes

    def __init__(self, root: Path, split: str):
        base = self._base(root)
        meta = self._load(base / self.meta_file)
        self.class_names = [n.decode() for n in meta[self.names_key]]
        batches = [self._load(base / f) for f in self.files[split]]
        data = np.concatenate([b[b"data"] for b in batches])
        # Rows are 3072 bytes: the R, G and B planes of a 32×32 image.
        self.images = np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        self.labels = np.concatenate([np.asarray(b[self.label_key], dtype=np.int64)
                                      for b in batches])

    def image(self, index: int) -> np.ndarray:
        return self.images[index]

    def max_pixels(self) -> int:
        return 32 * 32


@register_source("cifar10")
class Cifar10(_Cifar):
    folder = "cifar-10-batches-py"
    files = {"train": tuple(f"data_batch_{k}" for k in range(1, 6)), "val": ("test_batch",)}
    label_key = b"labels"
    meta_file = "batches.meta"
    names_key = b"label_names"
    classes = 10


@register_source("cifar100")
class Cifar100(_Cifar):
    folder = "cifar-100-python"
    files = {"train": ("train",), "val": ("test",)}
    label_key = b"fine_labels"
    meta_file = "meta"
    names_key = b"fine_label_names"
    classes = 100
