"""The Figure 4 image: per-layer distributions of E[h²] and ‖∂L/∂W‖_F over layer depth.

Drawn on a bare ``matplotlib.figure.Figure`` with the Agg canvas (no pyplot, no global state),
so the training process and ``app diagnose`` can render it headless and from any thread.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


# Rotated tick labels: one per layer while a layer's slot is at least this many points wide,
# else every k-th layer (the first and the last always named).
LABEL_POINTS = 7.0
MAX_WIDTH_IN = 30.0


def figure4(h2: np.ndarray, grad_w: np.ndarray, names: Sequence[str], title: str,
            theory_h2: np.ndarray | None = None, theory_grad_w: np.ndarray | None = None,
            grad_label: str = "‖∂L/∂W‖_F", chain_starts: Sequence[int] = (),
            ylims: tuple[tuple[float, float], tuple[float, float]] | None = None) -> Figure:
    """Two panels over layer depth, like the paper's Figure 4.

    ``h2`` and ``grad_w`` are [samples, layers] (samples: logging steps or batches); each layer
    gets a box of its samples (log scale, so an explosion stays readable). Optional theory
    predictions ([layers], NaN where there is none) are drawn as lines over the boxes, broken
    at ``chain_starts`` (layers where the theory restarts from a measurement); the dashed line
    marks the fixed point E[h²] = 1. The x axis names the layers as ``<index> <name>``, the
    index as in the monitor's ``norm/<kind>/<index>_<name>`` tags. ``ylims`` fixes the two
    panels' y ranges, so that figures drawn side by side compare at a glance.
    """
    layers = len(names)
    labels = layer_labels(names)
    label_in = max(map(len, labels), default=0) * 0.6 * LABEL_POINTS / 72  # rotated text height
    width = min(MAX_WIDTH_IN, max(6.0, 0.18 * layers + 2.5))
    fig = Figure(figsize=(width, 5.6 + label_in), dpi=100, layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True)
    _panel(top, h2, "E[h²]", theory_h2, chain_starts)
    top.axhline(1.0, color="0.4", linestyle="--", linewidth=0.8)
    _panel(bottom, grad_w, grad_label, theory_grad_w, chain_starts)
    if ylims is not None:
        top.set_ylim(*ylims[0])
        bottom.set_ylim(*ylims[1])
    ticks = label_ticks(layers, slot_points=72 * (width - 1.5) / max(layers, 1))
    bottom.set_xticks(ticks, [labels[i] for i in ticks], rotation=90, fontsize=LABEL_POINTS)
    top.tick_params(axis="x", labelbottom=False)
    skipped = "" if len(ticks) == layers else f"; one in {ticks[1] - ticks[0]} named"
    bottom.set_xlabel(f"layer (index and name, in depth order{skipped})")
    fig.suptitle(title)
    return fig


def layer_labels(names: Sequence[str]) -> list[str]:
    """``<index> <name>`` per layer, the index zero-padded as in the monitor's tags."""
    width = max(2, len(str(len(names) - 1)))
    return [f"{i:0{width}d} {name}" for i, name in enumerate(names)]


def label_ticks(layers: int, slot_points: float) -> list[int]:
    """The layers to name when each layer's slot on the axis is ``slot_points`` wide: all of them
    if a rotated label fits a slot, else every k-th, plus the last."""
    if layers <= 0:
        return []
    every = max(1, math.ceil(1.3 * LABEL_POINTS / max(slot_points, 1e-9)))
    ticks = list(range(0, layers, every))
    if ticks[-1] != layers - 1:  # the last layer named, its neighbour dropped if too close
        if len(ticks) > 1 and layers - 1 - ticks[-1] < every:
            ticks.pop()
        ticks.append(layers - 1)
    return ticks


def _panel(ax, values: np.ndarray, label: str, theory: np.ndarray | None,
           chain_starts: Sequence[int]) -> None:
    values = np.atleast_2d(values)
    # only finite, positive samples fit a log axis; an empty box is left blank
    columns = [col[np.isfinite(col) & (col > 0)] for col in values.T]
    positions = [i for i, col in enumerate(columns) if col.size]
    if positions:
        ax.boxplot([columns[i] for i in positions], positions=positions, widths=0.6,
                   showfliers=False, manage_ticks=False,
                   medianprops={"color": "tab:blue"}, boxprops={"color": "tab:blue"},
                   whiskerprops={"color": "tab:blue"}, capprops={"color": "tab:blue"})
        ax.set_yscale("log")
    if theory is not None:
        bounds = sorted({0, *chain_starts, len(theory)})
        for k, (a, b) in enumerate(zip(bounds, bounds[1:])):
            ax.plot(range(a, b), theory[a:b], color="tab:red", marker=".", linewidth=1,
                    label="theory" if k == 0 else None)
        ax.legend(loc="best", fontsize="small")
    ax.set_xlim(-0.5, values.shape[1] - 0.5)
    ax.set_ylabel(label)
    ax.grid(True, axis="y", which="both", alpha=0.3)


def to_rgb(fig: Figure) -> np.ndarray:
    """The rendered figure as an [H, W, 3] uint8 array (TensorBoard's ``add_image``)."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def save_png(fig: Figure, path: str | Path) -> None:
    FigureCanvasAgg(fig).print_png(str(path))
