"""``python -m app bench loader``: images/s of the FFCV train loader vs. torchvision.

Both read the same generated JPEG folder (ImageNet-like sizes, JPEG quality 90) and deliver the
same thing: RandomResizedCrop to ``--resolution`` + horizontal flip, normalised float32 batches
on ``--device``, with ``--num-workers`` workers (FFCV: decoding threads; torchvision: PIL
DataLoader processes). FFCV reads the .beton that ``prepare`` writes from that folder with the
imagefolder defaults (``--write-mode``, ``--max-resolution``). After a warm-up epoch each (JIT
compilation, worker start-up, page cache), timed epochs alternate between the two loaders, so
that a shared machine's varying load affects both alike.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m app bench loader", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    from data.writer import usable_cores

    cores = usable_cores()
    p.add_argument("--images", type=int, default=2000, help="images in the generated folder")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--resolution", type=int, default=224, help="output side of both loaders")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=cores, help="both loaders (default: cores)")
    p.add_argument("--epochs", type=int, default=3, help="timed epochs after the warm-up")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    g = p.add_argument_group("storage (default: prepare's imagefolder defaults)")
    g.add_argument("--write-mode", help="raw, jpg, proportion or smart")
    g.add_argument("--compress-probability", type=float, help="JPEG share for proportion")
    g.add_argument("--max-resolution", type=int, help="cap on the longer side (0: keep)")
    p.add_argument("--folder", type=Path,
                   help="where the JPEG folder and .beton live (kept; reused when present, so "
                        "change it with the storage options); default: a temporary folder")
    p.add_argument("--only", choices=("ffcv", "torchvision"), help="time one loader only")
    return p


def make_jpeg_folder(root: Path, images: int, classes: int, seed: int = 0) -> None:
    """``root/class_k/*.jpg``: learnable synthetic images, 280-400 px sides, quality 90."""
    from PIL import Image

    from data.sources.synthetic import Synthetic

    source = Synthetic(None, "train", num_classes=classes, num_samples=images, image_size=400,
                       seed=seed)
    rng = np.random.default_rng(seed)
    for i in range(images):
        h, w = rng.integers(280, 401, size=2)
        img = source.image(i)[:h, :w]
        folder = root / f"class_{source.labels[i]:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / f"{i:06d}.jpg", quality=90)


def _epoch(loader, device) -> tuple[float, int]:
    import torch

    seen, start = 0, time.perf_counter()
    for x, _ in loader:
        seen += x.shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, seen


def ffcv_loader(beton: Path, args, device):
    from data.datamodule import FFCVImageDataModule

    dm = FFCVImageDataModule(train_path=str(beton), val_path=str(beton), augment="imagenet",
                             resolution=args.resolution, batch_size=args.batch_size,
                             num_workers=args.num_workers)
    dm.setup("fit")
    return dm.build_loader("train", device=device)


class _TorchvisionLoader:
    """DataLoader batches moved and normalised like the FFCV loader's (non_blocking, NHWC)."""

    def __init__(self, folder: Path, args, device):
        import torch
        from torch.utils.data import DataLoader
        from torchvision import datasets, transforms

        from data.pipelines import IMAGENET_MEAN, IMAGENET_STD

        tf = transforms.Compose([
            transforms.RandomResizedCrop(args.resolution), transforms.RandomHorizontalFlip(),
            transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
        self.loader = DataLoader(datasets.ImageFolder(str(folder), transform=tf),
                                 batch_size=args.batch_size, shuffle=True, drop_last=True,
                                 num_workers=args.num_workers, persistent_workers=True,
                                 pin_memory=device.type == "cuda")
        self.device = device
        self.torch = torch

    def __iter__(self):
        for x, y in self.loader:
            x = x.to(self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
            yield x.contiguous(memory_format=self.torch.channels_last), y


def main(argv: list[str]) -> int:
    import torch

    from app.errors import UserError
    from data.prepare import prepare, write_options

    args = _parser().parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda given but no CUDA GPU is visible; use --device cpu")
    with tempfile.TemporaryDirectory(prefix="selfnorm-bench-") as tmp:
        base = args.folder or Path(tmp)
        folder, beton = base / "jpeg", base / "train.beton"
        if not folder.is_dir():
            started = time.perf_counter()
            make_jpeg_folder(folder, args.images, args.classes)
            print(f"generated {args.images} JPEGs in {folder} "
                  f"({time.perf_counter() - started:.1f} s)")
        if not beton.is_file():
            started = time.perf_counter()
            options = write_options("imagefolder", write_mode=args.write_mode,
                                    max_resolution=args.max_resolution,
                                    compress_probability=args.compress_probability)
            prepare("imagefolder", "train", beton, str(folder), options=options, progress=False)
            print(f"prepared {beton} ({beton.stat().st_size / 2**20:.0f} MiB, "
                  f"{time.perf_counter() - started:.1f} s)")
        loaders = {}
        if args.only in (None, "ffcv"):
            loaders["ffcv"] = ffcv_loader(beton, args, device)
        if args.only in (None, "torchvision"):
            loaders["torchvision"] = _TorchvisionLoader(folder, args, device)
        for loader in loaders.values():
            _epoch(loader, device)  # warm-up
        spent = {k: [0.0, 0] for k in loaders}
        for _ in range(args.epochs):
            for k, loader in loaders.items():
                s, n = _epoch(loader, device)
                spent[k][0] += s
                spent[k][1] += n
        if "ffcv" in loaders:
            loaders["ffcv"].close()
    rates = {k: n / s for k, (s, n) in spent.items()}
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or "cpu"
    print(f"\nloader benchmark: {args.images} images, {args.resolution}px RandomResizedCrop+flip, "
          f"batch {args.batch_size}, {args.num_workers} workers, device {device} ({name}), "
          f"{os.cpu_count()} CPUs")
    for k, r in rates.items():
        print(f"  {k:<12} {r:9.0f} images/s")
    if len(rates) == 2:
        print(f"  ffcv / torchvision: {rates['ffcv'] / rates['torchvision']:.2f}x")
    print(json.dumps({"bench": "loader", "device": str(device), "workers": args.num_workers,
                      "resolution": args.resolution,
                      "images_per_s": {k: round(r, 1) for k, r in rates.items()}}))
    return 0
