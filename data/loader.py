"""An FFCV Loader made safe to hand to Lightning.

``FFCVLoader`` wraps ``ffcv.loader.Loader`` and fixes what a trainer trips over (ffcv 1.0.2):

* Leaving an epoch early (sanity check, ``limit_*_batches``, early stopping) leaks ffcv's
  producer thread and its batch buffers (ffcv #345, #393): its thread holds the only reference
  to itself and blocks on a full queue forever. Each new epoch, ``close()`` and the generator's
  ``finally`` stop the previous producer for good.
* A new Loader starts at epoch 0, so a resumed run would replay epoch 0's order: the order is
  taken from ``epoch()`` (the trainer's current epoch), each epoch a fresh seeded shuffle.
* Batches live in buffers that ffcv reuses ``batches_ahead + 2`` batches later, while Lightning
  holds one batch back to detect the last one; each batch is handed out as new tensors (the
  normalisation on the GPU, a copy into the training dtype on the CPU), so the trainer owns it.
* ffcv's ``Compiler.set_num_threads`` also calls ``torch.set_num_threads(num_workers)``, from its
  producer thread too, which silently caps torch's pool for the training step (matmuls 2×
  slower measured with ``num_workers=1`` on 2 cores); only its numba part is kept.
* ffcv writes each batch on side CUDA streams of its own: leaving an epoch early makes the
  batch buffers' stream wait on them before the buffers can be freed and reused.
* ffcv's OS-cache reader marks numba's shared, interned ``uint8[::1]`` type read-only by
  mutating it, which corrupts numba's dispatcher tables ("Exception ignored ... KeyError" each
  time a loader is freed); the same reader is compiled with a read-only type of its own.
"""
from __future__ import annotations

import sys
import time
from multiprocessing import cpu_count
from queue import Empty
from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor


def _patch_ffcv() -> None:
    import numba
    import numpy as np
    from ffcv.memory_managers.os_cache import OSCacheManager
    from ffcv.pipeline.compiler import Compiler

    def set_num_threads(cls, n: int) -> None:
        cls.num_threads = n if n >= 1 else cpu_count()
        numba.set_num_threads(min(cls.num_threads, numba.config.NUMBA_NUM_THREADS))

    def compile_reader(self):
        def read(address, mem_state):
            size = mem_state[2][np.searchsorted(mem_state[1], address)]
            return mem_state[0][address:address + size]

        data = numba.types.Array(numba.uint8, 1, "C", readonly=True)
        table = numba.uint64[::1]
        return Compiler.compile(read, data(numba.uint64, numba.types.Tuple([data, table, table])))

    Compiler.set_num_threads = classmethod(set_num_threads)
    OSCacheManager.compile_reader = compile_reader


_patch_ffcv()


def stop_epoch(it, timeout: float = 60.0) -> None:
    """Stop an ffcv EpochIterator for good, wait until its threads have ended and order its
    pending CUDA copies before any reuse of its buffers."""
    it.iter_ixes = iter(())  # the producer takes no further batch after the one in flight
    it.terminate_event.set()
    if sys.is_finalizing():
        return  # threads no longer run at interpreter exit: waiting would never end
    deadline = time.monotonic() + timeout
    while it.is_alive() and time.monotonic() < deadline:
        try:  # make room, so that a producer blocked in put() returns and sees the end
            it.output_queue.get(timeout=0.05)
        except Empty:
            pass
    it.close()
    # os_cache=False: the epoch's page readers end on the stop marks close() just queued.
    for reader in getattr(getattr(it.memory_context, "executor", None), "threads", ()):
        reader.join()
    wait_for_streams(it)


def wait_for_streams(it) -> None:
    """Order the stream that owns ``it``'s batch buffers after ffcv's side streams.

    ffcv copies each batch on a side stream (one per buffer slot) without ``record_stream``
    and only syncs a slot when its batch is taken: batches left in the queue or in flight
    could still be written after the iterator drops its buffers and the caching allocator
    hands them out again. The buffers were allocated on ``it.current_stream`` (the current
    stream when the epoch began; ffcv syncs its batches to it). No-op without CUDA (ffcv then
    keeps ``None`` streams).
    """
    streams = [s for s in getattr(it, "cuda_streams", ()) if s is not None]
    if not streams:
        return
    owner = getattr(it, "current_stream", None)
    if owner is None:
        owner = torch.cuda.current_stream()
    for stream in streams:
        owner.wait_stream(stream)


class FFCVLoader:
    """Iterable of ``(images, labels)``: images normalised ``(x/255 − mean)/std`` in ``dtype``
    on ``device``, in channels_last memory format or contiguous (NCHW) as ``channels_last``
    says; labels int64 on ``device``.

    With ``mean``/``std`` the pipeline delivers uint8 images that are normalised here (on the
    GPU), in float32 (float64 for float64) and rounded once to ``dtype``; without, it already
    normalised them (on the CPU) and they are only copied out.
    ``epoch()`` gives the epoch whose order the next iteration uses (default: count the
    iterations, as ffcv does); ``before_epoch(epoch)`` runs first (progressive resizing).
    """

    def __init__(self, loader, *, device: torch.device, dtype: torch.dtype = torch.float32,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 channels_last: bool = True, epoch: Callable[[], int] | None = None,
                 before_epoch: Callable[[int], None] | None = None):
        self.loader = loader
        self.device = device
        self.dtype = dtype
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self._shift: Tensor | None = None
        self._scale: Tensor | None = None
        if mean is not None and std is not None:
            # Kept in float32 at least: in bf16 the ImageNet shift 123.675 would be 123.5.
            work = torch.promote_types(dtype, torch.float32)

            def channels(values: list[float]) -> Tensor:
                return torch.tensor(values, dtype=work, device=device).view(1, -1, 1, 1)

            self._shift = channels([255.0 * m for m in mean])
            self._scale = channels([1.0 / (255.0 * s) for s in std])
        self._count = 0
        self._epoch = epoch or (lambda: self._count)
        self._before_epoch = before_epoch
        self._active = None

    def __len__(self) -> int:
        return len(self.loader)

    @property
    def batch_size(self) -> int:
        return self.loader.batch_size

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        self.close()
        epoch = int(self._epoch())
        if self._before_epoch is not None:
            self._before_epoch(epoch)
        self.loader.next_epoch = epoch
        self._count = epoch + 1
        # ffcv allocates its batch buffers here and fills them from its own thread, which runs
        # outside inference mode: buffers made under Lightning's inference_mode (validate, test,
        # predict) would be inference tensors, the thread's in-place writes would fail and the
        # loop would wait forever.
        with torch.inference_mode(False):
            it = iter(self.loader)  # starts the producer now, ahead of the first next()
        self._active = it
        return self._batches(it)

    def _batches(self, it) -> Iterator[tuple[Tensor, Tensor]]:
        try:
            for images, labels in it:
                yield self.normalize(images), labels.clone()
        finally:
            self._stop(it)

    def normalize(self, images: Tensor) -> Tensor:
        """A new tensor the caller owns (ffcv reuses the one it returned), in ``dtype`` and the
        requested memory format."""
        if self._shift is None:  # normalised by the pipeline, which also made the layout
            return images.to(self.dtype, memory_format=self.memory_format, copy=True)
        assert self._scale is not None
        # Two passes over the batch: ``sub`` reads the uint8 pixels, promoting them as it goes,
        # into a new tensor whose layout is the requested one; ``mul`` writes the result in
        # ``dtype``, rounding the float32 arithmetic once.
        work = torch.empty(images.shape, dtype=self._shift.dtype, device=images.device,
                           memory_format=self.memory_format)
        torch.sub(images, self._shift, out=work)
        if work.dtype == self.dtype:
            return work.mul_(self._scale)
        return torch.mul(work, self._scale, out=torch.empty_like(work, dtype=self.dtype))

    def _stop(self, it) -> None:
        stop_epoch(it)
        if self._active is it:
            self._active = None

    def close(self) -> None:
        """Stop the current epoch's producer, if any (safe to call at any time)."""
        if getattr(self, "_active", None) is not None:
            self._stop(self._active)

    def __del__(self) -> None:
        self.close()
