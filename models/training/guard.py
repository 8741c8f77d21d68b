"""``DivergenceGuard``: stop a run that blows up, with one line and a diagnostic checkpoint.

Every step the guard looks at the loss; on the monitor's logging steps also at its per-layer
statistics. A non-finite value, or one beyond its bound, stops training: the guard writes
``diverged-step<N>.ckpt`` next to the last good checkpoint (which it never touches) and raises
``TrainingDiverged``, whose message names the step and the first layer in depth order that blew
up (``python -m app`` exits 3).

It never stalls the device: each step's loss flag is agreed over the ranks (one all-reduce
queued on the device) and copied to the host asynchronously; the guard acts on the previous
step's copy, waiting for it if need be. Acting on "whatever copy has landed" instead would let
DDP ranks stop at different steps and hang. Before any checkpoint is written, it waits for every
pending copy, so no checkpoint holds diverged weights under a good name.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from models.errors import ModelError, TrainingDiverged
from models.training.monitor import NormalizationMonitor
from models.training.stats import KINDS, grad_norms, select_layers

_SYMBOL = {"h2": "E[h²]", "mean": "mean(h)", "grad_w": "‖∂L/∂W‖_F", "weight": "‖W‖_F"}


@dataclass(frozen=True)
class Bounds:
    """Upper bounds (``None``: only non-finite values trip)."""

    loss: float | None = None
    h2: float | None = 1e6
    grad_w: float | None = None

    def first_violation(self, stats: np.ndarray, names: Sequence[str],
                        kinds: Sequence[str] = KINDS,
                        measured: np.ndarray | None = None) -> str | None:
        """'layer i (name) <stat> = v' for the first layer in depth order out of bounds.

        ``stats`` is [layers, len(kinds)]; ``measured`` (same shape, bool) marks the entries
        that were measured (a layer that did not run this step has no E[h²]).
        """
        for i, row in enumerate(stats):
            for k, (kind, value) in enumerate(zip(kinds, row)):
                if measured is not None and not measured[i, k]:
                    continue
                bound = getattr(self, kind, None)
                if not math.isfinite(value) or (bound is not None and abs(value) > bound):
                    return f"layer {i} ({names[i]}) {_SYMBOL[kind]} = {value:.4g}" + (
                        f" > {bound:g}" if math.isfinite(value) else "")
        return None


@dataclass
class PendingLoss:
    """A step's [bad (agreed over ranks), loss] on its way to the host; ``event`` is None once
    the values are on the host (CPU training)."""

    step: int
    values: Tensor
    event: Any = None


class DivergenceGuard(L.Callback):
    """Stop training when the loss or a monitored statistic is non-finite or out of bounds.

    Args:
        max_loss: loss bound (default: non-finite only).
        max_h2: E[h²] bound on the monitor's logging steps; 1e6 is an RMS 1000× the fixed point.
        max_grad_w: ‖∂L/∂W‖_F bound on the monitor's logging steps (default: non-finite only).
    """

    def __init__(self, max_loss: float | None = None, max_h2: float | None = 1e6,
                 max_grad_w: float | None = None) -> None:
        for name, value in (("max_loss", max_loss), ("max_h2", max_h2),
                            ("max_grad_w", max_grad_w)):
            if value is not None and not value > 0:
                raise ModelError(f"DivergenceGuard {name} must be positive or null, "
                                 f"got {value!r}.")
        self.bounds = Bounds(max_loss, max_h2, max_grad_w)
        self.pending: deque[PendingLoss] = deque()
        self.monitor: NormalizationMonitor | None = None
        self._layers: list = []
        self._step = 0  # optimizer step of the current batch

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self.monitor = next((cb for cb in trainer.callbacks
                             if isinstance(cb, NormalizationMonitor)), None)
        self._layers = select_layers(pl_module)
        if any(getattr(cb, "save_on_exception", False) for cb in trainer.checkpoint_callbacks):
            rank_zero_warn("ModelCheckpoint(save_on_exception=True) also saves the diverged "
                           "weights (and last.ckpt) when the divergence guard stops training; "
                           "turn it off to keep the last good checkpoint.")

    # ---- per step -------------------------------------------------------------------------

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        self._step = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        step = self._step
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, Tensor):
            self.pending.append(self.loss_flag(step, loss))
        if self.monitor is not None and self.monitor.records_at(step):
            self._check_statistics(trainer, step)
        self.check_losses(trainer, wait=False)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        # before any checkpoint reaches disk: raising here keeps diverged weights out of it
        self.check_losses(trainer, wait=True)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.check_losses(trainer, wait=True)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.check_losses(trainer, wait=True)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.check_losses(trainer, wait=True)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule,
                     exception: BaseException) -> None:
        self.pending.clear()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.pending.clear()

    # ---- the checks ---------------------------------------------------------------------------

    def loss_flag(self, step: int, loss: Tensor) -> PendingLoss:
        """``step``'s [bad, loss], copied to the host without a sync; ``bad`` is agreed over
        ranks (MAX), so every rank stops at the same step."""
        loss = loss.detach().float().reshape(())
        bad = ~torch.isfinite(loss)
        if self.bounds.loss is not None:
            bad |= loss.abs() > self.bounds.loss
        bad = bad.float()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)  # queued on the device, every step
        both = torch.stack([bad, loss])
        if not both.is_cuda:
            return PendingLoss(step, both)
        host = torch.empty(2, pin_memory=True)
        host.copy_(both, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return PendingLoss(step, host, event)

    def check_losses(self, trainer: L.Trainer, wait: bool) -> None:
        """Act on every pending loss but the newest device copy (on all of them when ``wait``).
        Which losses are acted on depends only on the step, so all ranks agree."""
        while self.pending:
            first = self.pending[0]
            if first.event is not None:
                if not wait and len(self.pending) == 1:
                    return  # this step's copy: look at it after the next step
                first.event.synchronize()
            self.pending.popleft()
            bad, loss = first.values.tolist()
            if bad:
                what = f"loss = {loss:.4g}"
                if self.bounds.loss is not None and math.isfinite(loss):
                    what += f" (bound {self.bounds.loss:g})"
                self.stop(trainer, first.step, what + self._first_bad_layer())

    def _check_statistics(self, trainer: L.Trainer, step: int) -> None:
        """The monitor's record of ``step`` (rank 0's) against the bounds, on every rank."""
        violation = None
        latest = self.monitor.latest if self.monitor is not None else None
        if trainer.is_global_zero and latest is not None and latest.step == step:
            measured = latest.measured.copy()
            if getattr(trainer.precision_plugin, "scaler", None) is not None:
                # with a GradScaler, non-finite gradients are its overflow signal (that step is
                # skipped and the scale lowered): only the forward statistics are guarded
                measured[:, KINDS.index("grad_w")] = False
            violation = self.bounds.first_violation(latest.stats, self.monitor.names, KINDS,
                                                    measured)
        if trainer.world_size > 1:
            violation = trainer.strategy.broadcast(violation, src=0)
        if violation is not None:
            self.stop(trainer, step, violation)

    def _first_bad_layer(self) -> str:
        """'; first layer out of bounds: …' judged from the weights and their gradients."""
        if not self._layers:
            return ""
        device = self._layers[0][1].weight.device
        w = torch.stack([torch.linalg.vector_norm(m.weight.detach(), dtype=torch.float32)
                         .to(device) for _, m in self._layers])
        stats = torch.stack([w, grad_norms(self._layers, device)], dim=1).cpu().numpy()
        found = self.bounds.first_violation(stats, [n for n, _ in self._layers],
                                            ("weight", "grad_w"))
        return f"; first layer out of bounds: {found}" if found else ""

    def stop(self, trainer: L.Trainer, step: int, what: str) -> None:
        """Write the diagnostic checkpoint (every rank calls this) and raise one line."""
        # rank 0 names the file: another rank could otherwise see it written and pick a -v1
        path = trainer.strategy.broadcast(diagnostic_path(trainer, step), src=0)
        self.pending.clear()  # the diagnostic save below must not stop again
        trainer.save_checkpoint(path)
        raise TrainingDiverged(f"training diverged at step {step}: {what}; diagnostic "
                               f"checkpoint {path} (earlier checkpoints untouched)")


def diagnostic_path(trainer: L.Trainer, step: int) -> Path:
    """A new file next to the checkpoints: ``diverged-step<N>[-vK].ckpt``, never overwriting."""
    ckpt = trainer.checkpoint_callback
    dirpath = getattr(ckpt, "dirpath", None)
    folder = Path(dirpath) if dirpath else Path(trainer.log_dir or trainer.default_root_dir,
                                                "checkpoints")
    path, version = folder / f"diverged-step{step}.ckpt", 0
    while path.exists():
        version += 1
        path = folder / f"diverged-step{step}-v{version}.ckpt"
    return path
