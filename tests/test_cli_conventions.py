"""Lightning's, TensorBoard's and timm's habits through the real CLI: default_root_dir, callback
option groups, linked arguments in --print_config, the optimizer recipe, throughput, the summary
line, predictions, EMA and quiet output."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from app.cli import make_cli
from app.main import main

ROOT = Path(__file__).resolve().parents[1]
SHORT = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=6",
         "--trainer.limit_val_batches=2", "--trainer.enable_progress_bar=false"]


def scalars(run: Path) -> dict[str, list]:
    acc = EventAccumulator(str(run), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: acc.Scalars(tag) for tag in acc.Tags()["scalars"]}


def test_default_root_dir_decides_where_the_run_goes(workdir):
    out = workdir / "elsewhere"
    assert main(["fit", "--config", "demo.yaml", *SHORT,
                 f"--trainer.default_root_dir={out}"]) == 0
    run = out / "lightning_logs" / "version_0"
    assert (run / "config.yaml").is_file() and list(run.glob("events.out.tfevents.*"))
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert not (workdir / "lightning_logs").exists()


def test_callback_options_are_first_class_groups(workdir):
    cli = make_cli(["--config", "demo.yaml", "--monitor.every_n_steps=7",
                    "--checkpoint.every_n_train_steps=500", "--checkpoint.every_n_minutes=3",
                    "--mixup.alpha=0.3", "--guard.max_h2=50", "--preemption.requeue=false",
                    "--throughput.log_every_n_steps=2", "--trainer.logger=false"], run=False)
    by = {type(c).__name__: c for c in cli.trainer.callbacks}
    assert by["NormalizationMonitor"].every_n_steps == 7
    assert by["Checkpoint"].last_every_n_train_steps == 500
    assert by["Checkpoint"].every_n_minutes == 3
    assert by["Mixup"].alpha == 0.3 and by["DivergenceGuard"].bounds.h2 == 50
    assert by["Preemption"].requeue is False and by["Throughput"].log_every_n_steps == 2


def test_the_demo_shows_curves_during_its_run(workdir):
    assert main(["fit", "--config", "demo.yaml", *SHORT, "--trainer.max_epochs=2"]) == 0
    run = workdir / "lightning_logs" / "version_0"
    tags = scalars(run)
    steps = [e.step for e in tags["norm/h2/00_features.0.conv"]]
    assert steps == [0, 5, 10]  # every 5 steps from the start, not once at the end
    acc = EventAccumulator(str(run), size_guidance={"images": 0})
    acc.Reload()
    assert len(acc.Images("norm/figure4")) >= 2  # at least once per epoch
    # throughput: per device, in total, and the data wait
    for tag in ("throughput/images_per_s", "throughput/images_per_s_total",
                "throughput/data_wait_ms", "throughput/data_wait_share"):
        assert tags[tag] and all(e.value >= 0 for e in tags[tag]), tag
    assert all(0 <= e.value <= 1 for e in tags["throughput/data_wait_share"])
    assert tags["throughput/images_per_s"][-1].value > 0


def test_print_config_says_where_the_linked_values_come_from(workdir, capsys):
    assert main(["fit", "--config", "demo.yaml", "--print_config"]) == 0
    out = capsys.readouterr().out
    assert "num_classes: 1000" not in out and "num_classes:" not in out.split("data:")[0]
    assert ("# also num_classes, in_chans, in_features, channels_last: filled in from the data "
            "module's attributes of the same names") in out
    assert not (workdir / "betons").exists()  # printing builds no data


def test_optimizer_flags_are_refused_naming_the_model_keys(workdir, capsys):
    assert main(["fit", "--config", "demo.yaml", "--optimizer", "AdamW"]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("error: --optimizer is not an option here: the optimizer and its "
                           "schedule are the model's, so the recipe's parameter groups stay; "
                           "set model.init_args.optimizer (sgd or adamw)")
    assert main(["fit", "--config", "demo.yaml", "--lr_scheduler.class_path=StepLR"]) == 2


def test_adamw_keeps_the_parameter_groups_and_the_schedule(workdir):
    assert main(["fit", "--config", "examples/adamw.yaml", *SHORT]) == 0
    ckpt = torch.load(workdir / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt",
                      weights_only=True)
    groups = ckpt["optimizer_states"][0]["param_groups"]
    assert [g["name"] for g in groups] == ["decay", "no_decay"]
    assert groups[0]["weight_decay"] == 0.05 and groups[1]["weight_decay"] == 0.0
    assert "exp_avg_sq" in next(iter(ckpt["optimizer_states"][0]["state"].values()))
    assert ckpt["lr_schedulers"][0]["last_epoch"] == 6


def test_fit_ends_with_one_summary_line_and_summary_json(workdir, capsys):
    assert main(["fit", "--config", "demo.yaml", *SHORT]) == 0
    run = workdir / "lightning_logs" / "version_0"
    info = json.loads((run / "summary.json").read_text())
    line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("***")]
    assert len(line) == 1
    assert line[0].startswith(f"*** best val/top1 {info['best_val_top1']:.4f} at epoch 0 "
                              f"({run}/checkpoints/best-epoch000.ckpt); last "
                              f"{run}/checkpoints/last.ckpt; 1 epochs, 6 steps in ")
    assert line[0].endswith(" images/s") and info["images_per_s"] > 0
    assert info["final_metrics"]["val/top1"] == pytest.approx(info["best_val_top1"])


def test_predict_writes_top5_classes_with_their_names(workdir):
    assert main(["fit", "--config", "demo.yaml", *SHORT]) == 0
    last = workdir / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    assert main(["predict", "--config", "demo.yaml", "--ckpt_path", str(last),
                 "--trainer.enable_progress_bar=false"]) == 0
    rows = list(csv.DictReader(open(workdir / "lightning_logs" / "version_1"
                                    / "predictions.csv")))
    assert len(rows) == 360  # every val sample, in order
    assert list(rows[0])[:4] == ["sample", "class1", "name1", "p1"] and "p5" in rows[0]
    for row in rows[:20]:
        probs = [float(row[f"p{k}"]) for k in range(1, 6)]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0001
        assert row["name1"] == row["class1"]  # the digits' class names are the digits


def test_ema_of_the_weights_is_a_config_option(workdir):
    assert main(["fit", "--config", "examples/ema.yaml", *SHORT]) == 0
    ckpt = torch.load(workdir / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt",
                      weights_only=True)
    assert "current_model_state" in ckpt and "averaging_state" in ckpt
    averaged, raw = ckpt["state_dict"], ckpt["current_model_state"]
    key = "model.features.0.conv.weight"
    assert not torch.equal(averaged[key], raw[key])  # validation and the file use the average


def test_a_run_prints_no_known_third_party_noise(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SELFNORM_DATA_DIR": str(tmp_path / "b")}
    done = subprocess.run([sys.executable, "-m", "app", "fit", "--config", "demo.yaml", *SHORT],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    text = done.stdout + done.stderr
    for noise in ("LeafSpec", "💡 Tip", "Total Flops", "weights_only` was not set",
                  "was deprecated in v4"):
        assert noise not in text, noise


def test_prepare_help_prints_each_sources_storage_defaults(capsys):
    from data.prepare import write_options
    from data.sources import list_sources

    with pytest.raises(SystemExit):
        main(["prepare", "--help"])
    out = capsys.readouterr().out
    assert "storage defaults per source" in out
    table = out.split("storage defaults per source")[1].splitlines()
    for name in list_sources():
        row = next(line.split() for line in table if line.split()[:1] == [name])
        opts = write_options(name)
        assert row[1] == opts.write_mode and row[2] == str(opts.max_resolution or "keep")
