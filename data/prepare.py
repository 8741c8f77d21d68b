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
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np

from app.errors import UserError
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
        raise UserError(f"subset {subset} must be a positive number of images")
    return np.sort(np.random.default_rng(seed).choice(len(labels), size=subset, replace=False))


def prepare(source: str, split: str, out: str | os.PathLike, root: str | None = None, *,
            options: WriteOptions | None = None, source_options: dict[str, Any] | None = None,
            subset: int | None = None, seed: int = 0, overwrite: bool = False,
            skip_bad: bool = False, progress: bool = True) -> dict[str, Any]:
    """Write ``split`` of ``source`` to ``out`` (plus ``out.json``); returns the sidecar."""
    source_options = dict(source_options or {})
    options = options or write_options(source)
    out = Path(out).expanduser()
    if out.exists() and not overwrite:
        # Checked before reading the source: a slow folder walk should not precede this error.
        raise UserError(f"{str(out)!r} already exists; pass --overwrite (data.overwrite) to "
                        f"replace it or choose another --out")
    src = open_source(source, root, split, **source_options)
    provenance = {"root": str(Path(root).expanduser().resolve()) if root else None,
                  "source_options": source_options, "subset": subset, "seed": seed}
    return write_beton(src, out, options, split=split, overwrite=overwrite, skip_bad=skip_bad,
                       indices=choose_subset(src.labels, subset, seed), progress=progress,
                       seed=seed, provenance=provenance)
