"""Activations, weight-centralized layers, alpha dropout and architectures.

Architecture tests are parametrised over the registries (``list_models()`` × ``list_acts()``),
so a newly registered model or activation is tested the moment it exists.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models.errors import ModelError
from models import create_model, list_acts, list_models, solve
from models.layers.activations import SeluFamilyAct, create_act, get_act_layer
from models.layers.dropout import AlphaDropout, dropout_for
from cuda_ops.reference import selu_family
from models.layers.centralized import WCConv2d, WCLinear, centralize

# ε for the activations that need one; the paper's ImageNet value.
EPS = {"dselu": 0.06, "sselu": 0.06, "lselu": 0.06}
# Small but real instances: the CPU demo's width, Table 4's full depth, a 64-layer FC SNN.
ARCH = {
    "conv_mobilenet_v1": (dict(width_mult=0.25), (2, 3, 32, 32)),
    "serial_cnn": (dict(depth=56), (2, 3, 32, 32)),
    "fc_snn": (dict(in_features=12, depth=64, width=32), (4, 12)),
}


def _act_kwargs(act: str, variant: str) -> dict:
    """'snn': the paper's SNN recipe for the act; 'plain': fixed λ, no WC, no norm."""
    kw = dict(act=act, eps=EPS.get(act))
    if variant == "snn":
        if act == "relu":
            kw.update(norm="batchnorm", weight_centralization=True)
        else:
            kw.update(trainable_lambda=True, weight_centralization=True,
                      central=act in ("sselu", "lselu"))
    return kw


def test_every_model_has_a_test_shape():
    assert sorted(ARCH) == list_models()


@pytest.mark.parametrize("variant", ["plain", "snn"])
@pytest.mark.parametrize("act", list_acts())
@pytest.mark.parametrize("name", list_models())
def test_forward_shapes_finite_and_every_parameter_gets_a_gradient(name, act, variant):
    torch.manual_seed(0)
    arch_kw, shape = ARCH[name]
    model = create_model(name, num_classes=7, **_act_kwargs(act, variant), **arch_kw)
    x = torch.randn(shape)
    out = model(x)
    assert out.shape == (shape[0], 7)
    assert torch.isfinite(out).all()
    F.cross_entropy(out, torch.arange(shape[0]) % 7).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname
    if variant == "snn" and act != "relu":
        lams = [n for n, _ in model.named_parameters() if n.endswith(".lam")]
        acts = [m for m in model.modules() if isinstance(m, SeluFamilyAct)]
        assert len(lams) == len(acts) > 0  # one trainable λ per activation site


# ---- activations ---------------------------------------------------------------------------

@pytest.mark.parametrize("name,eps,central", [
    ("selu", None, False), ("dselu", 0.06, False), ("sselu", 0.03, False),
    ("lselu", 0.03, False), ("sselu", 0.06, True), ("lselu", 0.06, True)])
def test_create_act_uses_the_solver_and_matches_the_reference(name, eps, central):
    act = create_act(name, eps=eps, central=central)
    sol = solve(name, eps, central=central)
    assert (act.lam, act.alpha, act.beta, act.kappa) == (sol.lam, sol.alpha, sol.beta, sol.kappa)
    x = torch.linspace(-6, 6, 1001)
    torch.testing.assert_close(act(x), selu_family(x, sol.lam, sol.alpha, sol.beta, sol.kappa))
    text = repr(act)
    for value in (sol.lam, sol.alpha, sol.beta):
        assert f"{value:.4f}" in text
    assert f"eps={sol.eps:g}" in text


def test_trainable_lambda_is_a_saved_parameter_with_the_right_gradient():
    act = create_act("sselu", eps=0.06, central=True, trainable_lambda=True)
    sol = solve("sselu", 0.06, central=True)
    assert isinstance(act.lam, nn.Parameter) and act.lam.item() == pytest.approx(sol.lam)
    assert "lam" in act.state_dict()
    x = torch.randn(4096, dtype=torch.float64).float()
    gy = torch.randn_like(x)
    act(x).mul(gy).sum().backward()
    # ∂L/∂λ = Σ gy·f(x)/λ (f is linear in λ)
    expected = (gy * selu_family(x, 1.0, sol.alpha, sol.beta, sol.kappa)).sum()
    torch.testing.assert_close(act.lam.grad, expected, rtol=1e-4, atol=1e-4)
    other = create_act("sselu", eps=0.06, central=True, trainable_lambda=True)
    other.load_state_dict({"lam": torch.tensor(1.5)})
    assert other.lam.item() == 1.5


def test_explicit_parameters_override_the_solver():
    act = create_act("sselu", eps=0.06, lam=1.2)
    sol = solve("sselu", 0.06)
    assert (act.lam, act.alpha, act.beta) == (1.2, sol.alpha, sol.beta)
    free = create_act("lselu", lam=1.0, alpha=1.5, kappa=0.2)  # every free parameter: no ε
    assert (free.lam, free.alpha, free.beta, free.kappa, free.eps) == (1.0, 1.5, 1.0, 0.2, None)


@pytest.mark.parametrize("call,message", [
    (lambda: create_act("swish"),
     r"unknown activation 'swish'; choose one of: dselu, lselu, relu, selu, sselu\."),
    (lambda: create_act("sselu"),
     r"sselu needs ε \(eps\); the paper uses ε between 0\.01 and 0\.07"),
    (lambda: create_act("selu", eps=0.06),
     r"selu has no free ε \(its parameters are fixed\); drop eps"),
    (lambda: create_act("dselu", eps=0.06, central=True),
     r"dselu cannot be centralized \(it has no parameter left for E\[f\]=0\)"),
    (lambda: create_act("sselu", eps=0.06, kappa=0.1),
     r"sselu \(eq\. 9\) fixes kappa=0, got kappa=0\.1; drop kappa"),
    (lambda: create_act("sselu", eps=0.06, gamma=2.0),
     r"unknown activation parameter\(s\) gamma; the parameters are: lam, alpha, beta, kappa\."),
    (lambda: create_act("relu", trainable_lambda=True),
     r"relu has no λ, α, β or κ to set or train \(got trainable_lambda\)"),
    (lambda: create_act("lselu", eps=float("nan")),
     r"ε must be a positive number, got nan"),
    (lambda: create_act("lselu", lam=1.0, alpha=float("inf"), kappa=0.1),
     r"alpha must be a finite number, got inf\."),
    (lambda: create_act("selu", central=True, lam=1.0, alpha=1.0),
     r"central=True solves selu's parameters for E\[f\] = 0, but all of lam, alpha were given"),
])
def test_bad_activation_requests_are_one_sentence_user_errors(call, message):
    with pytest.raises(ModelError, match=message) as err:
        call()
    assert "\n" not in str(err.value)


def test_lambda_min_reaches_the_solver_through_create_model():
    model = create_model("fc_snn", num_classes=2, act="lselu", eps=0.06, lambda_min=0.5,
                         in_features=4, depth=3, width=8)
    acts = [m for m in model.modules() if isinstance(m, SeluFamilyAct)]
    sol = solve("lselu", 0.06, lambda_min=0.5)
    assert sol.lam < 1.0  # the relaxed constraint is active
    assert all((a.lam, a.alpha, a.kappa) == (sol.lam, sol.alpha, sol.kappa) for a in acts)


def test_relu_is_plain_and_act_layer_builds_independent_modules():
    assert type(create_act("relu")) is nn.ReLU
    layer = get_act_layer("lselu", eps=0.03, trainable_lambda=True)
    a, b = layer(), layer()
    assert a is not b and a.lam is not b.lam
    assert get_act_layer(nn.GELU) is nn.GELU


# ---- weight centralization and init ---------------------------------------------------------

def test_wc_linear_effective_weights_have_zero_mean_and_gradients_flow_through():
    torch.manual_seed(0)
    layer = WCLinear(300, 40)
    nn.init.normal_(layer.weight, 0.5, 1.0)  # far from centred on purpose
    assert isinstance(layer, nn.Linear)
    # Probing with the identity reads the effective weights out of forward.
    effective = (layer(torch.eye(300)) - layer.bias).T
    assert effective.mean(dim=1).abs().max() < 1e-6
    assert layer.weight.mean(dim=1).abs().min() > 0.1  # the stored weights stay free
    layer(torch.randn(8, 300)).square().sum().backward()
    # d/dW of W − mean(W) projects the mean out of the gradient
    grad = layer.weight.grad
    assert grad.mean(dim=1).abs().max() < 1e-6 * grad.abs().max()


def test_wc_conv_effective_weights_have_zero_mean():
    torch.manual_seed(0)
    conv = WCConv2d(5, 6, 3, padding=1)
    nn.init.normal_(conv.weight, 0.5, 1.0)
    assert isinstance(conv, nn.Conv2d)
    # A constant input sums each unit's effective weights: interior outputs equal the bias.
    out = conv(torch.ones(1, 5, 8, 8))[0, :, 1:-1, 1:-1]
    torch.testing.assert_close(out, conv.bias[:, None, None].expand_as(out), atol=1e-5,
                               rtol=0)
    torch.testing.assert_close(centralize(conv.weight).mean(dim=(1, 2, 3)),
                               torch.zeros(6), atol=1e-6, rtol=0)
    plain = nn.Conv2d(5, 6, 3, padding=1)
    plain.load_state_dict(conv.state_dict())
    assert (plain(torch.ones(1, 5, 8, 8))[0, :, 1:-1, 1:-1] - out).abs().max() > 0.1


@pytest.mark.parametrize("name", list_models())
def test_weight_centralization_is_applied_to_every_conv_and_linear(name):
    arch_kw, _ = ARCH[name]
    model = create_model(name, num_classes=3, act="selu", weight_centralization=True, **arch_kw)
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert layers and all(isinstance(m, (WCConv2d, WCLinear)) for m in layers)


def test_self_normalizing_init_is_n0_1_over_fan_in_with_zero_bias():
    torch.manual_seed(0)
    model = create_model("conv_mobilenet_v1", num_classes=10, act="selu")
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            fan_in = m.weight[0].numel()
            assert m.weight.var().item() == pytest.approx(1 / fan_in, rel=0.1)
            assert m.bias is not None and not m.bias.any()
    bn = create_model("conv_mobilenet_v1", num_classes=10, act="relu", norm="batchnorm")
    convs = [m for m in bn.modules() if isinstance(m, nn.Conv2d)]
    assert all(m.bias is None for m in convs)
    fan_out = convs[5].weight.shape[0] * 9
    assert convs[5].weight.var().item() == pytest.approx(2 / fan_out, rel=0.1)  # Kaiming


# ---- the theory, end to end ------------------------------------------------------------------

def _pre_activation_second_moments(act: str, eps: float | None, seed: int) -> list[float]:
    torch.manual_seed(seed)
    width = 256
    model = create_model("fc_snn", num_classes=10, act=act, eps=eps, in_features=width,
                         depth=64, width=width)
    moments: list[float] = []
    for m in model.modules():
        if isinstance(m, nn.Linear):
            m.register_forward_hook(lambda mod, inp, out: moments.append(out.pow(2).mean().item()))
    with torch.no_grad():
        model(torch.randn(1024, width))
    assert len(moments) == 64
    return moments


@pytest.mark.parametrize("seed", [0, 1])
def test_64_layer_fc_snn_keeps_the_second_moment_and_relu_drifts(seed):
    sselu = _pre_activation_second_moments("sselu", 0.03, seed)
    assert all(0.5 <= q <= 2.0 for q in sselu), (min(sselu), max(sselu))
    # He-initialised ReLU keeps E[h²] only on average over draws: one draw drifts (no
    # restoring force), which is the point of self-normalization
    relu = _pre_activation_second_moments("relu", None, seed)
    assert not all(0.5 <= q <= 2.0 for q in relu)


def _layer_second_moments(model: nn.Module, x: torch.Tensor) -> list[float]:
    moments: list[float] = []
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            m.register_forward_hook(lambda mod, inp, out: moments.append(out.pow(2).mean().item()))
    with torch.no_grad():
        model(x)
    return moments


def test_relu_without_a_norm_is_he_initialised_and_with_batchnorm_kaiming():
    torch.manual_seed(0)
    model = create_model("serial_cnn", num_classes=10, act="relu")
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(layers) == 56
    for m in layers:  # N(0, 2/fan_in) for every conv and the fc, as Chen et al.'s ReLU baseline
        assert m.weight.var().item() == pytest.approx(2 / m.weight[0].numel(), rel=0.2)
        assert m.bias is not None and not m.bias.any()
    assert sum(type(m) is nn.ReLU for m in model.modules()) == 55  # the activation stays ReLU
    bn = create_model("serial_cnn", num_classes=10, act="relu", norm="batchnorm")
    convs = [m for m in bn.modules() if isinstance(m, nn.Conv2d)]
    fan_out = convs[-1].weight.shape[0] * 9
    assert convs[-1].weight.var().item() == pytest.approx(2 / fan_out, rel=0.1)  # unchanged
    selu = create_model("serial_cnn", num_classes=10, act="selu")
    assert selu.fc.weight.var().item() == pytest.approx(1 / 64, rel=0.2)


def test_he_init_keeps_relus_second_moment_where_snn_init_halves_it_per_layer():
    """E[relu(h)²] = E[h²]/2: N(0, 1/fan_in) loses a factor 2 a layer (about 1e-21 at the
    56-layer CNN's fc), N(0, 2/fan_in) keeps E[h²] = 2·E[x²] in expectation. A single draw of
    this 16-64-channel CNN still drifts: ReLU has no restoring force, so the draws' random
    factors multiply (Hanin & Rolnick 2018), which is what self-normalization corrects."""
    from models.layers.norm import snn_init_
    torch.manual_seed(0)
    x = torch.randn(16, 3, 32, 32)
    he = create_model("serial_cnn", num_classes=10, act="relu")
    v = [m.weight.pow(2).mean().item() * m.weight[0].numel()
         for m in he.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert v[:2] == pytest.approx([2, 2], rel=0.15)
    q = _layer_second_moments(he, x)
    # v·E[x²] less the border: per axis 94 of the 96 taps of a 32-wide map read the image
    assert q[0] == pytest.approx(v[0] * x.pow(2).mean().item() * (94 / 96) ** 2, rel=0.03)
    assert q[1] / q[0] == pytest.approx(v[1] / 2 * (94 / 96) ** 2, rel=0.1)
    assert q[-1] > 1e-6
    snn = create_model("serial_cnn", num_classes=10, act="relu")
    snn_init_(snn)
    q_snn = _layer_second_moments(snn, x)
    assert q_snn[1] / q_snn[0] == pytest.approx(0.5, rel=0.2)
    assert q_snn[-1] < 1e-12


# ---- alpha dropout ---------------------------------------------------------------------------

@pytest.mark.parametrize("name,eps", [("selu", None), ("sselu", 0.03), ("lselu", 0.03)])
def test_alpha_dropout_keeps_the_fixed_point_statistics(name, eps):
    torch.manual_seed(0)
    act = create_act(name, eps=eps)
    drop = dropout_for(act, 0.2)
    assert isinstance(drop, AlphaDropout)
    x = act(torch.randn(1_000_000))
    y = drop.train()(x)
    assert y.mean().item() == pytest.approx(x.mean().item(), abs=5e-3)
    assert y.var().item() == pytest.approx(x.var().item(), rel=1e-2)
    dropped = torch.isclose(y, torch.tensor(drop.a * drop.drop_value + drop.b), atol=1e-6, rtol=0)
    assert dropped.float().mean().item() == pytest.approx(0.2, abs=2e-3)
    assert torch.equal(drop.eval()(x), x)


def test_selu_alpha_dropout_has_klambauers_constants():
    drop = dropout_for(create_act("selu"), 0.1)
    alpha_p = -1.0507009873554805 * 1.6732632423543772  # SELU's saturation −λα
    a = (0.9 + alpha_p ** 2 * 0.9 * 0.1) ** -0.5         # Klambauer et al., eq. for a, b
    assert drop.drop_value == pytest.approx(alpha_p, rel=1e-9)
    assert drop.a == pytest.approx(a, rel=1e-9)
    assert drop.b == pytest.approx(-a * 0.1 * alpha_p, abs=1e-9)
    assert isinstance(dropout_for(nn.ReLU(), 0.1), nn.Dropout)
    assert isinstance(dropout_for(create_act("selu"), 0.0), nn.Identity)


# ---- architectures ---------------------------------------------------------------------------

def _size(model: nn.Module, shape: tuple[int, ...]) -> tuple[int, int, list]:
    """(parameters, multiply-accumulates per image, conv layer table) by forward hooks."""
    macs, table = [0], []

    def hook(mod, inp, out):
        if isinstance(mod, nn.Conv2d):
            macs[0] += out[0].numel() * mod.weight[0].numel()
            table.append((mod.in_channels, mod.out_channels, mod.stride[0], out.shape[-1]))
        elif isinstance(mod, nn.Linear):
            macs[0] += mod.in_features * mod.out_features
    for m in model.modules():
        m.register_forward_hook(hook)
    model(torch.empty(shape, device="meta"))
    return sum(p.numel() for p in model.parameters()), macs[0], table


def test_conv_mobilenet_v1_size_matches_its_docstring():
    with torch.device("meta"):  # shapes only: no memory, no arithmetic
        model = create_model("conv_mobilenet_v1", num_classes=1000, act="selu")
        bn = create_model("conv_mobilenet_v1", num_classes=1000, act="relu", norm="batchnorm")
    params, macs, table = _size(model, (1, 3, 224, 224))
    assert table == [(3, 32, 2, 112), (32, 64, 1, 112), (64, 128, 2, 56), (128, 128, 1, 56),
                     (128, 256, 2, 28), (256, 256, 1, 28), (256, 512, 2, 14),
                     *[(512, 512, 1, 14)] * 5, (512, 1024, 2, 7), (1024, 1024, 1, 7)]
    assert params == 29_288_104
    assert macs == 4_867_293_184
    assert _size(bn, (1, 3, 224, 224))[0] == 29_294_088
    with torch.device("meta"):
        demo = create_model("conv_mobilenet_v1", num_classes=10, act="selu", width_mult=0.25,
                            in_chans=1)
    assert _size(demo, (1, 1, 32, 32))[:2] == (1_770_154, 6_214_144)


def test_serial_cnn_is_table_4():
    with torch.device("meta"):
        model = create_model("serial_cnn", num_classes=10, act="selu")
    _, _, table = _size(model, (1, 3, 32, 32))
    assert len(table) == 55  # conv1 + 3 stages × 9 blocks × 2 convs; + fc = 56 layers
    assert table[0] == (3, 16, 1, 32)
    assert [t for t in table if t[2] == 2] == [(16, 32, 2, 16), (32, 64, 2, 8)]
    assert {t[1] for t in table} == {16, 32, 64} and table[-1] == (64, 64, 1, 8)


@pytest.mark.parametrize("call,message", [
    (lambda: create_model("resnet50", num_classes=10),
     r"unknown model 'resnet50'; choose one of: conv_mobilenet_v1, fc_snn, serial_cnn\."),
    (lambda: create_model("serial_cnn", num_classes=10, act="selu", depth=57),
     r"serial_cnn depth must be 6n \+ 2 with n ≥ 1 \(8, 14, 20, …, 56\), got 57\."),
    (lambda: create_model("serial_cnn", num_classes=10, act="selu", width_mult=2.0),
     r"serial_cnn takes no option\(s\) width_mult; its options are: depth, in_chans\."),
    (lambda: create_model("fc_snn", num_classes=2, act="selu"),
     r"fc_snn needs in_features, the number of input columns \(a positive integer\), got None\."),
    (lambda: create_model("fc_snn", num_classes=2, act="selu", in_features=4, drop_rate=1.5),
     r"drop_rate must be in \[0, 1\), got 1\.5\."),
    (lambda: create_model("conv_mobilenet_v1", num_classes=10, act="selu", norm="layernorm"),
     r"unknown norm 'layernorm'; choose one of: none, batchnorm\."),
    (lambda: create_model("conv_mobilenet_v1", num_classes=0, act="selu"),
     r"num_classes must be a positive integer, got 0\."),
    (lambda: create_model("conv_mobilenet_v1", num_classes=10, act="selu", width_mult=0),
     r"width_mult must be positive, got 0; 1\.0 is the paper's model"),
    (lambda: create_model("conv_mobilenet_v1", num_classes=10),
     r"sselu needs ε \(eps\)"),
])
def test_bad_model_requests_are_one_sentence_user_errors(call, message):
    with pytest.raises(ModelError, match=message) as err:
        call()
    assert "\n" not in str(err.value)


def test_fc_snn_with_alpha_dropout_trains_and_evaluates_deterministically():
    torch.manual_seed(0)
    model = create_model("fc_snn", num_classes=2, act="sselu", eps=0.017, in_features=8,
                         depth=8, width=16, drop_rate=0.1)
    drops = [m for m in model.modules() if isinstance(m, AlphaDropout)]
    assert len(drops) == 7
    x = torch.randn(5, 8)
    assert not torch.equal(model.train()(x), model(x))
    assert torch.equal(model.eval()(x), model(x))
    assert math.isfinite(model(x).sum().item())
