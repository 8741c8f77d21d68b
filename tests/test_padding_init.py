"""PaddingAwareInit: each conv scaled so the padding-aware theory puts E[h²] at 1."""
from __future__ import annotations

import warnings
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from models.errors import ModelError
from models.training.diagnose import diagnose
from models.training.module import ImageClassifier
from models.training.padding_init import PaddingAwareInit, padding_aware_init_

# the miniature Table 2 network: Conv MobileNet V1 at width 0.25, centralized sSELU, 64 px
MINI = dict(model="conv_mobilenet_v1", num_classes=20, act="sselu", eps=0.06, central=True,
            trainable_lambda=True, model_kwargs={"width_mult": 0.25})


def _gaussian(n: int = 32, size: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, 20, (n,), generator=g)


def _convs(d) -> list[int]:
    return [i for i, name in enumerate(d.names) if "conv" in name]


def test_theory_and_measurement_at_the_fixed_point_after_init():
    torch.manual_seed(0)
    net = ImageClassifier(**MINI).model
    before = diagnose(net, [_gaussian(seed=1)], per_sample=0)
    gains = padding_aware_init_(net, _gaussian()[0])
    after = diagnose(net, [_gaussian(seed=1)], per_sample=0)

    convs = _convs(after)
    assert len(convs) == 14 and len(gains) == 14
    assert before.columns()["h2"][convs[-1]] < 0.3  # the 2×2 maps: far below 1 at init
    theory = after.columns()["h2_theory"][convs]
    assert all(kind == "padding-aware" for kind in (after.theory_kind[i] for i in convs))
    assert abs(theory - 1).max() < 0.02, theory
    measured = after.columns()["h2"][convs]
    assert abs(measured - 1).max() < 0.1, measured
    # the deepest convs, on the smallest maps, need the largest gains
    assert gains["features.13.conv"] == max(gains.values()) > 1.3
    assert all(g > 0.95 for g in gains.values())


def test_fc_and_other_layers_are_left_alone():
    torch.manual_seed(0)
    net = ImageClassifier(**MINI).model
    fc = net.fc.weight.detach().clone()
    padding_aware_init_(net, _gaussian()[0])
    assert torch.equal(net.fc.weight, fc)


def test_bad_target():
    with pytest.raises(ModelError, match="target must be positive"):
        PaddingAwareInit(target=0)


def test_callback_scales_before_the_first_optimizer_step_and_not_on_resume():
    torch.manual_seed(0)
    module = ImageClassifier(**{**MINI, "lr": 1e-3})
    initial = {n: p.detach().clone() for n, p in module.model.named_parameters()
               if n.endswith("conv.weight")}
    seen: dict[str, torch.Tensor] = {}

    class Spy(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if not seen:
                seen.update({n: p.detach().clone() for n, p in pl_module.model.named_parameters()
                             if n in initial})

    init = PaddingAwareInit()
    x, y = _gaussian(64)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(num_workers|does not have many workers|"
                                "LeafSpec|Trying to infer|val_dataloader).*")
        L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False, max_steps=1,
                  callbacks=[init, Spy()]).fit(module, DataLoader(TensorDataset(x, y),
                                                                  batch_size=32))
    assert len(init.gains) == 14
    for name, w0 in initial.items():
        gain = init.gains[name.removesuffix(".weight")]
        torch.testing.assert_close(seen[name], w0 * gain)
    assert init.state_dict()["applied"] is True

    resumed = PaddingAwareInit()
    resumed.load_state_dict({"applied": False, "gains": {}})
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    trainer = SimpleNamespace(global_step=100)
    resumed.on_train_batch_start(trainer, module, (x[:4], y[:4]), 0)
    assert all(torch.equal(p, before[n]) for n, p in module.model.named_parameters())


def test_config_appends_it_to_the_shared_callbacks():
    from app.cli import load_config, resolve_config

    cfg = load_config(resolve_config("tiny_t2_sselu_padinit.yaml"))
    paths = [c["class_path"] for c in cfg["trainer"]["callbacks"]]
    assert paths[-1] == "models.training.padding_init.PaddingAwareInit"
    assert len(paths) >= 2  # the shared progress bar stays
    assert cfg["model"]["init_args"]["central"] is True


def test_a_bf16_batch_of_mixed_precision_gives_the_float32_gains():
    torch.manual_seed(0)
    net = ImageClassifier(**MINI).model
    x = _gaussian(n=8)[0]
    state = {k: v.clone() for k, v in net.state_dict().items()}
    exact = padding_aware_init_(net, x)
    net.load_state_dict(state)
    rounded = padding_aware_init_(net, x.bfloat16())
    assert rounded.keys() == exact.keys()
    for name, gain in exact.items():
        assert rounded[name] == pytest.approx(gain, rel=2e-2), name
