"""Image files on disk: the ImageNet class-folder layout and Tiny ImageNet's own layout."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from data.errors import DataError
from data.images import IMAGE_EXTENSIONS, is_image_file, load_rgb
from data.sources import ImageSource, register_source


def _class_dirs(folder: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def _images_under(folder: Path) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [os.path.join(dirpath, f) for f in sorted(filenames) if is_image_file(f)]
    return found


class FileSource(ImageSource):
    """Sources whose samples are image files: ``files[i]`` with label ``labels[i]``."""

    files: list[str]

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
    def splits_coincide(cls, root: Path | None) -> bool:
        return cls.split_folder(root, "train") == cls.split_folder(root, "val")

    def __init__(self, root: Path, split: str):
        folder = self.split_folder(root, split)
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


@register_source("tiny-imagenet")
class TinyImageNet(FileSource):
    """Tiny ImageNet 200 as distributed: ``wnids.txt``, ``train/<wnid>/images/*.JPEG``, and
    ``val/images`` labelled by ``val/val_annotations.txt``; class indices follow wnids.txt."""

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

    def __init__(self, root: Path, split: str):
        base = self._base(root)
        wnids = self._wnids(base)
        self.class_names = self._names(base, wnids)
        index = {w: k for k, w in enumerate(wnids)}
        if split == "train":
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
