"""The run lifecycle with real processes: kill -9 and SIGTERM mid-epoch, resume, full disks,
corrupt checkpoints, two runs in one folder, longer schedules, and bitwise-repeatable seeds."""
from __future__ import annotations

import errno
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
STEPS_PER_EPOCH = 10
# the demo, shortened; deterministic, so that runs can be compared bitwise on the CPU
RUN = ["--config", "demo.yaml", "--trainer.max_epochs=3",
       f"--trainer.limit_train_batches={STEPS_PER_EPOCH}", "--trainer.limit_val_batches=2",
       "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
       "--trainer.deterministic=true", "--checkpoint.every_n_train_steps=4"]


@pytest.fixture(scope="module")
def betons(tmp_path_factory) -> Path:
    """One .beton cache for the module's runs (the digits are prepared once)."""
    return tmp_path_factory.mktemp("betons")


def app(args: list[str], cwd: Path, betons: Path, **popen) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SELFNORM_DATA_DIR": str(betons),
           "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "app", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def finish(proc: subprocess.Popen, timeout: float = 600) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def fit(cwd: Path, betons: Path, *extra: str) -> tuple[int, str, str]:
    return finish(app(["fit", *RUN, *extra], cwd, betons))


def run_dir(cwd: Path, version: str = "version_0") -> Path:
    return cwd / "lightning_logs" / version


def state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def summary(cwd: Path, version: str = "version_0") -> dict:
    return json.loads((run_dir(cwd, version) / "summary.json").read_text())


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, betons) -> Path:
    """The reference: the same run, never stopped."""
    cwd = tmp_path_factory.mktemp("uninterrupted")
    code, _, err = fit(cwd, betons)
    assert code == 0, err[-3000:]
    return cwd


def assert_same_run(a: Path, b: Path) -> None:
    """Bitwise the same final weights (and optimizer state) and the same metrics."""
    last_a, last_b = state(run_dir(a) / "checkpoints" / "last.ckpt"), state(
        run_dir(b) / "checkpoints" / "last.ckpt")
    assert last_a["global_step"] == last_b["global_step"] == 3 * STEPS_PER_EPOCH
    for key, value in last_a["state_dict"].items():
        assert torch.equal(value, last_b["state_dict"][key]), key
    ma, mb = summary(a)["final_metrics"], summary(b)["final_metrics"]
    for key in ("val/top1", "val/loss", "train/top1", "train/loss_epoch"):
        assert ma[key] == mb[key], (key, ma[key], mb[key])


# ---- last.ckpt is the newest state ------------------------------------------------------------

def test_last_checkpoint_is_the_final_state_and_best_is_kept_apart(uninterrupted):
    ckpts = run_dir(uninterrupted) / "checkpoints"
    last = state(ckpts / "last.ckpt")
    assert last["global_step"] == 3 * STEPS_PER_EPOCH and last["epoch"] == 2
    best = [p for p in ckpts.glob("best-epoch*.ckpt")]
    assert len(best) == 1
    info = summary(uninterrupted)
    assert info["best_checkpoint"].endswith(best[0].name)
    assert info["best_val_top1"] == pytest.approx(
        float(state(best[0])["callbacks"][next(k for k in state(best[0])["callbacks"]
                                              if "Checkpoint" in k)]["best_model_score"]))
    assert (ckpts / "last-previous.ckpt").is_file()  # the fallback one save back
    assert not list(ckpts.glob(".*partial"))


def test_same_seed_gives_bitwise_identical_runs(tmp_path, betons, uninterrupted):
    code, _, err = fit(tmp_path, betons)
    assert code == 0, err[-3000:]
    assert_same_run(uninterrupted, tmp_path)
    # another seed is another run: different order, crops and mixing
    other = tmp_path / "other"
    other.mkdir()
    assert fit(other, betons, "--seed_everything=1")[0] == 0
    a = state(run_dir(uninterrupted) / "checkpoints" / "last.ckpt")["state_dict"]
    b = state(run_dir(other) / "checkpoints" / "last.ckpt")["state_dict"]
    assert not all(torch.equal(v, b[k]) for k, v in a.items())


# ---- kill -9, SIGTERM, resume ----------------------------------------------------------------

def test_kill_9_mid_epoch_then_resume_equals_the_uninterrupted_run(tmp_path, betons,
                                                                   uninterrupted):
    proc = app(["fit", *RUN], tmp_path, betons)
    wait_for(run_dir(tmp_path) / "checkpoints" / "last.ckpt", proc)  # step 4, mid-epoch 0
    proc.kill()
    proc.communicate()
    saved = state(run_dir(tmp_path) / "checkpoints" / "last.ckpt")
    assert saved["global_step"] % STEPS_PER_EPOCH != 0  # a mid-epoch checkpoint
    code, _, err = fit(tmp_path, betons, "--ckpt_path", "last")
    assert code == 0, err[-3000:]
    assert not run_dir(tmp_path, "version_1").exists()  # the same run continued
    assert_same_run(uninterrupted, tmp_path)


def test_sigterm_saves_a_resumable_checkpoint_exits_143_and_resume_repeats_no_step(
        tmp_path, betons, uninterrupted):
    proc = app(["fit", *RUN], tmp_path, betons)
    wait_for(run_dir(tmp_path) / "checkpoints" / "last.ckpt", proc)
    proc.send_signal(signal.SIGTERM)
    code, _, err = finish(proc)
    assert code == 128 + signal.SIGTERM, err[-3000:]
    line = err.strip().splitlines()[-1]
    assert line.startswith("stopped: stopped by SIGTERM at step "), line
    step = int(line.split("at step ")[1].split(";")[0])
    assert step > 4 and f"resumable checkpoint {run_dir(tmp_path)}/checkpoints/last.ckpt" in line
    saved = state(run_dir(tmp_path) / "checkpoints" / "last.ckpt")
    assert saved["global_step"] == step
    code, out, err = fit(tmp_path, betons, "--ckpt_path", "last")
    assert code == 0, err[-3000:]
    assert summary(tmp_path)["global_step"] == 3 * STEPS_PER_EPOCH
    assert_same_run(uninterrupted, tmp_path)  # a repeated or skipped step would show here


def test_a_second_signal_while_stopping_corrupts_nothing(tmp_path, betons):
    proc = app(["fit", *RUN], tmp_path, betons)
    wait_for(run_dir(tmp_path) / "checkpoints" / "last.ckpt", proc)
    for _ in range(3):
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.002)
    code, _, err = finish(proc)
    assert code == 128 + signal.SIGTERM, err[-3000:]
    ckpts = run_dir(tmp_path) / "checkpoints"
    assert state(ckpts / "last.ckpt")["global_step"] > 4
    assert not list(ckpts.glob(".*partial"))


def test_sigusr1_stops_too_with_its_own_exit_code(tmp_path, betons):
    proc = app(["fit", *RUN], tmp_path, betons)
    wait_for(run_dir(tmp_path) / "checkpoints" / "last.ckpt", proc)
    proc.send_signal(signal.SIGUSR1)
    code, _, err = finish(proc)
    assert code == 128 + signal.SIGUSR1, err[-3000:]
    assert "stopped by SIGUSR1" in err.strip().splitlines()[-1]


# ---- which run resumes -----------------------------------------------------------------------

def test_ckpt_path_last_resumes_this_configs_run_not_the_newest_folder(tmp_path, betons):
    assert fit(tmp_path, betons, "--trainer.max_epochs=1")[0] == 0   # digits: 10 classes
    other = ["--data.init_args.source=synthetic",
             "--data.init_args.source_options={num_classes: 3, num_samples: 96, image_size: 32}"]
    assert fit(tmp_path, betons, "--trainer.max_epochs=1", *other)[0] == 0  # 3 classes, newer
    code, _, err = fit(tmp_path, betons, "--trainer.max_epochs=2", "--ckpt_path", "last")
    assert code == 0, err[-3000:]
    assert state(run_dir(tmp_path) / "checkpoints" / "last.ckpt")["epoch"] == 1
    assert state(run_dir(tmp_path, "version_1") / "checkpoints" / "last.ckpt")["epoch"] == 0
    assert not run_dir(tmp_path, "version_2").exists()


def test_a_checkpoint_of_another_model_is_refused_naming_the_difference(tmp_path, betons):
    assert fit(tmp_path, betons, "--trainer.max_epochs=1")[0] == 0
    last = run_dir(tmp_path) / "checkpoints" / "last.ckpt"
    before = last.read_bytes()
    code, _, err = fit(tmp_path, betons, "--model.init_args.act=lselu", "--ckpt_path", str(last))
    assert code == 2
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"error: checkpoint {last} was written by another model or data "
                           f"(act='sselu' there, 'lselu' here"), line
    code, _, err = fit(tmp_path, betons, "--model.init_args.act=lselu", "--ckpt_path", "last")
    assert code == 2 and "no run under" in err.strip().splitlines()[-1]
    assert last.read_bytes() == before and not run_dir(tmp_path, "version_1").exists()


def test_named_runs_start_and_continue_with_the_same_command(tmp_path, betons):
    cmd = ["--trainer.max_epochs=1", "--run", "job42", "--ckpt_path", "last"]
    code, _, err = fit(tmp_path, betons, *cmd)  # nothing to resume yet: starts job42
    assert code == 0, err[-3000:]
    assert state(run_dir(tmp_path, "job42") / "checkpoints" / "last.ckpt")["epoch"] == 0
    code, _, err = fit(tmp_path, betons, *cmd[1:], "--trainer.max_epochs=2")
    assert code == 0, err[-3000:]
    assert state(run_dir(tmp_path, "job42") / "checkpoints" / "last.ckpt")["epoch"] == 1
    events = list(run_dir(tmp_path, "job42").glob("events.out.tfevents.*"))
    assert len(events) == 2  # both attempts log into the run's one TensorBoard folder


def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, betons):
    assert fit(tmp_path, betons, "--trainer.max_epochs=1")[0] == 0
    ckpts = run_dir(tmp_path) / "checkpoints"
    previous_step = state(ckpts / "last-previous.ckpt")["global_step"]
    data = (ckpts / "last.ckpt").read_bytes()
    (ckpts / "last.ckpt").write_bytes(data[: len(data) // 2])  # truncated by a crash elsewhere
    code, _, err = fit(tmp_path, betons, "--trainer.max_epochs=2", "--ckpt_path", "last")
    assert code == 0, err[-3000:]
    assert f"resuming from {ckpts / 'last-previous.ckpt'} (step {previous_step})" in err
    assert state(ckpts / "last.ckpt")["global_step"] == 2 * STEPS_PER_EPOCH


def test_all_checkpoints_unreadable_is_a_one_line_refusal(tmp_path, betons):
    assert fit(tmp_path, betons, "--trainer.max_epochs=1")[0] == 0
    ckpts = run_dir(tmp_path) / "checkpoints"
    for name in ("last.ckpt", "last-previous.ckpt"):
        (ckpts / name).write_text("not a checkpoint\n")
    before = {p.name: p.read_bytes() for p in ckpts.iterdir()}
    code, _, err = fit(tmp_path, betons, "--run", "version_0", "--ckpt_path", "last")
    assert code == 2
    assert err.strip().splitlines()[-1] == (
        f"error: the checkpoints of run {run_dir(tmp_path)} are unreadable (truncated or "
        f"corrupt); pass another one with --ckpt_path PATH (e.g. a best-*.ckpt) or start "
        f"anew without --ckpt_path")
    assert {p.name: p.read_bytes() for p in ckpts.iterdir()} == before


# ---- options on resume -------------------------------------------------------------------------

def test_a_longer_max_epochs_stretches_the_cosine_schedule(tmp_path, betons):
    every = "--trainer.log_every_n_steps=1"
    assert fit(tmp_path, betons, "--trainer.max_epochs=2", every)[0] == 0
    code, _, err = fit(tmp_path, betons, "--trainer.max_epochs=4", "--ckpt_path", "last", every)
    assert code == 0, err[-3000:]
    last = state(run_dir(tmp_path) / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 4 * STEPS_PER_EPOCH
    # the LR the first step of epoch 2 trained with: the 4-epoch cosine at 20/40, not 0
    events = run_dir(tmp_path) / "summary.json"
    assert events.is_file()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir(tmp_path)), size_guidance={"scalars": 0})
    acc.Reload()
    lrs = {e.step: e.value for e in acc.Scalars("lr")}
    t = 2 * STEPS_PER_EPOCH
    assert lrs[t] == pytest.approx(0.05 * 0.5 * (1 + math.cos(math.pi * t / 40)), rel=1e-5)
    assert lrs[t - 1] == pytest.approx(0.05 * 0.5 * (1 + math.cos(math.pi * (t - 1) / 20)),
                                       rel=1e-4)


def test_training_options_given_on_resume_take_effect_and_are_recorded(tmp_path, betons):
    assert fit(tmp_path, betons, "--trainer.max_epochs=1")[0] == 0
    code, _, err = fit(tmp_path, betons, "--trainer.max_epochs=2", "--ckpt_path", "last",
                       "--model.init_args.lr=0.1", "--model.init_args.weight_decay=0.01",
                       "--model.init_args.schedule=multistep")
    assert code == 0, err[-3000:]
    last = state(run_dir(tmp_path) / "checkpoints" / "last.ckpt")
    groups = last["optimizer_states"][0]["param_groups"]
    assert groups[0]["lr"] == pytest.approx(0.1) and groups[0]["weight_decay"] == 0.01
    assert groups[1]["weight_decay"] == 0.0  # λ and biases stay undecayed
    config = (run_dir(tmp_path) / "config.yaml").read_text()
    assert "lr: 0.1" in config and "schedule: multistep" in config
    assert "lr: 0.05" in (run_dir(tmp_path) / "config.1.yaml").read_text()


# ---- full disk --------------------------------------------------------------------------------

def test_a_failed_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    from models.training.checkpoint import AtomicCheckpointIO, CheckpointError

    io = AtomicCheckpointIO()
    target = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}}, target)
    before = target.read_bytes()

    real_open = open

    class FullDisk:
        """A file that takes a few bytes, then reports a full disk."""

        def __init__(self, path, mode):
            self.fh = real_open(path, mode)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

        def write(self, data):
            self.fh.write(bytes(data[:100]))
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("builtins.open", lambda path, mode="r", *a, **k: FullDisk(path, mode)
                        if str(path).endswith(".partial") else real_open(path, mode, *a, **k))
    with pytest.raises(CheckpointError, match=rf"could not write checkpoint {target} \(No space "
                                              rf"left on device\); the previous checkpoints are "
                                              rf"intact; free space on that disk"):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}}, target,
                           storage_options={"keep_previous": True})
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


@pytest.fixture
def small_disk(tmp_path):
    """A 40 MiB tmpfs: room for two 14 MB checkpoints and not a third (the new one is written
    in full before the old one is replaced)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}); the injected ENOSPC "
                    f"test covers the writer")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_a_full_disk_stops_with_one_line_and_intact_checkpoints(tmp_path, betons, small_disk):
    # every 2 steps: the third save finds the disk full
    code, _, err = fit(tmp_path, betons, f"--trainer.default_root_dir={small_disk}",
                       "--checkpoint.every_n_train_steps=2")
    assert code == 2, err[-3000:]
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: could not write checkpoint ") and "No space left" in line
    ckpts = run_dir(small_disk) / "checkpoints"
    assert not list(ckpts.glob(".*partial"))
    for path in ckpts.glob("*.ckpt"):
        state(path)  # every file under a final name is a complete checkpoint


# ---- DDP: every rank stops at the same step, rank 0 writes ---------------------------------------

DDP_SCRIPT = '''
import sys, time
import torch, lightning as L, torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from models.errors import Preempted
from models.training.checkpoint import Checkpoint
from models.training.preemption import Preemption

class Net(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(12, 32), nn.SELU(), nn.Linear(32, 5))
    def training_step(self, batch, batch_idx):
        time.sleep(0.05)  # slow enough to signal mid-run
        return F.cross_entropy(self.net(batch[0]), batch[1])
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

class Beacon(L.Callback):
    def on_train_batch_end(self, trainer, *args):
        if trainer.is_global_zero and trainer.global_step == 3:
            print("READY", flush=True)

torch.manual_seed(0)
data = TensorDataset(torch.randn(4096, 12), torch.randint(0, 5, (4096,)))
trainer = L.Trainer(max_epochs=1, accelerator="cpu", devices=2, strategy="ddp", logger=False,
                    enable_progress_bar=False, enable_model_summary=False,
                    callbacks=[Checkpoint(dirpath="ckpt", monitor=None), Preemption(), Beacon()])
try:
    trainer.fit(Net(), DataLoader(data, batch_size=16))
except Preempted as err:
    print(f"rank {trainer.global_rank} stopped at {err.step}", flush=True)
    sys.exit(128 + err.signum)
'''


@pytest.mark.slow
def test_ddp_ranks_stop_at_the_same_step_and_rank_0_writes(tmp_path):
    (tmp_path / "run.py").write_text(DDP_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "run.py"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    for line in proc.stdout:
        if line.startswith("READY"):
            break
        assert time.monotonic() < deadline
    proc.send_signal(signal.SIGTERM)  # the scheduler signals the launching process (rank 0)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    import re

    stops = dict(re.findall(r"rank (\d) stopped at (\d+)", out))
    assert set(stops) == {"0", "1"} and stops["0"] == stops["1"], out
    files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert files == ["last.ckpt"]
    assert state(tmp_path / "ckpt" / "last.ckpt")["global_step"] == int(stops["0"])


def test_only_partials_of_dead_writers_on_this_host_are_removed(tmp_path):
    import socket

    from models.training.checkpoint import remove_stale_partials

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    files = {"dead": f".last.ckpt.{host}.{dead.pid}.partial",
             "alive": f".last.ckpt.{host}.{os.getpid()}.partial",
             "other host": f".last.ckpt.node-b-{host}.{dead.pid}.partial",
             "not ours": ".notes.partial"}
    for name in files.values():
        (tmp_path / name).write_bytes(b"x")
    remove_stale_partials(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        v for k, v in files.items() if k != "dead")
