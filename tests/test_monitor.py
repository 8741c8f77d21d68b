"""NormalizationMonitor and the DivergenceGuard, on tiny models trained by a real Trainer."""
import gc
import os
import re
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.plugins import MixedPrecision
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from models.errors import ModelError, TrainingDiverged
from models.training.guard import DivergenceGuard, PendingLoss
from models.training.monitor import NormalizationMonitor
from models.training.stats import KINDS, select_layers

BATCH = 16


def conv_net() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.SELU(), nn.Conv2d(8, 8, 3, padding=1),
                         nn.SELU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 5))


def mlp(depth: int = 8, width: int = 64) -> nn.Sequential:
    layers, d = [], 12
    for _ in range(depth):
        layers += [nn.Linear(d, width), nn.SELU()]
        d = width
    return nn.Sequential(*layers, nn.Linear(width, 5))


class Tiny(L.LightningModule):
    def __init__(self, net: nn.Module, lr: float) -> None:
        super().__init__()
        self.net, self.lr = net, lr

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x).float(), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def batches(shape: tuple[int, ...], n: int, seed: int = 0) -> list[tuple[torch.Tensor, ...]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(BATCH, *shape, generator=g), torch.randint(0, 5, (BATCH,), generator=g))
            for _ in range(n)]


def loader(data: list) -> DataLoader:
    x = torch.cat([b[0] for b in data])
    y = torch.cat([b[1] for b in data])
    return DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=False)


def trainer(tmp_path: Path, callbacks: list, max_steps: int, logger=False, **kw) -> L.Trainer:
    return L.Trainer(max_steps=max_steps, logger=logger, callbacks=callbacks,
                     enable_progress_bar=False, enable_model_summary=False,
                     enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
                     default_root_dir=tmp_path, accelerator="cpu", devices=1, **kw)


def direct(net: nn.Sequential, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """E[h²], mean(h) and ‖∂L/∂W‖_F per conv/linear layer, computed without any hook."""
    outs, h = [], x
    for m in net:
        h = m(h)
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            outs.append(h)
    weights = [m.weight for m in net if isinstance(m, (nn.Conv2d, nn.Linear))]
    grads = torch.autograd.grad(F.cross_entropy(h, y), weights)
    return np.array([[float((o ** 2).mean()), float(o.mean()), float(g.norm())]
                     for o, g in zip(outs, grads)])


def hook_count(module: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in module.modules())


# ---- values -----------------------------------------------------------------------------------

def test_values_equal_a_direct_computation(tmp_path):
    torch.manual_seed(0)
    data = batches((3, 6, 6), 5)
    module = Tiny(conv_net(), lr=0.0)  # weights stay put, so every record can be recomputed
    mon = NormalizationMonitor(every_n_steps=2)
    trainer(tmp_path, [mon], max_steps=5).fit(module, loader(data))
    assert mon.names == ["0", "2", "5"]  # the shared "net." prefix is dropped
    assert [step for step, _ in mon.history] == [0, 2, 4]
    for step, stats in mon.history:
        np.testing.assert_allclose(stats, direct(module.net, *data[step]), rtol=1e-5, atol=1e-7)


def test_a_compiled_model_is_measured_on_every_logging_step(tmp_path):
    torch.manual_seed(0)
    data = batches((3, 6, 6), 7)
    net = conv_net()
    net.compile()  # hooks come and go; cached graphs must not swallow their effects
    module = Tiny(net, lr=0.0)
    mon = NormalizationMonitor(every_n_steps=3)
    trainer(tmp_path, [mon], max_steps=7).fit(module, loader(data))
    eager = conv_net()
    eager.load_state_dict(net.state_dict())
    assert [step for step, _ in mon.history] == [0, 3, 6]
    for step, stats in mon.history:
        np.testing.assert_allclose(stats, direct(eager, *data[step]), rtol=1e-4, atol=1e-6)


def test_gradients_are_read_after_amp_unscaling(tmp_path):
    torch.manual_seed(0)
    data = batches((12,), 2)
    module = Tiny(mlp(depth=2), lr=0.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    mon = NormalizationMonitor(every_n_steps=1)
    trainer(tmp_path, [mon], max_steps=2,
            plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)]).fit(module, loader(data))
    for step, stats in mon.history:
        expected = direct(module.net, *data[step])[:, 2]
        np.testing.assert_allclose(stats[:, 2], expected, rtol=2e-2)  # fp16 forward, not ×1024


def test_layer_patterns_select_a_subset_by_short_or_full_name():
    net = Tiny(conv_net(), lr=0.0)
    assert [n for n, _ in select_layers(net, ["2", "net.5"])] == ["2", "5"]
    assert [n for n, _ in select_layers(net, "*")] == ["0", "2", "5"]
    with pytest.raises(ModelError, match="match no conv/linear layer"):
        select_layers(net, "features.*")
    with pytest.raises(ModelError, match="no conv or linear layer"):
        select_layers(nn.Sequential(nn.ReLU()))


@pytest.mark.parametrize("kw", [{"every_n_steps": 0}, {"figure_every_n_logs": -1},
                                {"window": 0}])
def test_bad_monitor_settings_are_user_errors(kw):
    with pytest.raises(ModelError, match=f"NormalizationMonitor {next(iter(kw))} must be a "
                                         f"positive integer"):
        NormalizationMonitor(**kw)


@pytest.mark.parametrize("kw", [{"max_h2": 0.0}, {"max_loss": -1.0}, {"max_grad_w": 0}])
def test_bad_guard_settings_are_user_errors(kw):
    with pytest.raises(ModelError, match=f"DivergenceGuard {next(iter(kw))} must be positive "
                                         f"or null"):
        DivergenceGuard(**kw)


def test_a_layer_that_did_not_run_has_no_forward_statistics_and_trips_nothing(tmp_path):
    class Skips(Tiny):
        def __init__(self):
            super().__init__(mlp(depth=2), lr=0.01)
            self.unused = nn.Linear(3, 3)

    data = batches((12,), 2)
    mon = NormalizationMonitor(every_n_steps=1)
    trainer(tmp_path, [mon], max_steps=2).fit(Skips(), loader(data))
    stats = mon.history[-1][1]
    assert mon.names[-1] == "unused"
    assert np.isnan(stats[-1, :2]).all() and stats[-1, 2] == 0.0  # no output, no gradient
    assert np.isfinite(stats[:-1]).all()


# ---- cost: hooks only on logging steps, nothing accumulates ----------------------------------

class Probe(L.Callback):
    """Hook counts during each forward and after each batch; live objects at two points."""

    def __init__(self, at: tuple[int, int]):
        self.at, self.during, self.after, self.objects, self.tensors = at, [], [], [], []

    def on_before_backward(self, trainer, pl_module, loss):
        self.during.append(hook_count(pl_module))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after.append(hook_count(pl_module))
        if trainer.global_step in self.at:
            gc.collect()
            live = gc.get_objects()
            self.objects.append(len(live))
            self.tensors.append(sum(type(o) in (torch.Tensor, nn.Parameter) for o in live))


def test_hooks_exist_only_during_logging_steps_and_nothing_grows_over_100_steps(tmp_path):
    torch.manual_seed(0)
    module = Tiny(conv_net(), lr=0.01)
    mon = NormalizationMonitor(every_n_steps=5, figure_every_n_logs=4)
    probe = Probe(at=(20, 100))
    trainer(tmp_path, [mon, probe], max_steps=100).fit(module, loader(batches((3, 6, 6), 100)))
    assert probe.after == [0] * 100
    assert probe.during == [3 if step % 5 == 0 else 0 for step in range(100)]
    assert len(mon.history) == 4 and mon.history[-1][0] == 95  # a bounded window
    assert probe.tensors[1] == probe.tensors[0]  # no tensor kept per step
    assert probe.objects[1] - probe.objects[0] < 200, probe.objects  # nor Python objects


# ---- logging ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def logged(tmp_path_factory) -> tuple[NormalizationMonitor, EventAccumulator]:
    """One 7-step run of a 3-layer conv net logging every step to TensorBoard, and its events."""
    tmp_path = tmp_path_factory.mktemp("tb")
    torch.manual_seed(0)
    module = Tiny(conv_net(), lr=0.01)
    mon = NormalizationMonitor(every_n_steps=1, figure_every_n_logs=3)
    logger = TensorBoardLogger(tmp_path, name="tb", version=0)
    trainer(tmp_path, [mon], max_steps=7, logger=logger).fit(module, loader(batches((3, 6, 6), 7)))
    events = EventAccumulator(str(tmp_path / "tb" / "version_0"),
                              size_guidance={"images": 0, "scalars": 0, "histograms": 0})
    events.Reload()
    return mon, events


def test_tensorboard_holds_every_layers_scalars_the_figure_and_histograms(logged):
    mon, events = logged
    tags = events.Tags()
    expected = {mon.tag(kind, i) for i in range(3) for kind in KINDS}
    assert expected == {t for t in tags["scalars"] if t.startswith("norm/")}
    assert expected == {"norm/h2/00_0", "norm/mean/00_0", "norm/grad_w/00_0",
                        "norm/h2/01_2", "norm/mean/01_2", "norm/grad_w/01_2",
                        "norm/h2/02_5", "norm/mean/02_5", "norm/grad_w/02_5"}
    for tag in expected:
        assert [e.step for e in events.Scalars(tag)] == list(range(7))
    # every 3rd record and once at the end: steps 2, 5 and 6
    images = events.Images("norm/figure4")
    assert [im.step for im in images] == [2, 5, 6]
    assert images[0].encoded_image_string[:8] == b"\x89PNG\r\n\x1a\n"
    assert images[0].width > 300 and images[0].height > 300
    assert set(tags["histograms"]) == {mon.tag(f"{kind}_hist", i) for i in range(3)
                                       for kind in KINDS}
    assert "norm/h2_hist/01_2" in tags["histograms"]  # the layer's index and name, as scalars
    assert "norm/layers/text_summary" in tags["tensors"]


def test_each_layers_histogram_holds_that_layers_values_over_the_window(logged):
    mon, events = logged
    # drawn after steps 2 and 5 (every 3rd record) and at the end (step 6), each over the
    # window of the last 3 records
    windows = {2: [0, 1, 2], 5: [3, 4, 5], 6: [4, 5, 6]}
    for i in range(3):
        for kind in KINDS:
            scalars = {e.step: e.value for e in events.Scalars(mon.tag(kind, i))}
            hists = events.Histograms(mon.tag(f"{kind}_hist", i))
            assert [h.step for h in hists] == list(windows)
            for h in hists:
                values = [scalars[step] for step in windows[h.step]]
                v = h.histogram_value
                assert v.num == 3
                assert (v.min, v.max, v.sum) == (pytest.approx(min(values), rel=1e-5),
                                                 pytest.approx(max(values), rel=1e-5),
                                                 pytest.approx(sum(values), rel=1e-5))
    # the layers differ, so one histogram over depth would have mixed them up
    firsts = [events.Histograms(mon.tag("h2_hist", i))[0].histogram_value.max for i in range(3)]
    assert len(set(firsts)) == 3


def test_a_layer_that_did_not_run_gets_no_forward_histograms(tmp_path):
    class Skips(Tiny):
        def __init__(self):
            super().__init__(mlp(depth=2), lr=0.01)
            self.unused = nn.Linear(3, 3)

    mon = NormalizationMonitor(every_n_steps=1, figure_every_n_logs=2)
    logger = TensorBoardLogger(tmp_path, name="tb", version=0)
    trainer(tmp_path, [mon], max_steps=2, logger=logger).fit(Skips(), loader(batches((12,), 2)))
    events = EventAccumulator(str(tmp_path / "tb" / "version_0"), size_guidance={"histograms": 0})
    events.Reload()
    hists = set(events.Tags()["histograms"])
    unused = len(mon.names) - 1
    assert mon.tag("grad_w_hist", unused) in hists  # a zero gradient is a value
    assert not {mon.tag("h2_hist", unused), mon.tag("mean_hist", unused)} & hists
    assert mon.tag("h2_hist", 0) in hists


# ---- the Figure 4 image -----------------------------------------------------------------------

def tick_texts(ax) -> list[str]:
    return [t.get_text() for t in ax.get_xticklabels()]


@pytest.mark.parametrize("layers", [3, 15, 56])
def test_figure4_names_every_layer_on_its_axis(layers):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from models.training.plot import figure4

    names = ["conv1.conv"] + [f"stages.{i // 18}.{i % 18 // 2}.{i % 2}.conv"
                              for i in range(layers - 2)] + ["fc"]
    rng = np.random.default_rng(0)
    fig = figure4(rng.lognormal(size=(5, layers)), rng.lognormal(size=(5, layers)), names,
                  "sselu, ε = 0.06")
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    top, bottom = fig.axes[:2]
    width = max(2, len(str(layers - 1)))
    assert tick_texts(bottom) == [f"{i:0{width}d} {n}" for i, n in enumerate(names)]
    assert list(bottom.get_xticks()) == list(range(layers))
    assert not any(tick_texts(top))  # shared axis: names once, under the lower panel
    boxes = [t.get_window_extent(renderer) for t in bottom.get_xticklabels()]
    assert all(a.x1 <= b.x0 for a, b in zip(boxes, boxes[1:]))  # rotated, side by side
    assert all(fig.bbox.contains(b.x0, b.y0) for b in boxes)  # none cut off


def test_figure4_names_a_readable_subset_of_very_many_layers():
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from models.training.plot import figure4, to_rgb

    layers = 400
    names = [f"blocks.{i // 4}.conv{i % 4}" for i in range(layers)]
    fig = figure4(np.ones((2, layers)), np.ones((2, layers)), names, "deep")
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    bottom = fig.axes[1]
    ticks = [int(t) for t in bottom.get_xticks()]
    assert ticks[0] == 0 and ticks[-1] == layers - 1 and len(ticks) < layers
    assert tick_texts(bottom) == [f"{i:03d} {names[i]}" for i in ticks]
    boxes = [t.get_window_extent(renderer) for t in bottom.get_xticklabels()]
    assert all(a.x1 <= b.x0 for a, b in zip(boxes, boxes[1:]))
    assert "one in" in bottom.get_xlabel()
    assert to_rgb(fig).shape[1] <= 3000  # a bounded image, for TensorBoard


def test_scalar_values_in_tensorboard_are_the_records(tmp_path):
    torch.manual_seed(0)
    module = Tiny(mlp(depth=2), lr=0.01)
    mon = NormalizationMonitor(every_n_steps=2, figure_every_n_logs=100, window=100)
    logger = TensorBoardLogger(tmp_path, name="tb", version=0)
    trainer(tmp_path, [mon], max_steps=6, logger=logger).fit(module, loader(batches((12,), 6)))
    events = EventAccumulator(str(tmp_path / "tb" / "version_0"), size_guidance={"scalars": 0})
    events.Reload()
    for i in range(len(mon.names)):
        for k, kind in enumerate(KINDS):
            logged = [(e.step, e.value) for e in events.Scalars(mon.tag(kind, i))]
            assert logged == [(step, pytest.approx(float(st[i, k]), rel=1e-6))
                              for step, st in mon.history]


def test_other_loggers_get_the_scalars_and_no_images(tmp_path):
    torch.manual_seed(0)
    mon = NormalizationMonitor(every_n_steps=1, figure_every_n_logs=1)
    logger = CSVLogger(tmp_path, name="csv", version=0)
    trainer(tmp_path, [mon], max_steps=3, logger=logger).fit(Tiny(mlp(depth=2), lr=0.01),
                                                             loader(batches((12,), 3)))
    header = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text().splitlines()[0]
    assert {mon.tag(kind, i) for i in range(3) for kind in KINDS} <= set(header.split(","))


# ---- the explosion guard ----------------------------------------------------------------------

def files(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


def last_good_checkpoint(tmp_path: Path) -> Path:
    """A short healthy run that leaves last.ckpt (and a step checkpoint) in tmp_path/ckpt."""
    torch.manual_seed(0)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=1)
    trainer(tmp_path, [NormalizationMonitor(every_n_steps=1), DivergenceGuard(), ckpt],
            max_steps=2).fit(
        Tiny(mlp(), lr=0.01), loader(batches((12,), 2)))
    return tmp_path / "ckpt"


@pytest.mark.parametrize("every_n_steps", [1, 50], ids=["statistics", "loss"])
def test_a_planted_divergent_run_stops_in_its_first_steps(tmp_path, every_n_steps):
    folder = last_good_checkpoint(tmp_path)
    before = files(folder)
    assert "last.ckpt" in before

    torch.manual_seed(0)
    mon = NormalizationMonitor(every_n_steps=every_n_steps)
    # the same checkpoint folder; ModelCheckpoint itself would not save within 1000 steps
    ckpt = ModelCheckpoint(dirpath=folder, save_last=True, every_n_train_steps=1000)
    run = trainer(tmp_path, [mon, DivergenceGuard(), ckpt], max_steps=50)
    module = Tiny(mlp(), lr=100.0)
    with pytest.raises(TrainingDiverged) as err:
        run.fit(module, loader(batches((12,), 50, seed=1)))

    message = str(err.value)
    assert "\n" not in message
    found = re.match(r"training diverged at step (\d+): (.*); diagnostic checkpoint (\S+) ",
                     message)
    assert found, message
    step, what, path = int(found[1]), found[2], Path(found[3])
    assert 1 <= step <= 5 and run.global_step <= 6
    if every_n_steps == 1:  # per-layer statistics: the first layer in depth order is named
        assert re.match(r"layer \d+ \(\d+\) (E\[h²\]|‖∂L/∂W‖_F) = ", what), what
    else:                   # only the loss is checked between logging steps
        assert what.startswith("loss = "), what
    assert path == folder / f"diverged-step{step}.ckpt"
    after = files(folder)
    assert set(after) == set(before) | {path.name}
    assert all(after[name] == before[name] for name in before)  # bytes and mtime untouched
    saved = torch.load(path, weights_only=False)
    assert saved["global_step"] == run.global_step
    torch.testing.assert_close(saved["state_dict"], module.state_dict(), rtol=0, atol=0,
                               equal_nan=True)  # the weights that blew up, for a post-mortem

    # a second divergence in the same folder writes a new file and keeps the first
    torch.manual_seed(0)
    with pytest.raises(TrainingDiverged, match=r"-v1\.ckpt"):
        trainer(tmp_path, [NormalizationMonitor(every_n_steps=every_n_steps), DivergenceGuard(),
                           ModelCheckpoint(dirpath=folder, every_n_train_steps=1000)],
                max_steps=50).fit(Tiny(mlp(), lr=100.0), loader(batches((12,), 50, seed=1)))
    assert files(folder)[path.name] == after[path.name]


def test_without_the_guard_the_same_run_goes_on(tmp_path):
    torch.manual_seed(0)
    mon = NormalizationMonitor(every_n_steps=1)
    run = trainer(tmp_path, [mon], max_steps=8)
    run.fit(Tiny(mlp(), lr=100.0), loader(batches((12,), 8, seed=1)))
    assert run.global_step == 8
    assert not np.isfinite(mon.history[-1][1]).all() or mon.history[-1][1][:, 0].max() > 1e6


def test_the_first_layer_in_depth_order_beyond_the_bound_is_named(tmp_path):
    torch.manual_seed(0)
    net = mlp(depth=4)
    with torch.no_grad():
        net[4].weight.mul_(100.0)  # layer 2 blows up; every layer after it inherits the blow-up
    mon = NormalizationMonitor(every_n_steps=1)
    blew_up = r"at step 0: layer 2 \(4\) E\[h²\] = [\d.e+]+ > 100;"
    with pytest.raises(TrainingDiverged, match=blew_up):
        trainer(tmp_path, [mon, DivergenceGuard(max_h2=100.0)], max_steps=3).fit(
            Tiny(net, lr=0.0), loader(batches((12,), 3)))
    assert list(tmp_path.glob("checkpoints/diverged-step0.ckpt"))


def test_the_loss_bound_trips_without_a_logging_step(tmp_path):
    torch.manual_seed(0)
    guard = DivergenceGuard(max_loss=1e-3)
    with pytest.raises(TrainingDiverged, match=r"at step 0: loss = [\d.]+ \(bound 0.001\)"):
        trainer(tmp_path, [guard], max_steps=3).fit(Tiny(mlp(depth=2), lr=0.0),
                                                  loader(batches((12,), 3)))


# ---- through the app: exit code 3 ---------------------------------------------------------------

@pytest.mark.slow
def test_app_fit_exits_3_with_one_line_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch,
                                                                          capsys):
    from app.main import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SELFNORM_DATA_DIR", str(tmp_path / "data"))
    ckpt = tmp_path / "ckpt"
    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "logger": False,
                    "enable_progress_bar": False, "enable_model_summary": False,
                    "callbacks": [
                        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                         "init_args": {"dirpath": str(ckpt), "save_last": True,
                                       "every_n_train_steps": 1000}}]},
        "monitor": {"every_n_steps": 50},
        "model": {"class_path": "models.ImageClassifier",
                  "init_args": {"model": "serial_cnn", "act": "sselu", "eps": 0.06,
                                "model_kwargs": {"depth": 8}, "lr": 0.01}},
        "data": {"class_path": "data.FFCVImageDataModule",
                 "init_args": {"source": "digits", "batch_size": 32, "num_workers": 1}},
    }
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(config))
    assert main(["fit", "--config", str(cfg), "--trainer.max_steps=2",
                 "--trainer.default_root_dir=good"]) == 0
    before = files(ckpt)
    assert "last.ckpt" in before
    capsys.readouterr()

    code = main(["fit", "--config", str(cfg), "--trainer.max_steps=40",
                 "--trainer.default_root_dir=bad", "--model.init_args.lr=100"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 3
    assert re.fullmatch(r"error: training diverged at step [1-5]: .*diverged-step\d\.ckpt.*",
                        err[-1]), err[-1]
    after = files(ckpt)
    assert all(after[name] == before[name] for name in before)
    assert [n for n in after if n.startswith("diverged-step")]


DDP_SCRIPT = '''
import sys
import torch, lightning as L, torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from lightning.pytorch.callbacks import ModelCheckpoint
from models.errors import TrainingDiverged
from models.training.guard import DivergenceGuard
from models.training.monitor import NormalizationMonitor

class Net(L.LightningModule):
    def __init__(self):
        super().__init__()
        layers, d = [], 12
        for _ in range(8):
            layers += [nn.Linear(d, 64), nn.SELU()]
            d = 64
        self.net = nn.Sequential(*layers, nn.Linear(64, 5))
    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self.net(batch[0]), batch[1])
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=100.0)

torch.manual_seed(0)  # the same data on both ranks; DistributedSampler shards it
data = TensorDataset(torch.randn(1024, 12), torch.randint(0, 5, (1024,)))
trainer = L.Trainer(max_steps=40, accelerator="cpu", devices=2, strategy="ddp", logger=False,
                    enable_progress_bar=False, enable_model_summary=False,
                    callbacks=[NormalizationMonitor(every_n_steps=int(sys.argv[1])),
                               DivergenceGuard(),
                               ModelCheckpoint(dirpath="ckpt", every_n_train_steps=1000)])
try:
    trainer.fit(Net(), DataLoader(data, batch_size=16))
except TrainingDiverged as err:
    print(f"rank {trainer.global_rank}: {err}", flush=True)
    sys.exit(3)
'''


@pytest.mark.slow
@pytest.mark.parametrize("every_n_steps", [1, 50], ids=["statistics", "loss"])
def test_ddp_ranks_stop_together_with_one_diagnostic_checkpoint(tmp_path, every_n_steps):
    (tmp_path / "run.py").write_text(DDP_SCRIPT)
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo)}
    done = subprocess.run([sys.executable, "run.py", str(every_n_steps)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)  # a hang fails here
    assert done.returncode == 3, done.stderr[-2000:]
    # both ranks print to one pipe, so their lines may interleave
    said = dict(re.findall(r"rank (\d): (training diverged at step [1-5]: .*?untouched\))",
                           done.stdout))
    assert set(said) == {"0", "1"}, done.stdout
    assert said["0"] == said["1"]  # the same step and verdict on both ranks
    assert [p.name for p in (tmp_path / "ckpt").iterdir()] == [
        re.search(r"(diverged-step\d+\.ckpt)", said["0"])[1]]


class _Copy:
    """A device-to-host copy's event that has not landed: only ``synchronize`` may be used."""

    def __init__(self) -> None:
        self.waited = False

    def query(self) -> bool:
        raise AssertionError("acting on whichever copy has landed lets DDP ranks disagree")

    def synchronize(self) -> None:
        self.waited = True


def test_device_losses_are_checked_one_step_late_whatever_has_landed():
    """On a GPU each step's loss reaches the host asynchronously; the guard acts on the previous
    step's (waiting for it), so the step it acts at is the same on every rank."""
    guard = DivergenceGuard()
    copies = [_Copy() for _ in range(3)]
    for step, event in enumerate(copies):
        guard.pending.append(PendingLoss(step, torch.tensor([0.0, 1.5]), event))
        guard.check_losses(trainer=None, wait=False)
        assert [p.step for p in guard.pending] == [step]  # only this step's copy is left
        assert [c.waited for c in copies[:step + 1]] == [True] * step + [False]
    guard.check_losses(trainer=None, wait=True)  # epoch end, checkpoints: every copy
    assert not guard.pending and all(c.waited for c in copies)


def test_a_bad_device_loss_stops_at_the_next_step(tmp_path, monkeypatch):
    guard = DivergenceGuard()
    stops = []
    monkeypatch.setattr(guard, "stop", lambda trainer, step, what: stops.append((step, what)))
    guard.pending.append(PendingLoss(4, torch.tensor([1.0, float("nan")]), _Copy()))
    guard.check_losses(trainer=None, wait=False)
    assert stops == []  # step 4's own batch end: not yet
    guard.pending.append(PendingLoss(5, torch.tensor([0.0, 2.0]), _Copy()))
    guard.check_losses(trainer=None, wait=False)
    assert stops == [(4, "loss = nan")]
