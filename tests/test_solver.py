"""The ε solver: every Table 5 row, arbitrary ε, constraints, optimality, errors, speed bound."""
import json

import numpy as np
import pytest
from scipy.optimize import brentq

from models.errors import ModelError
from models import theory
from models.theory.solver import TABLE5, SolverError, _sselu_curve, solve
from models.theory.moments import SeluFamily

# Rows where the paper's printed values are not the optimum of its own program (see
# `python -m app solve --table`); each deviation is checked for its reason below.
SSELU_003 = ("56-layer CNN", "sselu", 0.03, False)
SSELU_007 = ("56-layer CNN", "sselu", 0.07, False)


def row_id(row):
    return f"{row[0]}-{row[1]}-{row[2]}{'-central' if row[3] else ''}"


@pytest.mark.parametrize("row", [r for r in TABLE5 if r[:4] != SSELU_003], ids=row_id)
def test_table5_row_reproduced_to_printed_digits(row):
    """Every row but sSELU ε=0.03 (a worse point: test_table5_sselu_003_... checks it)."""
    section, name, eps, central, lam, alpha, beta, gamma = row
    s = solve(name, eps, central=central)
    want_lam = 1.00 if row[:4] == SSELU_007 else lam  # misprint; checked in test_table5_sselu_007
    assert round(s.lam, 2) == pytest.approx(want_lam, abs=1e-9)
    assert round(abs(s.alpha), 2) == pytest.approx(alpha, abs=1e-9)
    if beta is not None:
        assert round(s.paper_beta, 2) == pytest.approx(beta, abs=1e-9)
    # γ to ±1 in its printed third decimal: our closed form is exact (tests/test_theory.py),
    # the paper's γ carries its own quadrature error in the last digit.
    assert abs(s.gamma - gamma) <= 1e-3 + 1e-12


def test_table5_sselu_003_is_a_worse_point_on_the_same_curve():
    s = solve("sselu", 0.03)
    assert s.gamma < 0.855 - 1e-3  # strictly better than the paper's row
    # The paper's row is a feasible point of the same program: on the constraint curve, where
    # α = 2.46, λ, β and γ round to the printed 1.02, 0.58, 0.855; only it is not the minimum.
    curve = _sselu_curve(0.03)
    beta = brentq(lambda b: float(curve(np.array([b])).alpha[0]) - 2.46, 0.5, 0.7)
    f = curve(np.array([beta]))
    assert (round(float(f.lam[0]), 2), round(beta, 2)) == (1.02, 0.58)
    assert abs(float(theory.gamma_q1(f)[0]) - 0.855) <= 1e-3


def test_table5_sselu_007_lambda_is_a_misprint():
    s = solve("sselu", 0.07)
    assert (round(s.alpha, 2), round(s.beta, 2), round(s.gamma, 3)) == (1.94, 0.92, 0.794)
    printed = SeluFamily(1.06, 1.94, 0.92, 0.0)
    assert theory.second_moment(printed) > 1.1  # violates E[f²] = 1: λ=1.06 cannot be right


def test_selu_is_klambauers_fixed_point():
    s = solve("selu")
    assert s.lam == pytest.approx(1.0507009873554805, rel=1e-12)
    assert s.alpha == pytest.approx(1.6732632423543772, rel=1e-12)
    assert s.eps == pytest.approx(0.0716, abs=5e-5)
    assert abs(s.mean) < 1e-12 and s.second_moment == pytest.approx(1, abs=1e-12)


def test_relu_is_he_scaled():
    s = solve("relu")
    assert s.lam == pytest.approx(np.sqrt(2)) and s.alpha == 0 and s.eps == pytest.approx(0)


@pytest.mark.parametrize("name", ["sselu", "lselu"])
@pytest.mark.parametrize("central", [False, True])
@pytest.mark.parametrize("eps", [0.001, 0.013, 0.0437, 0.06, 0.091, 0.137, 0.2])
def test_arbitrary_eps_satisfies_constraints(name, central, eps):
    s = solve(name, eps, central=central)
    assert s.phi1 == pytest.approx(1 + eps, abs=1e-10)
    assert s.second_moment == pytest.approx(1, abs=1e-10)
    assert s.lam >= 1.0 - 1e-12
    if central:
        assert abs(s.mean) < 1e-10
    # the reported values are the theory's, recomputed independently
    assert s.gamma == pytest.approx(float(theory.gamma_q1(s.family)), rel=1e-12)


@pytest.mark.parametrize("name", ["sselu", "lselu"])
@pytest.mark.parametrize("eps", [0.01, 0.03, 0.06, 0.15])
def test_solution_is_global_minimum_against_random_feasible_points(name, eps):
    """Sample the feasible set independently (random α, β, κ; λ and one more from constraints)."""
    best = solve(name, eps).gamma
    rng = np.random.default_rng(1)
    if name == "sselu":
        f = _sselu_curve(eps)(rng.uniform(1e-3, 8, 200_000))
    else:  # λ random; α and κ from the two constraints, all four branches
        from models.theory.solver import _lselu_curve
        lam = rng.uniform(1.0, 5.0, 200_000)
        fs = [_lselu_curve(eps, sa, sr)(lam) for sa in (1, -1) for sr in (1, -1)]
        f = SeluFamily(*(np.concatenate([np.broadcast_to(getattr(x, k), lam.shape) for x in fs])
                         for k in ("lam", "alpha", "beta", "kappa")))
    ok = np.isfinite(f.lam) & np.isfinite(f.kappa * np.ones_like(f.lam)) & (f.lam >= 1.0)
    g = theory.gamma_q1(f)[ok]
    assert g.size > 1000
    np.testing.assert_allclose(theory.phi(f)[ok], 1 + eps, rtol=1e-9)
    assert g.min() >= best - 1e-9


def test_lambda_min_is_respected_and_relaxing_it_lowers_gamma():
    strict, loose = solve("lselu", 0.06), solve("lselu", 0.06, lambda_min=0.5)
    assert loose.lam >= 0.5 - 1e-12 and loose.gamma < strict.gamma


def test_cached():
    assert solve("sselu", 0.06, central=True) is solve("sselu", 0.06, central=True)


@pytest.mark.parametrize("kwargs,needle", [
    (dict(activation="swish", eps=0.06), "unknown activation 'swish'"),
    (dict(activation="sselu", eps=0.0), "ε must be a positive number"),
    (dict(activation="sselu", eps=-0.1), "ε must be a positive number"),
    (dict(activation="sselu", eps=float("nan")), "ε must be a positive number"),
    (dict(activation="lselu"), "lselu needs ε"),
    (dict(activation="selu", eps=0.06), "selu has no free ε"),
    (dict(activation="dselu", eps=0.06, central=True), "dselu cannot be centralized"),
    (dict(activation="dselu", eps=0.3), "solves"),
    (dict(activation="sselu", eps=0.06, lambda_min=1.5), "lower lambda_min"),
    (dict(activation="sselu", eps=0.06, lambda_min=0), "lambda_min must be positive"),
])
def test_infeasible_or_malformed_requests_raise_one_clear_error(kwargs, needle):
    with pytest.raises(SolverError) as err:
        solve(**kwargs)
    assert isinstance(err.value, ModelError)
    msg = str(err.value)
    assert needle in msg and "\n" not in msg


def test_dselu_error_names_the_feasible_range():
    with pytest.raises(SolverError, match=r"ε in about \[0\.001, 0\.159\] solves"):
        solve("dselu", 0.3)


def test_solution_json_keys():
    d = solve("lselu", 0.06).to_json()
    assert list(d) == ["activation", "eps", "central", "lambda", "alpha", "beta", "gamma",
                       "phi1", "second_moment", "mean"]
    assert d["beta"] == solve("lselu", 0.06).kappa
    assert json.loads(json.dumps(d)) == d
