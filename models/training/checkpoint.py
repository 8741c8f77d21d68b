"""Checkpoints you can trust: ``last.ckpt`` is always the newest state; every file is atomic.

``Checkpoint`` is Lightning's ``ModelCheckpoint`` for the best checkpoint (by ``monitor``), plus
its own ``last.ckpt``: written at every epoch end, every ``every_n_train_steps`` optimizer steps,
every ``every_n_minutes`` of training, and on demand (``write_last``, which the preemption callback
calls). The previous ``last.ckpt`` is kept as ``last-previous.ckpt``, the fallback when the newest
file turns out unreadable.

``AtomicCheckpointIO`` writes every checkpoint (the best, the last, the guard's diagnostic one) to
a temporary name in the same folder, flushes it to disk and renames it into place, so no reader
ever sees a truncated file under a final name; a failed write (disk full) removes the temporary
file, leaves the previous checkpoint as it was, and raises one line. It loads checkpoints with
``weights_only=True`` unless the caller asks otherwise (``--weights_only false`` for a file you
trust): selfnorm's own checkpoints hold tensors and plain data only.
"""
from __future__ import annotations

import errno
import io
import os
import re
import socket
import time
import zipfile
from pathlib import Path
from typing import Any, Callable

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

from models.errors import ModelError

LAST = "last.ckpt"
PREVIOUS = "last-previous.ckpt"
_PARTIAL = ".partial"


class CheckpointError(ModelError):
    """A checkpoint that cannot be written or read; the message names the file and the fix."""


def _partial_name(path: Path) -> Path:
    # host and pid: on a shared file system only this host can tell whether the writer lives
    return path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}{_PARTIAL}")


def remove_stale_partials(folder: Path) -> None:
    """Delete the temporary files that killed processes on this host left in ``folder``."""
    if not folder.is_dir():
        return
    host = socket.gethostname()
    for entry in folder.glob(f".*{_PARTIAL}"):
        parts = entry.name[:-len(_PARTIAL)].rsplit(".", 2)
        if len(parts) != 3 or parts[1] != host or not parts[2].isdigit():
            continue
        if not _alive(int(parts[2])):
            entry.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` to a temporary file, fsync, rename; safe ``torch.load`` by default.

    ``storage_options={"keep_previous": True}`` first moves an existing file at the target to
    ``last-previous.ckpt`` (only once the new file is complete).
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike,
                        storage_options: Any | None = None) -> None:
        path = Path(path)
        keep_previous = bool((storage_options or {}).get("keep_previous"))
        tmp = _partial_name(path)
        # serialized in memory first (as Lightning does): a short write on a full disk is then
        # the OSError it is, not torch's zip writer's "unexpected pos"
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as fh:
                fh.write(buffer.getbuffer())
                fh.flush()
                os.fsync(fh.fileno())
            if keep_previous and path.exists():
                os.replace(path, path.with_name(PREVIOUS))
            os.replace(tmp, path)
            _fsync_folder(path.parent)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            fix = ("free space on that disk or point trainer.default_root_dir elsewhere"
                   if err.errno in (errno.ENOSPC, errno.EDQUOT) else
                   "check that the folder is writable")
            raise CheckpointError(f"could not write checkpoint {path} ({err.strerror or err}); "
                                  f"the previous checkpoints are intact; {fix}") from None
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def load_checkpoint(self, path: str | os.PathLike,
                        map_location: Callable | None = lambda storage, loc: storage,
                        weights_only: bool | None = None) -> dict[str, Any]:
        return load_checkpoint(path, map_location=map_location,
                               weights_only=True if weights_only is None else weights_only)


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu",
                    weights_only: bool = True, mmap: bool = False) -> dict[str, Any]:
    """``torch.load`` with one-line errors for missing, truncated, foreign or unsafe files."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; check --ckpt_path")
    if not zipfile.is_zipfile(path):  # torch.save's format since 1.6; a cut file loses its end
        raise CheckpointError(f"checkpoint {path} is not a checkpoint file (truncated, or another "
                              f"kind of file); use another checkpoint")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=weights_only, mmap=mmap)
    except torch.serialization.pickle.UnpicklingError as err:
        if not weights_only:
            raise CheckpointError(f"checkpoint {path} is unreadable ({_first_line(err)}); use "
                                  f"another checkpoint") from None
        raise CheckpointError(f"checkpoint {path} needs unsafe unpickling "
                              f"({_unsafe_global(err)}), which could run code from the file; if "
                              f"you trust it, pass --weights_only false") from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path} is unreadable ({_first_line(err)}): truncated "
                              f"or not a checkpoint; use another checkpoint") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"{path} is not a Lightning checkpoint (no state_dict); pass a "
                              f".ckpt file written by python -m app fit")
    return ckpt


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _unsafe_global(err: BaseException) -> str:
    found = re.search(r"GLOBAL (\S+) was not an allowed global", str(err))
    return f"it holds a {found[1]} object" if found else _first_line(err)


class Checkpoint(ModelCheckpoint):
    """The best checkpoint by ``monitor`` and an always-newest ``last.ckpt``.

    Args:
        dirpath: folder of the checkpoints (default: ``<run folder>/checkpoints``).
        monitor: metric that picks the best checkpoint (null: no best checkpoint).
        mode: ``max`` or ``min`` of ``monitor``.
        save_top_k: best checkpoints to keep.
        filename: name of the best checkpoint (Lightning's format, e.g. ``best-epoch{epoch:03d}``).
        every_n_train_steps: also write ``last.ckpt`` every N optimizer steps (null: epoch ends).
        every_n_minutes: also write ``last.ckpt`` after this much training time (checked every
            50 steps; rank 0's clock decides for all ranks).
        keep_previous: keep the replaced ``last.ckpt`` as ``last-previous.ckpt``.
    """

    CHECK_EVERY = 50  # steps between clock checks (each one a broadcast under DDP)

    def __init__(self, dirpath: str | None = None, monitor: str | None = "val/top1",
                 mode: str = "max", save_top_k: int = 1, filename: str = "best-epoch{epoch:03d}",
                 every_n_train_steps: int | None = None, every_n_minutes: float | None = None,
                 keep_previous: bool = True) -> None:
        if every_n_train_steps is not None and not (isinstance(every_n_train_steps, int)
                                                    and every_n_train_steps >= 1):
            raise ModelError(f"checkpoint.every_n_train_steps must be a positive integer or "
                             f"null, got {every_n_train_steps!r}.")
        if every_n_minutes is not None and not every_n_minutes > 0:
            raise ModelError(f"checkpoint.every_n_minutes must be positive or null, got "
                             f"{every_n_minutes!r}.")
        if mode not in ("max", "min"):
            raise ModelError(f"checkpoint.mode must be max or min, got {mode!r}.")
        super().__init__(dirpath=dirpath, filename=filename, monitor=monitor, mode=mode,
                         save_top_k=save_top_k if monitor else 0, save_last=False,
                         auto_insert_metric_name=False)
        self.last_every_n_train_steps = every_n_train_steps
        self.every_n_minutes = every_n_minutes
        self.keep_previous = keep_previous
        self._last_save_time = time.monotonic()

    @property
    def last_path(self) -> Path:
        return Path(self.dirpath or ".") / LAST

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        if trainer.is_global_zero and self.dirpath:
            remove_stale_partials(Path(self.dirpath))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._last_save_time = time.monotonic()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        step = trainer.global_step
        due = bool(self.last_every_n_train_steps and step % self.last_every_n_train_steps == 0)
        if self.every_n_minutes and step % self.CHECK_EVERY == 0:
            late = time.monotonic() - self._last_save_time >= 60 * self.every_n_minutes
            due |= bool(trainer.strategy.broadcast(late, src=0))
        if due:
            self.write_last(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if not trainer.sanity_checking:
            self.write_last(trainer)

    def write_last(self, trainer: L.Trainer) -> Path:
        """Write ``last.ckpt`` now (every rank calls this; rank 0 writes)."""
        options = ({"keep_previous": self.keep_previous}
                   if isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO) else None)
        trainer.save_checkpoint(self.last_path, weights_only=False, storage_options=options)
        self.last_model_path = str(self.last_path)
        self._last_save_time = time.monotonic()
        return self.last_path
