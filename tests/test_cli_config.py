"""Config resolution and composition of app.cli (no training here: see tests/test_app.py)."""
import os
from pathlib import Path

import pytest
import yaml

from app.cli import CONFIG_DIR, expand_configs, load_config, resolve_config
from app.errors import UserError


def test_bare_name_resolves_to_shipped_configs_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    name = sorted(CONFIG_DIR.glob("*.yaml"))[0].name
    assert resolve_config(name) == CONFIG_DIR / name
    assert resolve_config(name[:-5]) == CONFIG_DIR / name  # .yaml optional


def test_existing_path_wins_over_shipped_name(tmp_path, monkeypatch):
    name = sorted(CONFIG_DIR.glob("*.yaml"))[0].name
    (tmp_path / name).write_text("trainer: {max_epochs: 1}\n")
    monkeypatch.chdir(tmp_path)
    assert resolve_config(name) == Path(name)


def test_missing_config_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="not found as a path or in") as err:
        resolve_config("nope.yaml")
    assert "\n" not in str(err.value)


def test_base_files_merge_deeply_and_the_file_itself_wins(tmp_path):
    (tmp_path / "b1.yaml").write_text(yaml.safe_dump(
        {"trainer": {"max_epochs": 90, "precision": "bf16-mixed", "callbacks": [1, 2]},
         "model": {"init_args": {"lr": 0.02, "momentum": 0.9}}}))
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b2.yaml").write_text("base: ../b1.yaml\nmodel: {init_args: {lr: 0.1}}\n")
    top = tmp_path / "top.yaml"
    top.write_text("base: [sub/b2.yaml]\ntrainer: {max_epochs: 5, callbacks: [3]}\n")
    cfg = load_config(top)
    assert cfg == {"trainer": {"max_epochs": 5, "precision": "bf16-mixed", "callbacks": [3]},
                   "model": {"init_args": {"lr": 0.1, "momentum": 0.9}}}


def test_plus_key_appends_to_the_inherited_list(tmp_path):
    (tmp_path / "b.yaml").write_text("trainer: {callbacks: [a, b]}\n")
    (tmp_path / "t.yaml").write_text("base: b.yaml\ntrainer: {callbacks+: [c]}\n")
    assert load_config(tmp_path / "t.yaml") == {"trainer": {"callbacks": ["a", "b", "c"]}}


def test_base_cycle_is_an_error(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(UserError, match="includes itself"):
        load_config(tmp_path / "a.yaml")


def test_expand_configs_replaces_each_config_flag(tmp_path):
    cfg = tmp_path / "x.yaml"
    cfg.write_text("trainer: {max_epochs: 3}\n")
    out = expand_configs(["fit", "--config", str(cfg), f"--config={cfg}",
                          "--trainer.fast_dev_run=1"])
    assert out[0] == "fit" and out[-1] == "--trainer.fast_dev_run=1"
    assert out[1] == "--config" and yaml.safe_load(out[2]) == {"trainer": {"max_epochs": 3}}
    assert out[3] == "--config" and yaml.safe_load(out[4]) == {"trainer": {"max_epochs": 3}}


def test_every_shipped_config_composes():
    for path in CONFIG_DIR.glob("*.yaml"):
        cfg = load_config(path)
        assert {"model", "data", "trainer"} <= set(cfg), path.name
        assert "base" not in cfg


TRICKS = ("act", "eps", "central", "trainable_lambda", "weight_centralization", "norm",
          "lambda_min")


def _row(cfg: dict) -> tuple:
    args = cfg["model"]["init_args"]
    callbacks = (cfg.get("trainer") or {}).get("callbacks") or []
    mixup = any("Mixup" in str(c) for c in callbacks) or (cfg.get("mixup") or {}).get("alpha")
    return tuple(args.get(k) for k in TRICKS) + (bool(mixup),)


def test_each_table_2_miniature_row_switches_on_the_imagenet_rows_tricks():
    """tiny_t2_<row>.yaml and imagenet_<row>.yaml differ in scale only: same activation, ε,
    centralization, trainable λ, WC, norm, λ bound and Mixup."""
    rows = sorted(CONFIG_DIR.glob("tiny_t2_*.yaml"))
    assert len(rows) >= 20
    for tiny in rows:
        row = tiny.name.removeprefix("tiny_t2_")
        full = CONFIG_DIR / f"imagenet_{row}"
        if not full.is_file():  # beyond the paper (e.g. padinit): no ImageNet twin
            continue
        assert _row(load_config(tiny)) == _row(load_config(full)), row
