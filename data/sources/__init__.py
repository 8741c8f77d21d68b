"""Image sources that ``python -m app prepare`` turns into .beton files.

A source is one split of a dataset on disk (or generated) as an indexable of
``(H×W×3 uint8 RGB array, label)``; the registry maps the names the CLI and the YAML configs use
(``imagefolder``, ``tiny-imagenet``, ``cifar10``, ``cifar100``, ``digits``, ``synthetic``) to
their classes, timm-style: ``open_source(name, root, split, **options)`` is the single door.
"""
from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable, ClassVar, TypeVar

import numpy as np

from data.errors import DataError

SPLITS = ("train", "val")

_SOURCES: dict[str, type["ImageSource"]] = {}
S = TypeVar("S", bound=type["ImageSource"])


class ImageSource(ABC):
    """One split of a dataset: ``source[i] -> (image, label)``; labels are known without decoding.

    Class attributes are the defaults the app uses when a config leaves them out: the output
    ``resolution``, the augmentation ``recipe`` (``data.pipelines.RECIPES``) and how ``prepare``
    stores the images (``write_mode``, ``max_resolution``, ``compress_probability``: FFCV's
    RGBImageField options). Photographs default to ffcv-imagenet's setting for ResNet-18-sized
    models such as Conv MobileNet V1: ≤ 400 px, 10 % JPEG (quality 90), 90 % raw pixels; JPEG
    decoding is what limits loading, at the price of a larger file (ResNet-50 setting: 500 px,
    50 % JPEG).
    """

    name: ClassVar[str]
    resolution: ClassVar[int] = 224
    recipe: ClassVar[str] = "imagenet"
    write_mode: ClassVar[str] = "proportion"
    max_resolution: ClassVar[int | None] = 400
    compress_probability: ClassVar[float] = 0.1
    needs_root: ClassVar[bool] = True

    class_names: list[str]
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        return self.image(index), int(self.labels[index])

    @abstractmethod
    def image(self, index: int) -> np.ndarray:
        """The H×W×3 uint8 RGB image; raises ``data.images.BadImage`` for an unreadable file."""

    def max_pixels(self) -> int | None:
        """An upper bound on H·W when known without decoding (sizes the .beton pages)."""
        return None

    def describe(self, index: int) -> str:
        """Where sample ``index`` comes from, for error messages and the sidecar's skip list."""
        return f"{self.name}[{index}]"

    @classmethod
    @abstractmethod
    def count_classes(cls, root: Path | None, **options: Any) -> int:
        """The number of classes, cheaply (no file walk), so a DataModule knows it at __init__."""

    @classmethod
    def default_resolution(cls, **options: Any) -> int:
        return cls.resolution

    @classmethod
    def splits_coincide(cls, root: Path | None, **options: Any) -> bool:
        """True when 'train' and 'val' would read the very same files (a folder without
        split sub-folders): fine for one ``prepare`` call, wrong for a train/val pair."""
        return False


def register_source(name: str) -> Callable[[S], S]:
    def wrap(cls: S) -> S:
        cls.name = name
        _SOURCES[name] = cls
        return cls
    return wrap


def list_sources() -> list[str]:
    return sorted(_SOURCES)


def get_source(name: str) -> type[ImageSource]:
    key = name.lower().replace("_", "-")
    if key not in _SOURCES:
        raise DataError(f"unknown source {name!r}; choose one of: {', '.join(list_sources())}")
    return _SOURCES[key]


def _check_options(cls: type[ImageSource], options: dict[str, Any]) -> None:
    params = inspect.signature(cls.__init__).parameters
    allowed = [p for p in params if p not in ("self", "root", "split")]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise DataError(f"source {cls.name!r} has no option {unknown[0]!r}; its options are: "
                        f"{', '.join(allowed) or 'none'}")


def _check_root(cls: type[ImageSource], root: str | Path | None) -> Path | None:
    if not cls.needs_root:
        return Path(root).expanduser() if root else None
    if root is None or str(root) == "":
        raise DataError(f"source {cls.name!r} reads files from disk; give their folder with "
                        f"--root DIR (data.root in a config)")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DataError(f"root folder {str(path)!r} does not exist; check the path given for "
                        f"source {cls.name!r}")
    return path


def open_source(name: str, root: str | Path | None, split: str, **options: Any) -> ImageSource:
    """Build source ``name`` for ``split`` ('train' or 'val'); bad input raises DataError."""
    cls = get_source(name)
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose one of: {', '.join(SPLITS)}")
    _check_options(cls, options)
    return cls(_check_root(cls, root), split, **options)


def count_classes(name: str, root: str | Path | None, **options: Any) -> int:
    cls = get_source(name)
    _check_options(cls, options)
    return cls.count_classes(_check_root(cls, root), **options)


def default_resolution(name: str, **options: Any) -> int:
    cls = get_source(name)
    _check_options(cls, options)
    return cls.default_resolution(**options)


# Importing the modules registers their sources.
from data.sources import cifar, digits, folder, synthetic  # noqa: E402,F401
