"""Source → .beton, shared by ``python -m app prepare`` and the DataModule's ``prepare_data``.

Betons that a config does not name go to a cache folder (``$SELFNORM_DATA_DIR``, else
``$XDG_CACHE_HOME/selfnorm/data`` or ``~/.cache/selfnorm/data``) under a name derived from
everything that changes their content, so the demo works from any directory and a changed
option never silently reuses a stale file.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from data.errors import DataError
from data.sources import get_source, open_source
from data.writer import WriteOptions, write_beton


def data_dir() -> Path:
    if os.environ.get("SELFNORM_DATA_DIR"):
        return Path(os.environ["SELFNORM_DATA_DIR"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "selfnorm" / "data"


def write_options(source: str, **overrides: Any) -> WriteOptions:
    """The source's storage defaults with the given (non-None) overrides applied.

    ``max_resolution=0`` means "keep the original size".
    """
    cls = get_source(source)
    options = WriteOptions(write_mode=cls.write_mode, max_resolution=cls.max_resolution,
                           compress_probability=cls.compress_probability)
    given = {k: v for k, v in overrides.items() if v is not None}
    if given.get("max_resolution") == 0:
        given["max_resolution"] = None
    return replace(options, **given)


@dataclass(frozen=True)
class Preparation:
    """How a data module writes the .beton files it finds missing (None: the source's default).

    ``write_mode``, ``max_resolution`` (0 keeps the size), ``jpeg_quality`` and
    ``compress_probability`` are FFCV's storage options (ffcv-imagenet's names); ``subset`` writes
    a fixed random subset of that many train images; ``skip_bad`` skips unreadable images
    instead of stopping.
    """

    write_mode: str | None = None
    max_resolution: int | None = None
    jpeg_quality: int | None = None
    compress_probability: float | None = None
    subset: int | None = None
    skip_bad: bool = False

    def options(self, source: str) -> WriteOptions:
        """The storage options for ``source``, checked."""
        options = write_options(source, write_mode=self.write_mode,
                                max_resolution=self.max_resolution,
                                jpeg_quality=self.jpeg_quality,
                                compress_probability=self.compress_probability)
        options.check()
        return options


def default_beton(source: str, split: str, root: str | None, source_options: dict[str, Any],
                  options: WriteOptions, subset: int | None) -> Path:
    """Where the DataModule keeps ``split`` of ``source`` when no path is configured."""
    key = {"root": str(Path(root).expanduser().resolve()) if root else None,
           "options": source_options, "write": asdict(options) | {"num_workers": None},
           "subset": subset}
    digest = hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return data_dir() / f"{get_source(source).name}-{digest}" / f"{split}.beton"


def choose_subset(labels: np.ndarray, subset: int | None, seed: int) -> np.ndarray | None:
    """``subset`` samples drawn without replacement with ``seed`` (in file order, for locality).

    Unlike ffcv-imagenet's first-N, a random draw keeps every class of a class-sorted folder.
    """
    if subset is None or subset >= len(labels):
        return None
    if subset < 1:
        raise DataError(f"subset {subset} must be a positive number of images")
    return np.sort(np.random.default_rng(seed).choice(len(labels), size=subset, replace=False))


def prepare(source: str, split: str, out: str | os.PathLike, root: str | None = None, *,
            options: WriteOptions | None = None, source_options: dict[str, Any] | None = None,
            subset: int | None = None, seed: int = 0, overwrite: bool = False,
            skip_bad: bool = False, progress: bool = True, wait: bool = False,
            where: str = "--out") -> dict[str, Any] | None:
    """Write ``split`` of ``source`` to ``out`` (plus ``out.json``); returns the sidecar, or
    None when ``wait`` waited for another writer of ``out`` that wrote it meanwhile."""
    source_options = dict(source_options or {})
    options = options or write_options(source)
    out = Path(out).expanduser()
    if out.exists() and not overwrite:
        # Checked before reading the source: a slow folder walk should not precede this error.
        raise DataError(f"{str(out)!r} already exists; pass --overwrite to replace it or "
                        f"choose another {where}")
    src = open_source(source, root, split, **source_options)
    provenance = {"root": str(Path(root).expanduser().resolve()) if root else None,
                  "source_options": source_options, "subset": subset, "seed": seed}
    return write_beton(src, out, options, split=split, overwrite=overwrite, skip_bad=skip_bad,
                       indices=choose_subset(src.labels, subset, seed), progress=progress,
                       seed=seed, provenance=provenance, wait=wait, where=where)
