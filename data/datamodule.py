"""``FFCVImageDataModule``: FFCV train/val loaders for single-device and DDP training.

Used from LightningCLI configs as ``class_path: data.FFCVImageDataModule``. The recipe follows
ffcv-imagenet: RandomResizedCrop decoder + flip for train, CenterCrop (ratio 224/256) for val,
uint8 → device (non_blocking) → channels_last → normalised on the GPU in the training dtype and
the ``channels_last`` layout asked for (on the CPU, normalised in ffcv's compiled threads before
ToTensor; see ``data.pipelines``).
``num_classes`` and ``image_size`` are known right after ``__init__`` so the app can link them to
the model, even before the .beton files exist.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_warn

from data.errors import DataError
from data import pipelines
from data.decoders import stateful
from data.loader import FFCVLoader
from data.prepare import Preparation, data_dir, default_beton, prepare
from data.sidecar import beton_labels, read_sidecar, sidecar_path
from data.validate import check_beton
from data.sources import count_classes, default_resolution, get_source
from data.writer import usable_cores

Order = Literal["random", "quasi_random", "sequential"]
DType = Literal["auto", "float32", "bfloat16", "float16", "float64"]

# Trainer precision -> the dtype batches are normalised into (ffcv-imagenet feeds fp16 to AMP).
# the data module's own settings travel in checkpoints (hyper_parameters): safe to unpickle
torch.serialization.add_safe_globals([Preparation, pipelines.ProgressiveResizing])

PRECISION_DTYPES = {
    "16-mixed": torch.float16, "16-true": torch.float16,
    "bf16-mixed": torch.bfloat16, "bf16-true": torch.bfloat16,
    "64-true": torch.float64,
}


class FFCVImageDataModule(LightningDataModule):
    """Image classification from FFCV .beton files (``image``: RGB, ``label``: int).

    Args:
        train_path: train .beton. Default: a cache folder (``$SELFNORM_DATA_DIR`` or
            ``~/.cache/selfnorm/data``) keyed by the source and its options.
        val_path: val .beton, defaulted the same way.
        source: dataset to prepare missing betons from (``imagefolder``, ``tiny-imagenet``,
            ``cifar10``, ``cifar100``, ``digits``, ``synthetic``); local rank 0 prepares them
            once in ``prepare_data`` and the other ranks wait at Lightning's barrier.
        root: the source's folder on disk (not needed by ``digits`` and ``synthetic``).
        source_options: the source's own options, e.g. ``{image_size: 32}`` for digits or
            ``{num_classes: 100, num_samples: 10000, image_size: 256}`` for synthetic.
        batch_size: per-device train batch size.
        val_batch_size: per-device val batch size (default: ``batch_size``).
        global_batch_size: train batch summed over all devices (the paper's 512); when set,
            each device gets ``global_batch_size / world_size`` and ``batch_size`` is unused.
        num_workers: decoding threads per process (default: the cores shared by the local ranks).
        resolution: train output side (the end resolution when progressive resizing is on).
            Default: the source's (224 for ImageNet-like folders, 32 for CIFAR and digits).
        val_resolution: val output side (default: ``resolution``); also ``image_size``.
        progressive: progressive resizing (``min_resolution``, ``start_ramp``, ``end_ramp``,
            ``step``): the train side grows to ``resolution``, as ffcv-imagenet does.
        augment: recipe in ``data.pipelines.RECIPES`` (default: the source's, else imagenet).
        val_crop_ratio: val centre-crop side / shorter image side (default: the recipe's,
            224/256 for imagenet).
        mean: per-channel mean in [0, 1] (default: the train sidecar's statistics, else
            ImageNet's); SNNs assume standardised inputs.
        std: per-channel standard deviation in [0, 1], defaulted like ``mean``.
        dtype: dtype of the image batches; ``auto`` follows the trainer's precision.
        channels_last: deliver images in channels_last memory format.
        order: train order; ``quasi_random`` reads pages in bulk (for ``os_cache: false``) and
            falls back to ``random`` under DDP, which ffcv does not support with it.
        os_cache: rely on the OS page cache (the dataset fits in RAM) instead of ffcv's
            process cache.
        batches_ahead: batches decoded ahead of the training step.
        drop_last: drop the last incomplete train batch.
        distributed: shard the data across ranks; default: on when the trainer's world size
            is above one. Each epoch reshuffles with ``seed`` + epoch, as DistributedSampler.
        seed: seed of the train order and of the augmentations (the same on every rank; each
            sample's crop and flip depend on it, the epoch and the sample only). Default: the
            run's ``seed_everything``. The prepared data does not depend on it, so runs with
            different seeds share the betons.
        prepare: how missing betons are written from ``source`` (storage options, ``subset``,
            ``skip_bad``; default: the source's).
    """

    def __init__(
        self,
        train_path: str | None = None,
        val_path: str | None = None,
        source: str | None = None,
        root: str | None = None,
        source_options: dict[str, Any] | None = None,
        batch_size: int = 256,
        val_batch_size: int | None = None,
        global_batch_size: int | None = None,
        num_workers: int | None = None,
        resolution: int | None = None,
        val_resolution: int | None = None,
        progressive: pipelines.ProgressiveResizing | None = None,
        augment: str | None = None,
        val_crop_ratio: float | None = None,
        mean: tuple[float, float, float] | None = None,
        std: tuple[float, float, float] | None = None,
        dtype: DType = "auto",
        channels_last: bool = True,
        order: Order = "random",
        os_cache: bool = True,
        batches_ahead: int = 3,
        drop_last: bool = True,
        distributed: bool | None = None,
        seed: int | None = None,
        prepare: Preparation | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.source = get_source(source).name if source else None
        self.root = root
        self.source_options = dict(source_options or {})
        self.mean, self.std = mean, std
        self.preparation = prepare or Preparation()
        self.write = self.preparation.options(self.source) if self.source else None
        self.subset, self.skip_bad = self.preparation.subset, self.preparation.skip_bad
        self.seed = seed
        self.train_path = self._path("train", train_path)
        self.val_path = self._path("val", val_path)
        self._check_files()
        meta = read_sidecar(self.train_path) if self.train_path.is_file() else None
        if self.train_path.is_file():
            self._check_statistics(meta)
        defaults_from = self.source or (meta or {}).get("source")
        self.num_classes = self._num_classes(meta)
        self._check_val_classes()
        self.class_names: list[str] | None = (meta or {}).get("class_names")

        # Unset recipe and resolution follow the source (named here or in the sidecar).
        opts = self.source_options if self.source else (meta or {}).get("source_options") or {}
        if defaults_from:
            self.recipe_name = augment or get_source(defaults_from).recipe
            self.resolution = resolution or default_resolution(defaults_from, **opts)
        else:
            self.recipe_name, self.resolution = augment or "imagenet", resolution or 224
        self.recipe = pipelines.get_recipe(self.recipe_name)
        self.val_resolution = val_resolution or self.resolution
        self.image_size = self.val_resolution
        self.in_chans = 3
        self.val_crop_ratio = val_crop_ratio or self.recipe.crop_ratio
        self.progressive = progressive
        self._check_ramp()

        self.batch_size = batch_size
        self.global_batch_size = global_batch_size
        if global_batch_size is not None and global_batch_size < 1:
            raise DataError(f"global_batch_size {global_batch_size} must be positive")
        self.val_batch_size = val_batch_size or batch_size
        if self.batch_size < 1 or self.val_batch_size < 1:
            raise DataError(f"batch_size {min(self.batch_size, self.val_batch_size)} must be "
                            f"at least 1")
        self.num_workers = num_workers
        self.dtype_name, self.channels_last = dtype, channels_last
        if order not in ("random", "quasi_random", "sequential"):
            raise DataError(f"unknown order {order!r}; choose random, quasi_random or sequential")
        self.order, self.os_cache, self.batches_ahead = order, os_cache, batches_ahead
        self._check_numbers()
        self.drop_last, self.distributed = drop_last, distributed
        self._loaders: dict[str, FFCVLoader] = {}

    def __str__(self) -> str:
        # LightningDataModule's would build every loader just to print their sizes
        return (f"{type(self).__name__}(train_path={str(self.train_path)!r}, "
                f"val_path={str(self.val_path)!r}, num_classes={self.num_classes})")

    # -- paths and the facts the app links to the model ---------------------------------------

    def _path(self, split: str, given: str | None) -> Path:
        if given:
            return Path(given).expanduser()
        if not self.source:
            raise DataError(f"no {split}_path and no source given; set data.{split}_path to a "
                            f".beton file, or data.source (e.g. digits) to prepare one")
        subset = self.subset if split == "train" else None
        return default_beton(self.source, split, self.root, self.source_options, self.write,
                             subset)

    def _check_files(self) -> None:
        """Existing betons are complete classification betons; new ones go to a folder that
        exists (or into the cache), never silently into new folders elsewhere."""
        for split, path in (("train", self.train_path), ("val", self.val_path)):
            if path.exists():
                check_beton(path, f"{split} .beton")
            elif not self.source:
                continue
            elif not path.parent.is_dir() and not path.is_relative_to(data_dir()):
                raise DataError(f"the folder of data.{split}_path {str(path)!r} does not exist; "
                                f"create it or choose another path")

    def _check_val_classes(self) -> None:
        """Train and val must share their classes: a val label beyond train's classes would
        end in an IndexError mid-epoch."""
        if not (self.train_path.is_file() and self.val_path.is_file()):
            return
        train, val = read_sidecar(self.train_path), read_sidecar(self.val_path)
        if train and val and train["num_classes"] != val["num_classes"]:
            raise DataError(f"train .beton {str(self.train_path)!r} has {train['num_classes']} "
                            f"classes but val .beton {str(self.val_path)!r} has "
                            f"{val['num_classes']}; prepare both from the same dataset")
        top = int(beton_labels(self.val_path).max())
        if top >= self.num_classes:
            raise DataError(f"val .beton {str(self.val_path)!r} has labels up to {top}, but the "
                            f"train data has {self.num_classes} classes; prepare both from the "
                            f"same dataset")

    def _check_numbers(self) -> None:
        for name in ("resolution", "val_resolution"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 8):
                raise DataError(f"data.{name} must be an integer of at least 8 pixels, got "
                                f"{value!r}")
        if self.num_workers is not None and not (isinstance(self.num_workers, int)
                                                 and self.num_workers >= 0):
            raise DataError(f"data.num_workers must be ≥ 0 (0: all cores) or null, got "
                            f"{self.num_workers!r}")
        if not (isinstance(self.batches_ahead, int) and self.batches_ahead >= 1):
            raise DataError(f"data.batches_ahead must be a positive integer, got "
                            f"{self.batches_ahead!r}")
        if not 0 < self.val_crop_ratio <= 1:
            raise DataError(f"data.val_crop_ratio must lie in (0, 1], got {self.val_crop_ratio!r}")
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is not None and (len(value) != 3 or (name == "std" and min(value) <= 0)):
                raise DataError(f"data.{name} must be 3 per-channel values in [0, 1]"
                                f"{' (positive)' if name == 'std' else ''}, got {list(value)}")

    def _check_statistics(self, meta: dict[str, Any] | None) -> None:
        if meta is None and (self.mean is None or self.std is None):
            # ImageNet's statistics on other images would train an SNN on shifted inputs
            raise DataError(f"train .beton {str(self.train_path)!r} has no (matching) sidecar "
                            f"{str(sidecar_path(self.train_path))!r} with its channel statistics; "
                            f"write it with `python -m app prepare`, or give data.mean and "
                            f"data.std (ImageNet's: {list(pipelines.IMAGENET_MEAN)}, "
                            f"{list(pipelines.IMAGENET_STD)})")

    def _num_classes(self, meta: dict[str, Any] | None) -> int:
        if meta is not None:
            return int(meta["num_classes"])
        if self.source:
            return count_classes(self.source, self.root, **self.source_options)
        if self.train_path.is_file():
            return int(beton_labels(self.train_path).max()) + 1
        raise DataError(f"train .beton {str(self.train_path)!r} does not exist and no source is "
                        f"set; prepare it with `python -m app prepare` or set data.source")

    def _check_ramp(self) -> None:
        ramp = self.progressive
        if ramp is None:
            return
        if not self.recipe.resizable:
            raise DataError(f"progressive resizing needs a resizing recipe; "
                            f"{self.recipe_name!r} reads images at their stored size, use "
                            f"augment: imagenet or drop progressive")
        if not 0 < ramp.min_resolution <= self.resolution:
            raise DataError(f"progressive.min_resolution {ramp.min_resolution} must lie in "
                            f"(0, resolution={self.resolution}]")
        if ramp.end_ramp <= ramp.start_ramp:
            raise DataError(f"progressive.end_ramp {ramp.end_ramp} must be after start_ramp "
                            f"{ramp.start_ramp}")

    def train_resolution(self, epoch: int) -> int:
        """The train output side at ``epoch`` (constant unless progressive resizing is on)."""
        ramp = self.progressive
        if ramp is None:
            return self.resolution
        return pipelines.ramp_resolution(epoch, ramp.min_resolution, self.resolution,
                                         ramp.start_ramp, ramp.end_ramp, ramp.step)

    # -- Lightning hooks -------------------------------------------------------------------

    def prepare_data(self) -> None:
        missing = [(s, p) for s, p in (("train", self.train_path), ("val", self.val_path))
                   if not p.is_file()]
        if missing and not self.source:
            split, path = missing[0]
            raise DataError(f"{split} .beton {str(path)!r} does not exist and no source is set; "
                            f"prepare it with `python -m app prepare` or set data.source")
        if missing and get_source(self.source).splits_coincide(
                Path(self.root or ".").expanduser(), **self.source_options):
            raise DataError(f"root {self.root!r} has no train/ and val/ sub-folders, so val "
                            f"would repeat train; arrange root/train and root/val, or give "
                            f"data.val_path")
        for split, path in missing:
            # another job may be writing the same cache file: wait for it, then use its file
            prepare(self.source, split, path, self.root, options=self.write,
                    source_options=self.source_options,
                    subset=self.subset if split == "train" else None, skip_bad=self.skip_bad,
                    wait=True, where=f"data.{split}_path (or $SELFNORM_DATA_DIR)")

    def setup(self, stage: str | None = None) -> None:
        needed = (self.train_path, self.val_path) if stage in (None, "fit") else (self.val_path,)
        for path in needed:
            if not path.is_file():
                raise DataError(f".beton {str(path)!r} does not exist; run prepare_data first "
                                f"(the trainer does) or `python -m app prepare`")
        meta = read_sidecar(self.train_path) if self.train_path.is_file() else None
        self._check_statistics(meta)
        self.mean = tuple(self.mean or meta["mean"])
        self.std = tuple(self.std or meta["std"])
        if self.class_names is None and meta is not None:
            self.class_names = meta["class_names"]

    def train_dataloader(self) -> FFCVLoader:
        return self._loader("train")

    def val_dataloader(self) -> FFCVLoader:
        return self._loader("val")

    def test_dataloader(self) -> FFCVLoader:
        return self._loader("val")

    def predict_dataloader(self) -> FFCVLoader:
        return self._loader("val")

    def transfer_batch_to_device(self, batch: Any, device: torch.device,
                                 dataloader_idx: int) -> Any:
        # The loader already delivered the batch on the device: no second copy.
        if all(isinstance(t, torch.Tensor) and t.device == device for t in batch):
            return batch
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # a batch here reaches the training step: what a resumed epoch skips
        trainer = self.trainer
        if trainer is not None and trainer.training and "train" in self._loaders:
            self._loaders["train"].consumed += 1
        return batch

    def run_seed(self) -> int:
        """``seed``, else the run's (``seed_everything`` sets PL_GLOBAL_SEED), else 0."""
        if self.seed is not None:
            return int(self.seed)
        return int(os.environ.get("PL_GLOBAL_SEED", 0))

    def teardown(self, stage: str | None = None) -> None:
        for loader in self._loaders.values():
            loader.close()

    # -- building the loaders ----------------------------------------------------------------

    def _device(self) -> torch.device:
        trainer = self.trainer
        return trainer.strategy.root_device if trainer is not None else torch.device("cpu")

    def _dtype(self) -> torch.dtype:
        if self.dtype_name != "auto":
            return getattr(torch, self.dtype_name)
        trainer = self.trainer
        return PRECISION_DTYPES.get(str(trainer.precision) if trainer else "", torch.float32)

    def _is_distributed(self) -> bool:
        world = self.trainer.world_size if self.trainer is not None else 1
        if self.distributed is None:
            return world > 1
        if self.distributed and not torch.distributed.is_initialized():
            raise DataError("distributed: true needs a distributed trainer (strategy ddp); "
                            "set distributed: null to follow the trainer")
        return self.distributed

    def _workers(self) -> int:
        if self.num_workers is not None and self.num_workers > 0:
            return self.num_workers
        local = self.trainer.num_devices if self.trainer is not None else 1
        return max(1, usable_cores() // max(1, local))

    def _loader(self, split: str) -> FFCVLoader:
        if split not in self._loaders:
            self._loaders[split] = self.build_loader(split, device=self._device(),
                                                     dtype=self._dtype(),
                                                     distributed=self._is_distributed())
        return self._loaders[split]

    def train_batch_size(self) -> int:
        """Per-device train batch: ``global_batch_size`` split over the trainer's devices."""
        if self.global_batch_size is None:
            return self.batch_size
        world = self.trainer.world_size if self.trainer is not None else 1
        if self.global_batch_size % world:
            raise DataError(f"global_batch_size {self.global_batch_size} does not split evenly "
                            f"over {world} devices; use a multiple of {world}")
        return self.global_batch_size // world

    def build_loader(self, split: str, device: torch.device | None = None,
                     dtype: torch.dtype = torch.float32, distributed: bool = False) -> FFCVLoader:
        """A fresh loader for ``split`` ('train' or 'val'); the ``*_dataloader`` hooks call this
        with the trainer's device, precision and world size; benchmarks call it directly."""
        from ffcv.loader import Loader, OrderOption

        if self.mean is None or self.std is None:
            self.setup("fit" if split == "train" else "validate")
        device = device or torch.device("cpu")
        train = split == "train"
        path = self.train_path if train else self.val_path
        if train:
            steps = self.recipe.train(self.train_resolution(0))
        else:
            steps = self.recipe.val(self.val_resolution, self.val_crop_ratio)
        if not self.recipe.resizable:
            self._check_fixed_size(path, self.resolution if train else self.val_resolution)
        order = self.order if train else "sequential"
        if order == "quasi_random" and distributed:
            rank_zero_warn("order quasi_random is not supported by ffcv under DDP; using random")
            order = "random"
        loader = Loader(
            str(path),
            batch_size=self.train_batch_size() if train else self.val_batch_size,
            num_workers=self._workers(),
            os_cache=self.os_cache,
            order=OrderOption[order.upper()],
            distributed=distributed,
            seed=self.run_seed(),
            drop_last=self.drop_last if train else False,
            batches_ahead=self.batches_ahead,
            pipelines={
                "image": pipelines.image_pipeline(steps, device, self.channels_last, self.mean,
                                                  self.std, dtype),
                "label": pipelines.label_pipeline(device),
            },
        )
        epoch = None
        if train and self.trainer is not None:
            epoch = lambda: self.trainer.current_epoch  # noqa: E731 - resumes continue the order
        decoders = stateful(steps)
        for op in decoders:
            op.set_seed(self.run_seed())

        def before(e: int) -> None:
            for op in decoders:
                op.set_epoch(e)
            if train and self.progressive is not None:
                side = self.train_resolution(e)
                steps[0].output_size = (side, side)
        if train and len(loader) == 0:
            share = "on this rank" if distributed else "in all"
            raise DataError(f"the train set {str(path)!r} has {len(loader.indices)} images "
                            f"({share}), fewer than one batch of {loader.batch_size}, and "
                            f"drop_last drops it: training would do nothing; lower "
                            f"data.batch_size or set data.drop_last: false")
        stats = {} if pipelines.normalized_on_host(device) else {"mean": self.mean, "std": self.std}
        return FFCVLoader(loader, device=device, dtype=dtype, channels_last=self.channels_last,
                          epoch=epoch, before_epoch=before if train else None,
                          decoders=decoders, path=path, **stats)

    def _check_fixed_size(self, path: Path, side: int) -> None:
        from data.sidecar import beton_image_sizes

        low, high = beton_image_sizes(path)
        if low != high or low != (side, side):
            raise DataError(f"recipe {self.recipe_name!r} reads images at their stored size, but "
                            f"{str(path)!r} holds {low[0]}×{low[1]} to {high[0]}×{high[1]} "
                            f"images, not {side}×{side}; use augment: imagenet or resolution: "
                            f"{high[0]}")
