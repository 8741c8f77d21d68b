"""Which run a ``--ckpt_path last`` resumes, and whether a checkpoint fits the model at hand.

A run is a folder ``<log root>/<version>/`` holding ``checkpoints/last.ckpt`` (and
``last-previous.ckpt``, its predecessor). Resuming "last" means: the newest run whose checkpoint
was written by the same model on the same data (architecture, activation, class count, ...),
or the run named with ``--run``; the resumed run keeps logging into its own folder, so its
TensorBoard curves continue. An unreadable newest checkpoint falls back to the previous one.

Options that only steer training (learning rate, schedule, weight decay, label smoothing,
``max_epochs``) may change on resume and take effect; the ones the weights depend on may not, and
a checkpoint that differs in them is refused with one line naming the differences.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from lightning.pytorch.utilities import rank_zero_warn

from models.training.checkpoint import LAST, PREVIOUS, CheckpointError, load_checkpoint

# what the weights (and the optimizer state's layout) depend on
STRUCTURAL = ("model", "num_classes", "in_chans", "in_features", "act", "eps", "central",
              "trainable_lambda", "weight_centralization", "norm", "lambda_min", "model_kwargs",
              "optimizer", "decay_all")


@dataclass(frozen=True)
class Resume:
    """The checkpoint to resume from and the run folder it belongs to (None: a new run)."""

    checkpoint: Path | None
    version: str | None


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-12, abs_tol=0.0)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return set(a) == set(b) and all(_same(a[k], b[k]) for k in a)
    return a == b


def differences(saved: Mapping[str, Any], current: Mapping[str, Any],
                keys: tuple[str, ...] = STRUCTURAL) -> list[str]:
    """``key=saved (here current)`` for each structural setting that differs."""
    out = []
    for key in keys:
        if key not in saved and key not in current:
            continue
        a, b = saved.get(key), current.get(key)
        if not _same(a, b):
            out.append(f"{key}={a!r} there, {b!r} here")
    return out


def check_compatible(checkpoint: Mapping[str, Any], path: Path | str,
                     hparams: Mapping[str, Any], class_name: str | None = None) -> None:
    """Refuse, in one line, a checkpoint of another model or data than ``hparams``'."""
    saved = checkpoint.get("hyper_parameters") or {}
    saved_class = str(saved.get("_class_path", "")).rsplit(".", 1)[-1] or None
    problems = []
    if class_name and saved_class and saved_class != class_name:
        problems.append(f"model class {saved_class} there, {class_name} here")
    problems += differences(saved, hparams)
    if problems:
        raise CheckpointError(f"checkpoint {path} was written by another model or data "
                              f"({'; '.join(problems)}); pass a checkpoint of this config, or "
                              f"use --run to start another run")


def readable(path: Path) -> dict[str, Any] | None:
    """The checkpoint at ``path`` if it loads (tensors memory-mapped, cheap), else None."""
    try:
        return load_checkpoint(path, mmap=True)
    except CheckpointError:
        return None


def newest_good(run: Path) -> tuple[Path, dict[str, Any]] | None:
    """A run's ``last.ckpt``, or ``last-previous.ckpt`` when the newest is unreadable."""
    folder = run / "checkpoints"
    last, previous = folder / LAST, folder / PREVIOUS
    for path in (last, previous):
        if path.is_file():
            ckpt = readable(path)
            if ckpt is not None:
                if path == previous and last.exists():
                    rank_zero_warn(f"{last} is unreadable (truncated or corrupt); resuming from "
                                   f"{previous} (step {ckpt.get('global_step')}) instead")
                return path, ckpt
    if last.exists() or previous.exists():
        raise CheckpointError(f"the checkpoints of run {run} are unreadable (truncated or "
                              f"corrupt); pass another one with --ckpt_path PATH (e.g. a "
                              f"best-*.ckpt) or start anew without --ckpt_path")
    return None


def resolve_last(root: Path, hparams: Mapping[str, Any], class_name: str | None,
                 run: str | None) -> Resume:
    """What ``--ckpt_path last`` resumes under the log root ``root``.

    With ``run``: that run (a new run when it has no checkpoint yet: the requeue idiom
    ``--run NAME --ckpt_path last`` starts or continues). Without: the newest run whose
    checkpoint fits ``hparams``; a one-line refusal when there is none.
    """
    if run is not None:
        found = newest_good(root / run)
        if found is None:
            return Resume(None, run)
        path, ckpt = found
        check_compatible(ckpt, path, hparams, class_name)
        return Resume(path, run)
    runs = sorted((p for p in root.glob("*") if (p / "checkpoints").is_dir()),
                  key=lambda p: _newest_mtime(p / "checkpoints"), reverse=True)
    refused: list[str] = []
    for folder in runs:
        try:
            found = newest_good(folder)
        except CheckpointError as err:
            refused.append(str(err))
            continue
        if found is None:
            continue
        path, ckpt = found
        try:
            check_compatible(ckpt, path, hparams, class_name)
        except CheckpointError as err:
            refused.append(str(err))
            continue
        return Resume(path, folder.name)
    if refused:
        raise CheckpointError(f"--ckpt_path last: no run under {root} fits this config; the "
                              f"newest: {refused[0]}")
    raise CheckpointError(f"--ckpt_path last: no last.ckpt under {root}; train first, or pass "
                          f"a checkpoint's path")


def _newest_mtime(folder: Path) -> float:
    return max((p.stat().st_mtime for p in folder.glob("*.ckpt")), default=0.0)


def run_of(checkpoint: Path, root: Path) -> str | None:
    """The run (version folder) under ``root`` that ``checkpoint`` lies in, if any."""
    try:
        rel = checkpoint.resolve().relative_to(root.resolve())
    except ValueError:
        return None
    parts = rel.parts
    return parts[0] if len(parts) == 3 and parts[1] == "checkpoints" else None
