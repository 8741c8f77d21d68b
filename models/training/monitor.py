"""Normalization-effectiveness monitoring (paper section 6.1, Figure 4) for TensorBoard.

``NormalizationMonitor`` records, every ``every_n_steps`` optimizer steps, the second moment
E[h²] and the mean of each conv/linear layer's output pre-activation h and the Frobenius norm
‖∂L/∂W‖_F of its weight gradient — exactly the two quantities of Figure 4 — and logs them as
scalars (``norm/h2/…``, ``norm/mean/…``, ``norm/grad_w/…``) plus, every few records and at
each epoch's end, the Figure 4 image and per-layer histograms over the recent records.

It is cheap by construction: forward hooks exist only during logging steps; each hook adds two
float32 reductions on the device (no host sync, no collective); everything reaches the host in
one copy per logging step, on rank 0 only. The weight gradients are read in
``on_before_optimizer_step``, i.e. after AMP unscaling and before gradient clipping. Each record
is kept as ``latest`` (the ``DivergenceGuard`` checks it).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import nn

from models.errors import ModelError
from models.training.stats import KINDS, LayerStats, activation_label, grad_norms, select_layers


@dataclass(frozen=True)
class Record:
    """One logging step: ``stats`` is [layers, KINDS]; ``measured`` marks the entries that were
    measured (a layer that did not run has no E[h²])."""

    step: int
    stats: np.ndarray
    measured: np.ndarray


class NormalizationMonitor(L.Callback):
    """Figure 4's per-layer E[h²] and ‖∂L/∂W‖_F during training.

    Args:
        every_n_steps: record every N optimizer steps (step 0, the initialisation, included).
        layers: fnmatch pattern(s) selecting layers by name; default every conv/linear layer.
        figure_every_n_logs: every K records, log the Figure 4 image and the per-layer
            histograms (also at the end of each epoch with new records).
        window: records each figure summarises (default ``figure_every_n_logs``).
        title: figure title; default: the model's activations and ε.
    """

    def __init__(self, every_n_steps: int = 50, layers: str | list[str] | None = None,
                 figure_every_n_logs: int = 10, window: int | None = None,
                 title: str | None = None) -> None:
        for name, value in (("every_n_steps", every_n_steps),
                            ("figure_every_n_logs", figure_every_n_logs),
                            ("window", figure_every_n_logs if window is None else window)):
            if not (isinstance(value, int) and value >= 1):
                raise ModelError(f"NormalizationMonitor {name} must be a positive integer, "
                                 f"got {value!r}.")
        self.every_n_steps = every_n_steps
        self.patterns = layers
        self.figure_every_n_logs = figure_every_n_logs
        self.title = title
        self.history: deque[tuple[int, np.ndarray]] = deque(maxlen=window or figure_every_n_logs)
        self.latest: Record | None = None
        self.layers: list[tuple[str, nn.Module]] = []
        self.stats: LayerStats | None = None
        self._logs = 0
        self._drawn = 0
        self._step = 0                 # optimizer step of the current batch
        self._recorded_step = -1

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.layers]

    def records_at(self, step: int) -> bool:
        """Whether ``step`` is a logging step (the same answer on every rank)."""
        return step % self.every_n_steps == 0

    def tag(self, kind: str, i: int) -> str:
        """TensorBoard tag of a layer's statistic: ``norm/<kind>/<index>_<name>``."""
        width = max(2, len(str(len(self.layers) - 1)))
        return f"norm/{kind}/{i:0{width}d}_{self.layers[i][0]}"

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self.layers = select_layers(pl_module, self.patterns)
        self.stats = LayerStats(self.layers)
        if self.title is None:
            self.title = activation_label(pl_module)
        if trainer.is_global_zero:
            rows = "\n".join(f"| {i} | {name} | {type(m).__name__} |"
                             for i, (name, m) in enumerate(self.layers))
            for exp in _tensorboards(trainer):
                exp.add_text("norm/layers", "| # | layer | type |\n|---|---|---|\n" + rows, 0)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        self._step = trainer.global_step
        if self.stats is not None and trainer.is_global_zero and self._logging_step():
            self.stats.attach()  # stays for every micro-batch of this optimizer step

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        if not self._logging_step():
            return
        self._recorded_step = self._step  # once per step, whatever the number of optimizers
        if trainer.is_global_zero and self.stats is not None:
            self.latest = self._record()
            self._log(trainer, self.latest.stats)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero and self._logs > self._drawn:
            self._draw(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero and self._logs > self._drawn:
            self._draw(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule,
                     exception: BaseException) -> None:
        self.teardown(trainer, pl_module, "fit")

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.stats is not None:
            self.stats.detach()
            self.stats.reset()

    def _logging_step(self) -> bool:
        return self.records_at(self._step) and self._recorded_step != self._step

    def _record(self) -> Record:
        """E[h²], mean and ‖∂L/∂W‖_F per layer in one device-to-host copy; hooks removed."""
        assert self.stats is not None
        self.stats.detach()
        grads = grad_norms(self.layers, self.stats.device)[:, None]
        both = torch.cat([self.stats.moments(), grads], dim=1).cpu().numpy()
        self.stats.reset()
        stats, ran = both[:, [0, 1, 3]], both[:, 2] > 0
        self.history.append((self._step, stats))
        self._logs += 1
        return Record(self._step, stats, np.stack([ran, ran, np.ones_like(ran)], axis=1))

    def _log(self, trainer: L.Trainer, stats: np.ndarray) -> None:
        metrics = {self.tag(kind, i): float(v)
                   for i, row in enumerate(stats) for kind, v in zip(KINDS, row)}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=self._step)
        if self._logs % self.figure_every_n_logs == 0:
            self._draw(trainer)

    def _draw(self, trainer: L.Trainer) -> None:
        """Figure 4 over the recent window, and per layer a histogram of each statistic over
        that window (``norm/<kind>_hist/<index>_<name>``: TensorBoard's histogram and
        distribution panels then show one layer's spread as training goes on)."""
        self._drawn = self._logs
        exps = _tensorboards(trainer)
        if not exps:
            return
        from models.training.plot import figure4, to_rgb

        steps = [s for s, _ in self.history]
        window = np.stack([st for _, st in self.history])  # [records, layers, kinds]
        image = to_rgb(figure4(window[..., 0], window[..., 2], names=self.names,
                               title=f"{self.title} — steps {steps[0]}–{steps[-1]}"))
        for exp in exps:
            exp.add_image("norm/figure4", image, steps[-1], dataformats="HWC")
            for k, kind in enumerate(KINDS):
                for i in range(window.shape[1]):
                    values = window[:, i, k][np.isfinite(window[:, i, k])]
                    if values.size:  # a layer that never ran has no forward statistics
                        exp.add_histogram(self.tag(f"{kind}_hist", i), values, steps[-1])


def _tensorboards(trainer: L.Trainer) -> list[Any]:
    """The SummaryWriters among the trainer's loggers (other loggers get scalars only)."""
    return [lg.experiment for lg in trainer.loggers
            if hasattr(lg.experiment, "add_image") and hasattr(lg.experiment, "add_histogram")]
