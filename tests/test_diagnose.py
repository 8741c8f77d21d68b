"""``app diagnose``: measurement at initialisation against the mean-field theory, and the CLI."""
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from models.training.diagnose import diagnose
from app.diagnose import format_table
from app.main import main
from models import create_model


def gaussian_batches(n: int, batch: int, features: int, seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, features, generator=g), torch.randint(0, 10, (batch,), generator=g))
            for _ in range(n)]


def fc_snn(act: str, eps: float | None, depth: int = 16, width: int = 512) -> nn.Module:
    torch.manual_seed(0)
    return create_model("fc_snn", num_classes=10, act=act, eps=eps, in_features=64, depth=depth,
                        width=width)


@pytest.mark.parametrize("act,eps", [("selu", None), ("sselu", 0.06), ("lselu", 0.06),
                                     ("dselu", 0.06)])
def test_the_theory_predicts_a_deep_selu_family_network_at_init(act, eps):
    d = diagnose(fc_snn(act, eps), gaussian_batches(2, 256, 64), per_sample=16)
    cols = d.columns()
    assert d.links == ["measured"] + [act] * 15
    # forward: E[h²] of every hidden layer within the weight-sampling noise of the prediction
    rel = cols["h2"][:-1] / cols["h2_theory"][:-1] - 1
    assert np.abs(rel).max() < 0.12, rel
    # backward: the per-sample gradient grows toward the input as predicted (Prop. 3.1)
    measured = cols["grad_w_sample"][1] / cols["grad_w_sample"][14]
    predicted = cols["grad_w_theory"][1] / cols["grad_w_theory"][14]
    assert measured > 1.2 and predicted > 1.2
    assert measured == pytest.approx(predicted, rel=0.2)
    assert math.isnan(cols["grad_w_theory"][-1])  # the anchor
    assert np.isfinite(cols["grad_w_theory"][:-1]).all()


def test_at_the_fixed_point_gradients_grow_by_one_plus_eps_per_layer():
    net = fc_snn("sselu", 0.06, depth=6)
    with torch.no_grad():  # exact N(0, 1/fan_in) second moments: v = 1 in every layer
        for m in net.modules():
            if isinstance(m, nn.Linear):
                m.weight.mul_((m.weight.pow(2).mean() * m.in_features).rsqrt())
    d = diagnose(net, gaussian_batches(1, 64, 64))
    q = d.theory_h2
    assert q[1:] == pytest.approx(1.0, abs=0.02)  # E[f²] = 1 at q = 1 (eq. 11)
    growth = (d.theory_grad_w[1:4] / d.theory_grad_w[2:5]) ** 2
    assert growth == pytest.approx(1.06, abs=0.004)  # 1 + δ_q = 1 + ε at q = 1


def test_relu_halves_the_second_moment_per_layer_under_the_snn_init():
    d = diagnose(fc_snn("relu", None, depth=6), gaussian_batches(2, 256, 64))
    assert d.theory_h2[2:] / d.theory_h2[1:-1] == pytest.approx(0.5, rel=0.1)
    assert d.h2.mean(0)[1:5] == pytest.approx(d.theory_h2[1:5], rel=0.15)


def test_the_chain_restarts_after_pooling_and_norm_layers_and_skips_per_sample_for_bn():
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    images = [(torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,)))]
    d = diagnose(plain, images, per_sample=3)
    assert d.names == ["0", "2", "6"]
    assert d.links == ["measured", "relu", "measured"]
    assert d.grad_w_sample.shape == (3, 3)
    assert np.isfinite(d.theory_grad_w[0]) and np.isnan(d.theory_grad_w[1:]).all()

    bn = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                       nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
                       nn.Linear(8 * 64, 10))
    d = diagnose(bn, images)
    assert d.links == ["measured", "measured", "relu"]
    assert d.grad_w_sample.shape == (0, 3)  # batch norm has no single-sample statistics
    assert np.isnan(d.theory_grad_w).all() and np.isfinite(d.theory_h2).all()
    assert "per sample" in format_table(d).splitlines()[0]


def test_diagnose_leaves_the_model_as_it_was():
    net = fc_snn("sselu", 0.06, depth=4, width=32)
    net.eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    diagnose(net, gaussian_batches(2, 16, 64))
    assert not net.training
    assert all(p.grad is None for p in net.parameters())
    assert sum(len(m._forward_hooks) for m in net.modules()) == 0
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_the_table_and_json_carry_every_layer():
    d = diagnose(fc_snn("sselu", 0.06, depth=4, width=32), gaussian_batches(1, 16, 64))
    lines = format_table(d).splitlines()
    assert len(lines) == 2 + 4 and lines[2].split()[1] == "layers.0.linear"
    assert lines[-1].split()[1] == "fc"
    rows = d.to_json()["layers"]
    assert [r["name"] for r in rows] == d.names
    assert rows[-1]["grad_w_theory"] is None and rows[0]["theory_from"] == "measured"


# ---- the command ------------------------------------------------------------------------------

def test_bad_arguments_are_one_line_errors_that_touch_nothing(tmp_path, capsys):
    out = tmp_path / "report.png"
    out.write_bytes(b"keep me")
    assert main(["diagnose", "--config", "demo.yaml", "--batches", "0"]) == 2
    assert capsys.readouterr().err.strip() == "error: --batches must be at least 1, got 0"
    assert main(["diagnose", "--config", "demo.yaml", "--out", str(out)]) == 2
    assert "is a file; pass a folder" in capsys.readouterr().err
    assert out.read_bytes() == b"keep me"
    assert main(["diagnose", "--config", "no_such_config"]) == 2
    assert "not found" in capsys.readouterr().err


@pytest.mark.slow
def test_diagnose_a_shipped_config_with_an_override(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SELFNORM_DATA_DIR", str(tmp_path / "data"))
    out = tmp_path / "report"
    assert main(["diagnose", "--config", "demo.yaml", "--batches", "2", "--out", str(out),
                 "--model.init_args.eps", "0.03"]) == 0
    printed = capsys.readouterr().out
    assert "sselu (central), ε = 0.03" in printed
    report = json.loads((out / "demo.json").read_text())
    convs = [r for r in report["layers"] if r["name"].endswith("conv")]
    assert len(convs) >= 10 and report["layers"][-1]["name"] == "fc"
    assert all(r["h2"] > 0 and r["grad_w"] > 0 for r in report["layers"])
    assert all(r["name"] in printed for r in report["layers"])
    assert (out / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
