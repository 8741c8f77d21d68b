"""``app diagnose``: measurement at initialisation against the mean-field theory, and the CLI."""
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from models.training.diagnose import conv_geometry, diagnose, pool
from app.diagnose import format_table, theory_note
from app.main import main
from models import create_model
from models.layers.activations import create_act
from models.layers.norm import snn_init_
from models.theory.propagation import (propagate, propagate_spatial, window_mean,
                                       window_mean_adjoint)


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


def test_relu_keeps_the_second_moment_under_he_init_and_halves_it_under_the_snn_init():
    d = diagnose(fc_snn("relu", None, depth=6), gaussian_batches(2, 256, 64))
    assert d.theory_h2[2:] / d.theory_h2[1:-1] == pytest.approx(1.0, rel=0.1)  # v = 2
    assert d.h2.mean(0)[1:5] == pytest.approx(d.theory_h2[1:5], rel=0.15)
    net = fc_snn("relu", None, depth=6)
    snn_init_(net)  # N(0, 1/fan_in): E[relu(h)²] = E[h²]/2 per layer
    d = diagnose(net, gaussian_batches(2, 256, 64))
    assert d.theory_h2[2:] / d.theory_h2[1:-1] == pytest.approx(0.5, rel=0.1)
    assert d.h2.mean(0)[1:5] == pytest.approx(d.theory_h2[1:5], rel=0.15)


def test_for_dense_layers_the_padding_aware_theory_is_the_plain_one():
    d = diagnose(fc_snn("sselu", 0.06, depth=6, width=64), gaussian_batches(1, 32, 64),
                 per_sample=4)
    assert d.theory_kind == ["plain"] * 6 and d.geometry == [None] * 6
    np.testing.assert_allclose(d.theory_h2, d.theory_h2_plain, rtol=1e-12)
    np.testing.assert_allclose(d.theory_grad_w, d.theory_grad_w_plain, rtol=1e-12)


# ---- the padding-aware (spatial) theory --------------------------------------------------------

@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("size,kw", [
    ((6, 5), dict(kernel_size=3, padding=1)),
    ((7, 8), dict(kernel_size=3, stride=2, padding=1)),
    ((6, 6), dict(kernel_size=3, dilation=2, padding="same")),
    ((5, 7), dict(kernel_size=(3, 4), padding="same")),          # asymmetric: one more after
    ((4, 4), dict(kernel_size=3, padding=0)),
    ((6, 6), dict(kernel_size=3, stride=2, padding=1, padding_mode="circular")),
    ((6, 5), dict(kernel_size=3, padding=2, padding_mode="reflect")),
    ((9, 7), dict(kernel_size=5, stride=2, padding=2, padding_mode="replicate")),
])
def test_the_window_mean_is_a_mean_kernel_convolution_and_its_adjoint_that_conv_gradient(size,
                                                                                        kw):
    conv = nn.Conv2d(1, 1, bias=False, **kw).double()
    nn.init.constant_(conv.weight, 1.0 / conv.weight.numel())
    geom = conv_geometry(conv, size)
    m = torch.rand(1, 1, *size, dtype=torch.float64, requires_grad=True)
    out = conv(m)
    assert geom.out_size == tuple(out.shape[2:])
    np.testing.assert_allclose(window_mean(m.detach()[0, 0].numpy(), geom),
                               out.detach()[0, 0].numpy(), rtol=1e-12)
    r = torch.rand_like(out)
    out.backward(r)
    np.testing.assert_allclose(window_mean_adjoint(r[0, 0].numpy(), geom),
                               m.grad[0, 0].numpy(), rtol=1e-12)


def test_the_spatial_recursion_matches_a_wide_random_network_position_by_position():
    """E[h²] at every position of a 7×7 → 4×4 stack (zero padding, a stride, a dilation) with
    256 channels, against the recursion from the same weights: borders and corners included."""
    torch.manual_seed(0)
    convs = [nn.Conv2d(4, 256, 3, padding=1), nn.Conv2d(256, 256, 3, stride=2, padding=1),
             nn.Conv2d(256, 256, 3, dilation=2, padding="same")]
    act = create_act("sselu", eps=0.06)
    snn_init_(nn.Sequential(*convs))
    x = h = torch.randn(128, 4, 7, 7)
    measured, sizes = [], []
    with torch.no_grad():
        for conv in convs:
            sizes.append(tuple(h.shape[2:]))
            h = conv(h)
            measured.append(h.pow(2).mean((0, 1)).double().numpy())
            h = act(h)
    fan_in = np.array([c.weight[0].numel() for c in convs], dtype=float)
    v = fan_in * [c.weight.double().pow(2).mean().item() for c in convs]
    f = act.family()
    _, _, maps = propagate_spatial(fan_in, v, np.full(3, 256.0), [None, f, f],
                                   [conv_geometry(c, n) for c, n in zip(convs, sizes)],
                                   [x.pow(2).mean((0, 1)).double().numpy(), None, None],
                                   np.ones(3))
    for got, want in zip(measured, maps):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=0.04)
    assert maps[1][0, 0] < 0.4 < 0.9 < maps[1][1, 1]  # a corner reads 4 of 9 inputs
    plain, _ = propagate(fan_in, v, [None, f, f], np.array([x.pow(2).mean().item(), 0, 0]),
                         np.ones(3))
    assert plain[2] > 0.9 and measured[2].mean() < 0.35  # what ignoring the padding misses


def test_without_zero_padding_the_spatial_theory_is_the_plain_one():
    """Circular padding keeps every map uniform: the spatial recursion, forward and backward
    (strides included), reduces to the one-number recursion."""
    f = create_act("lselu", eps=0.06).family()
    geom = lambda n, s: conv_geometry(nn.Conv2d(8, 8, 3, s, 1, padding_mode="circular"), (n, n))
    geometry = [geom(8, 1), geom(8, 2), geom(4, 1), geom(4, 2), None]
    rng = np.random.default_rng(0)
    fan_in = np.array([8 * 9] * 4 + [8 * 4], dtype=float)
    v = rng.uniform(0.8, 1.2, 5)
    links = [None, f, f, f, f]
    q, g, _ = propagate_spatial(fan_in, v, np.full(5, 8.0), links, geometry,
                                [np.full((8, 8), 1.3)] + [None] * 4, np.full(5, 2.0))
    q0, g0 = propagate(fan_in, v, links, np.full(5, 1.3), np.full(5, 2.0))
    np.testing.assert_allclose(q, q0, rtol=1e-12)
    np.testing.assert_allclose(g, g0, rtol=1e-12, equal_nan=True)


def _h2_error(name: str, act: str, eps: float | None, size: int, seeds: int, batch: int,
              **arch_kw) -> tuple[float, float]:
    """Max over layers of |E[h²] − theory|, both averaged over weight draws (Gaussian images):
    (padding-aware, plain)."""
    rows = []
    for seed in range(seeds):
        torch.manual_seed(seed)
        net = create_model(name, num_classes=10, act=act, eps=eps, **arch_kw)
        g = torch.Generator().manual_seed(1000 + seed)
        d = diagnose(net, [(torch.randn(batch, 3, size, size, generator=g),
                            torch.randint(0, 10, (batch,), generator=g))], per_sample=0)
        c = d.columns()
        rows.append((c["h2"], c["h2_theory"], c["h2_theory_plain"]))
    h2, th, plain = (np.mean(r, 0) for r in zip(*rows))
    return float(np.abs(h2 - th).max()), float(np.abs(h2 - plain).max())


@pytest.mark.slow
@pytest.mark.parametrize("name,act,eps,size,seeds,batch,kw", [
    ("serial_cnn", "sselu", 0.06, 32, 8, 16, dict(depth=56)),
    ("conv_mobilenet_v1", "lselu", 0.06, 64, 2, 16, dict(width_mult=0.25)),
])
def test_the_padding_aware_theory_predicts_e_h2_of_the_papers_cnns(name, act, eps, size, seeds,
                                                                   batch, kw):
    err, plain = _h2_error(name, act, eps, size, seeds, batch, **kw)
    assert err < 0.05 and plain > 0.3, (err, plain)


def test_for_he_initialised_relu_the_theory_keeps_e_h2_and_matches_the_first_layers():
    torch.manual_seed(0)
    net = create_model("serial_cnn", num_classes=10, act="relu", depth=56)
    g = torch.Generator().manual_seed(0)
    d = diagnose(net, [(torch.randn(16, 3, 32, 32, generator=g), torch.randint(0, 10, (16,)))],
                 per_sample=2)
    assert d.links == ["measured"] + ["relu"] * 54 + ["measured"]
    # v = 2 and E[relu(h)²] = E[h²]/2: no halving per layer, only the weight draws' noise
    assert np.all((d.theory_h2_plain[:-1] > 1.5) & (d.theory_h2_plain[:-1] < 2.5))
    # zero padding drains E[h²] from the borders, and ReLU does not restore it
    assert d.theory_h2[54] < 0.5 * d.theory_h2[0]
    # beyond the first layers one draw of 16 channels drifts away multiplicatively: the theory
    # is the mean over draws, and ReLU, unlike the SELU family, has no restoring force
    np.testing.assert_allclose(d.h2.mean(0)[:2], d.theory_h2[:2], rtol=0.15)
    assert np.isfinite(d.theory_grad_w[:54]).all()


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


def test_pooled_draws_keep_every_measurement_and_average_the_theory():
    batches = gaussian_batches(2, 16, 64)
    draws = [diagnose(fc_snn("sselu", 0.06, depth=4, width=16), batches)]
    torch.manual_seed(1)
    draws.append(diagnose(create_model("fc_snn", num_classes=10, act="sselu", eps=0.06,
                                       in_features=64, depth=4, width=16), batches))
    assert not np.allclose(draws[0].h2, draws[1].h2)  # another draw, the same batches
    both = pool(draws)
    np.testing.assert_array_equal(both.h2, np.concatenate([d.h2 for d in draws]))
    np.testing.assert_allclose(both.theory_h2, (draws[0].theory_h2 + draws[1].theory_h2) / 2)
    np.testing.assert_allclose(both.columns()["h2"], np.concatenate([d.h2 for d in draws]).mean(0))
    with pytest.raises(ValueError, match="the draws are of different models"):
        pool([draws[0], diagnose(fc_snn("sselu", 0.06, depth=3, width=16), batches)])


# ---- the command ------------------------------------------------------------------------------

def test_bad_arguments_are_one_line_errors_that_touch_nothing(tmp_path, capsys):
    out = tmp_path / "report.png"
    out.write_bytes(b"keep me")
    assert main(["diagnose", "--config", "demo.yaml", "--batches", "0"]) == 2
    assert capsys.readouterr().err.strip() == "error: --batches must be at least 1, got 0"
    assert main(["diagnose", "--config", "demo.yaml", "--draws", "0"]) == 2
    assert capsys.readouterr().err.strip() == "error: --draws must be at least 1, got 0"
    assert main(["diagnose", "--config", "demo.yaml", "--out", str(out)]) == 2
    assert "is a file; give a folder" in capsys.readouterr().err
    assert out.read_bytes() == b"keep me"
    assert main(["diagnose", "--config", "no_such_config"]) == 2
    assert "not found" in capsys.readouterr().err


@pytest.mark.slow
def test_diagnose_a_shipped_config_with_an_override(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SELFNORM_DATA_DIR", str(tmp_path / "data"))
    out = tmp_path / "report"
    assert main(["diagnose", "--config", "demo.yaml", "--batches", "2", "--draws", "2",
                 "--out", str(out), "--model.init_args.eps", "0.03"]) == 0
    printed = capsys.readouterr().out
    assert "sselu (central), ε = 0.03; 2 weight draw(s) × 2 batch(es)" in printed
    report = json.loads((out / "demo.json").read_text())
    assert (report["draws"], report["batches"]) == (2, 2)
    convs = [r for r in report["layers"] if r["name"].endswith("conv")]
    assert len(convs) >= 10 and report["layers"][-1]["name"] == "fc"
    assert all(r["h2"] > 0 and r["grad_w"] > 0 for r in report["layers"])
    assert all(r["name"] in printed for r in report["layers"])
    assert (out / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
