"""``python -m app figure4``: reads a real run's monitor scalars and draws one panel per run."""
from __future__ import annotations

import numpy as np
import pytest
from matplotlib.image import imread

from app.errors import UserError
from app.figure4 import compose, read_monitor, spreads
from app.figure4 import main as figure4
from app.main import main

FIT = ["fit", "--config", "demo.yaml", "--trainer.max_epochs=1",
       "--trainer.limit_train_batches=4", "--trainer.limit_val_batches=1",
       "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
       "--monitor.every_n_steps=1"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> list:
    """Two real demo runs (sSELU and SELU) that logged the monitor at every step."""
    root = tmp_path_factory.mktemp("fig4")
    mp = pytest.MonkeyPatch()
    mp.setenv("SELFNORM_DATA_DIR", str(root / "betons"))
    mp.chdir(root)
    try:
        for act in ("sselu", "selu"):
            extra = ["--model.init_args.eps=null"] if act == "selu" else []
            assert main([*FIT, f"--model.init_args.act={act}", *extra, "--run", act]) == 0
    finally:
        mp.undo()
    return [root / "lightning_logs" / act for act in ("sselu", "selu")]


def test_reads_every_layer_at_every_logged_step(runs):
    names, h2, grad_w, steps = read_monitor(runs[0])
    assert steps == [0, 1, 2, 3]  # step 0 (the initialisation) and the three after it
    assert h2.shape == grad_w.shape == (4, len(names)) and len(names) >= 3
    assert np.isfinite(h2).all() and (grad_w > 0).all()
    assert read_monitor(runs[0], (1, 2))[3] == [1, 2]


def test_one_png_with_a_panel_per_run(runs, tmp_path, capsys):
    out = tmp_path / "figs" / "fig4.png"
    assert main(["figure4", f"{runs[0]}=sSELU", f"{runs[1]}=SELU", "--out", str(out)]) == 0
    image = imread(out)
    one = imread_single(runs[0], tmp_path)
    assert image.shape[1] == 2 * one.shape[1]  # two side by side
    printed = capsys.readouterr().out
    assert "sSELU: " in printed and "SELU: " in printed and "over depth ×" in printed


def imread_single(run, tmp_path):
    out = tmp_path / "one.png"
    assert main(["figure4", str(run), "--out", str(out)]) == 0
    return imread(out)


def test_spreads_are_ratios_of_medians_and_percentiles():
    values = np.array([[1.0, 10.0], [2.0, 20.0], [3.0, 30.0]])
    s = spreads(values)
    assert s["depth"] == pytest.approx(10.0)
    p10, p90 = np.percentile(values[:, 0], [10, 90])
    assert s["steps"] == pytest.approx(p90 / p10)


def test_compose_pads_to_a_grid():
    tiles = [np.zeros((4, 6, 3), np.uint8), np.zeros((5, 3, 3), np.uint8),
             np.zeros((2, 2, 3), np.uint8)]
    grid = compose(tiles, columns=2)
    assert grid.shape == (10, 12, 3)
    assert (grid[5:, 6:] == 255).all()  # the empty fourth cell is white


def test_bad_input_is_one_line(tmp_path, runs):
    with pytest.raises(UserError, match="holds no TensorBoard event files"):
        read_monitor(tmp_path)
    with pytest.raises(UserError, match="does not exist"):
        figure4([str(tmp_path / "nope"), "--out", str(tmp_path / "x.png")])
    with pytest.raises(UserError, match="must name a .png"):
        figure4([str(runs[0]), "--out", str(tmp_path / "x.jpg")])
    with pytest.raises(UserError, match="must read A:B"):
        figure4([str(runs[0]), "--out", str(tmp_path / "x.png"), "--steps", "5"])
    with pytest.raises(UserError, match="no step at which every layer"):
        read_monitor(runs[0], (100, 200))


def test_bad_input_through_the_cli_is_exit_2(tmp_path, capsys):
    assert main(["figure4", str(tmp_path / "nope"), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: run folder") and len(err.splitlines()) == 1
    assert not (tmp_path / "x.png").exists()


def test_runs_share_one_y_range_per_panel():
    from models.training.plot import figure4 as draw
    from app.figure4 import shared_range

    a, b = np.array([[0.5, 2.0]]), np.array([[np.nan, 0.0], [4.0, 8.0]])
    low, high = shared_range([a, b])
    assert low == pytest.approx(0.5 / 1.5) and high == pytest.approx(8.0 * 1.5)
    fig = draw(np.ones((3, 2)), np.ones((3, 2)), ["a", "b"], "t",
               ylims=((0.1, 10.0), (0.01, 1.0)))
    assert fig.axes[0].get_ylim() == pytest.approx((0.1, 10.0))
    assert fig.axes[1].get_ylim() == pytest.approx((0.01, 1.0))
