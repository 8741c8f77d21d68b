"""``python -m app figure4 RUN[=LABEL] ... --out FIG.png``: the paper's Figure 4 for several runs.

Reads the normalization monitor's scalars (``norm/h2/<i>_<layer>`` and ``norm/grad_w/...``)
from each run folder's TensorBoard event files and draws one Figure 4 per run (boxes of each
layer's values over the logged steps), two per row, into one PNG: the side-by-side comparison
of activations that the paper's Figure 4 makes.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from app.errors import UserError
from app.paths import check_output_folder

KINDS = ("h2", "grad_w")


def read_monitor(run: Path, steps: tuple[int, int] | None = None
                 ) -> tuple[list[str], np.ndarray, np.ndarray, list[int]]:
    """Layer names, E[h²] and ‖∂L/∂W‖_F as [steps, layers], and the steps, from a run folder's
    event files (a resumed run's several files are merged; a step logged twice keeps its last
    value). Only steps where every layer has both values are kept."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = sorted(run.glob("events.out.tfevents.*"))
    if not files:
        raise UserError(f"{str(run)!r} holds no TensorBoard event files; pass a run folder "
                        f"(<default_root_dir>/lightning_logs/<run>)")
    values: dict[str, dict[int, float]] = {}
    for path in files:
        acc = EventAccumulator(str(path), size_guidance={"scalars": 0, "images": 1,
                                                          "histograms": 1})
        try:
            acc.Reload()
        except Exception as err:  # e.g. a file truncated by a full disk: name it
            raise UserError(f"cannot read {path} ({type(err).__name__}: {err}); move the file "
                            f"aside and rerun") from None
        for tag in acc.Tags()["scalars"]:
            if tag.split("/")[:2] in (["norm", k] for k in KINDS):
                series = values.setdefault(tag, {})
                for event in acc.Scalars(tag):
                    series[event.step] = event.value
    names = sorted({tag.split("/", 2)[2] for tag in values})
    if not names:
        raise UserError(f"{str(run)!r} has no norm/h2 or norm/grad_w scalars: the run logged "
                        f"no normalization monitor (enable it with --monitor.every_n_steps N)")
    common = set.intersection(*(set(values.get(f"norm/{k}/{n}", {})) for k in KINDS
                                for n in names))
    if steps is not None:
        common = {s for s in common if steps[0] <= s <= steps[1]}
    kept = sorted(common)
    if not kept:
        raise UserError(f"{str(run)!r} has no step at which every layer logged both E[h²] and "
                        f"‖∂L/∂W‖" + (f" within --steps {steps[0]}:{steps[1]}" if steps else ""))
    h2, grad_w = (np.array([[values[f"norm/{k}/{n}"][s] for n in names] for s in kept])
                  for k in KINDS)
    return [n.split("_", 1)[1] if "_" in n else n for n in names], h2, grad_w, kept


def spreads(values: np.ndarray) -> dict[str, float]:
    """How flat and how concentrated [steps, layers] values are, as ratios (1: constant):
    ``depth``, the largest over the smallest per-layer median; ``steps``, the median over layers
    of the 90th over the 10th percentile across steps."""
    medians = np.median(values, axis=0)
    p10, p90 = np.percentile(values, [10, 90], axis=0)
    return {"depth": float(medians.max() / medians.min()),
            "steps": float(np.median(p90 / p10))}


def shared_range(arrays: list[np.ndarray]) -> tuple[float, float]:
    """A log-axis range holding every finite positive value of ``arrays``, with a margin."""
    values = np.concatenate([a[np.isfinite(a) & (a > 0)].ravel() for a in arrays])
    if not values.size:
        return 0.1, 10.0
    return float(values.min()) / 1.5, float(values.max()) * 1.5


def compose(tiles: list[np.ndarray], columns: int = 2) -> np.ndarray:
    """RGB images in a grid, ``columns`` per row, padded white to a common size."""
    h = max(t.shape[0] for t in tiles)
    w = max(t.shape[1] for t in tiles)
    padded = [np.pad(t, ((0, h - t.shape[0]), (0, w - t.shape[1]), (0, 0)),
                     constant_values=255) for t in tiles]
    padded += [np.full_like(padded[0], 255)] * (-len(padded) % columns)
    rows = [np.concatenate(padded[i:i + columns], axis=1)
            for i in range(0, len(padded), columns)]
    return np.concatenate(rows, axis=0)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m app figure4", allow_abbrev=False,
        description="The paper's Figure 4 (per-layer E[h²] and ‖∂L/∂W‖_F over the logged "
                    "steps) for several runs side by side, from their TensorBoard scalars.")
    p.add_argument("runs", nargs="+", metavar="RUN[=LABEL]",
                   help="run folders (<default_root_dir>/lightning_logs/<run>); the label "
                        "defaults to the folder's name")
    p.add_argument("--out", type=Path, required=True, help="the PNG to write")
    p.add_argument("--steps", default=None, metavar="A:B",
                   help="only the steps A to B (inclusive)")
    p.add_argument("--columns", type=int, default=2, help="runs per row (default 2)")
    return p


def _steps(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        a, b = (int(x) for x in text.split(":"))
    except ValueError:
        raise UserError(f"--steps {text!r} must read A:B with whole numbers, e.g. 0:200") from None
    return a, b


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    steps = _steps(args.steps)
    if args.columns < 1:
        raise UserError(f"--columns {args.columns} must be at least 1")
    if args.out.suffix.lower() != ".png":
        raise UserError(f"--out {str(args.out)!r} must name a .png file")
    check_output_folder(args.out.parent.resolve(), "--out's folder")
    from matplotlib.image import imsave

    from models.training.plot import figure4, to_rgb

    runs = []
    for spec in args.runs:
        folder, _, label = spec.partition("=")
        run = Path(folder).expanduser()
        if not run.is_dir():
            raise UserError(f"run folder {folder!r} does not exist; pass "
                            f"<default_root_dir>/lightning_logs/<run>")
        runs.append((label or run.name, *read_monitor(run, steps)))
    # one y range per panel for all runs, so the runs compare at a glance
    ylims = tuple(shared_range([r[k] for r in runs]) for k in (2, 3))
    tiles = []
    for label, names, h2, grad_w, kept in runs:
        title = f"{label}: {len(kept)} records, steps {kept[0]}-{kept[-1]}"
        tiles.append(to_rgb(figure4(h2, grad_w, names, title, ylims=ylims)))
        spread = spreads(grad_w)
        print(f"{label}: {len(names)} layers, {len(kept)} records; ‖∂L/∂W‖_F "
              f"median {np.median(grad_w):.3g}, over depth ×{spread['depth']:.3g}, over steps "
              f"×{spread['steps']:.3g}; median E[h²] {np.median(h2):.3g}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    imsave(args.out, compose(tiles, min(args.columns, len(tiles))))
    print(f"wrote {args.out}")
    return 0
