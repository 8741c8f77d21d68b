"""Writing a .beton (``image``: RGBImageField, ``label``: IntField) from an ImageSource, safely.

ffcv's ``DatasetWriter`` is used for the file header; the worker loop is ours because ffcv's
waits forever when a worker dies (one corrupt JPEG hangs the whole write) and cannot drop a bad
sample. Here a worker reports the bad image and either the write stops with a clear error, or
(``skip_bad``) the sample is left out of the final index. The file is written under a temporary
name in the target folder and renamed only when complete, so an interrupted run never leaves a
partial .beton under the final name. Workers also accumulate per-channel pixel statistics, which
the DataModule uses to standardise inputs (what SNNs assume of their input).
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import fcntl
import multiprocessing as mp
import os
import signal
import socket
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from queue import Empty
from typing import Any, Iterator, Sequence

import numpy as np

from data.errors import DataError
from data.images import BadImage
from data.sidecar import FORMAT, sidecar_path, write_json_atomic
from data.sources import ImageSource

WRITE_MODES = ("raw", "jpg", "proportion", "smart")
MIN_PAGE = 1 << 21  # ffcv's smallest page; each sample must fit in one page
DEFAULT_PAGE = 1 << 23  # ffcv's default, for images of unknown size


@dataclass(frozen=True)
class WriteOptions:
    """How images are stored; the names and meaning follow ffcv-imagenet's write_imagenet.py.

    ``write_mode``: ``raw`` pixels, ``jpg``, ``proportion`` (JPEG with ``compress_probability``)
    or ``smart`` (JPEG when the raw image exceeds ``smart_threshold`` bytes, default 256²×3).
    ``max_resolution`` caps the longer side (None keeps the original size).
    """

    write_mode: str = "proportion"
    max_resolution: int | None = 400
    jpeg_quality: int = 90
    compress_probability: float = 0.1
    smart_threshold: int | None = None
    num_workers: int = -1
    chunk_size: int = 100

    def check(self) -> None:
        if self.write_mode not in WRITE_MODES:
            raise DataError(f"unknown write mode {self.write_mode!r}; choose one of: "
                            f"{', '.join(WRITE_MODES)}")
        if self.max_resolution is not None and self.max_resolution < 8:
            raise DataError(f"max_resolution {self.max_resolution} is too small; give at least "
                            f"8 pixels, or none to keep the original size")
        if not 1 <= self.jpeg_quality <= 100:
            raise DataError(f"jpeg_quality {self.jpeg_quality} is out of range; give 1..100")
        if not 0.0 <= self.compress_probability <= 1.0:
            raise DataError(f"compress_probability {self.compress_probability} is out of "
                            f"range; give a value in [0, 1]")
        if self.chunk_size < 1:
            raise DataError(f"chunk_size {self.chunk_size} must be at least 1")

    def fields(self) -> dict[str, Any]:
        from ffcv.fields import IntField, RGBImageField

        threshold = self.smart_threshold if self.smart_threshold is not None else 256 * 256 * 3
        return {
            "image": RGBImageField(write_mode=self.write_mode, max_resolution=self.max_resolution,
                                   smart_threshold=threshold, jpeg_quality=self.jpeg_quality,
                                   compress_probability=self.compress_probability),
            "label": IntField(),
        }

    def page_size(self, max_pixels: int | None) -> int:
        """Pages just big enough for the largest raw image: each worker fills its own pages,
        so oversized pages would bloat small datasets."""
        if self.max_resolution is not None:
            capped = self.max_resolution ** 2
            max_pixels = capped if max_pixels is None else min(max_pixels, capped)
        if max_pixels is None:
            return DEFAULT_PAGE
        return max(MIN_PAGE, 1 << (3 * max_pixels - 1).bit_length())

    def workers(self) -> int:
        return self.num_workers if self.num_workers > 0 else usable_cores()


def usable_cores() -> int:
    """The cores this process may run on (a container or ``taskset`` may allow fewer)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def temp_path(out: Path) -> Path:
    return out.with_name(f".{out.name}.{socket.gethostname()}.{os.getpid()}.partial")


def remove_stale_temps(out: Path) -> None:
    """Delete temporary files that killed runs on this host left next to ``out``."""
    prefix, host = f".{out.name}.", socket.gethostname()
    if not out.parent.is_dir():
        return
    for entry in out.parent.iterdir():
        parts = entry.name[len(prefix):].rsplit(".", 2)
        if not entry.name.startswith(prefix) or len(parts) != 3 or parts[2] != "partial":
            continue
        if parts[0] != host or not parts[1].isdigit() or _alive(int(parts[1])):
            continue
        entry.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _die_with(parent: int) -> None:
    """Have the kernel kill this process when its parent dies (a ``kill -9`` of prepare or of
    fit would otherwise leave writers filling a file nobody will rename)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the parent's finally still terminates the workers
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


@contextlib.contextmanager
def exclusive(out: Path, wait: bool) -> Iterator[None]:
    """Hold ``out``'s lock (a ``.<name>.lock`` file next to it, flock'ed, removed on release):
    one writer per output; a second one waits (``wait``) or refuses in one line."""
    lock = out.with_name(f".{out.name}.lock")
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise DataError(f"another process (pid {holder}) is writing {str(out)!r}; wait for "
                            f"it to finish or choose another --out") from None
        try:  # the holder we waited for removed the file: lock the one at the path now
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        lock.unlink(missing_ok=True)  # while still holding it: waiters then retry (above)
        os.close(fd)


def _work(worker_id: int, todo, results, done, metadata_sm, metadata_type, fields, allocator,
          source: ImageSource, skip_bad: bool, seed: int, parent: int) -> None:
    """One writer process: encode the chunks it takes from ``todo`` into its own pages."""
    from ffcv.writer import handle_sample

    _die_with(parent)
    # The parent alone handles Ctrl-C and stops the workers; no traceback wall from each.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    np.random.seed(seed + worker_id)  # write_mode=proportion draws from numpy's global RNG
    metadata = np.frombuffer(metadata_sm.buf, dtype=metadata_type)
    names = metadata_type.names
    pixel_sum, pixel_sq, pixels = np.zeros(3), np.zeros(3), 0
    bad: list[tuple[int, str]] = []
    src = None
    try:
        with allocator:
            while (chunk := todo.get()) is not None:
                for dest, src in chunk:
                    try:
                        image, label = source[src]
                    except BadImage as err:
                        if not skip_bad:
                            results.put(("error", f"cannot read image {err}; fix or remove it, "
                                                  f"or pass --skip-bad (data.skip_bad) to skip it"))
                            return
                        bad.append((dest, str(err)))
                        continue
                    # A grid of ≥ 64×64 pixels per image estimates the channel statistics well
                    # and costs nothing next to decoding (full-image float sums cost as much).
                    step = max(1, min(image.shape[:2]) // 64)
                    flat = image[::step, ::step].reshape(-1, 3).astype(np.float64)
                    pixel_sum += flat.sum(0)
                    pixel_sq += np.square(flat).sum(0)
                    pixels += flat.shape[0]
                    handle_sample((image, label), dest, names, metadata, allocator, fields)
                with done.get_lock():
                    done.value += len(chunk)
    except Exception as err:  # noqa: BLE001 - reported to the parent, which stops the write
        where = source.describe(src) if src is not None else source.name
        results.put(("error", f"writing {where} failed: {type(err).__name__}: {err}"))
        return
    results.put(("ok", allocator.allocations, bad, (pixel_sum, pixel_sq, pixels)))


def _finalize(path: Path, header, metadata_start: int, metadata: np.ndarray,
              allocations: list, keep: np.ndarray) -> None:
    """Write the metadata rows and allocation table of the kept samples, renumbered densely.

    A skipped sample wrote no data; dropping its metadata row and renumbering the rest leaves
    a valid beton (data pointers are absolute file offsets, so nothing else moves).
    """
    from ffcv.types import ALLOC_TABLE_TYPE

    new_id = np.full(len(metadata), -1, dtype=np.int64)
    new_id[keep] = np.arange(len(keep))
    table = np.array([a for a in allocations], dtype=ALLOC_TABLE_TYPE)
    table = table[new_id[table["sample_id"].astype(np.int64)] >= 0]
    table["sample_id"] = new_id[table["sample_id"].astype(np.int64)]
    header["num_samples"] = len(keep)
    with open(path, "r+b") as fp:
        fp.seek(metadata_start)
        fp.write(metadata[keep].tobytes())
        header["alloc_table_ptr"] = fp.seek(0, os.SEEK_END)
        fp.write(table.tobytes())
        fp.seek(0)
        fp.write(header.tobytes())
        fp.flush()
        os.fsync(fp.fileno())


def write_beton(source: ImageSource, out: str | os.PathLike, options: WriteOptions, *,
                split: str, indices: Sequence[int] | None = None, overwrite: bool = False,
                skip_bad: bool = False, progress: bool = True, seed: int = 0,
                provenance: dict[str, Any] | None = None, wait: bool = False,
                where: str = "--out") -> dict[str, Any] | None:
    """Write ``source`` (or its ``indices``) to ``out`` plus its sidecar; returns the sidecar.

    Refuses to replace an existing ``out`` unless ``overwrite``; never leaves a partial file
    under ``out``. Bad input raises DataError before anything existing is touched. One writer
    per output: another one refuses, or with ``wait`` waits and returns None when the first
    wrote the file meanwhile. ``where`` names the option that chose ``out`` (for messages).
    """
    options.check()
    out = Path(out).expanduser()
    if out.is_dir():
        raise DataError(f"output {str(out)!r} is a folder; give a file name such as "
                        f"{str(out / (split + '.beton'))!r}")
    if out.exists() and not overwrite:
        raise DataError(f"{str(out)!r} already exists; pass --overwrite to replace it or "
                        f"choose another {where}")
    order = np.arange(len(source)) if indices is None else np.asarray(indices, dtype=np.int64)
    if len(order) == 0:
        raise DataError(f"source {source.name!r} ({split}) has no samples to write")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out.parent):
            pass
    except OSError as err:
        raise DataError(f"cannot write into the folder of {str(out)!r} ({err.strerror}); "
                        f"choose a writable {where}") from None
    with exclusive(out, wait):
        if out.exists() and not overwrite:
            if wait:
                return None  # written by the writer we waited for
            raise DataError(f"{str(out)!r} was written by another process meanwhile; pass "
                            f"--overwrite to replace it or choose another {where}")
        return _write(source, out, options, order, split=split, skip_bad=skip_bad,
                      progress=progress, seed=seed, provenance=provenance)


def _write(source: ImageSource, out: Path, options: WriteOptions, order: np.ndarray, *,
           split: str, skip_bad: bool, progress: bool, seed: int,
           provenance: dict[str, Any] | None) -> dict[str, Any]:
    from ffcv.writer import DatasetWriter
    from tqdm import tqdm

    remove_stale_temps(out)
    tmp = temp_path(out)
    fields = options.fields()
    writer = DatasetWriter(str(tmp), fields, page_size=options.page_size(source.max_pixels()),
                           num_workers=options.workers())
    writer.num_samples = len(order)
    started = time.perf_counter()
    ctx = mp.get_context("fork")
    todo, results = ctx.Queue(), ctx.Queue()
    # On an error or Ctrl-C the workers are gone with chunks still queued: without this the
    # interpreter would wait at exit to flush them into a pipe nobody reads.
    todo.cancel_join_thread()
    procs: list = []
    try:
        writer.prepare()  # header, field descriptors and the shared metadata block
        jobs = list(enumerate(order.tolist()))
        for k in range(0, len(jobs), options.chunk_size):
            todo.put(jobs[k:k + options.chunk_size])
        n_workers = min(writer.num_workers, -(-len(jobs) // options.chunk_size))
        for _ in range(n_workers):
            todo.put(None)
        from ffcv.memory_allocator import MemoryAllocator

        allocator = MemoryAllocator(str(tmp), writer.data_region_start, writer.page_size)
        done = ctx.Value("Q", 0)
        procs = [ctx.Process(target=_work, daemon=True,
                             args=(w, todo, results, done, writer.metadata_sm,
                                   writer.metadata_type, fields, allocator, source, skip_bad,
                                   seed, os.getpid()))
                 for w in range(n_workers)]
        for p in procs:
            p.start()
        reports = _collect(procs, results, done, len(jobs),
                           tqdm(total=len(jobs), desc=f"{source.name}/{split}", unit="img",
                                disable=not progress, dynamic_ncols=True))
        for p in procs:
            p.join()
        metadata = np.frombuffer(writer.metadata_sm.buf, dtype=writer.metadata_type).copy()
        allocations = [a for r in reports for a in r[1]]
        bad = sorted(b for r in reports for b in r[2])
        keep = np.setdiff1d(np.arange(len(jobs)), [d for d, _ in bad])
        if len(keep) == 0:
            raise DataError(f"none of the {len(jobs)} images of {source.name!r} ({split}) "
                            f"could be read; the first error was: {bad[0][1]}")
        _finalize(tmp, writer.header, writer.metadata_start, metadata, allocations, keep)
        meta = _sidecar(source, split, order[keep], metadata[keep], reports, bad, order,
                        options, provenance, time.perf_counter() - started)
        write_json_atomic(sidecar_path(out), meta)
        os.replace(tmp, out)
        return meta
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join()
        writer_sm = getattr(writer, "metadata_sm", None)
        if writer_sm is not None and not isinstance(writer_sm, int):
            writer_sm.close()
            writer_sm.unlink()
        tmp.unlink(missing_ok=True)


def _collect(procs, results, done, total: int, bar) -> list:
    """Wait for every worker's report, failing fast on an error report or a dead worker."""
    reports: list = []
    with bar:
        while len(reports) < len(procs):
            try:
                report = results.get(timeout=0.1)
            except Empty:
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead:
                    raise DataError(f"a prepare worker died (exit code {dead[0].exitcode}), "
                                    f"probably out of memory; retry with fewer --num-workers")
                bar.update(done.value - bar.n)
                continue
            if report[0] == "error":
                raise DataError(report[1])
            reports.append(report)
        bar.update(total - bar.n)
    return reports


def _sidecar(source: ImageSource, split: str, kept: np.ndarray, rows: np.ndarray, reports: list,
             bad: list, order: np.ndarray, options: WriteOptions,
             provenance: dict[str, Any] | None, seconds: float) -> dict[str, Any]:
    from importlib.metadata import version

    pixel_sum = sum(r[3][0] for r in reports)
    pixel_sq = sum(r[3][1] for r in reports)
    pixels = max(sum(r[3][2] for r in reports), 1)
    mean = pixel_sum / pixels
    std = np.sqrt(np.maximum(pixel_sq / pixels - mean ** 2, 1e-12))
    labels = source.labels[kept]
    image = rows["f0"]
    return {
        "format": FORMAT,
        "source": source.name,
        "split": split,
        "num_samples": int(len(kept)),
        "num_classes": len(source.class_names),
        "class_names": list(source.class_names),
        "class_counts": np.bincount(labels, minlength=len(source.class_names)).tolist(),
        "mean": (mean / 255.0).round(6).tolist(),
        "std": (std / 255.0).round(6).tolist(),
        "min_size": [int(image["height"].min()), int(image["width"].min())],
        "max_size": [int(image["height"].max()), int(image["width"].max())],
        "skipped": [{"item": source.describe(int(order[d])), "error": msg} for d, msg in bad],
        "write": {k: v for k, v in asdict(options).items() if k not in ("num_workers",)},
        **(provenance or {}),
        "ffcv": version("ffcv"),
        "seconds": round(seconds, 2),
    }
