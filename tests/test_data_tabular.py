"""``TabularDataModule``: bundled UCI sets and local CSVs, standardised, fixed stratified split."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from data.errors import DataError
from data.tabular import TabularDataModule


def split_arrays(dm: TabularDataModule) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    xt, yt = (t.numpy() for t in dm.train_set.tensors)
    xv, yv = (t.numpy() for t in dm.val_set.tensors)
    return xt, yt, xv, yv


@pytest.mark.parametrize("name, classes, features, samples", [
    ("breast_cancer", 2, 30, 569), ("wine", 3, 13, 178), ("iris", 3, 4, 150),
    ("digits", 10, 64, 1797)])
def test_bundled_sets(name, classes, features, samples):
    dm = TabularDataModule(dataset=name, val_fraction=0.2, seed=0)
    assert (dm.num_classes, dm.in_features) == (classes, features)
    xt, yt, xv, yv = split_arrays(dm)
    assert len(yt) + len(yv) == samples and abs(len(yv) - 0.2 * samples) <= 1
    assert xt.dtype == np.float32 and yt.dtype == np.int64
    np.testing.assert_allclose(xt.mean(0), 0, atol=1e-4)
    std = xt.std(0)
    assert np.all((np.abs(std - 1) < 1e-3) | (std == 0))  # constant pixels of digits stay 0
    assert np.isfinite(xv).all()
    # stratified: every class keeps its share in both splits
    share_t = np.bincount(yt, minlength=classes) / len(yt)
    share_v = np.bincount(yv, minlength=classes) / len(yv)
    assert np.abs(share_t - share_v).max() < 0.05


def test_split_is_fixed_by_seed_and_loaders_batch():
    a = split_arrays(TabularDataModule(seed=3))
    b = split_arrays(TabularDataModule(seed=3))
    c = split_arrays(TabularDataModule(seed=4))
    assert all(np.array_equal(u, v) for u, v in zip(a, b))
    assert not np.array_equal(a[0], c[0])
    dm = TabularDataModule(batch_size=32)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 30) and y.shape == (32,) and x.dtype == torch.float32
    assert sum(len(y) for _, y in dm.val_dataloader()) == len(dm.val_set)


def test_csv_with_header_and_named_target(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 3))
    label = np.where(x[:, 0] > 0, "pos", "neg")
    lines = ["a,b,kind,c"] + [f"{r[0]},{r[1]},{k},{r[2]}" for r, k in zip(x, label)]
    (tmp_path / "t.csv").write_text("\n".join(lines) + "\n")
    dm = TabularDataModule(dataset="csv", path=str(tmp_path / "t.csv"), target="kind")
    assert (dm.num_classes, dm.in_features, dm.class_names) == (2, 3, ["neg", "pos"])
    xt, yt, _, _ = split_arrays(dm)
    # feature 0 (standardised) still separates the classes: the label column was dropped,
    # not a feature, and rows kept their labels
    assert xt[yt == 1, 0].min() > xt[yt == 0, 0].max()


def test_csv_without_header_uses_last_column(tmp_path):
    rows = [f"{i * 0.5},{i % 3},{i % 2}" for i in range(40)]
    (tmp_path / "h.csv").write_text("\n".join(rows))
    dm = TabularDataModule(dataset="csv", path=str(tmp_path / "h.csv"))
    assert (dm.num_classes, dm.in_features, dm.class_names) == (2, 2, ["0", "1"])


def test_bad_input(tmp_path):
    with pytest.raises(DataError, match="unknown tabular dataset 'adult'"):
        TabularDataModule(dataset="adult")
    with pytest.raises(DataError, match="existing file"):
        TabularDataModule(dataset="csv", path=str(tmp_path / "missing.csv"))
    (tmp_path / "c.csv").write_text("x,colour,y\n1,red,0\n2,blue,1\n3,red,0\n4,blue,1\n")
    with pytest.raises(DataError, match="non-numeric feature"):
        TabularDataModule(dataset="csv", path=str(tmp_path / "c.csv"))
    with pytest.raises(DataError, match="target column 'label'"):
        TabularDataModule(dataset="csv", path=str(tmp_path / "c.csv"), target="label")
    with pytest.raises(DataError, match="val_fraction"):
        TabularDataModule(val_fraction=1.5)
