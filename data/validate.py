"""Checks of the files a data module is given, before ffcv reads them.

ffcv trusts its input: an empty, truncated or foreign file fails deep inside it ("negative
dimensions are not allowed", "file format mismatch", an index error), or trains on garbage.
``check_beton`` reads the header, the field descriptors, the metadata and the allocation table
(no image is decoded) and says in one line what is wrong and what to do.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from data.errors import DataError

# ffcv's type ids of the fields a classification .beton holds (ffcv/types.py)
EXPECTED_FIELDS = {"image": "RGBImageField", "label": "IntField"}
_REWRITE = "write it again with `python -m app prepare`"


def check_beton(path: str | os.PathLike, what: str = ".beton") -> int:
    """Raise a one-line DataError unless ``path`` is a complete classification .beton;
    returns its number of samples."""
    from ffcv.types import (ALLOC_TABLE_TYPE, CURRENT_VERSION, FieldDescType, HeaderType,
                            TYPE_ID_HANDLER, get_metadata_type)
    from ffcv.utils import decode_null_terminated_string

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} {str(path)!r} does not exist; check the path")
    if not os.access(path, os.R_OK):
        raise DataError(f"{what} {str(path)!r} is not readable; check its permissions")
    size = path.stat().st_size
    if size < HeaderType.itemsize:
        raise DataError(f"{what} {str(path)!r} is empty or not a .beton ({size} bytes); "
                        f"{_REWRITE}")
    header = np.fromfile(path, dtype=HeaderType, count=1)[0]
    if int(header["version"]) != CURRENT_VERSION:
        raise DataError(f"{what} {str(path)!r} is not a .beton of this ffcv (format "
                        f"{int(header['version'])}, expected {CURRENT_VERSION}); {_REWRITE}")
    n_fields, n_samples = int(header["num_fields"]), int(header["num_samples"])
    table_at = int(header["alloc_table_ptr"])
    fields_end = HeaderType.itemsize + n_fields * FieldDescType.itemsize
    if not 1 <= n_fields <= 64 or fields_end > size:
        raise DataError(f"{what} {str(path)!r} has a corrupt header ({n_fields} fields); "
                        f"{_REWRITE}")
    fields = np.fromfile(path, dtype=FieldDescType, count=n_fields,
                         offset=HeaderType.itemsize)
    names = [decode_null_terminated_string(f["name"]) for f in fields]
    kinds = {name: getattr(TYPE_ID_HANDLER.get(int(f["type_id"])), "__name__", "unknown")
             for name, f in zip(names, fields)}
    for name, kind in EXPECTED_FIELDS.items():
        if kinds.get(name) != kind:
            found = ", ".join(f"{n} ({k})" for n, k in kinds.items())
            raise DataError(f"{what} {str(path)!r} holds {found}, not the image "
                            f"(RGBImageField) and label (IntField) fields of a classification "
                            f".beton; {_REWRITE}")
    handlers = [TYPE_ID_HANDLER[int(f["type_id"])].from_binary(f["arguments"]) for f in fields]
    metadata_type = get_metadata_type(handlers)
    if n_samples == 0 or fields_end + n_samples * metadata_type.itemsize > min(table_at, size):
        raise DataError(f"{what} {str(path)!r} is truncated or corrupt (header: {n_samples} "
                        f"samples, {size} bytes on disk); {_REWRITE}")
    table_bytes = size - table_at
    if table_at > size or table_bytes % ALLOC_TABLE_TYPE.itemsize or table_bytes == 0:
        raise DataError(f"{what} {str(path)!r} is truncated ({size} bytes, its index starts "
                        f"at byte {table_at}); {_REWRITE}")
    table = np.fromfile(path, dtype=ALLOC_TABLE_TYPE, offset=table_at)
    if (table["sample_id"] >= n_samples).any() or (table["ptr"] + table["size"] > table_at).any():
        raise DataError(f"{what} {str(path)!r} has a corrupt index; {_REWRITE}")
    meta = np.fromfile(path, dtype=metadata_type, count=n_samples, offset=fields_end)
    image = meta[f"f{names.index('image')}"]
    if (image["height"] == 0).any() or (image["width"] == 0).any():
        raise DataError(f"{what} {str(path)!r} holds images of zero size; {_REWRITE}")
    return n_samples
