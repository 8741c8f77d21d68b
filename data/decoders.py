"""The image decoders of every recipe: seeded augmentation and decode errors that are reported.

Seeded: every random draw is a function of (run seed, epoch, sample index). ffcv 1.0.2's random
decoders and transforms draw from numba's per-thread generators, which are seeded from the OS:
two runs with the same seed differ from their first batch, and a resumed run cannot repeat the
interrupted epoch's crops. Here the draws come from a counter-based hash (splitmix64) of the
run's seed, the epoch and the sample's index instead, so

* two runs with the same seed see bit-identical batches, whatever the number of threads;
* a run resumed mid-epoch continues with the very crops and flips it would have seen;
* every epoch and every sample gets fresh, independent draws.

The augmentations are fused into the decode step (crop + resize + flip; flip + pad-and-crop)
because ffcv hands the sample indices to decoders only.

Checked: ffcv ignores libjpeg-turbo's result, so a corrupt JPEG trains as garbage. These
decoders record the first sample that fails to decode; ``FFCVLoader`` stops with one line naming
the file and the sample.

Each decoder keeps its small state (seed, epoch; the error count and sample) in numpy arrays
whose addresses the compiled code reads at every call, so it changes without recompiling.
"""
from __future__ import annotations

from typing import Callable

import numba
import numpy as np
from ffcv.fields.rgb_image import IMAGE_MODES, ResizedCropRGBImageDecoder, SimpleRGBImageDecoder
from ffcv.libffcv import imdecode, memcpy, resize_crop
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler
from ffcv.pipeline.state import State
from numba import types
from numba.extending import intrinsic

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


@intrinsic
def _u64_pointer(typingctx, address):  # noqa: ARG001 (numba's intrinsic signature)
    sig = types.CPointer(types.uint64)(types.intp)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(types.CPointer(types.uint64)))
    return sig, codegen


@numba.njit(inline="always")
def _mix(x):
    """splitmix64's finaliser: a bijective, well-mixing hash of a uint64."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


@numba.njit(inline="always")
def sample_key(seed, epoch, index):
    """The key of one sample's draws in one epoch of one run."""
    return _mix(_mix(_mix(np.uint64(seed) + _GOLDEN) ^ np.uint64(epoch)) ^ np.uint64(index))


@numba.njit(inline="always")
def uniform(key, k):
    """The k-th draw in [0, 1) under ``key`` (53 random bits)."""
    x = _mix(key + np.uint64(k + 1) * _GOLDEN)
    return np.float64(x >> np.uint64(11)) * (1.0 / 9007199254740992.0)


@numba.njit
def random_crop(key, height, width, scale, ratio):
    """torchvision's RandomResizedCrop box (as ffcv's ``get_random_crop``), from ``key``."""
    area = height * width
    lo, hi = np.log(ratio[0]), np.log(ratio[1])
    for t in range(10):
        target = area * (scale[0] + (scale[1] - scale[0]) * uniform(key, 4 * t))
        aspect = np.exp(lo + (hi - lo) * uniform(key, 4 * t + 1))
        w = int(round(np.sqrt(target * aspect)))
        h = int(round(np.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            i = int(uniform(key, 4 * t + 2) * (height - h + 1))
            j = int(uniform(key, 4 * t + 3) * (width - w + 1))
            return i, j, h, w
    in_ratio = float(width) / float(height)
    if in_ratio < ratio[0]:
        w = width
        h = int(round(w / ratio[0]))
    elif in_ratio > ratio[1]:
        h = height
        w = int(round(h * ratio[1]))
    else:
        w = width
        h = height
    return (height - h) // 2, (width - w) // 2, h, w


@numba.njit
def center_crop(height, width, ratio):
    """ffcv's ``get_center_crop``: a centred square of ``ratio`` × the shorter side."""
    c = int(ratio * min(height, width))
    return (height - c) // 2, (width - c) // 2, c, c


_FLIP_DRAW = 64  # draw index of the flip decision (after the crop's 40)
_SHIFT_DRAW = 65  # and of the translation (65, 66)


@numba.njit
def flip_rows(image):
    """Mirror an H×W×C image left-right in place."""
    h, w = image.shape[0], image.shape[1]
    for y in range(h):
        for x in range(w // 2):
            for c in range(image.shape[2]):
                tmp = image[y, x, c]
                image[y, x, c] = image[y, w - 1 - x, c]
                image[y, w - 1 - x, c] = tmp


@numba.njit(inline="always")
def record_failure(errors, status, source_ix):
    """Count a failed decode (libjpeg-turbo's ``status`` != 0) and keep the sample's index."""
    if status != 0:
        errors[0] += np.uint64(1)
        errors[1] = np.uint64(source_ix)


class _State:
    """(seed, epoch) and (decode errors, a failing sample), shared with the compiled code."""

    def _init_state(self, seed: int) -> None:
        self.state = np.array([seed % 2 ** 64, 0], dtype=np.uint64)
        self.errors = np.zeros(2, dtype=np.uint64)

    def set_epoch(self, epoch: int) -> None:
        self.state[1] = epoch

    def set_seed(self, seed: int) -> None:
        self.state[0] = seed % 2 ** 64

    def failed_sample(self) -> int | None:
        """A sample that failed to decode since the last call (then cleared), or None."""
        if not self.errors[0]:
            return None
        sample = int(self.errors[1])
        self.errors[:] = 0
        return sample


class CropDecoder(_State, ResizedCropRGBImageDecoder):
    """Decode, crop and resize to ``output_size``: a seeded RandomResizedCrop (+ horizontal
    flip with probability ``flip_prob``), or with ``center_ratio`` the centred crop of that
    ratio of the shorter side (validation)."""

    def __init__(self, output_size: tuple[int, int], scale: tuple[float, float] = (0.08, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), flip_prob: float = 0.0,
                 center_ratio: float | None = None, seed: int = 0) -> None:
        super().__init__(output_size)
        self.scale, self.ratio, self.flip_prob = scale, ratio, flip_prob
        self.center_ratio = center_ratio
        self._init_state(seed)

    @property
    def get_crop_generator(self) -> Callable:  # required by ffcv's abstract base; unused
        return random_crop

    def generate_code(self) -> Callable:
        jpg = IMAGE_MODES["jpg"]
        mem_read = self.memory_read
        my_range = Compiler.get_iterator()
        imdecode_c = Compiler.compile(imdecode)
        resize_crop_c = Compiler.compile(resize_crop)
        scale = np.array(self.scale, dtype=np.float64)
        ratio = np.array(self.ratio, dtype=np.float64)
        flip_prob = float(self.flip_prob)
        center = self.center_ratio is not None
        center_ratio = float(self.center_ratio or 1.0)
        address, errors_at = self.state.ctypes.data, self.errors.ctypes.data

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, temp_storage = my_storage
            state = numba.carray(_u64_pointer(address), (2,))
            errors = numba.carray(_u64_pointer(errors_at), (2,))
            for dst_ix in my_range(len(batch_indices)):
                source_ix = batch_indices[dst_ix]
                field = metadata[source_ix]
                image_data = mem_read(field["data_ptr"], storage_state)
                height = np.uint32(field["height"])
                width = np.uint32(field["width"])
                if field["mode"] == jpg:
                    temp_buffer = temp_storage[dst_ix]
                    status = imdecode_c(image_data, temp_buffer, height, width, height, width,
                                        0, 0, 1, 1, False, False)
                    record_failure(errors, status, source_ix)
                    selected_size = 3 * height * width
                    temp_buffer = temp_buffer.reshape(-1)[:selected_size]
                    temp_buffer = temp_buffer.reshape(height, width, 3)
                else:
                    temp_buffer = image_data.reshape(height, width, 3)
                key = sample_key(state[0], state[1], source_ix)
                if center:
                    i, j, h, w = center_crop(int(height), int(width), center_ratio)
                else:
                    i, j, h, w = random_crop(key, int(height), int(width), scale, ratio)
                resize_crop_c(temp_buffer, i, i + h, j, j + w, destination[dst_ix])
                if flip_prob > 0 and uniform(key, _FLIP_DRAW) < flip_prob:
                    flip_rows(destination[dst_ix])
            return destination[:len(batch_indices)]

        decode.is_parallel = True
        return decode


class PadCropDecoder(_State, SimpleRGBImageDecoder):
    """Decode images of one fixed size; for training the CIFAR recipe on top: flip
    (probability ``flip_prob``), then a random crop of the image zero-padded by ``padding``
    pixels on every side (ffcv's RandomTranslate). ``padding=0, flip_prob=0``: decode only."""

    def __init__(self, padding: int = 0, flip_prob: float = 0.0, seed: int = 0) -> None:
        super().__init__()
        self.padding, self.flip_prob = int(padding), flip_prob
        self._init_state(seed)

    def declare_state_and_memory(self, previous_state: State) -> tuple[State, tuple]:
        state, out = super().declare_state_and_memory(previous_state)
        h, w, c = state.shape
        return state, (out, AllocationQuery((h, w, c), np.dtype("<u1")))

    def generate_code(self) -> Callable:
        jpg = IMAGE_MODES["jpg"]
        mem_read = self.memory_read
        my_range = Compiler.get_iterator()
        imdecode_c = Compiler.compile(imdecode)
        my_memcpy = Compiler.compile(memcpy)
        pad = self.padding
        flip_prob = float(self.flip_prob)
        address, errors_at = self.state.ctypes.data, self.errors.ctypes.data

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, temp_storage = my_storage
            state = numba.carray(_u64_pointer(address), (2,))
            errors = numba.carray(_u64_pointer(errors_at), (2,))
            for dst_ix in my_range(len(batch_indices)):
                source_ix = batch_indices[dst_ix]
                field = metadata[source_ix]
                image_data = mem_read(field["data_ptr"], storage_state)
                height, width = field["height"], field["width"]
                image = temp_storage[dst_ix]
                if field["mode"] == jpg:
                    status = imdecode_c(image_data, image, height, width, height, width, 0, 0,
                                        1, 1, False, False)
                    record_failure(errors, status, source_ix)
                else:
                    my_memcpy(image_data, image)
                key = sample_key(state[0], state[1], source_ix)
                if flip_prob > 0 and uniform(key, _FLIP_DRAW) < flip_prob:
                    flip_rows(image)
                dy = int(uniform(key, _SHIFT_DRAW) * (2 * pad + 1)) - pad
                dx = int(uniform(key, _SHIFT_DRAW + 1) * (2 * pad + 1)) - pad
                out = destination[dst_ix]
                h, w = out.shape[0], out.shape[1]
                for y in range(h):
                    sy = y + dy
                    for x in range(w):
                        sx = x + dx
                        inside = 0 <= sy < h and 0 <= sx < w
                        for c in range(3):
                            out[y, x, c] = image[sy, sx, c] if inside else 0
            return destination[:len(batch_indices)]

        decode.is_parallel = True
        return decode


def stateful(steps: list) -> list[_State]:
    """The decoders among ``steps`` (seeded, and checked for decode errors)."""
    return [s for s in steps if isinstance(s, _State)]


__all__ = ["CropDecoder", "PadCropDecoder", "sample_key", "stateful", "uniform"]
