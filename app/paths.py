"""Checks of the places a command writes to, before it creates anything there."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from app.errors import UserError


def check_output_folder(path: Path, what: str, need_bytes: int = 0) -> None:
    """One line, before anything is created, unless ``path`` can take the run's files."""
    if path.exists() and not path.is_dir():
        raise UserError(f"{what} {path} is a file; give a folder")
    existing = path
    while not existing.exists():
        existing = existing.parent
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise UserError(f"cannot write to {what} {path} ({err.strerror or err}); choose a "
                        f"writable folder") from None
    free = shutil.disk_usage(existing).free
    if need_bytes and free < need_bytes:
        raise UserError(f"{what} {path} has {free / 2**20:.0f} MiB free, but one checkpoint of "
                        f"this model takes about {need_bytes / 2**20:.0f} MiB; free space or "
                        f"choose another folder")
