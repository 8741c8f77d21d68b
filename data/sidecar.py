"""The JSON sidecar written next to each .beton: classes, counts, statistics, provenance.

``train.beton`` gets ``train.beton.json``. It records the beton's sample count so that a sidecar
left from an older beton (a run killed between the two renames) is recognised and ignored.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "selfnorm-beton-sidecar/1"


def sidecar_path(beton: str | os.PathLike) -> Path:
    beton = Path(beton)
    return beton.with_name(beton.name + ".json")


def beton_num_samples(beton: str | os.PathLike) -> int:
    """The sample count from the .beton header (no decoding, no full read)."""
    from ffcv.types import HeaderType

    return int(np.fromfile(beton, dtype=HeaderType, count=1)[0]["num_samples"])


def beton_labels(beton: str | os.PathLike, field: str = "label") -> np.ndarray:
    """Labels straight from the .beton metadata: for betons written without a sidecar."""
    from ffcv.reader import Reader

    reader = Reader(str(beton))
    names = reader.field_names
    return np.asarray(reader.metadata[f"f{names.index(field)}"], dtype=np.int64)


def read_sidecar(beton: str | os.PathLike) -> dict[str, Any] | None:
    """The sidecar of ``beton``, or None when there is none or it belongs to another beton."""
    path = sidecar_path(beton)
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if meta.get("format") != FORMAT or not Path(beton).is_file():
        return None
    if meta.get("num_samples") != beton_num_samples(beton):
        return None
    return meta


def write_json_atomic(path: Path, content: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    tmp.write_text(json.dumps(content, indent=1) + "\n")
    os.replace(tmp, path)


def beton_image_sizes(beton: str | os.PathLike,
                      field: str = "image") -> tuple[tuple[int, int], tuple[int, int]]:
    """The smallest and largest stored (height, width), from the metadata (no decoding)."""
    from ffcv.reader import Reader

    reader = Reader(str(beton))
    meta = reader.metadata[f"f{reader.field_names.index(field)}"]
    return ((int(meta["height"].min()), int(meta["width"].min())),
            (int(meta["height"].max()), int(meta["width"].max())))
