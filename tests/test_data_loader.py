"""``FFCVImageDataModule`` and ``FFCVLoader`` on real .beton files, alone and under Lightning."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import lightning.pytorch as pl
from data.errors import DataError
from data.datamodule import FFCVImageDataModule
from data.pipelines import ProgressiveResizing
from data.prepare import Preparation, prepare
from data.sources import open_source
from data.writer import WriteOptions

N = 96  # one class per sample, so labels identify samples
SYN = {"num_classes": N, "num_samples": N, "image_size": 16}
RAW = WriteOptions(write_mode="raw", max_resolution=None, num_workers=1)


@pytest.fixture(scope="module")
def betons(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("betons")
    for split in ("train", "val"):
        prepare("synthetic", split, folder / f"{split}.beton", options=RAW, source_options=SYN,
                progress=False)
    return folder / "train.beton", folder / "val.beton"


@pytest.fixture
def data_dir(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("SELFNORM_DATA_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def module(betons, **kw) -> FFCVImageDataModule:
    args = dict(train_path=str(betons[0]), val_path=str(betons[1]), batch_size=16,
                num_workers=1, drop_last=False)
    return FFCVImageDataModule(**(args | kw))


def labels_of(loader) -> list[int]:
    return [int(v) for _, y in loader for v in y]


def new_threads(before: set[threading.Thread], allowed: int = 0,
                timeout: float = 5.0) -> list[threading.Thread]:
    """Threads alive now that were not in ``before``, once at most ``allowed`` remain or
    ``timeout`` passes. Identities, not counts: a thread of an earlier test that ends meanwhile
    must not hide one that leaks."""
    deadline = time.time() + timeout
    while True:
        new = [t for t in threading.enumerate() if t not in before]
        if len(new) <= allowed or time.time() >= deadline:
            return new
        time.sleep(0.05)


def test_val_batches_are_the_stored_pixels_normalised(betons):
    mean, std = (0.2, 0.4, 0.6), (0.5, 0.25, 0.125)
    dm = module(betons, augment="pad_crop", mean=mean, std=std)
    dm.setup("validate")
    src = open_source("synthetic", None, "val", **SYN)
    seen = 0
    for x, y in dm.val_dataloader():
        assert x.dtype == torch.float32 and x.is_contiguous(memory_format=torch.channels_last)
        assert y.dtype == torch.int64 and y.shape == (x.shape[0],)
        for k in range(len(y)):
            img = torch.from_numpy(src.image(seen + k)).permute(2, 0, 1).double() / 255
            want = (img - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
            torch.testing.assert_close(x[k].double(), want, atol=1e-5, rtol=0)
            assert int(y[k]) == src.labels[seen + k]
        seen += len(y)
    assert seen == N  # the last, partial val batch is kept


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_layout_follows_channels_last(betons, dtype):
    """On the CPU the pipeline itself makes the layout; the values do not depend on it."""
    nhwc, nchw = ([x for x, _ in module(betons, augment="pad_crop", channels_last=cl)
                   .build_loader("val", dtype=dtype)] for cl in (True, False))
    for batch in nchw:
        assert batch.dtype == dtype and batch.is_contiguous()
        assert not batch.is_contiguous(memory_format=torch.channels_last)
    for batch in nhwc:
        assert batch.dtype == dtype and not batch.is_contiguous()
        assert batch.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(torch.cat(nhwc), torch.cat(nchw))


def test_cuda_pipeline_allocates_nothing_off_the_device():
    """ffcv 1.0.2's ToTorchImage(channels_last=False) allocates its output without a device:
    after ToDevice that copied every batch back to pinned CPU memory (the demo's crash)."""
    from ffcv.pipeline.state import State

    from data.pipelines import image_pipeline

    cuda = torch.device("cuda")
    for channels_last in (True, False):
        state = State(jit_mode=True, device=torch.device("cpu"), shape=(16, 16, 3),
                      dtype=np.dtype("uint8"))  # a decoder's output
        for op in image_pipeline([], cuda, channels_last, (0.5,) * 3, (0.25,) * 3,
                                 torch.float32):
            on_device = state.device == cuda
            state, alloc = op.declare_state_and_memory(state)
            assert alloc is None or not on_device or alloc.device == cuda, (op, alloc)
        assert state.device == cuda and state.shape == (3, 16, 16)


@pytest.mark.parametrize("channels_last", [False, True])
def test_device_normalisation_run_on_the_cpu(betons, monkeypatch, channels_last):
    """The CUDA pipeline (uint8 moved by ToDevice, channels_last view, normalised by
    FFCVLoader) run on the CPU: the layout asked for, and the host-normalised values."""
    from data import pipelines

    dm = module(betons, augment="pad_crop", channels_last=channels_last)
    dm.setup("validate")
    ref = torch.cat([x for x, _ in dm.build_loader("val")])
    monkeypatch.setattr(pipelines, "normalized_on_host", lambda device: False)
    loader = dm.build_loader("val")
    assert loader._scale is not None  # the pipeline delivers uint8, FFCVLoader normalises
    batches = list(loader)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    assert all(x.dtype == torch.float32 and x.is_contiguous(memory_format=layout)
               for x, _ in batches)
    assert torch.cat([y for _, y in batches]).tolist() == list(range(N))
    torch.testing.assert_close(torch.cat([x for x, _ in batches]), ref, atol=1e-5, rtol=1e-6)


def uint8_batch() -> torch.Tensor:
    """Every pixel value in every channel, as ffcv's ToTorchImage hands them over: a
    channels_last view of an NHWC buffer."""
    nhwc = torch.arange(2 * 8 * 16 * 3).remainder(256).to(torch.uint8).view(2, 8, 16, 3)
    return nhwc.permute(0, 3, 1, 2)


@pytest.mark.parametrize("channels_last", [False, True])
def test_normalize_rounds_once_to_the_training_dtype(channels_last):
    from data.loader import FFCVLoader
    from data.pipelines import IMAGENET_MEAN, IMAGENET_STD

    images = uint8_batch()
    want = ((images.double() - 255 * torch.tensor(IMAGENET_MEAN, dtype=torch.float64)
             .view(1, 3, 1, 1)) / (255 * torch.tensor(IMAGENET_STD, dtype=torch.float64)
                                   .view(1, 3, 1, 1)))
    layout = torch.channels_last if channels_last else torch.contiguous_format

    def normalize(dtype: torch.dtype) -> torch.Tensor:
        loader = FFCVLoader(None, device=torch.device("cpu"), dtype=dtype, mean=IMAGENET_MEAN,
                            std=IMAGENET_STD, channels_last=channels_last)
        out = loader.normalize(images)
        assert out.dtype == dtype and out.is_contiguous(memory_format=layout)
        assert out.untyped_storage().data_ptr() != images.untyped_storage().data_ptr()
        return out

    f32 = normalize(torch.float32)
    torch.testing.assert_close(f32.double(), want, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(normalize(torch.float64), want, atol=1e-12, rtol=1e-12)
    for dtype in (torch.bfloat16, torch.float16):
        assert torch.equal(normalize(dtype), f32.to(dtype))  # the float32 result, rounded once
    # Arithmetic in bf16 (123.675 → 123.5) would not pass the check above for these pixels.
    shift = (255 * torch.tensor(IMAGENET_MEAN)).view(1, 3, 1, 1).bfloat16()
    scale = (1 / (255 * torch.tensor(IMAGENET_STD))).view(1, 3, 1, 1).bfloat16()
    assert not torch.equal(images.bfloat16().sub_(shift).mul_(scale), f32.bfloat16())


class FakeStream:
    def __init__(self):
        self.waited: list[FakeStream] = []

    def wait_stream(self, other: "FakeStream") -> None:
        self.waited.append(other)


def test_stopping_an_epoch_orders_the_buffers_stream_after_ffcvs(monkeypatch):
    """ffcv fills its buffers on side streams: dropping them early must not let the caching
    allocator reuse them before those copies end. Without CUDA, ffcv's streams are None."""
    from types import SimpleNamespace

    from data.loader import wait_for_streams

    def no_cuda():
        raise AssertionError("CUDA touched for an iterator without streams")

    monkeypatch.setattr(torch.cuda, "current_stream", no_cuda)
    wait_for_streams(SimpleNamespace(cuda_streams=[None, None, None]))
    owner, side = FakeStream(), [FakeStream(), FakeStream()]
    wait_for_streams(SimpleNamespace(cuda_streams=side, current_stream=owner))
    assert owner.waited == side


def test_training_dtypes_on_the_cpu(betons):
    dm = module(betons, augment="pad_crop")
    dm.setup("validate")
    ref = torch.cat([x for x, _ in dm.build_loader("val")]).double()
    for dtype, tol in ((torch.float16, 4e-3), (torch.bfloat16, 3e-2), (torch.float64, 1e-6)):
        got = torch.cat([x for x, _ in dm.build_loader("val", dtype=dtype)])
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), ref, atol=tol * 8, rtol=tol)


def test_default_statistics_standardise_inputs(betons):
    dm = module(betons, augment="pad_crop")
    dm.setup("fit")
    x = torch.cat([b for b, _ in dm.val_dataloader()])
    assert abs(float(x.mean())) < 0.1 and abs(float(x.std()) - 1) < 0.1


def test_order_reshuffles_every_epoch_and_resumes(betons):
    loader = module(betons).train_dataloader()
    epochs = [labels_of(loader) for _ in range(4)]
    for order in epochs:
        assert sorted(order) == list(range(N))
    assert len({tuple(o) for o in epochs}) == 4
    resumed = module(betons).train_dataloader()
    resumed._epoch = lambda: 3  # what the trainer reports after resuming at epoch 3
    assert labels_of(resumed) == epochs[3]


def test_process_cache_with_quasi_random_order(betons):
    """os_cache: false (data larger than RAM) starts page-reader threads per epoch."""
    loader = module(betons, os_cache=False, order="quasi_random").train_dataloader()
    base = set(threading.enumerate())
    epochs = [labels_of(loader) for _ in range(2)]
    assert all(sorted(o) == list(range(N)) for o in epochs) and epochs[0] != epochs[1]
    held = iter(loader)
    next(held)
    assert set(threading.enumerate()) - base
    loader.close()
    assert new_threads(base) == []


def test_leaving_epochs_early_does_not_leak_threads(betons):
    loader = module(betons, batch_size=8).train_dataloader()
    base = set(threading.enumerate())
    for _ in range(8):
        next(iter(loader))  # the iterator is dropped after one batch, as limit_*_batches does
        assert len(new_threads(base, allowed=1)) <= 1
    held = iter(loader)
    next(held)
    loader.close()
    assert new_threads(base) == []
    with pytest.raises(StopIteration):
        next(held)


def test_held_batches_are_not_overwritten(betons):
    """Lightning keeps one batch while fetching the next; ffcv reuses its buffers."""
    loader = module(betons, batch_size=8, batches_ahead=1).train_dataloader()
    it = iter(loader)
    x0, y0 = next(it)
    copies = x0.clone(), y0.clone()
    rest = list(it)
    assert len(rest) == N // 8 - 1
    assert torch.equal(x0, copies[0]) and torch.equal(y0, copies[1])


def test_torch_threads_are_left_alone(betons):
    from ffcv.pipeline.compiler import Compiler

    before = torch.get_num_threads()
    loader = module(betons, num_workers=1).train_dataloader()
    labels_of(loader)
    Compiler.set_num_threads(1)
    assert torch.get_num_threads() == before


def test_progressive_resizing_follows_the_ramp(betons):
    dm = module(betons, resolution=16, progressive=ProgressiveResizing(8, start_ramp=0, end_ramp=2,
                                                                       step=4))
    assert [dm.train_resolution(e) for e in range(4)] == [8, 12, 16, 16]
    loader = dm.train_dataloader()
    sides = [next(iter(loader))[0].shape[-1] for _ in range(3)]
    assert sides == [8, 12, 16]
    assert dm.image_size == 16


def test_facts_are_known_before_any_file_exists(data_dir):
    dm = FFCVImageDataModule(source="digits", num_workers=1)
    assert (dm.num_classes, dm.image_size, dm.in_chans) == (10, 32, 3)
    assert dm.recipe_name == "digits" and not data_dir.exists()
    syn = FFCVImageDataModule(source="synthetic", source_options={"num_classes": 7,
                                                                    "image_size": 48})
    assert (syn.num_classes, syn.image_size) == (7, 48)
    dm.prepare_data()
    assert dm.train_path.is_file() and dm.val_path.is_file()
    assert dm.train_path.parent.parent == data_dir
    again = FFCVImageDataModule(source="digits", seed=5)  # another run: the same betons
    assert again.train_path == dm.train_path and again.class_names == [str(d) for d in range(10)]
    jpg = FFCVImageDataModule(source="digits", prepare=Preparation(write_mode="jpg"))
    assert jpg.train_path != dm.train_path
    from_file = FFCVImageDataModule(train_path=str(dm.train_path), val_path=str(dm.val_path))
    facts = from_file.num_classes, from_file.image_size, from_file.recipe_name
    assert facts == (10, 32, "digits")


def test_bad_configuration_is_one_user_error(betons, tmp_path, data_dir):
    with pytest.raises(DataError, match="no train_path and no source"):
        FFCVImageDataModule()
    with pytest.raises(DataError, match="does not exist and no source"):
        FFCVImageDataModule(train_path=str(tmp_path / "no.beton"), val_path=str(betons[1]))
    with pytest.raises(DataError, match="unknown source"):
        FFCVImageDataModule(source="mnist")
    with pytest.raises(DataError, match="unknown augmentation recipe"):
        module(betons, augment="autoaugment")
    with pytest.raises(DataError, match="unknown order"):
        module(betons, order="shuffled")
    with pytest.raises(DataError, match="progressive resizing needs a resizing recipe; "
                                        "'pad_crop' reads images at their stored size"):
        module(betons, augment="pad_crop", progressive=ProgressiveResizing(8, end_ramp=3))
    with pytest.raises(DataError, match="progressive.end_ramp 3 must be after start_ramp 3"):
        module(betons, progressive=ProgressiveResizing(8, start_ramp=3, end_ramp=3))
    with pytest.raises(DataError, match="16×16 images, not 32×32"):
        module(betons, augment="pad_crop", resolution=32).train_dataloader()
    assert not data_dir.exists()


class Linear(pl.LightningModule):
    def __init__(self, num_classes: int, side: int):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * side * side, num_classes))
        self.threads: list[set[threading.Thread]] = []
        self.batches: list = []

    def training_step(self, batch, idx):
        x, y = batch
        self.batches = self.batches[:1] + [batch]  # the first and the latest
        return nn.functional.cross_entropy(self.net(x.float()), y)

    def validation_step(self, batch, idx):
        x, y = batch
        self.log("val_acc", (self.net(x.float()).argmax(1) == y).float().mean())

    def on_train_epoch_start(self):
        self.threads.append(set(threading.enumerate()))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=3e-3)


def trainer(**kw) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, **kw)


def test_limited_batches_under_lightning_do_not_grow_threads(betons):
    dm = module(betons, batch_size=8)
    model = Linear(dm.num_classes, dm.image_size)
    base = set(threading.enumerate())
    trainer(max_epochs=6, limit_train_batches=2, limit_val_batches=1).fit(model, dm)
    started = [len(alive - base) for alive in model.threads]
    assert len(set(started)) == 1, started  # without the fix: +2 threads per epoch
    assert new_threads(base) == []


def test_digits_train_under_lightning(data_dir):
    """Images and labels stay aligned through prepare, decode and augmentation."""
    dm = FFCVImageDataModule(source="digits", batch_size=64, num_workers=1)
    model = Linear(dm.num_classes, dm.image_size)
    t = trainer(max_epochs=8, precision="bf16-mixed")
    t.fit(model, dm)
    x, y = model.batches[-1]
    assert x.dtype == torch.bfloat16 and x.device.type == "cpu"  # the trainer's dtype
    assert dm.transfer_batch_to_device(model.batches[0], torch.device("cpu"), 0) is model.batches[0]
    acc = t.validate(model, dm, verbose=False)[0]["val_acc"]
    assert acc > 0.75  # chance is 0.1; a linear model reaches ~0.85-0.9


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_batches_are_normalised_on_the_device(betons):
    dm = module(betons, augment="pad_crop")
    dm.setup("fit")
    cpu = torch.cat([x for x, _ in dm.build_loader("val")])
    gpu_loader = dm.build_loader("val", device=torch.device("cuda"), dtype=torch.float16)
    batches = list(gpu_loader)  # every batch held at once: none may be overwritten
    x = torch.cat([b for b, _ in batches])
    y = torch.cat([b for _, b in batches])
    assert x.device.type == "cuda" and x.dtype == torch.float16 and y.device.type == "cuda"
    assert batches[0][0].is_contiguous(memory_format=torch.channels_last)
    assert y.tolist() == list(range(N))
    torch.testing.assert_close(x.float().cpu(), cpu, atol=2e-2, rtol=1e-2)
    train = dm.build_loader("train", device=torch.device("cuda"))
    assert sorted(int(v) for _, b in train for v in b) == list(range(N))
    assert dm.transfer_batch_to_device(batches[0], torch.device("cuda", 0), 0) is batches[0]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_batches_in_nchw(betons, dtype):
    """channels_last: false (the demo's setting) on the GPU: NCHW batches on the device."""
    dm = module(betons, augment="pad_crop", channels_last=False)
    dm.setup("fit")
    cpu = torch.cat([x for x, _ in dm.build_loader("val")])
    batches = list(dm.build_loader("val", device=torch.device("cuda"), dtype=dtype))
    for x, y in batches:
        assert x.device.type == "cuda" and y.device.type == "cuda" and x.dtype == dtype
        assert x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    assert torch.cat([y for _, y in batches]).tolist() == list(range(N))
    x = torch.cat([b for b, _ in batches]).float().cpu()
    tol = dict(atol=1e-5, rtol=1e-6) if dtype == torch.float32 else dict(atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(x, cpu, **tol)
    train = dm.build_loader("train", device=torch.device("cuda"), dtype=dtype)
    x, _ = next(iter(train))
    assert x.device.type == "cuda" and x.is_contiguous()
    train.close()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_epoch_left_early_waits_for_ffcvs_streams(betons):
    """Work still queued on ffcv's side streams holds back the stream that owns the buffers."""
    from data.loader import stop_epoch

    loader = module(betons, augment="pad_crop").build_loader("val", device=torch.device("cuda"))
    it = iter(loader.loader)
    next(it)
    assert all(s is not None for s in it.cuda_streams)
    with torch.cuda.stream(it.cuda_streams[0]):
        torch.cuda._sleep(10_000_000_000)  # a batch copy still in flight (~5 s)
    stop_epoch(it)
    after = torch.cuda.Event()
    after.record(it.current_stream)
    assert not after.query()  # ordered after the side stream's work, which has not ended
    after.synchronize()
    assert it.cuda_streams[0].query()
    loader.close()


def test_global_batch_size_is_split_over_the_devices(betons):
    from types import SimpleNamespace

    dm = module(betons, global_batch_size=48)
    assert dm.train_batch_size() == 48  # no trainer: one device
    dm.trainer = SimpleNamespace(world_size=4, current_epoch=0)
    assert dm.train_batch_size() == 12
    x, _ = next(iter(dm.build_loader("train")))
    assert x.shape[0] == 12
    dm.trainer = SimpleNamespace(world_size=5)
    with pytest.raises(DataError, match="does not split evenly over 5 devices"):
        dm.train_batch_size()
    with pytest.raises(DataError, match="global_batch_size 0 must be positive"):
        module(betons, global_batch_size=0)


@pytest.mark.timeout(120)
def test_first_epoch_under_inference_mode_yields_batches(betons):
    """validate/test/predict run under torch.inference_mode: ffcv's thread must still fill its
    buffers (it used to die on an inference-tensor write and leave the loop waiting forever)."""
    dm = module(betons)
    dm.setup("validate")
    with torch.inference_mode():
        labels = labels_of(dm.val_dataloader())
    assert sorted(labels) == list(range(N))


# ---- seeded augmentation and resumable epochs ---------------------------------------------------

def train_epoch(dm: FFCVImageDataModule, epoch: int) -> tuple[torch.Tensor, list[int]]:
    loader = dm.build_loader("train")
    loader._epoch = lambda: epoch
    xs, ys = zip(*[(x, y) for x, y in loader])
    loader.close()
    return torch.cat(xs), [int(v) for y in ys for v in y]


@pytest.mark.parametrize("augment", ["imagenet", "pad_crop"])
def test_augmentation_repeats_for_a_seed_whatever_the_threads(betons, augment):
    """Crops, flips and translations are functions of (seed, epoch, sample): bit-identical
    across loaders and thread counts, fresh for every epoch and every seed."""
    one = module(betons, augment=augment, resolution=16, seed=7, num_workers=1)
    two = module(betons, augment=augment, resolution=16, seed=7, num_workers=2)
    x1, y1 = train_epoch(one, 0)
    x2, y2 = train_epoch(two, 0)
    assert y1 == y2 and torch.equal(x1, x2)
    x3, y3 = train_epoch(one, 1)
    assert y3 != y1  # a new order
    order = {label: i for i, label in enumerate(y3)}
    x3 = x3[[order[label] for label in y1]]  # the same samples, in epoch 0's order
    assert not torch.equal(x3, x1)  # and new draws
    x4, _ = train_epoch(module(betons, augment=augment, resolution=16, seed=8), 0)
    assert not torch.equal(x4, x1)


def test_seeded_crops_cover_the_range_like_torchvisions():
    """The counter-based draws give RandomResizedCrop's distribution: scale and ratio spread
    over their ranges and flips half the time."""
    import numpy as np

    from data.decoders import _FLIP_DRAW, random_crop, sample_key, uniform

    scale, ratio = np.array([0.08, 1.0]), np.array([3 / 4, 4 / 3])
    key = [np.uint64(sample_key(0, 0, i)) for i in range(4000)]
    boxes = [random_crop(k, 400, 300, scale, ratio) for k in key]
    areas = np.array([h * w / (400 * 300) for _, _, h, w in boxes])
    assert areas.min() < 0.1 and areas.max() > 0.9 and 0.4 < areas.mean() < 0.6
    assert all(0 <= i <= 400 - h and 0 <= j <= 300 - w for i, j, h, w in boxes)
    flips = np.mean([uniform(k, _FLIP_DRAW) < 0.5 for k in key])
    assert 0.47 < flips < 0.53


def test_a_resumed_epoch_skips_what_was_trained_and_continues_the_order(betons):
    dm = module(betons, augment="pad_crop", seed=3)
    full_x, full_y = train_epoch(dm, 2)
    loader = dm.build_loader("train")
    loader._epoch = lambda: 2
    it = iter(loader)
    for _ in range(3):
        next(it)
        loader.consumed += 1  # the data module counts batches that reach the training step
    state = loader.state_dict()
    assert state == {"epoch": 2, "consumed": 3}
    loader.close()
    resumed = dm.build_loader("train")
    resumed._epoch = lambda: 2
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert len(rest) == len(resumed) - 3
    assert [int(v) for _, y in rest for v in y] == full_y[3 * 16:]
    assert torch.equal(torch.cat([x for x, _ in rest]), full_x[3 * 16:])
    assert len(list(resumed)) == len(resumed)  # the next epoch is whole again
