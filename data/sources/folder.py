"""Image files on disk: the ImageNet class-folder layout and Tiny ImageNet's own layout."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from data.errors import DataError
from data.images import IMAGE_EXTENSIONS, is_image_file, load_rgb
from data.sources import ImageSource, register_source


def _class_dirs(folder: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def holdout_mask(labels: np.ndarray, holdout: float, seed: int) -> np.ndarray:
    """True for the samples of a fixed, seeded, stratified ``holdout`` share of each class.

    Each class holds out ``round(holdout · n)`` of its ``n`` samples (at least 1, at most
    ``n − 1``), drawn with a generator of its own (``seed``, class index), so a class's choice
    depends only on its own files and the seed: the same on every machine and run.
    """
    if not _check_holdout(holdout):
        raise DataError("holdout must be a fraction in (0, 1), e.g. 0.1")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise DataError(f"holdout_seed {seed!r} must be a whole number ≥ 0, e.g. 0")
    mask = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        if len(members) < 2:
            raise DataError(f"class {int(c)} has {len(members)} train image(s); a holdout needs "
                            f"at least 2 per class, or leave holdout out")
        k = min(len(members) - 1, max(1, int(round(holdout * len(members)))))
        chosen = np.random.default_rng([seed, int(c)]).choice(members, size=k, replace=False)
        mask[chosen] = True
    return mask


def _check_holdout(holdout: float | None) -> float:
    """The holdout fraction as a float; 0 (or None) means none."""
    try:
        value = float(holdout or 0.0)
    except (TypeError, ValueError):
        value = -1.0
    if value and not 0 < value < 1:
        raise DataError(f"holdout {holdout!r} must be a fraction in (0, 1), e.g. 0.1; leave it "
                        f"out (or 0) to use the official splits")
    return value


def _images_under(folder: Path) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [os.path.join(dirpath, f) for f in sorted(filenames) if is_image_file(f)]
    return found


class FileSource(ImageSource):
    """Sources whose samples are image files: ``files[i]`` with label ``labels[i]``."""

    files: list[str]

    def _keep(self, holdout_share: bool, holdout: float, seed: int) -> None:
        """Keep only the held-out share of the (train) files, or only the rest."""
        mask = holdout_mask(self.labels, holdout, seed)
        keep = mask if holdout_share else ~mask
        self.files = [f for f, k in zip(self.files, keep) if k]
        self.labels = self.labels[keep]

    def image(self, index: int) -> np.ndarray:
        return load_rgb(self.files[index])

    def describe(self, index: int) -> str:
        return self.files[index]


@register_source("imagefolder")
class ImageFolder(FileSource):
    """``root/<class>/**/<image>`` as torchvision's ImageFolder reads it (classes sorted by name).

    ``root/<split>`` is read when it exists (ImageNet's ``train/`` and ``val/``, once val is
    arranged in class folders), otherwise ``root`` itself. The classes always come from the
    train folder when there is one, so train and val agree on label indices.

    ``holdout`` (a fraction in (0, 1); 0, the default, keeps the official splits) sets aside a
    fixed, seeded (``holdout_seed``), stratified share of each class of the train folder, for
    choosing hyper-parameters on data that is not the reported val set: split ``train`` then
    drops that share, and split ``val`` returns it (from the train folder) instead of the
    official val. The two splits are disjoint and together are the full train folder. The
    .beton cache key includes the source options, so these files never replace the official
    ones.
    """

    @staticmethod
    def split_folder(root: Path, split: str) -> Path:
        return root / split if (root / split).is_dir() else root

    @classmethod
    def count_classes(cls, root: Path | None, **options) -> int:
        classes = _class_dirs(cls.split_folder(root, "train"))
        if not classes:
            raise DataError(f"{str(cls.split_folder(root, 'train'))!r} has no class sub-folders; "
                            f"imagefolder expects root/<class>/<image> (or root/train/<class>/...)")
        return len(classes)

    @classmethod
    def splits_coincide(cls, root: Path | None, **options: Any) -> bool:
        if _check_holdout(options.get("holdout")):  # val is the held-out share: disjoint
            return False
        return cls.split_folder(root, "train") == cls.split_folder(root, "val")

    def __init__(self, root: Path, split: str, holdout: float = 0.0, holdout_seed: int = 0):
        holdout = _check_holdout(holdout)
        folder = self.split_folder(root, "train" if holdout else split)
        reference = self.split_folder(root, "train")
        if split != "train" and folder == root and reference != root:
            raise DataError(f"{str(root)!r} has a train/ but no {split}/ sub-folder; arrange "
                            f"the {split} images as {str(root / split)}/<class>/<image>")
        self.folder = folder
        self.class_names = _class_dirs(reference)
        if not self.class_names:
            raise DataError(f"{str(reference)!r} has no class sub-folders; imagefolder expects "
                            f"root/<class>/<image> (or root/train/<class>/...)")
        index = {c: k for k, c in enumerate(self.class_names)}
        extra = [c for c in _class_dirs(folder) if c not in index]
        if extra:
            raise DataError(f"class folder {str(folder / extra[0])!r} has no counterpart in "
                            f"{str(reference)!r}; train and val must have the same classes")
        self.files, labels = [], []
        for name in self.class_names:
            found = _images_under(folder / name) if (folder / name).is_dir() else []
            if not found and folder == reference:
                raise DataError(f"class folder {str(folder / name)!r} holds no images "
                                f"({', '.join(IMAGE_EXTENSIONS)}); add images or remove it")
            self.files += found
            labels += [index[name]] * len(found)
        if not self.files:
            raise DataError(f"{str(folder)!r} holds no images in its class folders")
        self.labels = np.asarray(labels, dtype=np.int64)
        if holdout:
            self._keep(split != "train", holdout, holdout_seed)


@register_source("tiny-imagenet")
class TinyImageNet(FileSource):
    """Tiny ImageNet 200 as distributed: ``wnids.txt``, ``train/<wnid>/images/*.JPEG``, and
    ``val/images`` labelled by ``val/val_annotations.txt``; class indices follow wnids.txt.

    ``holdout`` (a fraction in (0, 1); 0, the default, keeps the official splits) sets aside a
    fixed, seeded (``holdout_seed``), stratified share of each class's train images, for
    choosing hyper-parameters on data that is not the reported val set: split ``train`` then
    drops that share, and split ``val`` returns it instead of the official val (with 500 train
    images a class and ``holdout: 0.1``: 450 for training, 50 for validation, per class). The
    two splits are disjoint and together are the official train split. The .beton cache key
    includes the source options, so these files never replace the official ones.
    """

    resolution = 64
    recipe = "pad_crop"
    write_mode = "raw"
    max_resolution = None

    @staticmethod
    def _base(root: Path) -> Path:
        for base in (root, root / "tiny-imagenet-200"):
            if (base / "wnids.txt").is_file():
                return base
        raise DataError(f"{str(root)!r} holds no wnids.txt; point --root at the extracted "
                        f"tiny-imagenet-200 folder")

    @classmethod
    def _wnids(cls, base: Path) -> list[str]:
        wnids = [w.strip() for w in (base / "wnids.txt").read_text().splitlines() if w.strip()]
        if not wnids:
            raise DataError(f"{str(base / 'wnids.txt')!r} is empty; re-extract tiny-imagenet-200")
        return wnids

    @classmethod
    def count_classes(cls, root: Path | None, **options) -> int:
        return len(cls._wnids(cls._base(root)))

    def __init__(self, root: Path, split: str, holdout: float = 0.0, holdout_seed: int = 0):
        holdout = _check_holdout(holdout)
        base = self._base(root)
        wnids = self._wnids(base)
        self.class_names = self._names(base, wnids)
        index = {w: k for k, w in enumerate(wnids)}
        if split == "train" or holdout:
            self.files, labels = [], []
            for w in wnids:
                found = _images_under(base / "train" / w / "images")
                if not found:
                    raise DataError(f"{str(base / 'train' / w / 'images')!r} holds no images; "
                                    f"re-extract tiny-imagenet-200")
                self.files += found
                labels += [index[w]] * len(found)
        else:
            self.files, labels = self._val(base, index)
        self.labels = np.asarray(labels, dtype=np.int64)
        if holdout:
            self._keep(split != "train", holdout, holdout_seed)

    def max_pixels(self) -> int:
        return 64 * 64

    @staticmethod
    def _names(base: Path, wnids: list[str]) -> list[str]:
        words = base / "words.txt"
        if not words.is_file():
            return list(wnids)
        table = dict(line.split("\t", 1) for line in words.read_text().splitlines() if "\t" in line)
        return [table.get(w, w).strip() for w in wnids]

    @staticmethod
    def _val(base: Path, index: dict[str, int]) -> tuple[list[str], list[int]]:
        notes = base / "val" / "val_annotations.txt"
        if not notes.is_file():
            raise DataError(f"{str(notes)!r} does not exist; Tiny ImageNet's val labels come "
                            f"from it, re-extract tiny-imagenet-200")
        files, labels = [], []
        for n, line in enumerate(notes.read_text().splitlines(), 1):
            if not line.strip():
                continue
            parts = line.split("\t")
            if len(parts) < 2 or parts[1] not in index:
                raise DataError(f"{str(notes)!r} line {n} names no known wnid; it should read "
                                f"'<file>\\t<wnid>\\t...' with a wnid from wnids.txt")
            files.append(str(base / "val" / "images" / parts[0]))
            labels.append(index[parts[1]])
        if not files:
            raise DataError(f"{str(notes)!r} lists no images; re-extract tiny-imagenet-200")
        return files, labels
