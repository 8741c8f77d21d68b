"""The application end to end: fit through the CLI on CPU, every shipped config instantiates,
resume continues the step counter and the LR schedule, bad input is one line and loses nothing."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from app.cli import CONFIG_DIR, make_cli
from app.main import main

ROOT = Path(__file__).resolve().parents[1]
TINY_FIT = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=3",
            "--trainer.limit_val_batches=2", "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false"]


def _ckpts(root: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in root.glob("lightning_logs/**/*.ckpt")}


def test_fit_demo_through_the_cli_for_a_few_steps(workdir):
    assert main(["fit", "--config", "demo.yaml", *TINY_FIT]) == 0
    run = workdir / "lightning_logs" / "version_0"
    assert (run / "config.yaml").is_file()  # the resolved config is saved with the run
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 3
    assert list(run.glob("events.out.tfevents.*"))
    # the trained checkpoint goes through the other LightningCLI subcommands too
    for sub in ("validate", "test", "predict"):
        assert main([sub, "--config", "demo.yaml", "--trainer.limit_val_batches=2",
                     "--trainer.limit_test_batches=2", "--trainer.limit_predict_batches=2",
                     "--trainer.enable_progress_bar=false",
                     "--ckpt_path", str(run / "checkpoints" / "last.ckpt")]) == 0, sub


def test_resume_from_last_continues_steps_and_lr_schedule(workdir):
    common = ["fit", "--config", "demo.yaml", "--trainer.limit_train_batches=3",
              "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false",
              "--trainer.enable_model_summary=false",
              "--model.init_args.schedule=multistep", "--model.init_args.milestones=[1]",
              "--model.init_args.gamma=0.5"]
    assert main([*common, "--trainer.max_epochs=1"]) == 0
    run = workdir / "lightning_logs" / "version_0"
    first_config = (run / "config.yaml").read_text()
    assert main([*common, "--trainer.max_epochs=2", "--ckpt_path", "last"]) == 0
    # the resumed run continues in its own folder: one TensorBoard run, curves continue
    assert not (workdir / "lightning_logs" / "version_1").exists()
    assert (run / "config.1.yaml").read_text() == first_config  # the first config is kept
    assert "max_epochs: 2" in (run / "config.yaml").read_text()  # what ran the second time
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 6 and ckpt["epoch"] == 1
    lr = ckpt["optimizer_states"][0]["param_groups"][0]["lr"]
    assert lr == pytest.approx(0.05 * 0.5)  # epoch 1 is past the milestone: the schedule went on
    assert ckpt["lr_schedulers"][0]["last_epoch"] == 6


def test_resume_last_without_a_checkpoint_is_one_line(workdir, capsys):
    assert main(["fit", "--config", "demo.yaml", *TINY_FIT, "--ckpt_path", "last"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: --ckpt_path last: no last.ckpt under")
    assert not (workdir / "lightning_logs").exists()  # a failed start leaves no run folder


def _tiny_overrides(path: Path, tmp: Path) -> list[str]:
    """Shrink a shipped config to something that instantiates in a second on a CPU."""
    text = path.read_text()
    args = ["--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.strategy=auto",
            "--trainer.precision=32-true", "--trainer.logger=false"]
    if "TabularDataModule" in text or path.name == "uci_fc_snn.yaml":
        return args + ["--model.init_args.model_kwargs={depth: 4, width: 16}"]
    args += [f"--data.init_args.train_path={tmp / 'train.beton'}",
             f"--data.init_args.val_path={tmp / 'val.beton'}",
             "--data.init_args.source=synthetic", "--data.init_args.root=null",
             "--data.init_args.source_options={num_classes: 7, num_samples: 16, image_size: 32}"]
    return args


CONFIGS = sorted(p for p in CONFIG_DIR.glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_shipped_config_instantiates(path, workdir):
    cli = make_cli(["--config", path.name, *_tiny_overrides(path, workdir)], run=False)
    model, data = cli.model, cli.datamodule
    assert model.hparams.num_classes == data.num_classes
    x = torch.randn(2, *((data.in_features,) if hasattr(data, "in_features")
                         else (3, 32, 32)))
    model.eval()
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, data.num_classes) and torch.isfinite(out).all()


def test_imagenet_sselu_reads_like_the_paper(workdir):
    cli = make_cli(["--config", "imagenet_sselu.yaml", *_tiny_overrides(
        CONFIG_DIR / "imagenet_sselu.yaml", workdir)], run=False)
    hp = cli.model.hparams
    assert (hp.model, hp.act, hp.eps, hp.central, hp.trainable_lambda) == (
        "conv_mobilenet_v1", "sselu", 0.06, True, True)
    assert (hp.lr, hp.momentum, list(hp.milestones)) == (0.02, 0.9, [60, 75])
    cfg = cli.config
    assert cfg.trainer.max_epochs == 90 and cfg.trainer.gradient_clip_val is None  # no clipping
    names = [type(c).__name__ for c in cli.trainer.callbacks]
    assert {"Mixup", "NormalizationMonitor", "DivergenceGuard", "Checkpoint", "Preemption",
            "Throughput"} <= set(names)
    by_name = {type(c).__name__: c for c in cli.trainer.callbacks}
    assert by_name["Mixup"].alpha == 0.7
    assert by_name["Checkpoint"].every_n_minutes == 10  # bounds the work a preemption loses
    assert cli.model.channels_last and cli.datamodule.channels_last  # one layout end to end


def test_table_1_configs_clip_gradients_and_table_2_configs_do_not(workdir):
    for name, clip in (("cifar10.yaml", 2.0), ("tiny_imagenet.yaml", 2.0),
                       ("imagenet_selu.yaml", None), ("demo.yaml", None)):
        cfg = make_cli(["--config", name, *_tiny_overrides(CONFIG_DIR / name, workdir)],
                       run=False).config
        assert cfg.trainer.gradient_clip_val == clip, name


def run_app(args, cwd, env_extra=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "app", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300)


@pytest.mark.parametrize("override,needle", [
    (["--data.init_args.source=null", "--data.init_args.train_path=missing.beton",
      "--data.init_args.val_path=missing_val.beton"], "missing.beton"),
    (["--model.init_args.act=swish"], "unknown activation 'swish'"),
    (["--model.init_args.eps=-0.1"], "ε must be a positive number"),
    (["--model.init_args.num_classes=7"], "model.init_args.num_classes is taken from the data "
                                          "module (data.num_classes)"),
    (["--config", "no_such_config.yaml"], "not found as a path or in"),
])
def test_bad_input_is_one_line_nonzero_and_loses_nothing(override, needle, tmp_path):
    logs = tmp_path / "lightning_logs" / "version_0" / "checkpoints"
    logs.mkdir(parents=True)
    (logs / "last.ckpt").write_bytes(b"precious")
    before = _ckpts(tmp_path)
    r = run_app(["fit", "--config", "demo.yaml", *TINY_FIT, *override], cwd=tmp_path,
                env_extra={"SELFNORM_DATA_DIR": str(tmp_path / "betons")})
    assert r.returncode != 0
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], r.stderr[-3000:]
    assert _ckpts(tmp_path) == before
    assert not (tmp_path / "lightning_logs" / "version_1").exists()
