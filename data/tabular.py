"""``TabularDataModule``: standardised tabular data for the fully-connected SNN (paper App. E).

The paper's UCI sets (MiniBooNE, Adult, HTRU2) are not bundled anywhere; scikit-learn's bundled
UCI sets (breast_cancer, wine, iris, digits) run with no download, and ``dataset: csv`` reads a
local numeric CSV (e.g. HTRU_2.csv) with the label in ``target``. The split is a fixed
stratified one; features are standardised with the train split's mean and std.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, TensorDataset

from data.errors import DataError

Table = tuple[np.ndarray, np.ndarray, list[str]]


def _sklearn(name: str) -> Callable[..., Table]:
    def load(path: str | None, target: str | int | None) -> Table:
        import sklearn.datasets

        bunch = getattr(sklearn.datasets, f"load_{name}")()
        names = [str(n) for n in getattr(bunch, "target_names", np.unique(bunch.target))]
        return bunch.data.astype(np.float64), bunch.target.astype(np.int64), names
    return load


def _csv(path: str | None, target: str | int | None) -> Table:
    """A numeric CSV, with or without a header row; ``target`` is a column name or index."""
    if not path or not Path(path).expanduser().is_file():
        raise DataError(f"dataset csv needs an existing file in data.path, got {path!r}")
    with open(Path(path).expanduser(), newline="") as fh:
        rows = [r for r in csv.reader(fh) if r]
    if len(rows) < 2:
        raise DataError(f"{path!r} holds fewer than two rows; give a CSV with one sample per row")
    header = None if _numeric(rows[0]) else rows[0]
    body = rows[1:] if header else rows
    column = -1 if target is None else target
    if isinstance(column, str) and not column.lstrip("-").isdigit():
        if header is None or column not in header:
            raise DataError(f"target column {column!r} is not in the header of {path!r}; give "
                            f"its name or index")
        column = header.index(column)
    column = int(column) % len(body[0])
    labels = [r[column] for r in body]
    try:
        features = np.array([[float(v) for k, v in enumerate(r) if k != column] for r in body])
    except ValueError as err:
        raise DataError(f"{path!r} has a non-numeric feature ({err}); encode categorical "
                        f"columns as numbers first") from None
    names = sorted(set(labels), key=_label_order)
    index = {v: k for k, v in enumerate(names)}
    return features, np.array([index[v] for v in labels], dtype=np.int64), names


def _label_order(value: str) -> tuple:
    # Numeric labels sort as numbers ("2" before "10"), others after them by name.
    return (0, float(value), value) if _numeric([value]) else (1, 0.0, value)


def _numeric(row: list[str]) -> bool:
    try:
        [float(v) for v in row]
    except ValueError:
        return False
    return True


DATASETS: dict[str, Callable[..., Table]] = {
    "breast_cancer": _sklearn("breast_cancer"),
    "wine": _sklearn("wine"),
    "iris": _sklearn("iris"),
    "digits": _sklearn("digits"),
    "csv": _csv,
}


class TabularDataModule(LightningDataModule):
    """A tabular classification set as standardised float32 features and int64 labels.

    Args:
        dataset: ``breast_cancer``, ``wine``, ``iris``, ``digits`` (scikit-learn, bundled) or
            ``csv`` (a local file in ``path``).
        path: the CSV file for ``dataset: csv``.
        target: the CSV's label column, by name or index (default: the last).
        val_fraction: share of samples in the stratified val split (also the test split).
        batch_size: train batch size.
        val_batch_size: val batch size (default: the whole split, at most 4096).
        num_workers: DataLoader worker processes (the data is in memory: 0 is fastest).
        seed: seed of the split.
    """

    def __init__(self, dataset: str = "breast_cancer", path: str | None = None,
                 target: str | int | None = None, val_fraction: float = 0.2,
                 batch_size: int = 128, val_batch_size: int | None = None, num_workers: int = 0,
                 seed: int = 0):
        super().__init__()
        self.save_hyperparameters()
        if dataset not in DATASETS:
            raise DataError(f"unknown tabular dataset {dataset!r}; choose one of: "
                            f"{', '.join(DATASETS)}")
        if not 0.0 < val_fraction < 1.0:
            raise DataError(f"val_fraction {val_fraction} must lie strictly between 0 and 1")
        from sklearn.model_selection import train_test_split

        x, y, self.class_names = DATASETS[dataset](path, target)
        train, val = train_test_split(np.arange(len(y)), test_size=val_fraction, stratify=y,
                                      random_state=seed)
        mean = x[train].mean(0)
        std = x[train].std(0)
        std[std == 0] = 1.0  # constant features stay 0 instead of becoming NaN
        x = (x - mean) / std
        self.num_classes = len(self.class_names)
        self.in_features = x.shape[1]
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or min(len(val), 4096)
        self.num_workers = num_workers
        self.train_set = TensorDataset(torch.as_tensor(x[train], dtype=torch.float32),
                                       torch.as_tensor(y[train]))
        self.val_set = TensorDataset(torch.as_tensor(x[val], dtype=torch.float32),
                                     torch.as_tensor(y[val]))

    def __str__(self) -> str:
        # LightningDataModule's would build every loader just to print their sizes
        return (f"{type(self).__name__}(dataset={self.hparams.dataset!r}, "
                f"num_classes={self.num_classes}, in_features={self.in_features})")

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True,
                          num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.val_batch_size,
                          num_workers=self.num_workers)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()
