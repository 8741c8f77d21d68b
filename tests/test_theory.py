"""The closed forms of models.theory against numerical quadrature and Monte Carlo."""
import numpy as np
import pytest
from scipy import integrate

from models import theory
from models.theory.moments import SeluFamily

FAMILIES = {
    "relu": SeluFamily(np.sqrt(2.0), 0.0, 1.0, 0.0),
    "selu": SeluFamily(1.0507, 1.6733, 1.0, 0.0),
    "sselu": SeluFamily(1.0475, 1.788, 0.894, 0.0),
    "lselu": SeluFamily(1.0, 1.138, 1.0, 0.394),
    "lselu_neg_kappa": SeluFamily(1.02, 6.07, 1.0, -2.63),
    "steep": SeluFamily(1.0, 1.2, 3.5, 0.0),
}


def f_np(f: SeluFamily, x):
    x = np.asarray(x, dtype=float)
    neg = f.alpha * np.expm1(f.beta * np.minimum(x, 0)) + f.kappa * x
    return f.lam * np.where(x > 0, x, neg)


def df_np(f: SeluFamily, x):
    x = np.asarray(x, dtype=float)
    neg = f.alpha * f.beta * np.exp(f.beta * np.minimum(x, 0)) + f.kappa
    return f.lam * np.where(x > 0, 1.0, neg)


def gauss_expect(g, mu=0.0, sd=1.0):
    pdf = lambda x: np.exp(-0.5 * ((x - mu) / sd) ** 2) / (sd * np.sqrt(2 * np.pi))  # noqa: E731
    lo, _ = integrate.quad(lambda x: g(x) * pdf(x), -np.inf, 0, epsabs=1e-13, epsrel=1e-12)
    hi, _ = integrate.quad(lambda x: g(x) * pdf(x), 0, np.inf, epsabs=1e-13, epsrel=1e-12)
    return lo + hi


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("q", [0.1, 0.5, 1.0, 1.7, 4.0])
def test_moments_match_quadrature(name, q):
    f = FAMILIES[name]
    s = np.sqrt(q)
    assert theory.mean(f, q) == pytest.approx(gauss_expect(lambda x: f_np(f, x), sd=s), abs=1e-10)
    assert theory.second_moment(f, q) == pytest.approx(
        gauss_expect(lambda x: f_np(f, x) ** 2, sd=s), rel=1e-9, abs=1e-12)
    assert theory.phi(f, q) == pytest.approx(
        gauss_expect(lambda x: df_np(f, x) ** 2, sd=s), rel=1e-9)


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("q", [0.3, 1.0, 2.5])
def test_dphi_dq_matches_central_difference(name, q):
    f, h = FAMILIES[name], 1e-5
    numeric = (theory.phi(f, q + h) - theory.phi(f, q - h)) / (2 * h)
    assert theory.dphi_dq(f, q) == pytest.approx(numeric, rel=1e-7, abs=1e-9)


@pytest.mark.parametrize("name", FAMILIES)
def test_delta_and_gamma_definitions(name):
    f = FAMILIES[name]
    q = np.array([0.5, 1.0, 2.0])
    # eq. 2: (1 + δ_q)·E[f²] = E[f'²]·E[x²]
    lhs = theory.one_plus_delta_q(f, q) * theory.second_moment(f, q)
    np.testing.assert_allclose(lhs, theory.phi(f, q) * q, rtol=1e-12)
    h = 1e-5
    slope = (theory.phi(f, 1 + h) - theory.phi(f, 1 - h)) / (2 * h)
    assert theory.gamma_q1(f) == pytest.approx(abs(slope + 1), rel=1e-6)


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("mu,var", [(-1.0, 0.25), (0.0, 1.0), (0.6, 3.0), (-0.2, 9.0)])
def test_output_mean_eq12_matches_quadrature(name, mu, var):
    f = FAMILIES[name]
    want = gauss_expect(lambda x: f_np(f, x), mu=mu, sd=np.sqrt(var))
    assert theory.output_mean(f, mu, var) == pytest.approx(want, abs=1e-9, rel=1e-9)


def test_output_mean_reduces_to_mean_at_standard_normal():
    f = FAMILIES["sselu"]
    assert theory.output_mean(f, 0.0, 1.7) == pytest.approx(theory.mean(f, 1.7), abs=1e-14)


@pytest.mark.parametrize("name", ["selu", "sselu", "lselu"])
def test_closed_forms_match_monte_carlo(name):
    f = FAMILIES[name]
    z = np.random.default_rng(0).standard_normal(2_000_000)
    for q in (0.5, 1.0, 2.0):
        y, dy = f_np(f, np.sqrt(q) * z), df_np(f, np.sqrt(q) * z)
        for closed, sample in ((theory.mean(f, q), y), (theory.second_moment(f, q), y * y),
                               (theory.phi(f, q), dy * dy)):
            se = sample.std() / np.sqrt(sample.size)
            assert abs(closed - sample.mean()) < 5 * se, (q, closed, sample.mean(), se)


def test_stable_for_extreme_arguments():
    f = SeluFamily(1.0, 2.0, 40.0, 0.0)  # e^{2β²}Φ(−2β) overflows if computed naively
    for fn in (theory.mean, theory.second_moment, theory.phi, theory.dphi_dq):
        assert np.isfinite(fn(f, 3.0))
