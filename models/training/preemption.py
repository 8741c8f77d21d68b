"""``Preemption``: a signal from the scheduler saves a resumable checkpoint, then the run exits.

Cluster schedulers stop jobs with SIGTERM (SLURM, Kubernetes, torchrun's agent) and warn before
a time limit with SIGUSR1 (SLURM's ``--signal=SIGUSR1@90``). The handler only records the signal;
at the end of the step in flight every rank agrees to stop (the flag is all-reduced; on a GPU the
result is read one step later, so the device never waits), ``last.ckpt`` is written (mid-epoch:
the data order and the step counter continue exactly from there), and ``Preempted`` is raised:
``python -m app`` exits with 128 + the signal number (143 for SIGTERM, 138 for SIGUSR1), never 0.
A second signal while saving changes nothing: the handler still only records it, and the file is
written atomically. Under SLURM, SIGUSR1 also requeues the job (``scontrol requeue``), as
Lightning's SLURM plugin does; resume it with ``--run NAME --ckpt_path last``.

It replaces Lightning's own SIGTERM handling, which exits with code 0 and saves nothing.
"""
from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from models.errors import ModelError, Preempted
from models.training.checkpoint import LAST, Checkpoint


class Preemption(L.Callback):
    """Save and stop on SIGTERM / SIGUSR1 (or the ``signals`` given).

    Args:
        signals: signal names to handle.
        requeue: requeue the SLURM job on SIGUSR1 (null: when running under SLURM).
    """

    def __init__(self, signals: list[str] | None = None, requeue: bool | None = None) -> None:
        names = ["SIGTERM", "SIGUSR1"] if signals is None else list(signals)
        bad = [n for n in names if not hasattr(signal.Signals, n) or n in ("SIGKILL", "SIGSTOP")]
        if bad:
            raise ModelError(f"preemption.signals names {bad[0]!r}, which cannot be handled; "
                             f"use names such as SIGTERM, SIGUSR1, SIGINT.")
        self.signals = [signal.Signals[n] for n in names]
        self.requeue = requeue
        self.received: list[int] = []
        self._previous: dict[int, Any] = {}
        self._pending: tuple[torch.Tensor, Any] | None = None  # (flag on host, event)
        self._flag: torch.Tensor | None = None

    # ---- handlers ---------------------------------------------------------------------------

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        self.received.append(signum)  # all the work happens at the next step's end

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # after Lightning registered its own handlers (it does so just before training)
        self.received = []
        for sig in self.signals:
            try:
                self._previous[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread: the launcher's process handles it
                rank_zero_warn("preemption signals are not handled off the main thread")
                break

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule,
                     exception: BaseException) -> None:
        self._restore()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore()

    # ---- the decision --------------------------------------------------------------------

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._stop_agreed(trainer, pl_module.device):
            self._stop(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking and trainer.training is False and self.received \
                and trainer.world_size == 1:
            self._stop(trainer)

    def _stop_agreed(self, trainer: L.Trainer, device: torch.device) -> bool:
        """Whether every rank stops now; the same answer on every rank, for the same step."""
        local = 1.0 if self.received else 0.0
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return bool(local)
        if self._flag is None or self._flag.device != device:
            self._flag = torch.zeros((), device=device)
        flag = self._flag.clone().fill_(local)  # fill_ with a Python number: no host sync
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.device.type != "cuda":
            return bool(flag.item())
        # read the previous step's agreement (long since computed) and queue this one's copy
        previous = self._pending
        host = torch.empty((), pin_memory=True)
        host.copy_(flag, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._pending = (host, event)
        if previous is None:
            return False
        previous[1].synchronize()
        return bool(previous[0].item())

    def _stop(self, trainer: L.Trainer) -> None:
        signum = self.received[0] if self.received else int(signal.SIGTERM)
        ckpt = next((cb for cb in trainer.callbacks if isinstance(cb, Checkpoint)), None)
        if ckpt is not None:
            path = ckpt.write_last(trainer)
        else:
            path = Path(trainer.log_dir or trainer.default_root_dir, "checkpoints", LAST)
            trainer.save_checkpoint(path)
        if signum == signal.SIGUSR1 and self._requeues() and trainer.is_global_zero:
            _requeue()
        raise Preempted(signum, trainer.global_step, path)

    def _requeues(self) -> bool:
        return bool(os.environ.get("SLURM_JOB_ID")) if self.requeue is None else self.requeue


def _requeue() -> None:
    """``scontrol requeue`` this SLURM job (array task included)."""
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array else os.environ.get(
        "SLURM_JOB_ID", "")
    if not job:
        rank_zero_warn("preemption.requeue is on but SLURM_JOB_ID is not set; not requeued")
        return
    try:
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True,
                              timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        rank_zero_warn(f"could not requeue SLURM job {job}: {err}")
        return
    if done.returncode == 0:
        rank_zero_info(f"requeued SLURM job {job}")
    else:
        rank_zero_warn(f"scontrol requeue {job} failed: {done.stderr.strip()}")
