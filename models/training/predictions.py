"""``PredictionWriter``: ``predict`` writes each sample's top-k classes and probabilities.

The file is ``predictions.csv`` in the run folder: one row per sample in loader order, with the
class indices, their names (the data module's ``class_names``, from the .beton's sidecar) and the
probabilities.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from models.errors import ModelError


class PredictionWriter(BasePredictionWriter):
    """Top-``k`` classes and probabilities per sample, as CSV in the run folder.

    Args:
        top_k: classes written per sample.
        filename: the file's name inside the run folder.
    """

    def __init__(self, top_k: int = 5, filename: str = "predictions.csv") -> None:
        super().__init__(write_interval="epoch")
        if not (isinstance(top_k, int) and top_k >= 1):
            raise ModelError(f"predictions.top_k must be a positive integer, got {top_k!r}.")
        self.top_k, self.filename = top_k, filename
        self.path: Path | None = None

    def write_on_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           predictions: Sequence[Any], batch_indices: Sequence[Any]) -> None:
        if not trainer.is_global_zero or not predictions:
            return
        probs = torch.cat([p.float().cpu() for p in _flat(predictions)])
        k = min(self.top_k, probs.shape[1])
        top = probs.topk(k, dim=1)
        names = getattr(trainer.datamodule, "class_names", None) or []
        self.path = Path(trainer.log_dir or trainer.default_root_dir) / self.filename
        self.path.parent.mkdir(parents=True, exist_ok=True)
        header = ["sample"] + [f"{c}{i + 1}" for i in range(k) for c in ("class", "name", "p")]
        with open(self.path, "w", newline="") as fh:
            out = csv.writer(fh)
            out.writerow(header)
            for n, (idx, p) in enumerate(zip(top.indices.tolist(), top.values.tolist())):
                row: list[Any] = [n]
                for c, q in zip(idx, p):
                    row += [c, names[c] if c < len(names) else "", f"{q:.6f}"]
                out.writerow(row)


def _flat(predictions: Sequence[Any]) -> list[torch.Tensor]:
    """Lightning nests per-dataloader lists when there are several loaders."""
    out: list[torch.Tensor] = []
    for p in predictions:
        out += _flat(p) if isinstance(p, (list, tuple)) else [p]
    return out
