"""`python -m app solve` end to end, in fresh processes as users script it."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from models.theory.solver import TABLE5, solve

ROOT = Path(__file__).resolve().parents[1]


def run_app(*args, cwd=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "app", *args], capture_output=True, text=True,
                          cwd=cwd or ROOT, env=env)


def test_solve_json_has_the_documented_keys_and_values(tmp_path):
    r = run_app("solve", "--activation", "sselu", "--eps", "0.06", "--central", "--json",
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    s = solve("sselu", 0.06, central=True)
    assert d == s.to_json()
    assert (round(d["lambda"], 2), round(d["alpha"], 2), round(d["beta"], 2)) == (1.05, 1.79, 0.89)


def test_solve_selu_needs_no_eps_and_beta_is_null():
    d = json.loads(run_app("solve", "--activation", "selu", "--json").stdout)
    assert d["beta"] is None and d["eps"] == pytest.approx(0.0716, abs=1e-4)


def test_solve_does_not_import_torch_or_lightning():
    code = ("import sys, app.main; app.main.main(['solve','-a','lselu','--eps','0.03']);"
            "bad=[m for m in sys.modules if m.split('.')[0] in ('torch','lightning')];"
            "assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr


def test_table_lists_every_row_beside_the_paper():
    r = run_app("solve", "--table")
    assert r.returncode == 0, r.stderr
    body = [ln for ln in r.stdout.splitlines() if ln.startswith(("56-layer", "MobileNet"))]
    assert len(body) == len(TABLE5)
    assert "1.79 (1.79)" in body[-2] and "0.89 (0.89)" in body[-2]


@pytest.mark.parametrize("args,needle", [
    (["solve", "--activation", "sselu", "--eps", "-0.1"], "ε must be a positive number"),
    (["solve", "--activation", "sselu", "--eps", "0.06", "--lambda-min", "1.5"], "lambda_min"),
    (["solve", "--activation", "dselu", "--eps", "0.06", "--central"], "cannot be centralized"),
    (["solve"], "nothing to do"),
    (["frobnicate"], "unknown subcommand"),
])
def test_bad_input_is_one_line_and_nonzero(args, needle):
    r = run_app(*args)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_no_arguments_lists_all_subcommands():
    r = run_app()
    assert r.returncode == 0
    for sub in ("fit", "validate", "test", "predict", "solve", "prepare", "diagnose", "bench"):
        assert f"  {sub} " in r.stdout


def test_plot_writes_the_three_figures(tmp_path):
    r = run_app("solve", "--activation", "sselu", "--eps", "0.03", "--plot", str(tmp_path))
    assert r.returncode == 0, r.stderr
    for name in ("fig1_phi.png", "fig2_delta.png", "fig3_mean.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
