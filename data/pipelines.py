"""FFCV pipelines, written out literally as in ffcv-imagenet: decode, augment, tensor, device.

A recipe names the decode and augmentation steps for the train and val splits; the train
decoders are ``data.decoders``' (crop, flip and translation drawn from the run's seed, the epoch
and the sample, so runs repeat exactly; a sample that fails to decode is reported). The rest of
the pipeline is shared and depends on the device:

* CUDA: ToTensor → ToDevice (non_blocking) → ToTorchImage (channels_last, always); the uint8
  batch is normalised in torch on the GPU, into the training dtype and the requested memory
  format (``data.loader``), which also avoids ffcv's cupy import for GPU normalisation.
* CPU: NormalizeImage *before* ToTensor, in ffcv's compiled producer threads, overlapping the
  training step (1.3-1.9× the images/s of normalising in torch afterwards, measured on 2
  cores); after ToTorchImage it would hang the Loader's constructor (ffcv #396).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from data.errors import DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_CROP_RATIO = 224 / 256


@dataclass(frozen=True)
class Recipe:
    """``train(resolution)`` and ``val(resolution, crop_ratio)`` return the decoder and the
    augmentations; ``resizable`` says whether the decoder resizes (progressive resizing needs
    it; fixed-size recipes read the stored images as they are)."""

    train: Callable[[int], list]
    val: Callable[[int, float], list]
    resizable: bool
    crop_ratio: float


def _imagenet_train(res: int) -> list:
    from data.decoders import CropDecoder

    return [CropDecoder((res, res), flip_prob=0.5)]


def _center_val(res: int, ratio: float) -> list:
    from data.decoders import CropDecoder

    return [CropDecoder((res, res), center_ratio=ratio)]


def _digits_train(res: int) -> list:
    from data.decoders import CropDecoder

    # Mild crops and no flip: a mirrored 2 or 5 is another digit, a 30 % crop loses it.
    return [CropDecoder((res, res), scale=(0.6, 1.0), ratio=(0.8, 1.25))]


def _pad_crop_train(res: int) -> list:
    from data.decoders import PadCropDecoder

    # The CIFAR recipe: flip, then a random crop of the image zero-padded by 1/8 of its side.
    return [PadCropDecoder(padding=res // 8, flip_prob=0.5)]


def _plain_val(res: int, ratio: float) -> list:
    from data.decoders import PadCropDecoder

    return [PadCropDecoder()]


RECIPES: dict[str, Recipe] = {
    "imagenet": Recipe(_imagenet_train, _center_val, resizable=True, crop_ratio=DEFAULT_CROP_RATIO),
    "digits": Recipe(_digits_train, _center_val, resizable=True, crop_ratio=1.0),
    "pad_crop": Recipe(_pad_crop_train, _plain_val, resizable=False, crop_ratio=1.0),
}


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise DataError(f"unknown augmentation recipe {name!r}; choose one of: "
                        f"{', '.join(RECIPES)}")
    return RECIPES[name]


# numpy has no bfloat16: a bf16 batch is normalised in float32 and cast while it is copied out.
HOST_DTYPES = {torch.float16: np.float16, torch.float64: np.float64}


def normalized_on_host(device: torch.device) -> bool:
    return device.type == "cpu"


def image_pipeline(steps: list, device: torch.device, channels_last: bool,
                   mean: Sequence[float], std: Sequence[float], dtype: torch.dtype) -> list:
    """``steps`` (decoder + augmentations) followed by the move to a (B, C, H, W) tensor:
    uint8 channels_last on CUDA (copied with ``non_blocking`` from pinned memory; ``ToDevice``
    needs a ``torch.device``, not a string), normalised ``dtype`` in the ``channels_last``
    layout on the CPU."""
    from ffcv.transforms import NormalizeImage, ToDevice, ToTensor, ToTorchImage

    if normalized_on_host(device):
        host = HOST_DTYPES.get(dtype, np.float32)
        norm = NormalizeImage(255.0 * np.asarray(mean), 255.0 * np.asarray(std), host)
        return [*steps, norm, ToTensor(), ToTorchImage(channels_last=channels_last)]
    # channels_last=True whatever is asked: it is a free view of ToDevice's GPU buffer, while
    # ffcv 1.0.2's channels_last=False copies into a buffer allocated without a device, i.e.
    # pinned CPU memory. FFCVLoader makes the requested layout as it normalises.
    return [*steps, ToTensor(), ToDevice(device, non_blocking=True),
            ToTorchImage(channels_last=True)]


def label_pipeline(device: torch.device) -> list:
    from ffcv.fields.basics import IntDecoder
    from ffcv.transforms import Squeeze, ToDevice, ToTensor

    # Squeeze(1), not Squeeze(): a last batch of one sample must keep its batch dimension.
    steps = [IntDecoder(), ToTensor(), Squeeze(1)]
    if not normalized_on_host(device):
        steps.append(ToDevice(device, non_blocking=True))
    return steps


@dataclass(frozen=True)
class ProgressiveResizing:
    """ffcv-imagenet's progressive resizing: the train side grows from ``min_resolution`` at
    epoch ``start_ramp`` to the data module's ``resolution`` at ``end_ramp``, rounded to
    multiples of ``step``."""

    min_resolution: int
    start_ramp: int = 0
    end_ramp: int = 0
    step: int = 32


def ramp_resolution(epoch: int, min_res: int, max_res: int, start_ramp: int, end_ramp: int,
                    step: int = 32) -> int:
    """ffcv-imagenet's progressive resizing: ``min_res`` until ``start_ramp``, then linear to
    ``max_res`` at ``end_ramp``, rounded to a multiple of ``step``."""
    if epoch <= start_ramp:
        return min_res
    if epoch >= end_ramp:
        return max_res
    frac = (epoch - start_ramp) / (end_ramp - start_ramp)
    return int(round((min_res + frac * (max_res - min_res)) / step)) * step
