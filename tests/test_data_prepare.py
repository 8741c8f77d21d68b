"""``python -m app prepare`` / ``data.prepare``: real miniature datasets in, .beton files out.

Stored pixels are read straight from the .beton (raw write mode) with ffcv's Reader, so the
checks do not depend on any decoder or augmentation.
"""
from __future__ import annotations

import hashlib
import io
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data.errors import DataError
from app.main import main as app_main
from data.prepare import choose_subset, prepare
from data.sidecar import read_sidecar, sidecar_path
from data.sources import open_source
from data.writer import WriteOptions

REPO = Path(__file__).resolve().parents[1]
RAW = WriteOptions(write_mode="raw", max_resolution=None, num_workers=2, chunk_size=3)


def stored(beton: Path) -> tuple[list[np.ndarray], np.ndarray]:
    """Images (raw mode) and labels exactly as the .beton holds them."""
    from ffcv.reader import Reader

    reader = Reader(str(beton))
    image, label = reader.metadata["f0"], reader.metadata["f1"]
    assert (image["mode"] == 1).all(), "raw write mode expected"
    blob = np.memmap(beton, dtype=np.uint8, mode="r")
    images = [np.array(blob[p:p + h * w * 3]).reshape(h, w, 3)
              for p, h, w in zip(image["data_ptr"], image["height"], image["width"])]
    return images, np.asarray(label, dtype=np.int64)


def rgb(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def save(path: Path, image: Image.Image, fmt: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format=fmt)


@pytest.fixture
def folder(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """root/train/{cat,dog,eel}: JPEG/PNG, mixed sizes, grayscale, CMYK, RGBA, palette, a
    nested folder, junk files, and one truncated JPEG; root/val with two classes."""
    root, expect = tmp_path / "folder", {}
    t = root / "train"
    a = rgb(30, 40, 1)
    save(t / "cat" / "a.jpg", Image.fromarray(a), "JPEG")
    b = rgb(50, 25, 2)
    save(t / "cat" / "b.png", Image.fromarray(b))
    expect["cat/b.png"] = b
    g = rgb(33, 33, 3)[:, :, 0]
    save(t / "cat" / "c.png", Image.fromarray(g, "L"))
    expect["cat/c.png"] = np.repeat(g[:, :, None], 3, axis=2)
    smooth = np.kron(rgb(7, 5, 4), np.ones((4, 4, 1), dtype=np.uint8))  # JPEG-friendly
    save(t / "dog" / "d.jpg", Image.fromarray(smooth).convert("CMYK"), "JPEG")
    expect["dog/d.jpg~"] = smooth  # lossy: compared with a tolerance
    rgba = np.dstack([rgb(17, 31, 5), np.full((17, 31), 90, np.uint8)])
    save(t / "dog" / "e.png", Image.fromarray(rgba, "RGBA"))
    expect["dog/e.png"] = rgba[:, :, :3]
    pal = Image.fromarray(rgb(12, 9, 6)).convert("P", palette=Image.ADAPTIVE, colors=16)
    save(t / "dog" / "f.png", pal)
    expect["dog/f.png"] = np.asarray(pal.convert("RGB"))
    save(t / "eel" / "g.JPEG", Image.fromarray(rgb(48, 64, 7)), "JPEG")
    save(t / "eel" / "sub" / "h.jpg", Image.fromarray(rgb(20, 20, 8)), "JPEG")
    buf = io.BytesIO()
    Image.fromarray(rgb(64, 64, 9)).save(buf, format="JPEG")
    (t / "eel" / "broken.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 3])
    (t / "eel" / "notes.txt").write_text("not an image")
    (t / "eel" / ".hidden.jpg").write_bytes(b"ignored")
    for cls, seed in (("cat", 10), ("eel", 11)):
        save(root / "val" / cls / "v.png", Image.fromarray(rgb(16, 16, seed)))
    return root, expect


def test_imagefolder_corrupt_file_is_an_error_and_writes_nothing(folder, tmp_path):
    root, _ = folder
    out = tmp_path / "out" / "train.beton"
    with pytest.raises(DataError, match=r"broken\.jpg.*--skip-bad"):
        prepare("imagefolder", "train", out, str(root), options=RAW)
    assert not out.exists() and not sidecar_path(out).exists()
    assert [p.name for p in out.parent.iterdir()] == []  # no temporary file left either


def test_imagefolder_skip_bad_converts_modes_and_labels(folder, tmp_path):
    root, expect = folder
    out = tmp_path / "train.beton"
    meta = prepare("imagefolder", "train", out, str(root), options=RAW, skip_bad=True,
                   progress=False)
    images, labels = stored(out)
    src = open_source("imagefolder", root, "train")
    files = [Path(f).relative_to(root / "train").as_posix() for f in src.files]
    assert files == ["cat/a.jpg", "cat/b.png", "cat/c.png", "dog/d.jpg", "dog/e.png",
                     "dog/f.png", "eel/broken.jpg", "eel/g.JPEG", "eel/sub/h.jpg"]
    kept = [f for f in files if f != "eel/broken.jpg"]
    assert len(images) == meta["num_samples"] == 8
    assert labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2]
    assert meta["class_names"] == ["cat", "dog", "eel"]
    assert meta["class_counts"] == [3, 3, 2]
    assert len(meta["skipped"]) == 1 and meta["skipped"][0]["item"].endswith("broken.jpg")
    for name, image in zip(kept, images):
        assert image.shape[2] == 3
        if name in expect:
            np.testing.assert_array_equal(image, expect[name], err_msg=name)
    cmyk = images[kept.index("dog/d.jpg")].astype(int)
    assert cmyk.shape == expect["dog/d.jpg~"].shape
    assert np.abs(cmyk - expect["dog/d.jpg~"]).mean() < 12  # CMYK decoded back to its RGB
    assert read_sidecar(out) == meta
    pixels = np.concatenate([i.reshape(-1, 3) for i in images]).astype(float)
    np.testing.assert_allclose(meta["mean"], pixels.mean(0) / 255, atol=1e-4)
    np.testing.assert_allclose(meta["std"], pixels.std(0) / 255, atol=1e-4)


def test_imagefolder_val_uses_train_classes_and_rejects_unknown(folder, tmp_path):
    root, _ = folder
    meta = prepare("imagefolder", "val", tmp_path / "val.beton", str(root), options=RAW,
                   progress=False)
    _, labels = stored(tmp_path / "val.beton")
    assert labels.tolist() == [0, 2]  # cat, eel: indices from train's class list
    assert meta["class_counts"] == [1, 0, 1]
    save(root / "val" / "fox" / "x.png", Image.fromarray(rgb(8, 8, 0)))
    with pytest.raises(DataError, match="fox.*same classes"):
        prepare("imagefolder", "val", tmp_path / "val2.beton", str(root), options=RAW)


def test_max_resolution_caps_the_longer_side(folder, tmp_path):
    root, _ = folder
    opts = WriteOptions(write_mode="raw", max_resolution=24, num_workers=1)
    prepare("imagefolder", "train", tmp_path / "t.beton", str(root), options=opts,
            skip_bad=True, progress=False)
    images, _ = stored(tmp_path / "t.beton")
    assert max(max(i.shape[:2]) for i in images) == 24
    assert any(i.shape[:2] == (12, 9) for i in images)  # smaller images are not enlarged


@pytest.mark.parametrize("mode, jpeg_modes", [("jpg", 8), ("raw", 0), ("smart", 0)])
def test_write_modes(folder, tmp_path, mode, jpeg_modes):
    from ffcv.reader import Reader

    root, _ = folder
    out = tmp_path / f"{mode}.beton"
    prepare("imagefolder", "train", out, str(root), skip_bad=True, progress=False,
            options=WriteOptions(write_mode=mode, max_resolution=None, num_workers=1))
    assert int((Reader(str(out)).metadata["f0"]["mode"] == 0).sum()) == jpeg_modes


def test_bad_folders_and_sources(tmp_path):
    with pytest.raises(DataError, match="unknown source 'imagenett'"):
        prepare("imagenett", "train", tmp_path / "x.beton", str(tmp_path))
    with pytest.raises(DataError, match="needs|--root"):
        prepare("imagefolder", "train", tmp_path / "x.beton", None)
    with pytest.raises(DataError, match="does not exist"):
        prepare("imagefolder", "train", tmp_path / "x.beton", str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class sub-folders"):
        prepare("imagefolder", "train", tmp_path / "x.beton", str(tmp_path / "empty"))
    (tmp_path / "empty" / "cat").mkdir()
    with pytest.raises(DataError, match="cat.*holds no images"):
        prepare("imagefolder", "train", tmp_path / "x.beton", str(tmp_path / "empty"))
    with pytest.raises(DataError, match="has no option 'colour'"):
        prepare("digits", "train", tmp_path / "x.beton", source_options={"colour": 1})
    with pytest.raises(DataError, match="unknown write mode"):
        prepare("digits", "train", tmp_path / "x.beton",
                options=WriteOptions(write_mode="png"))
    assert list(tmp_path.glob("*.beton*")) == []


def test_existing_output_is_kept_without_overwrite(tmp_path):
    out = tmp_path / "d.beton"
    small = {"num_samples": 40, "num_classes": 4, "image_size": 8}
    prepare("synthetic", "train", out, source_options=small, progress=False,
            options=WriteOptions(write_mode="raw", max_resolution=None, num_workers=1))
    before = hashlib.sha256(out.read_bytes()).hexdigest(), sidecar_path(out).read_text()
    with pytest.raises(DataError, match="already exists.*--overwrite"):
        prepare("synthetic", "train", out, source_options={**small, "num_samples": 20})
    assert (hashlib.sha256(out.read_bytes()).hexdigest(), sidecar_path(out).read_text()) == before
    prepare("synthetic", "train", out, source_options={**small, "num_samples": 20},
            overwrite=True, progress=False)
    assert read_sidecar(out)["num_samples"] == 20 and len(stored_labels(out)) == 20


def stored_labels(beton: Path) -> np.ndarray:
    from data.sidecar import beton_labels

    return beton_labels(beton)


def test_tiny_imagenet_layout(tmp_path):
    base = tmp_path / "tiny-imagenet-200"
    wnids = ["n03", "n01", "n02"]  # not sorted: indices must follow the file, not the names
    (base / "val" / "images").mkdir(parents=True)
    (base / "wnids.txt").write_text("\n".join(wnids) + "\n")
    (base / "words.txt").write_text("n01\tgoldfish\nn02\ttabby, cat\nn03\teel\nn09\tother\n")
    for k, w in enumerate(wnids):
        for j in range(2 + k):
            save(base / "train" / w / "images" / f"{w}_{j}.JPEG",
                 Image.fromarray(rgb(64, 64, 10 * k + j)), "JPEG")
        (base / "train" / w / f"{w}_boxes.txt").write_text("ignored")
    notes, truth = [], {}
    for j, w in enumerate(["n02", "n03", "n01", "n02"]):
        name = f"val_{j}.JPEG"
        save(base / "val" / "images" / name, Image.fromarray(rgb(64, 64, 100 + j)), "JPEG")
        notes.append(f"{name}\t{w}\t0\t0\t10\t10")
        truth[name] = wnids.index(w)
    (base / "val" / "val_annotations.txt").write_text("\n".join(notes) + "\n")

    train = prepare("tiny-imagenet", "train", tmp_path / "t.beton", str(tmp_path),
                    progress=False)  # the parent folder is accepted too
    val = prepare("tiny-imagenet", "val", tmp_path / "v.beton", str(base), progress=False)
    assert train["class_names"] == val["class_names"] == ["eel", "goldfish", "tabby, cat"]
    assert train["class_counts"] == [2, 3, 4]
    assert stored_labels(tmp_path / "t.beton").tolist() == [0, 0, 1, 1, 1, 2, 2, 2, 2]
    want = [truth[f"val_{j}.JPEG"] for j in range(4)]
    assert stored_labels(tmp_path / "v.beton").tolist() == want
    assert val["max_size"] == [64, 64]


def write_cifar(folder: Path, hundred: bool) -> dict[str, tuple[np.ndarray, list[int]]]:
    rng = np.random.default_rng(0)
    key, n_cls = (b"fine_labels", 100) if hundred else (b"labels", 10)
    files = {"train": ["train"], "val": ["test"]} if hundred else \
        {"train": [f"data_batch_{k}" for k in range(1, 6)], "val": ["test_batch"]}
    truth = {}
    for split, names in files.items():
        parts, labels = [], []
        for name in names:
            data = rng.integers(0, 256, (7, 3072), dtype=np.uint8)
            lab = rng.integers(0, n_cls, 7).tolist()
            with open(folder / name, "wb") as fh:
                pickle.dump({b"data": data, key: lab}, fh)
            parts.append(data)
            labels += lab
        truth[split] = (np.concatenate(parts).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels)
    meta_name, names_key = (("meta", b"fine_label_names") if hundred
                            else ("batches.meta", b"label_names"))
    with open(folder / meta_name, "wb") as fh:
        pickle.dump({names_key: [f"c{k}".encode() for k in range(n_cls)]}, fh)
    return truth


@pytest.mark.parametrize("name, folder_name, hundred", [
    ("cifar10", "cifar-10-batches-py", False), ("cifar100", "cifar-100-python", True)])
def test_cifar_pickles(tmp_path, name, folder_name, hundred):
    base = tmp_path / folder_name
    base.mkdir()
    truth = write_cifar(base, hundred)
    for split in ("train", "val"):
        meta = prepare(name, split, tmp_path / f"{split}.beton", str(tmp_path), progress=False)
        images, labels = stored(tmp_path / f"{split}.beton")
        np.testing.assert_array_equal(np.stack(images), truth[split][0])
        assert labels.tolist() == truth[split][1]
        assert meta["num_classes"] == (100 if hundred else 10)
    (base / ("train" if hundred else "data_batch_3")).unlink()
    with pytest.raises(DataError, match="is missing"):
        prepare(name, "train", tmp_path / "again.beton", str(base))


def test_digits_split_is_fixed_stratified_and_disjoint(tmp_path):
    train = open_source("digits", None, "train")
    val = open_source("digits", None, "val")
    assert (len(train), len(val)) == (1437, 360)
    assert not set(train.index) & set(val.index)
    shares = np.bincount(val.labels) / np.bincount(train.labels)
    assert np.allclose(shares, 0.25, atol=0.02)  # 20 % / 80 % in every class
    meta = prepare("digits", "val", tmp_path / "v.beton", progress=False)
    images, labels = stored(tmp_path / "v.beton")
    assert meta["num_samples"] == 360 and images[0].shape == (32, 32, 3)
    np.testing.assert_array_equal(labels, val.labels)
    np.testing.assert_array_equal(images[5], val.image(5))
    again = prepare("digits", "val", tmp_path / "v2.beton", progress=False)
    assert again["class_counts"] == meta["class_counts"]
    np.testing.assert_array_equal(np.stack(stored(tmp_path / "v2.beton")[0]), np.stack(images))


def test_synthetic_is_learnable():
    """A nearest-class-mean classifier on train separates val almost perfectly."""
    opts = {"num_classes": 5, "num_samples": 200, "image_size": 16}
    train = open_source("synthetic", None, "train", **opts)
    val = open_source("synthetic", None, "val", **opts)
    x = np.stack([train.image(i) for i in range(len(train))]).reshape(200, -1).astype(float)
    means = np.stack([x[train.labels == c].mean(0) for c in range(5)])
    v = np.stack([val.image(i) for i in range(len(val))]).reshape(200, -1).astype(float)
    guess = np.argmin(((v[:, None, :] - means[None]) ** 2).sum(-1), axis=1)
    assert (guess == val.labels).mean() > 0.9
    assert not np.array_equal(train.image(0), val.image(0))


def test_subset_draws_from_every_class():
    labels = np.repeat(np.arange(10), 100)  # class-sorted, like a folder walk
    pick = choose_subset(labels, 50, seed=0)
    assert len(pick) == 50 and len(set(pick)) == 50 and (np.diff(pick) > 0).all()
    assert len(set(labels[pick])) >= 9
    np.testing.assert_array_equal(pick, choose_subset(labels, 50, seed=0))
    assert choose_subset(labels, 5000, seed=0) is None


def test_stale_sidecar_is_ignored(tmp_path):
    out = tmp_path / "s.beton"
    prepare("synthetic", "val", out, progress=False,
            source_options={"num_samples": 12, "num_classes": 3, "image_size": 8})
    meta = read_sidecar(out)
    sidecar_path(out).write_text(sidecar_path(out).read_text().replace(
        '"num_samples": 12', '"num_samples": 13'))
    assert meta is not None and read_sidecar(out) is None


def test_cli_prepare_and_one_line_errors(tmp_path, capsys):
    out = tmp_path / "cli.beton"
    argv = ["prepare", "--source", "synthetic", "--split", "val", "--out", str(out),
            "--num-samples", "30", "--num-classes", "3", "--image-size", "12", "--no-progress",
            "--num-workers", "1"]
    assert app_main(argv) == 0
    assert "wrote" in capsys.readouterr().out and out.is_file()
    assert app_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "already exists" in err and "\n" not in err
    assert app_main(["prepare", "--source", "nope", "--out", str(tmp_path / "n.beton")]) == 2
    assert "unknown source 'nope'" in capsys.readouterr().err


def _prepare_process(out: Path, n: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-m", "app", "prepare", "--source", "synthetic", "--out", str(out),
         "--num-samples", str(n), "--image-size", "64", "--write-mode", "jpg",
         "--num-workers", "1", "--chunk-size", "50", "--no-progress"],
        cwd=REPO, env=env, start_new_session=True, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE)


def _wait_for_partial(out: Path, proc: subprocess.Popen) -> Path:
    deadline = time.time() + 60
    while time.time() < deadline:
        found = [p for p in out.parent.glob(f".{out.name}.*.partial") if p.stat().st_size > 1 << 21]
        if found:
            return found[0]
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    raise AssertionError("prepare never started writing")


@pytest.fixture
def spawn():
    """Start prepare processes; whatever a failing test leaves running is killed."""
    procs: list[subprocess.Popen] = []
    yield lambda out, n: procs.append(_prepare_process(out, n)) or procs[-1]
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.slow
def test_killed_prepare_leaves_no_beton(tmp_path, spawn):
    out = tmp_path / "big.beton"
    proc = spawn(out, 200_000)
    partial = _wait_for_partial(out, proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists() and not sidecar_path(out).exists()
    assert partial.exists()  # SIGKILL cannot clean up; the next run on this host does
    proc = spawn(out, 60)
    assert proc.wait(timeout=120) == 0, proc.communicate()
    assert read_sidecar(out)["num_samples"] == 60 and not partial.exists()


@pytest.mark.slow
def test_terminated_prepare_cleans_up(tmp_path, spawn):
    out = tmp_path / "big.beton"
    proc = spawn(out, 200_000)
    _wait_for_partial(out, proc)
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=60) == 130
    assert "was not written" in proc.stderr.read().decode()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_folder_splits_must_differ(folder, tmp_path, monkeypatch):
    from data.datamodule import FFCVImageDataModule

    root, _ = folder
    monkeypatch.setenv("SELFNORM_DATA_DIR", str(tmp_path / "cache"))
    shutil.rmtree(root / "val")
    with pytest.raises(DataError, match="train/ but no val/"):
        prepare("imagefolder", "val", tmp_path / "v.beton", str(root))
    flat = FFCVImageDataModule(source="imagefolder", root=str(root / "train"))
    assert flat.num_classes == 3
    with pytest.raises(DataError, match="val would repeat train"):
        flat.prepare_data()
    assert not (tmp_path / "cache").exists()


# ---- holdout: a share of train as the val set, for choosing hyper-parameters ------------------

def _tiny_imagenet(tmp_path: Path, per_class: int = 10) -> Path:
    """Tiny ImageNet's layout: 3 classes of ``per_class`` train images each, 3 val images."""
    base = tmp_path / "tiny-imagenet-200"
    wnids = ["n03", "n01", "n02"]
    (base / "val" / "images").mkdir(parents=True)
    (base / "wnids.txt").write_text("\n".join(wnids) + "\n")
    for k, w in enumerate(wnids):
        for j in range(per_class):
            save(base / "train" / w / "images" / f"{w}_{j}.JPEG",
                 Image.fromarray(rgb(8, 8, 10 * k + j)), "JPEG")
    notes = []
    for j, w in enumerate(wnids):
        save(base / "val" / "images" / f"val_{j}.JPEG", Image.fromarray(rgb(8, 8, 99 + j)),
             "JPEG")
        notes.append(f"val_{j}.JPEG\t{w}\t0\t0\t8\t8")
    (base / "val" / "val_annotations.txt").write_text("\n".join(notes) + "\n")
    return base


def test_tiny_imagenet_holdout_is_stratified_seeded_and_disjoint(tmp_path):
    base = _tiny_imagenet(tmp_path)
    full = open_source("tiny-imagenet", base, "train")
    train = open_source("tiny-imagenet", base, "train", holdout=0.2)
    held = open_source("tiny-imagenet", base, "val", holdout=0.2)
    assert np.bincount(train.labels).tolist() == [8, 8, 8]
    assert np.bincount(held.labels).tolist() == [2, 2, 2]
    assert not set(train.files) & set(held.files)
    assert sorted(train.files + held.files) == sorted(full.files)
    assert all("/train/" in f for f in held.files)  # never the official val images
    label = dict(zip(full.files, full.labels.tolist()))
    assert [label[f] for f in held.files] == held.labels.tolist()
    assert train.files == [f for f in full.files if f in set(train.files)]  # file order kept
    again = open_source("tiny-imagenet", base, "val", holdout=0.2)
    assert again.files == held.files
    other = open_source("tiny-imagenet", base, "val", holdout=0.2, holdout_seed=1)
    assert other.files != held.files and np.bincount(other.labels).tolist() == [2, 2, 2]
    assert open_source("tiny-imagenet", base, "val").files[0].endswith("val/images/val_0.JPEG")


def test_holdout_betons_through_the_data_module(tmp_path, monkeypatch):
    from data.datamodule import FFCVImageDataModule

    monkeypatch.setenv("SELFNORM_DATA_DIR", str(tmp_path / "cache"))
    base = _tiny_imagenet(tmp_path)
    plain = FFCVImageDataModule(source="tiny-imagenet", root=str(base), batch_size=2)
    held = FFCVImageDataModule(source="tiny-imagenet", root=str(base), batch_size=2,
                               source_options={"holdout": 0.3})
    assert held.train_path != plain.train_path and held.val_path != plain.val_path
    held.prepare_data()
    assert np.bincount(stored_labels(held.train_path)).tolist() == [7, 7, 7]
    assert np.bincount(stored_labels(held.val_path)).tolist() == [3, 3, 3]
    assert read_sidecar(held.val_path)["source_options"] == {"holdout": 0.3}
    assert not plain.train_path.exists()


def test_imagefolder_holdout_reads_train_only(folder, tmp_path):
    root, _ = folder
    train = open_source("imagefolder", root, "train", holdout=0.34)
    held = open_source("imagefolder", root, "val", holdout=0.34)
    assert np.bincount(held.labels).tolist() == [1, 1, 1]  # round(0.34 · 3) per class
    assert np.bincount(train.labels).tolist() == [2, 2, 2]
    assert all("/train/" in f for f in held.files)
    assert not set(train.files) & set(held.files)


@pytest.mark.parametrize("holdout", [1.0, -0.1, 2, "half"])
def test_bad_holdout_is_a_data_error(tmp_path, holdout):
    base = _tiny_imagenet(tmp_path)
    with pytest.raises(DataError, match="holdout .* must be a fraction in \\(0, 1\\)"):
        open_source("tiny-imagenet", base, "train", holdout=holdout)


def test_holdout_needs_two_images_a_class(tmp_path):
    base = _tiny_imagenet(tmp_path, per_class=1)
    with pytest.raises(DataError, match="at least 2 per class"):
        open_source("tiny-imagenet", base, "val", holdout=0.5)


def test_a_flat_imagefolder_with_a_holdout_has_a_val_split(tmp_path, monkeypatch):
    """Without train/ and val/ sub-folders val would repeat train, unless it is the held-out
    share: then the data module prepares both."""
    from data.datamodule import FFCVImageDataModule

    monkeypatch.setenv("SELFNORM_DATA_DIR", str(tmp_path / "cache"))
    root = tmp_path / "flat"
    for k, name in enumerate(("ant", "bee")):
        for j in range(4):
            save(root / name / f"{j}.png", Image.fromarray(rgb(8, 8, 10 * k + j)))
    flat = FFCVImageDataModule(source="imagefolder", root=str(root), batch_size=2)
    with pytest.raises(DataError, match="val would repeat train"):
        flat.prepare_data()
    held = FFCVImageDataModule(source="imagefolder", root=str(root), batch_size=2,
                               source_options={"holdout": 0.25})
    held.prepare_data()
    assert np.bincount(stored_labels(held.train_path)).tolist() == [3, 3]
    assert np.bincount(stored_labels(held.val_path)).tolist() == [1, 1]


@pytest.mark.parametrize("seed", ["abc", -1, 1.5])
def test_bad_holdout_seed_is_a_data_error(tmp_path, seed):
    base = _tiny_imagenet(tmp_path)
    with pytest.raises(DataError, match="holdout_seed .* must be a whole number"):
        open_source("tiny-imagenet", base, "val", holdout=0.2, holdout_seed=seed)
