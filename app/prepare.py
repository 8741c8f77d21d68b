"""``python -m app prepare``: write an FFCV .beton (and its JSON sidecar) from a dataset.

    python -m app prepare --source imagefolder --root /data/imagenet --split train \\
        --out /data/ffcv/train.beton --max-resolution 400 --write-mode proportion
    python -m app prepare --source digits --split val --out digits_val.beton

The storage options and their defaults follow ffcv-imagenet's write_imagenet.py; options left
out take the source's default (printed by ``--help``).
"""
from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    from data.sources import SPLITS, list_sources
    from data.writer import WRITE_MODES

    p = argparse.ArgumentParser(prog="python -m app prepare", description=__doc__,
                                epilog=source_defaults(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", required=True, help=f"one of: {', '.join(list_sources())}")
    p.add_argument("--root", help="the dataset folder (imagefolder, tiny-imagenet, cifar10/100)")
    p.add_argument("--split", choices=SPLITS, default="train")
    p.add_argument("--out", required=True, type=Path, help="the .beton file to write")
    g = p.add_argument_group("storage (default: the source's)")
    g.add_argument("--write-mode", choices=WRITE_MODES)
    g.add_argument("--max-resolution", type=int, help="cap on the longer side; 0 keeps the size")
    g.add_argument("--jpeg-quality", type=int)
    g.add_argument("--compress-probability", type=float,
                   help="JPEG share for write-mode proportion")
    g.add_argument("--smart-threshold", type=int, help="raw bytes above which smart mode JPEGs")
    g.add_argument("--num-workers", type=int, default=-1, help="writer processes (-1: all cores)")
    g.add_argument("--chunk-size", type=int, default=100, help="images per work item")
    g.add_argument("--subset", type=int, help="write a random subset of this many images")
    g.add_argument("--seed", type=int, default=0, help="for --subset and write-mode proportion")
    s = p.add_argument_group("source options")
    s.add_argument("--image-size", type=int, help="digits, synthetic: side of the images")
    s.add_argument("--num-classes", type=int, help="synthetic: number of classes")
    s.add_argument("--num-samples", type=int, help="synthetic: number of images")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip (and count) unreadable images instead of stopping")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def source_defaults() -> str:
    """The table of each source's storage defaults, for ``--help``."""
    from data.prepare import write_options
    from data.sources import get_source, list_sources

    rows = [("source", "write-mode", "max-resolution", "compress-probability", "jpeg-quality",
             "train resolution", "recipe")]
    for name in list_sources():
        cls, opts = get_source(name), write_options(name)
        rows.append((name, opts.write_mode, str(opts.max_resolution or "keep"),
                     f"{opts.compress_probability:g}", str(opts.jpeg_quality),
                     str(cls.default_resolution()), cls.recipe))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "storage defaults per source (an option given overrides them):\n  " + "\n  ".join(
        lines)


def _interrupt(signum, frame):
    # SIGTERM (a scheduler's kill) unwinds like Ctrl-C, so the temporary file is removed.
    raise KeyboardInterrupt


def main(argv: list[str]) -> int:
    from data.prepare import prepare, write_options

    args = _parser().parse_args(argv)
    options = write_options(args.source, write_mode=args.write_mode,
                            max_resolution=args.max_resolution, jpeg_quality=args.jpeg_quality,
                            compress_probability=args.compress_probability,
                            smart_threshold=args.smart_threshold, num_workers=args.num_workers,
                            chunk_size=args.chunk_size)
    source_options = {k: v for k, v in (("image_size", args.image_size),
                                        ("num_classes", args.num_classes),
                                        ("num_samples", args.num_samples)) if v is not None}
    signal.signal(signal.SIGTERM, _interrupt)
    started = time.perf_counter()
    try:
        meta = prepare(args.source, args.split, args.out, args.root, options=options,
                       source_options=source_options, subset=args.subset, seed=args.seed,
                       overwrite=args.overwrite, skip_bad=args.skip_bad,
                       progress=not args.no_progress)
    except KeyboardInterrupt:
        print(f"interrupted: {args.out} was not written", file=sys.stderr)
        return 130
    size = args.out.stat().st_size / 2 ** 20
    print(f"wrote {args.out} ({meta['num_samples']} images, {meta['num_classes']} classes, "
          f"{size:.1f} MiB) in {time.perf_counter() - started:.1f} s")
    if meta["skipped"]:
        print(f"skipped {len(meta['skipped'])} unreadable images (listed in "
              f"{args.out}.json), e.g. {meta['skipped'][0]['item']}", file=sys.stderr)
    return 0
