"""Every input a user can get wrong, through the real CLI: one line on stderr naming the problem
and the fix, exit code 2, no traceback, and every file present before byte-identical after."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from app.main import main

ROOT = Path(__file__).resolve().parents[1]
FIT = ["--config", "demo.yaml", "--trainer.max_epochs=1", "--trainer.limit_train_batches=2",
       "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false",
       "--trainer.enable_model_summary=false"]


class Evil:
    """A pickled object whose loading would run code."""

    def __reduce__(self):
        return (print, ("this ran",))


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Good and bad files of every kind, made once: checkpoints, betons, configs."""
    base = tmp_path_factory.mktemp("inputs")
    betons = base / "betons"
    env = {"SELFNORM_DATA_DIR": str(betons)}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    cwd = os.getcwd()
    os.chdir(base)
    try:
        assert main(["fit", *FIT]) == 0
        assert main(["prepare", "--source", "synthetic", "--num-samples", "64",
                     "--num-classes", "4", "--image-size", "32", "--out", "syn.beton",
                     "--no-progress"]) == 0
        assert main(["prepare", "--source", "synthetic", "--split", "val", "--num-samples", "16",
                     "--num-classes", "4", "--image-size", "32", "--out", "synval.beton",
                     "--no-progress"]) == 0
    finally:
        os.chdir(cwd)
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    out = {"root": base, "betons": betons}
    good = base / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    out["ckpt"] = good
    data = good.read_bytes()
    (base / "trunc.ckpt").write_bytes(data[: len(data) // 3])
    (base / "text.ckpt").write_text("not a checkpoint\n")
    torch.save({"weights": torch.ones(2)}, base / "plain.pt")
    evil = torch.load(good, weights_only=True)
    evil["extra"] = Evil()
    torch.save(evil, base / "evil.ckpt")
    digits = next(betons.glob("digits-*"))
    out["train"], out["val"] = digits / "train.beton", digits / "val.beton"
    beton = out["train"].read_bytes()
    (base / "trunc.beton").write_bytes(beton[:100_000])
    (base / "empty.beton").write_bytes(b"")
    (base / "text.beton").write_text("this is a text file, certainly not a .beton\n" * 3)
    (base / "version.beton").write_bytes(b"\x07\x00" + beton[2:3000] + beton[3000:])
    fields = bytearray(beton)
    fields[2:4] = (500).to_bytes(2, "little")  # num_fields
    (base / "fields.beton").write_bytes(bytes(fields))
    shutil.copy(out["train"], base / "nosidecar.beton")
    syn = base / "syn.beton"
    shutil.copy(syn, base / "corrupt.beton")
    shutil.copy(base / "syn.beton.json", base / "corrupt.beton.json")
    from ffcv.reader import Reader

    ptr = int(Reader(str(base / "corrupt.beton")).metadata["f0"]["data_ptr"][5])
    with open(base / "corrupt.beton", "r+b") as fh:  # wreck sample 5's JPEG header
        fh.seek(ptr + 2)
        fh.write(b"\x00" * 200)
    (base / "badbase.yaml").write_text("base: nothere.yaml\ntrainer: {max_epochs: 1}\n")
    (base / "bad.yaml").write_text("trainer: [unclosed\n")
    (base / "afile").write_text("a file, not a folder\n")
    return out


def snapshot(*roots: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for root in roots for p in sorted(root.rglob("*")) if p.is_file()}


def R(files: dict[str, Path], name: str) -> str:
    return str(files["root"] / name)


# (id, argv(files), message regex): every case must end in exactly that one line and exit 2
CASES = [
    # checkpoints given with --ckpt_path
    ("ckpt-missing", lambda f: ["fit", *FIT, "--ckpt_path", R(f, "missing.ckpt")],
     r"checkpoint \S+/missing.ckpt does not exist; check --ckpt_path"),
    ("ckpt-truncated", lambda f: ["validate", *FIT, "--ckpt_path", R(f, "trunc.ckpt")],
     r"checkpoint \S+/trunc.ckpt is not a checkpoint file \(truncated, or another kind of "
     r"file\); use another checkpoint"),
    ("ckpt-text", lambda f: ["test", *FIT, "--ckpt_path", R(f, "text.ckpt")],
     r"checkpoint \S+/text.ckpt is not a checkpoint file"),
    ("ckpt-not-lightning", lambda f: ["predict", *FIT, "--ckpt_path", R(f, "plain.pt")],
     r"\S+/plain.pt is not a Lightning checkpoint \(no state_dict\); pass a .ckpt file"),
    ("ckpt-unsafe", lambda f: ["validate", *FIT, "--ckpt_path", R(f, "evil.ckpt")],
     r"checkpoint \S+/evil.ckpt needs unsafe unpickling \(it holds a \S*print object\), "
     r"which could run code from the file; if you trust it, pass --weights_only false"),
    ("ckpt-other-model", lambda f: ["fit", *FIT, "--model.init_args.act=lselu",
                                    "--ckpt_path", str(f["ckpt"])],
     r"checkpoint \S+/last.ckpt was written by another model or data \(act='sselu' there, "
     r"'lselu' here\); pass a checkpoint of this config, or use --run to start another run"),
    ("ckpt-other-classes", lambda f: ["validate", *FIT, "--data.init_args.source=null",
                                      f"--data.init_args.train_path={R(f, 'syn.beton')}",
                                      f"--data.init_args.val_path={R(f, 'synval.beton')}",
                                      "--ckpt_path", str(f["ckpt"])],
     r"checkpoint \S+/last.ckpt was written by another model or data \(num_classes=10 there, "
     r"4 here\)"),
    ("ckpt-last-none", lambda f: ["fit", *FIT, "--trainer.default_root_dir=" + R(f, "fresh"),
                                  "--ckpt_path", "last"],
     r"--ckpt_path last: no last.ckpt under \S+/fresh/lightning_logs; train first"),
    ("ckpt-last-validate", lambda f: ["validate", *FIT, "--run", "nope", "--ckpt_path", "last"],
     r"--ckpt_path last: run nope has no checkpoint under \S+; train it first"),
    ("run-name", lambda f: ["fit", *FIT, "--run", "../elsewhere"],
     r"--run '../elsewhere' must be a plain folder name \(no path separators\)"),
    # .beton files
    ("beton-truncated", lambda f: ["fit", *FIT, "--data.init_args.source=null",
                                   f"--data.init_args.train_path={R(f, 'trunc.beton')}",
                                   f"--data.init_args.val_path={f['val']}"],
     r"train .beton '\S+/trunc.beton' is truncated \(100000 bytes, its index starts at byte "
     r"\d+\); write it again with `python -m app prepare`"),
    ("beton-empty", lambda f: ["fit", *FIT, "--data.init_args.source=null",
                               f"--data.init_args.train_path={R(f, 'empty.beton')}",
                               f"--data.init_args.val_path={f['val']}"],
     r"train .beton '\S+/empty.beton' is empty or not a .beton \(0 bytes\)"),
    ("beton-text", lambda f: ["fit", *FIT, "--data.init_args.source=null",
                              f"--data.init_args.train_path={f['train']}",
                              f"--data.init_args.val_path={R(f, 'text.beton')}"],
     r"val .beton '\S+/text.beton' is not a .beton of this ffcv \(format \d+, expected 2\)"),
    ("beton-version", lambda f: ["fit", *FIT, "--data.init_args.source=null",
                                 f"--data.init_args.train_path={R(f, 'version.beton')}",
                                 f"--data.init_args.val_path={f['val']}"],
     r"train .beton '\S+/version.beton' is not a .beton of this ffcv \(format 7, expected 2\)"),
    ("beton-header", lambda f: ["fit", *FIT, "--data.init_args.source=null",
                                f"--data.init_args.train_path={R(f, 'fields.beton')}",
                                f"--data.init_args.val_path={f['val']}"],
     r"train .beton '\S+/fields.beton' has a corrupt header \(500 fields\)"),
    ("beton-no-sidecar", lambda f: ["fit", *FIT, "--data.init_args.source=null",
                                    f"--data.init_args.train_path={R(f, 'nosidecar.beton')}",
                                    f"--data.init_args.val_path={f['val']}"],
     r"train .beton '\S+/nosidecar.beton' has no \(matching\) sidecar '\S+/nosidecar.beton.json' "
     r"with its channel statistics; write it with `python -m app prepare`, or give data.mean "
     r"and data.std"),
    ("beton-class-counts", lambda f: ["fit", *FIT, "--data.init_args.source=null",
                                      f"--data.init_args.train_path={f['train']}",
                                      f"--data.init_args.val_path={R(f, 'synval.beton')}"],
     r"train .beton '\S+' has 10 classes but val .beton '\S+/synval.beton' has 4; prepare both "
     r"from the same dataset"),
    ("beton-labels", lambda f: ["fit", *FIT, "--data.init_args.source=null",
                                "--data.init_args.mean=[0.5,0.5,0.5]",
                                "--data.init_args.std=[0.2,0.2,0.2]",
                                f"--data.init_args.train_path={R(f, 'nosidecar.beton')}",
                                f"--data.init_args.val_path={R(f, 'syn.beton')}"],
     None),  # 10 classes in train, 4 in val: fine (a subset); the mirror case below is not
    ("beton-val-labels", lambda f: ["fit", *FIT, "--data.init_args.source=null",
                                    "--data.init_args.mean=[0.5,0.5,0.5]",
                                    "--data.init_args.std=[0.2,0.2,0.2]",
                                    f"--data.init_args.train_path={R(f, 'syn.beton')}",
                                    f"--data.init_args.val_path={R(f, 'nosidecar.beton')}"],
     r"val .beton '\S+/nosidecar.beton' has labels up to 9, but the train data has 4 classes"),
    ("beton-missing", lambda f: ["fit", *FIT, "--data.init_args.source=null",
                                 f"--data.init_args.train_path={R(f, 'gone.beton')}",
                                 f"--data.init_args.val_path={f['val']}"],
     r"train .beton '\S+/gone.beton' does not exist and no source is set; prepare it with "
     r"`python -m app prepare` or set data.source"),
    ("beton-new-folder", lambda f: ["fit", *FIT, "--data.init_args.train_path=/nonexistent/"
                                                 "dir/train.beton"],
     r"the folder of data.train_path '/nonexistent/dir/train.beton' does not exist; create it "
     r"or choose another path"),
    ("beton-corrupt-sample", lambda f: ["fit", *FIT, "--data.init_args.source=null",
                                        f"--data.init_args.train_path={R(f, 'corrupt.beton')}",
                                        f"--data.init_args.val_path={R(f, 'synval.beton')}",
                                        "--trainer.limit_train_batches=null"],
     r"\S+/corrupt.beton: sample 5 could not be decoded \(corrupt JPEG data\); write the "
     r".beton again"),
    # output places
    ("root-unwritable", lambda f: ["fit", *FIT, "--trainer.default_root_dir=/proc/selfnorm"],
     r"cannot write to trainer.default_root_dir /proc/selfnorm \(.+\); choose a writable "
     r"folder"),
    ("root-is-a-file", lambda f: ["fit", *FIT, f"--trainer.default_root_dir={R(f, 'afile')}"],
     r"trainer.default_root_dir \S+/afile is a file; give a folder"),
    ("logger-save-dir", lambda f: ["fit", *FIT,
                                   "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
                                   "--trainer.logger.save_dir=/proc/selfnorm-logs"],
     r"cannot write to the logger's save_dir /proc/selfnorm-logs"),
    ("diagnose-out", lambda f: ["diagnose", "--config", "demo.yaml", "--out", "/proc/x"],
     r"cannot write to --out /proc/x"),
    ("diagnose-out-file", lambda f: ["diagnose", "--config", "demo.yaml", "--out",
                                     R(f, "afile")],
     r"--out \S+/afile is a file; give a folder"),
    ("solve-plot", lambda f: ["solve", "--plot", "/proc/figures"],
     r"cannot write to --plot /proc/figures"),
    ("solve-plot-file", lambda f: ["solve", "--plot", R(f, "afile")],
     r"--plot \S+/afile is a file; give a folder"),
    # values Lightning or torch would reject late
    ("max-epochs", lambda f: ["fit", *FIT, "--trainer.max_epochs=-5"],
     r"bad trainer setting: `max_epochs` must be a non-negative integer or -1. You passed in "
     r"-5."),
    ("resolution", lambda f: ["fit", *FIT, "--data.init_args.resolution=-32"],
     r"data.resolution must be an integer of at least 8 pixels, got -32"),
    ("gpu", lambda f: ["fit", *FIT, "--trainer.accelerator=gpu"],
     r"--trainer.accelerator gpu but no CUDA GPU is visible here; use --trainer.accelerator "
     r"cpu \(or auto\)"),
    ("base-missing", lambda f: ["fit", "--config", R(f, "badbase.yaml")],
     r"config \S+/nothere.yaml does not exist \(listed under 'base:' in \S+/badbase.yaml\)"),
    ("config-missing", lambda f: ["fit", "--config", "no_such_config.yaml"],
     r"config 'no_such_config.yaml' not found as a path or in \S+; pass a path or one of:"),
    ("config-yaml", lambda f: ["fit", "--config", R(f, "bad.yaml")],
     r"config \S+/bad.yaml is not valid YAML \("),
    ("batch-too-large", lambda f: ["fit", *FIT, "--data.init_args.batch_size=5000",
                                   "--trainer.limit_train_batches=null"],
     r"the train set '\S+' has 1437 images \(in all\), fewer than one batch of 5000, and "
     r"drop_last drops it"),
    ("batch-zero", lambda f: ["fit", *FIT, "--data.init_args.batch_size=0"],
     r"batch_size 0 must be at least 1"),
    ("typo", lambda f: ["fit", *FIT, "--trainer.max_epoch=3"],
     r"bad configuration: unrecognized arguments: --trainer.max_epoch=3"),
    ("activation", lambda f: ["fit", *FIT, "--model.init_args.act=swish"],
     r"unknown activation 'swish'; choose one of: dselu, lselu, relu, selu, sselu."),
    ("eps", lambda f: ["fit", *FIT, "--model.init_args.eps=-0.1"],
     r"ε must be a positive number, got -0.1"),
    ("linked", lambda f: ["fit", *FIT, "--model.init_args.num_classes=7"],
     r"model.init_args.num_classes is taken from the data module \(data.num_classes\); drop it"),
    ("optimizer", lambda f: ["fit", *FIT, "--optimizer", "AdamW"],
     r"--optimizer is not an option here"),
    ("callback-twice", lambda f: ["fit", *FIT, "--trainer.callbacks+=models.DivergenceGuard"],
     r"trainer.callbacks lists DivergenceGuard, which every run already has; drop it and set "
     r"its options as --guard.\* \(in a config: a top-level 'guard:' section\)"),
    ("monitor", lambda f: ["fit", *FIT, "--monitor.every_n_steps=0"],
     r"NormalizationMonitor every_n_steps must be a positive integer, got 0."),
    ("checkpoint-steps", lambda f: ["fit", *FIT, "--checkpoint.every_n_train_steps=0"],
     r"checkpoint.every_n_train_steps must be a positive integer or null, got 0."),
    ("mixup", lambda f: ["fit", *FIT, "--mixup.alpha=-1"],
     r"Mixup needs alpha ≥ 0 and cutmix_alpha ≥ 0"),
    ("order", lambda f: ["fit", *FIT, "--data.init_args.order=shuffled"],
     r"unknown order 'shuffled'|bad configuration: .*order"),
    ("workers", lambda f: ["fit", *FIT, "--data.init_args.num_workers=-3"],
     r"data.num_workers must be ≥ 0 \(0: all cores\) or null, got -3"),
    ("subcommand", lambda f: ["train", *FIT],
     r"unknown subcommand 'train'; choose one of: fit, validate, test, predict"),
    # prepare
    ("prepare-classes", lambda f: ["prepare", "--source", "synthetic", "--num-classes", "0",
                                   "--out", R(f, "new.beton")],
     r"synthetic num_classes must be an integer ≥ 1, got 0"),
    ("prepare-size", lambda f: ["prepare", "--source", "synthetic", "--image-size", "0",
                                "--out", R(f, "new.beton")],
     r"synthetic image_size must be an integer ≥ 8, got 0"),
    ("prepare-exists", lambda f: ["prepare", "--source", "synthetic", "--num-samples", "8",
                                  "--out", R(f, "syn.beton")],
     r"'\S+/syn.beton' already exists; pass --overwrite to replace it or choose another --out"),
    ("prepare-root", lambda f: ["prepare", "--source", "imagefolder", "--root",
                                R(f, "no_such_folder"), "--out", R(f, "new.beton")],
     r"root folder '\S+/no_such_folder' does not exist"),
    ("prepare-data-dir", lambda f: ["fit", *FIT, "--data.init_args.source_options="
                                                 "{image_size: 24}"],
     r"cannot write into the folder of '/proc/\S+' \(.+\); choose a writable data.train_path "
     r"\(or \$SELFNORM_DATA_DIR\)"),
]
# the unwritable data cache for the last case
ENV = {"prepare-data-dir": {"SELFNORM_DATA_DIR": "/proc/selfnorm-cache"}}


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_loses_nothing(case, files, tmp_path, monkeypatch,
                                                        capsys):
    name, argv, message = case
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SELFNORM_DATA_DIR", str(files["betons"]))
    for key, value in ENV.get(name, {}).items():
        monkeypatch.setenv(key, value)
    before = snapshot(files["root"])
    code = main(argv(files))
    err = capsys.readouterr().err
    after = snapshot(files["root"])
    if message is None:
        assert code == 0, err[-2000:]
        return
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert code == 2, err[-3000:]
    assert "Traceback" not in err
    assert len(lines) == 1, err[-3000:]
    import re

    assert re.match(f"error: (?:{message})", lines[0]), lines[0]
    assert after == before  # byte-identical: nothing was overwritten, nothing vanished
    assert not (tmp_path / "lightning_logs").exists()  # a failed start leaves no run folder


def test_a_trusted_unsafe_checkpoint_loads_with_weights_only_false(files, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SELFNORM_DATA_DIR", str(files["betons"]))
    assert main(["validate", *FIT, "--ckpt_path", R(files, "evil.ckpt"),
                 "--weights_only", "false"]) == 0


def test_an_internal_bug_keeps_its_traceback_and_exit_1(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    code = ("import sys, app.solve as s\n"
            "s.format_table5 = lambda: 1 / 0\n"
            "from app.main import main\n"
            "sys.exit(main(['solve', '--table']))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=120)
    assert done.returncode == 1 and "ZeroDivisionError" in done.stderr
    assert "Traceback" in done.stderr


def test_a_small_disk_is_refused_before_anything_is_written(files, tmp_path, monkeypatch,
                                                            capsys):
    disk = tmp_path / "disk"
    disk.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()})")
    try:
        monkeypatch.chdir(tmp_path)
        monkeypatch.setenv("SELFNORM_DATA_DIR", str(files["betons"]))
        assert main(["fit", *FIT, f"--trainer.default_root_dir={disk}"]) == 2
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert line.startswith(f"error: trainer.default_root_dir {disk} has 2 MiB free, but one "
                               f"checkpoint of this model takes about 15 MiB; free space")
        assert not list(disk.iterdir())
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


# ---- processes: kill -9 and concurrent writers ------------------------------------------------

def _children(pid: int) -> list[int]:
    done = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    return [int(x) for x in done.stdout.split()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = Path(f"/proc/{pid}/stat").read_text().split()[2] if Path(f"/proc/{pid}").exists() \
        else "X"
    return state not in ("Z", "X")


def _start_prepare(out: Path, cwd: Path, n: int = 20000) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "app", "prepare", "--source", "synthetic",
                             "--num-samples", str(n), "--image-size", "128", "--out", str(out),
                             "--num-workers", "2", "--no-progress"], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_workers(proc: subprocess.Popen, out: Path) -> list[int]:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        workers = _children(proc.pid)
        if len(workers) >= 2 and list(out.parent.glob(f".{out.name}.*.partial")):
            return workers
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        time.sleep(0.05)
    raise AssertionError("prepare's writers never started")


def test_kill_9_of_prepare_leaves_no_orphan_writers_and_the_next_run_cleans_up(tmp_path):
    out = tmp_path / "big.beton"
    proc = _start_prepare(out, tmp_path)
    workers = _wait_for_workers(proc, out)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    deadline = time.monotonic() + 10
    while any(_alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(w) for w in workers)  # they died with their parent
    assert not out.exists() and list(tmp_path.glob(".big.beton.*.partial"))
    done = _start_prepare(out, tmp_path, n=40)
    _, err = done.communicate(timeout=300)
    assert done.returncode == 0, err[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.beton", "big.beton.json"]


def test_a_second_writer_of_one_output_refuses_while_the_first_writes(tmp_path):
    out = tmp_path / "big.beton"
    first = _start_prepare(out, tmp_path)
    _wait_for_workers(first, out)
    second = _start_prepare(out, tmp_path, n=40)
    _, err = second.communicate(timeout=300)
    assert second.returncode == 2
    assert err.strip().splitlines()[-1] == (
        f"error: another process (pid {first.pid}) is writing {str(out)!r}; wait for it to "
        f"finish or choose another --out")
    first.send_signal(signal.SIGTERM)
    _, err = first.communicate(timeout=120)
    assert first.returncode == 130 and not out.exists()
