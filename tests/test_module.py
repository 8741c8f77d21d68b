"""The LightningModules (ImageClassifier, TabularClassifier) and the Mixup callback."""
from __future__ import annotations

import json
import math
import warnings

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from models.errors import ModelError
from models.layers.activations import SeluFamilyAct
from models.training.mixup import Mixup, cutmix, cutmix_box, mixup, soft_targets
from models.training.module import ImageClassifier, LrFactor, TabularClassifier

# the paper's best ImageNet recipe (configs/base/imagenet.yaml + imagenet_sselu.yaml) on the CPU
# demo's reduced Conv MobileNet V1
DEMO = dict(model="conv_mobilenet_v1", model_kwargs={"width_mult": 0.25}, act="sselu", eps=0.06,
            central=True, trainable_lambda=True, lr=0.02, weight_decay=4e-5, milestones=(60, 75))
# the 64-layer FC SNN of configs/uci_fc_snn.yaml
FC = dict(model="fc_snn", act="sselu", eps=0.017, lr=0.003, schedule="cosine")


def _images(n: int = 320, classes: int = 10, size: int = 16, seed: int = 0) -> TensorDataset:
    """Generated images: a fixed random pattern per class plus noise (learnable, not trivial)."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.randn(classes, 3, size, size, generator=g)
    y = torch.arange(n) % classes
    x = protos[y] + 0.8 * torch.randn(n, 3, size, size, generator=g)
    return TensorDataset(x, y)


def _trainer(**kw) -> L.Trainer:
    opts = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                gradient_clip_val=2.0, gradient_clip_algorithm="value")
    return L.Trainer(**{**opts, **kw})


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(num_workers|does not have many workers|"
                                "LeafSpec|self.log|Trying to infer).*")
        yield


# ---- training lowers the loss ----------------------------------------------------------------

@pytest.mark.parametrize("act,eps,norm", [
    ("sselu", 0.06, "none"), ("lselu", 0.06, "none"), ("selu", None, "none"),
    ("relu", None, "batchnorm")])
def test_short_training_run_lowers_the_loss(act, eps, norm):
    torch.manual_seed(0)
    data = DataLoader(_images(256, size=32), batch_size=32, shuffle=True)
    val = DataLoader(_images(256, size=32), batch_size=256)
    module = ImageClassifier(**{**DEMO, **dict(
        num_classes=10, act=act, eps=eps, norm=norm, central=act in ("sselu", "lselu"),
        trainable_lambda=act != "relu", weight_centralization=act != "relu", lr=0.01,
        milestones=(2,))})
    trainer = _trainer(max_epochs=3)
    before = trainer.validate(module, val, verbose=False)[0]["val/loss"]
    trainer.fit(module, data)
    after = trainer.validate(module, val, verbose=False)[0]["val/loss"]
    assert math.isfinite(after) and after < 0.5 * before, (before, after)
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.001)  # milestone 2


def test_tabular_classifier_trains_the_64_layer_fc_snn():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(512, 10, generator=g)
    y = (x[:, :3].sum(1) > 0).long()
    data = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True)
    module = TabularClassifier(in_features=10, num_classes=2, model_kwargs={"width": 64}, **FC)
    trainer = _trainer(max_epochs=8)
    before = trainer.validate(module, DataLoader(TensorDataset(x, y), batch_size=512),
                              verbose=False)[0]
    trainer.fit(module, data)
    after = trainer.validate(module, DataLoader(TensorDataset(x, y), batch_size=512),
                             verbose=False)[0]
    assert len([m for m in module.modules() if isinstance(m, torch.nn.Linear)]) == 64
    assert after["val/loss"] < 0.3 * before["val/loss"]
    assert after["val/top1"] > 0.9
    assert "val/top5" not in after  # binary: top-5 means nothing
    assert trainer.optimizers[0].param_groups[0]["lr"] < 1e-4  # cosine ran to 0


def test_bf16_mixed_and_channels_last_train_with_finite_loss():
    torch.manual_seed(0)
    module = ImageClassifier(num_classes=10, channels_last=True, **DEMO)
    assert module.model.features[1].conv.weight.is_contiguous(
        memory_format=torch.channels_last)
    trainer = _trainer(max_steps=3, precision="bf16-mixed")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, DataLoader(_images(96, size=32), batch_size=32))
    assert not [w for w in caught if "1-pixel-wide" in str(w.message)]  # 32 px: no bug met
    assert math.isfinite(trainer.callback_metrics["train/loss"].item())
    assert all(torch.isfinite(p).all() for p in module.parameters())


def _forward_pre_hooks(module: torch.nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) for m in module.modules())


@pytest.mark.parametrize("precision,warns", [
    ("bf16-mixed", True), ("bf16-true", True), ("32-true", False)])
def test_cpu_bf16_warns_where_a_strided_conv_sees_a_1_pixel_map(precision, warns):
    # At 16 px the last stride-2 conv of Conv MobileNet V1 sees 1×1, where oneDNN's bf16
    # weight gradient is garbage on AVX-512 CPUs (the flaky NaN this test's sibling once had).
    torch.manual_seed(0)
    module = ImageClassifier(num_classes=10, **DEMO)
    hooks = _forward_pre_hooks(module)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _trainer(max_steps=2, precision=precision).fit(
            module, DataLoader(_images(64, size=16), batch_size=32))
    messages = [str(w.message) for w in caught if "1-pixel-wide" in str(w.message)]
    assert len(messages) == (1 if warns else 0), messages
    if warns:
        assert "stride-2 conv" in messages[0] and "32-true" in messages[0]
    assert _forward_pre_hooks(module) == hooks  # the check runs once, then is gone


@pytest.mark.slow
def test_compile_flag_trains_and_keeps_state_dict_keys():
    torch.manual_seed(0)
    module = TabularClassifier(in_features=6, num_classes=2, compile=True,
                               model_kwargs={"depth": 4, "width": 16}, **FC)
    eager = TabularClassifier(in_features=6, num_classes=2,
                              model_kwargs={"depth": 4, "width": 16}, **FC)
    assert module.state_dict().keys() == eager.state_dict().keys()
    x = torch.randn(64, 6)
    trainer = _trainer(max_steps=2)
    trainer.fit(module, DataLoader(TensorDataset(x, (x[:, 0] > 0).long()), batch_size=32))
    assert math.isfinite(trainer.callback_metrics["train/loss"].item())


# ---- optimizer, schedule, loss ---------------------------------------------------------------

def test_no_weight_decay_on_lambda_and_biases_unless_asked():
    module = ImageClassifier(num_classes=10, **DEMO)
    decay, no_decay = module.param_groups()
    names = {id(p): n for n, p in module.model.named_parameters()}
    assert decay["weight_decay"] == 4e-5 and no_decay["weight_decay"] == 0.0
    assert all(names[id(p)].endswith(".weight") for p in decay["params"])
    skipped = {names[id(p)].rsplit(".", 1)[1] for p in no_decay["params"]}
    assert skipped == {"lam", "bias"}
    assert len(decay["params"]) + len(no_decay["params"]) == len(names)
    everything = ImageClassifier(num_classes=10, decay_all=True, **DEMO).param_groups()
    assert len(everything) == 1 and len(everything[0]["params"]) == len(names)


def test_lr_factor_multistep_cosine_and_warmup():
    step = LrFactor("multistep", milestones=(60, 75), gamma=0.1, warmup_epochs=0,
                    min_lr_ratio=0.0, lengths=lambda: (10, 900))
    assert step(599) == 1.0  # the run's length is not known yet: a neutral factor
    step.resolve()
    assert [step(s) for s in (0, 599, 600, 749, 750, 899)] == pytest.approx(
        [1, 1, 0.1, 0.1, 0.01, 0.01])
    cos = LrFactor("cosine", milestones=(), gamma=0.1, warmup_epochs=1, min_lr_ratio=0.1,
                   lengths=lambda: (10, 110))
    cos.resolve()
    assert cos.warmup_steps == 10
    assert [cos(s) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert cos(10) == pytest.approx(1.0) and cos(60) == pytest.approx(0.55)
    assert cos(110) == pytest.approx(0.1) and cos(500) == pytest.approx(0.1)


def test_cosine_schedule_follows_max_epochs_and_lr_is_logged():
    torch.manual_seed(0)
    module = ImageClassifier(**{**DEMO, **dict(num_classes=10, schedule="cosine", lr=0.05,
                                                 warmup_epochs=1)})
    seen = []

    class Probe(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(trainer.optimizers[0].param_groups[0]["lr"])

    trainer = _trainer(max_epochs=3, callbacks=[Probe()], log_every_n_steps=1)
    trainer.fit(module, DataLoader(_images(96), batch_size=32))  # 3 steps per epoch
    assert seen[:3] == pytest.approx([0.05 / 3, 0.05 * 2 / 3, 0.05])  # warmup epoch
    assert seen[3] == pytest.approx(0.05)  # cosine over the remaining 6 steps
    assert seen[4] == pytest.approx(0.05 * 0.5 * (1 + math.cos(math.pi / 6)))
    assert "lr" in trainer.logged_metrics


def test_soft_target_loss_matches_hard_labels_and_smoothing():
    module = ImageClassifier(num_classes=10, **{**DEMO, "label_smoothing": 0.1})
    logits, y = torch.randn(6, 10), torch.tensor([0, 3, 9, 2, 2, 5])
    hard = module.loss(logits, y)
    soft = module.loss(logits, F.one_hot(y, 10).float())
    torch.testing.assert_close(hard, soft)
    smoothed = 0.9 * F.one_hot(y, 10).float() + 0.01
    torch.testing.assert_close(hard, -(smoothed * logits.log_softmax(1)).sum(1).mean())
    # FFCV yields int32 labels of shape (B, 1)
    torch.testing.assert_close(module.loss(logits, module._labels(y.int()[:, None])), hard)


@pytest.mark.parametrize("kwargs,message", [
    (dict(schedule="linear"), r"unknown schedule 'linear'; choose one of: multistep, cosine"),
    (dict(optimizer="adam"), r"unknown optimizer 'adam'; choose one of: sgd, adamw"),
    (dict(lr=0.0), r"lr must be positive, got 0.0"),
    (dict(milestones=(75, 60)), r"milestones must be increasing positive epochs, got \[75, 60\]"),
    (dict(momentum=1.0), r"momentum must be in \[0, 1\), got 1.0"),
    (dict(label_smoothing=1.0), r"label_smoothing must be in \[0, 1\), got 1.0"),
    (dict(model="vgg16"), r"unknown model 'vgg16'; choose one of: conv_mobilenet_v1, fc_snn"),
    (dict(act="swish"), r"unknown activation 'swish'; choose one of: dselu, lselu, relu"),
    (dict(model_kwargs={"in_chans": 1}), r"give in_chans as the model's own argument"),
    (dict(eps=None), r"sselu needs ε \(eps\); the paper uses ε between 0.01 and 0.07")])
def test_bad_module_arguments_are_one_sentence_user_errors(kwargs, message):
    with pytest.raises(ModelError, match=message) as err:
        ImageClassifier(num_classes=10, **{**DEMO, **kwargs})
    assert "\n" not in str(err.value)


# ---- checkpoints and the CLI -----------------------------------------------------------------

def test_checkpoint_restores_hyperparameters_and_trained_lambda(tmp_path):
    torch.manual_seed(0)
    module = ImageClassifier(**{**DEMO, "num_classes": 10, "lr": 0.05, "in_chans": 3})
    trainer = _trainer(max_steps=2)
    trainer.fit(module, DataLoader(_images(64), batch_size=32))
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    restored = ImageClassifier.load_from_checkpoint(path)
    assert restored.hparams.lr == 0.05 and restored.hparams.in_chans == 3
    lams = [m.lam for m in module.modules() if isinstance(m, SeluFamilyAct)]
    back = [m.lam for m in restored.modules() if isinstance(m, SeluFamilyAct)]
    assert len(lams) == 14 and all(torch.equal(a, b) for a, b in zip(lams, back))
    assert any(a.item() != pytest.approx(1.0474826826808983) for a in lams)  # they trained
    tab = TabularClassifier(in_features=5, num_classes=2, model_kwargs={"depth": 3}, **FC)
    trainer = _trainer(max_steps=1)
    x = torch.randn(8, 5)
    trainer.fit(tab, DataLoader(TensorDataset(x, (x[:, 0] > 0).long()), batch_size=8))
    trainer.save_checkpoint(tmp_path / "t.ckpt")
    assert TabularClassifier.load_from_checkpoint(tmp_path / "t.ckpt").hparams.in_features == 5


def test_lightning_cli_builds_the_module_from_yaml_style_arguments():
    from lightning.pytorch.cli import LightningCLI

    cli = LightningCLI(L.LightningModule, subclass_mode_model=True, run=False,
                       save_config_callback=None, args={
                           "trainer": {"logger": False, "accelerator": "cpu"},
                           "model": {"class_path": "models.ImageClassifier",
                                     "init_args": {"model": "conv_mobilenet_v1",
                                                   "num_classes": 10, "act": "lselu",
                                                   "eps": 0.03, "milestones": [2, 4],
                                                   "model_kwargs": {"width_mult": 0.25}}}})
    assert isinstance(cli.model, ImageClassifier)
    assert cli.model.hparams.act == "lselu" and tuple(cli.model.hparams.milestones) == (2, 4)
    # the subclass's own arguments and the base's, reached through **kwargs
    assert (cli.model.hparams.lr, cli.model.hparams.in_chans) == (0.01, None)


def test_bench_train_runs_both_configs_and_reports_the_ratio(tmp_path, capsys):
    from app.bench import train

    out = tmp_path / "bench.json"
    assert train.main(["--device", "cpu", "--image-size", "16", "--batch-size", "4",
                       "--num-classes", "10", "--steps", "1", "--warmup", "1",
                       "--repeats", "1", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "sselu / bn_relu" in text
    results = json.loads(out.read_text())["results"]
    assert {(r["config"], r["mode"]) for r in results} == {("sselu", "eager"),
                                                            ("bn_relu", "eager")}
    assert all(r["images_per_s"] > 0 for r in results)
    from app.errors import UserError

    with pytest.raises(UserError, match="--modes 'eager,jit' names jit; choose from: eager, "
                                        "compile"):
        train.main(["--device", "cpu", "--modes", "eager,jit"])


def test_bench_train_refuses_to_time_the_reference_as_the_op(monkeypatch):
    import dataclasses

    import cuda_ops
    from app.bench import train

    monkeypatch.setattr(cuda_ops, "status", dataclasses.replace(
        cuda_ops.status, cpu="fallback", reason="no C++ compiler found"))
    from app.errors import UserError

    with pytest.raises(UserError, match=r"sSELU op is not built for cpu \(no C\+\+ compiler"):
        train.main(["--device", "cpu", "--steps", "1", "--repeats", "1"])
    # BN+ReLU alone does not need the op
    assert train.main(["--device", "cpu", "--configs", "bn_relu", "--image-size", "16",
                       "--batch-size", "2", "--steps", "1", "--warmup", "0",
                       "--repeats", "1"]) == 0


# ---- mixup -----------------------------------------------------------------------------------

def _indexed_batch(n: int = 8, size: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """Image i is the constant i and has label i, so a mix reveals who was mixed with whom."""
    return torch.arange(n, dtype=torch.float32)[:, None, None, None].expand(n, 3, size, size), \
        torch.arange(n)


@pytest.mark.parametrize("seed", range(4))
def test_mixup_targets_sum_to_one_and_mix_the_two_one_hot_labels(seed):
    torch.manual_seed(seed)
    x, y = _indexed_batch()
    mixed, targets = Mixup(alpha=0.7, seed=seed)(x, y, num_classes=8)
    assert targets.dtype == torch.float32 and targets.shape == (8, 8)
    torch.testing.assert_close(targets.sum(1), torch.ones(8))
    for i in range(8):
        lam = targets[i, i].item()
        others = [j for j in range(8) if j != i and targets[i, j] > 0]
        j = others[0] if others else i
        expected = lam * F.one_hot(y[i], 8) + (1 - lam) * F.one_hot(y[j], 8)
        torch.testing.assert_close(targets[i], expected.float())
        # the image is mixed with the same partner and weight as its label
        torch.testing.assert_close(mixed[i], torch.full_like(mixed[i], lam * i + (1 - lam) * j))


def test_mixup_coefficients_follow_beta_0_7():
    torch.manual_seed(0)
    x, y = _indexed_batch(2)
    lams, mixer = [], Mixup(alpha=0.7)
    while len(lams) < 3000:
        _, t = mixer(x, y, num_classes=2)
        if t[0, 0] < 1:  # the partner was the other sample: λ is readable
            lams.append(t[0, 0].item())
    lams = torch.tensor(lams)
    var = 0.7 * 0.7 / (1.4 ** 2 * 2.4)  # Beta(0.7, 0.7)
    assert lams.mean().item() == pytest.approx(0.5, abs=0.02)
    assert lams.var().item() == pytest.approx(var, rel=0.08)


def test_cutmix_pastes_a_box_and_weights_targets_by_its_area():
    torch.manual_seed(0)
    x, y = _indexed_batch(4, size=10)
    perm = torch.tensor([1, 2, 3, 0])
    box = cutmix_box(10, 10, 0.6)
    mixed, t = cutmix(x, soft_targets(y, 4), box, perm)
    for i in range(4):
        pasted = (mixed[i] == perm[i].float()).float().mean().item()
        assert t[i, perm[i]].item() == pytest.approx(pasted)
        assert t[i, i].item() == pytest.approx(1 - pasted)
    cb = Mixup(alpha=0.0, cutmix_alpha=1.0)
    mixed, t = cb(x, y, num_classes=4)
    torch.testing.assert_close(t.sum(1), torch.ones(4))
    values = mixed.unique()
    assert set(values.tolist()) <= {0.0, 1.0, 2.0, 3.0}  # pasted, never blended


def test_plain_mixup_functional_is_the_convex_combination():
    x, y = torch.randn(5, 3), soft_targets(torch.tensor([0, 1, 2, 3, 4]), 5)
    perm = torch.tensor([4, 3, 2, 1, 0])
    mx, my = mixup(x, y, 0.3, perm)
    torch.testing.assert_close(mx, 0.3 * x + 0.7 * x[perm])
    torch.testing.assert_close(my[0], torch.tensor([0.3, 0, 0, 0, 0.7]))


def test_training_accuracy_is_against_the_argmax_of_the_mixed_targets():
    torch.manual_seed(0)
    module = ImageClassifier(num_classes=10, **DEMO)
    mixer, seen = Mixup(alpha=0.7), []

    def recording(x, y, n):
        seen.append(mixer(x, y, n))
        return seen[-1]

    module.batch_mixer = recording
    x, y = _images(32)[:]
    module.training_step((x, y), 0)
    mx, targets = seen[0]
    with torch.no_grad():
        expected = (module(mx).argmax(1) == targets.argmax(1)).float().mean()
    torch.testing.assert_close(module.train_metrics.compute()["train/top1"], expected)


def test_mixup_callback_runs_on_the_training_batches_until_stop_epoch():
    torch.manual_seed(0)
    module = ImageClassifier(num_classes=10, **DEMO)
    log = []

    class Probe(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            log.append((trainer.current_epoch, pl_module.batch_mixer is not None))

    trainer = _trainer(max_epochs=3, callbacks=[Mixup(alpha=0.7, stop_epoch=2), Probe()])
    trainer.fit(module, DataLoader(_images(64), batch_size=32),
                DataLoader(_images(32), batch_size=32))
    assert log == [(0, True), (0, True), (1, True), (1, True), (2, False), (2, False)]
    assert module.batch_mixer is None  # withdrawn at teardown


@pytest.mark.parametrize("kwargs,message", [
    (dict(alpha=-1.0), r"Mixup needs alpha ≥ 0 and cutmix_alpha ≥ 0 \(0 turns it off\), got "
                       r"alpha=-1.0"),
    (dict(cutmix_alpha=-0.5), r"cutmix_alpha=-0.5"),
    (dict(prob=1.5), r"Mixup prob must be a probability in \[0, 1\], got 1.5"),
    (dict(stop_epoch=-1), r"Mixup stop_epoch must be ≥ 0 or null, got -1")])
def test_bad_mixup_arguments_are_user_errors(kwargs, message):
    with pytest.raises(ModelError, match=message):
        Mixup(**kwargs)


def test_mixup_is_off_by_default_and_its_draws_repeat_per_seed_and_step():
    x, y = _indexed_batch(8)
    assert not Mixup().enabled
    mixed, targets = Mixup()(x, y, num_classes=8)
    assert torch.equal(mixed, x) and torch.equal(targets.argmax(1), y)  # off: untouched
    a, b = Mixup(alpha=0.7, seed=3), Mixup(alpha=0.7, seed=3)
    first = [a(x, y, 8)[1] for _ in range(3)]
    assert all(torch.equal(u, b(x, y, 8)[1]) for u in first)  # same seed, same calls
    assert not torch.equal(first[0], first[1])  # each call its own draw
    assert not torch.equal(first[0], Mixup(alpha=0.7, seed=4)(x, y, 8)[1])
