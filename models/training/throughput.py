"""``Throughput``: images/s per device and in total, and how long each step waited for data.

Logged every ``log_every_n_steps`` (the trainer's) as ``throughput/images_per_s`` (this
device), ``throughput/images_per_s_total`` (× the world size) and ``throughput/data_wait_ms`` /
``throughput/data_wait_share`` (the time from one step's end to the next step's start, which is
where the host waits for the loader: a share near 1 means a starved GPU); images/s also goes to
the progress bar. Host clocks only: no device sync (on a GPU the host runs at most a few steps
ahead, so over a logging window its rate is the device's).
"""
from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch
from torch import Tensor


def _batch_size(batch: Any) -> int:
    first = batch[0] if isinstance(batch, (list, tuple)) else batch
    return int(first.shape[0]) if isinstance(first, Tensor) and first.dim() > 0 else 1


class Throughput(L.Callback):
    """Images/s and data-loading wait, logged and shown in the progress bar.

    Args:
        log_every_n_steps: logging interval (default: the trainer's ``log_every_n_steps``).
    """

    def __init__(self, log_every_n_steps: int | None = None) -> None:
        self.log_every_n_steps = log_every_n_steps
        self.images = 0             # trained this run
        self.train_seconds = 0.0    # spent in training steps and their data waits
        self._window = [0, 0, 0.0, 0.0]  # steps, images, seconds, waiting seconds
        self._batch_start: float | None = None
        self._batch_end: float | None = None
        self.last_rate: float | None = None

    @property
    def mean_images_per_s(self) -> float | None:
        """Per device, over the whole run's training time (validation excluded)."""
        return self.images / self.train_seconds if self.train_seconds > 0 else None

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._batch_end = None  # the wait before an epoch's first batch includes validation

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        now = time.perf_counter()
        if self._batch_end is not None:
            wait = now - self._batch_end
            self._window[2] += wait
            self._window[3] += wait
            self.train_seconds += wait
        self._batch_start = now

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        now = time.perf_counter()
        if self._batch_start is None:
            return
        step_seconds = now - self._batch_start
        n = _batch_size(batch)
        self.images += n
        self.train_seconds += step_seconds
        self._window[0] += 1
        self._window[1] += n
        self._window[2] += step_seconds
        self._batch_end = now
        every = self.log_every_n_steps or trainer.log_every_n_steps or 50
        if trainer.global_step % every == 0 and self._window[2] > 0:
            self._log(trainer, pl_module)

    def _log(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        steps, images, seconds, waiting = self._window
        self._window = [0, 0, 0.0, 0.0]
        rate = images / seconds
        self.last_rate = rate
        metrics = {"throughput/images_per_s": rate,
                   "throughput/images_per_s_total": rate * trainer.world_size,
                   "throughput/data_wait_ms": 1e3 * waiting / steps,
                   "throughput/data_wait_share": waiting / seconds}
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)
        # a CPU tensor: a float would become a blocking copy to the GPU
        pl_module.log("img/s", torch.tensor(rate * trainer.world_size), prog_bar=True,
                      logger=False, on_step=True, on_epoch=False, batch_size=1)
