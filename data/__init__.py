"""selfnorm data: FFCV .beton preparation, the FFCV image DataModule, the tabular DataModule.

Attributes are imported lazily (like ``models``) so that ``python -m app prepare --help`` and
configs naming ``data.TabularDataModule`` do not pay for importing ffcv.
"""
from __future__ import annotations

import importlib
from typing import Any

# public name -> submodule that defines it
_LAZY = {
    "FFCVImageDataModule": "data.datamodule",
    "TabularDataModule": "data.tabular",
    "FFCVLoader": "data.loader",
    "data_dir": "data.prepare",
    "read_sidecar": "data.sidecar",
    "open_source": "data.sources",
    "list_sources": "data.sources",
    "register_source": "data.sources",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'data' has no attribute {name!r}")
