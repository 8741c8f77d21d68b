"""`python -m app solve` end to end, in fresh processes as users script it."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
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


# ---- the figures a reader sees ----------------------------------------------------------------

def drawn(fig):
    """``fig`` laid out and drawn by the Agg renderer, and that renderer."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return canvas.get_renderer()


@pytest.fixture(scope="module")
def sols():
    from app.solve import figure_solutions

    return figure_solutions(0.06, central=False, lambda_min=1.0)


def test_plot_pngs_are_full_size_images(tmp_path):
    from PIL import Image

    r = run_app("solve", "--eps", "0.06", "--plot", str(tmp_path))
    assert r.returncode == 0, r.stderr
    for name, min_width in (("fig1_phi.png", 1200), ("fig2_delta.png", 700),
                            ("fig3_mean.png", 1800)):
        with Image.open(tmp_path / name) as im:
            assert im.format == "PNG" and im.width >= min_width and im.height >= 400, im.size


def test_figure3_overall_title_clears_the_panel_titles(sols):
    from app.solve import figure3

    fig = figure3(sols)
    renderer = drawn(fig)
    top = next(t for t in fig.texts if t.get_text() == fig.get_suptitle())
    assert top.get_text().startswith("Figure 3")
    top = top.get_window_extent(renderer)
    titles = [ax.title.get_window_extent(renderer) for ax in fig.axes]
    assert len(titles) == 4
    for box in titles:
        assert not top.overlaps(box) and top.y0 >= box.y1, (top, box)
    for a, b in zip(titles, titles[1:]):
        assert a.x1 < b.x0  # panel titles side by side, not on top of each other
    assert fig.bbox.contains(top.x0, top.y0) and fig.bbox.contains(top.x1, top.y1)


def curves(ax):
    return {line.get_label().split()[0]: line for line in ax.get_lines()
            if line.get_label().split()[0] in ("SELU", "dSELU", "sSELU", "lSELU")}


@pytest.mark.parametrize("which", ["figure1", "figure2"])
def test_every_activation_has_its_own_line_style(sols, which):
    import app.solve

    fig = getattr(app.solve, which)(sols)
    lines = curves(fig.axes[0])
    assert set(lines) == {"SELU", "dSELU", "sSELU", "lSELU"}
    styles = {(ln.get_linestyle(), ln.get_marker(), ln.get_linewidth()) for ln in lines.values()}
    assert len(styles) == 4
    s, l = lines["sSELU"], lines["lSELU"]
    # the near-identical pair: a wide band underneath, a thin marked line on top
    assert s.get_linewidth() > 1.5 * l.get_linewidth() and s.get_zorder() < l.get_zorder()
    assert l.get_marker() not in (None, "None", "")
    assert l.get_linestyle() != s.get_linestyle()


def test_figure1_second_panel_pulls_sselu_and_lselu_apart(sols):
    from app.solve import figure1

    fig = figure1(sols)
    drawn(fig)
    gaps = []
    for ax in fig.axes:
        lines = curves(ax)
        s, l = (ax.transData.transform(lines[k].get_xydata()) for k in ("sSELU", "lSELU"))
        gaps.append(np.abs(s[:, 1] - l[:, 1]).max())  # pixels apart, at the widest
    hidden, apart = gaps
    assert hidden < 5 < 20 < apart, gaps  # on the left they overlap; on the right they do not
