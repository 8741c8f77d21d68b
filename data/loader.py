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
* ffcv's producer thread starts on CUDA device 0 and enters ``torch.cuda.stream`` on the
  loader's device: on CUDA ≥ 12 that creates a context on GPU 0 from every DDP rank (~0.5 GB
  each). The thread first makes the loader's device its current one.
* A run resumed mid-epoch would repeat the epoch from its start: the loader is stateful
  (``state_dict``/``load_state_dict``, which Lightning saves with the checkpoint), and a resumed
  epoch skips the batches already trained, in the same order.
"""
from __future__ import annotations

import sys
import time
from multiprocessing import cpu_count
from queue import Empty
from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor

from data.errors import DataError


def _patch_ffcv() -> None:
    import numba
    import numpy as np
    from ffcv.loader.epoch_iterator import EpochIterator
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

    run = EpochIterator.run

    def run_on_the_loaders_device(self) -> None:
        stream = getattr(self, "current_stream", None)  # created on the loader's device
        if stream is not None and stream.device.type == "cuda":
            torch.cuda.set_device(stream.device)
        run(self)

    Compiler.set_num_threads = classmethod(set_num_threads)
    OSCacheManager.compile_reader = compile_reader
    EpochIterator.run = run_on_the_loaders_device


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
    GPU) in one pass, computed in float32 (float64 for float64) and rounded once to ``dtype``;
    without, it already normalised them (on the CPU) and they are only copied out.
    ``epoch()`` gives the epoch whose order the next iteration uses (default: count the
    iterations, as ffcv does); ``before_epoch(epoch)`` runs first (seeded augmentation,
    progressive resizing). A sample that one of ``decoders`` failed to decode stops the
    iteration with one line naming ``path`` and the sample. ``consumed`` counts the batches
    of the current epoch that reached the training step (the data module counts them): a
    checkpoint's ``state_dict`` records it.
    """

    def __init__(self, loader, *, device: torch.device, dtype: torch.dtype = torch.float32,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 channels_last: bool = True, epoch: Callable[[], int] | None = None,
                 before_epoch: Callable[[int], None] | None = None,
                 decoders: Sequence = (), path: object = None):
        self.loader = loader
        self.decoders, self.path = list(decoders), path
        self.device = device
        self.dtype = dtype
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self._bias: Tensor | None = None
        self._scale: Tensor | None = None
        if mean is not None and std is not None:
            # Kept in float32 at least: in bf16 the ImageNet shift 123.675 would be 123.5.
            work = torch.promote_types(dtype, torch.float32)

            def channels(values: list[float]) -> Tensor:
                return torch.tensor(values, dtype=work, device=device).view(1, -1, 1, 1)

            # (x − 255·mean)/(255·std) = x·scale + bias
            self._scale = channels([1.0 / (255.0 * s) for s in std])
            self._bias = channels([-m / s for m, s in zip(mean, std)])
        self._count = 0
        self._epoch = epoch or (lambda: self._count)
        self._before_epoch = before_epoch
        self._active = None
        self.epoch = -1        # the epoch being (or last) iterated
        self.consumed = 0      # its batches that reached the training step
        self._resume: tuple[int, int] | None = None

    def __len__(self) -> int:
        return len(self.loader)

    @property
    def batch_size(self) -> int:
        return self.loader.batch_size

    # -- resumable state (Lightning saves it with the checkpoint) -----------------------------

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "consumed": self.consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """The next iteration of ``state['epoch']`` skips its first ``consumed`` batches."""
        self._resume = (int(state["epoch"]), int(state["consumed"]))

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        from ffcv.loader.epoch_iterator import EpochIterator
        from ffcv.pipeline.compiler import Compiler

        self.close()
        epoch = int(self._epoch())
        if self._before_epoch is not None:
            self._before_epoch(epoch)
        skip = 0
        if self._resume is not None and self._resume[0] == epoch:
            skip = self._resume[1] if self._resume[1] < len(self) else 0
        self._resume = None
        self.epoch, self.consumed = epoch, skip
        loader = self.loader
        loader.next_epoch = epoch
        self._count = epoch + 1
        # ffcv's Loader.__iter__, with the already-trained part of a resumed epoch left out
        Compiler.set_num_threads(loader.num_workers)
        order = loader.next_traversal_order()[:len(loader) * loader.batch_size]
        loader.next_epoch += 1
        if loader.code is None or loader.recompile:
            loader.generate_code()
        # ffcv allocates its batch buffers here and fills them from its own thread, which runs
        # outside inference mode: buffers made under Lightning's inference_mode (validate, test,
        # predict) would be inference tensors, the thread's in-place writes would fail and the
        # loop would wait forever.
        with torch.inference_mode(False):
            it = EpochIterator(loader, order[skip * loader.batch_size:])
        self._active = it
        return self._batches(it)

    def _batches(self, it) -> Iterator[tuple[Tensor, Tensor]]:
        try:
            for images, labels in it:
                self._check_decoding()
                yield self.normalize(images), labels.clone()
        finally:
            self._stop(it)

    def _check_decoding(self) -> None:
        for decoder in self.decoders:
            sample = decoder.failed_sample()
            if sample is not None:
                raise DataError(f"{self.path}: sample {sample} could not be decoded (corrupt "
                                f"JPEG data); write the .beton again with `python -m app "
                                f"prepare` (or check that source image)")

    def normalize(self, images: Tensor) -> Tensor:
        """A new tensor the caller owns (ffcv reuses the one it returned), in ``dtype`` and the
        requested memory format."""
        if self._scale is None:  # normalised by the pipeline, which also made the layout
            return images.to(self.dtype, memory_format=self.memory_format, copy=True)
        assert self._bias is not None
        # one pass over the batch: the uint8 pixels are promoted as they are read, the result
        # rounded once into ``dtype``, in the requested layout
        out = torch.empty(images.shape, dtype=self.dtype, device=images.device,
                          memory_format=self.memory_format)
        return torch.addcmul(self._bias, images, self._scale, out=out)

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
