"""Normalization-effectiveness monitoring (paper section 6.1, Figure 4) and the explosion guard.

``NormalizationMonitor`` records, every ``every_n_steps`` optimizer steps, the second moment
E[h²] and the mean of each conv/linear layer's output pre-activation h and the Frobenius norm
‖∂L/∂W‖_F of its weight gradient — exactly the two quantities of Figure 4 — and logs them as
scalars (``norm/h2/…``, ``norm/mean/…``, ``norm/grad_w/…``) plus, every few logs, the Figure 4
image and histograms to TensorBoard.

It is cheap by construction: forward hooks exist only during logging steps; each hook adds two
float32 reductions on the device (no host sync, no collective); everything reaches the host in
one copy per logging step, on rank 0 only. The weight gradients are read in
``on_before_optimizer_step``, i.e. after AMP unscaling and before gradient clipping.

The explosion guard stops training when the loss (checked every step, read one step late so it
never stalls the device) or a monitored statistic is non-finite or beyond its bound: it writes
``diverged-step<N>.ckpt`` next to the last good checkpoint (which it never touches) and raises
``TrainingDiverged``, whose one-line message names the step and the first layer in depth order
that blew up; ``python -m app`` exits 3 on it.
"""
from __future__ import annotations

import fnmatch
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
from torch import Tensor, nn

from app.errors import TrainingDiverged, UserError

# The layers Figure 4 looks at; WCConv2d / WCLinear subclass these, so they are included.
LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
KINDS = ("h2", "mean", "grad_w")  # the columns of every statistics array, in this order
_SYMBOL = {"h2": "E[h²]", "mean": "mean(h)", "grad_w": "‖∂L/∂W‖_F", "weight": "‖W‖_F"}


def select_layers(model: nn.Module, patterns: str | Sequence[str] | None = None
                  ) -> list[tuple[str, nn.Module]]:
    """The conv/linear layers of ``model`` in depth (registration) order, as (name, module).

    Names drop the prefix every layer shares (``model.`` inside a LightningModule). ``patterns``
    (fnmatch, e.g. ``"stages.*.conv"``) keeps the layers whose short or full name matches one.
    """
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, LAYER_TYPES)]
    if not found:
        raise UserError(f"{type(model).__name__} has no conv or linear layer to monitor; "
                        f"monitor a model built from nn.Conv*d / nn.Linear layers.")
    prefix = _common_prefix([name for name, _ in found])
    layers = [(name[len(prefix):], name, m) for name, m in found]
    if patterns is not None:
        pats = [patterns] if isinstance(patterns, str) else list(patterns)
        layers = [x for x in layers
                  if any(fnmatch.fnmatchcase(n, p) for p in pats for n in x[:2])]
        if not layers:
            shown = ", ".join(name for name, _ in found[:6])
            raise UserError(f"layer pattern(s) {pats!r} match no conv/linear layer; use fnmatch "
                            f"patterns over names like: {shown}.")
    return [(short, m) for short, _, m in layers]


def _common_prefix(names: list[str]) -> str:
    """The longest shared dotted prefix (ending in '.') that leaves every name non-empty."""
    if len(names) < 2:
        return ""
    parts = [n.split(".") for n in names]
    shared = 0
    while all(len(p) > shared + 1 for p in parts) and len({p[shared] for p in parts}) == 1:
        shared += 1
    return "".join(p + "." for p in parts[0][:shared])


def activation_label(model: nn.Module) -> str:
    """The activations in ``model`` for figure titles, e.g. ``sselu (central), ε = 0.06``."""
    labels: list[str] = []
    for m in model.modules():
        if hasattr(m, "family") and hasattr(m, "eps"):  # the SELU-family modules
            label = m.name + (" (central)" if getattr(m, "central", False) else "")
            if m.eps is not None:
                label += f", ε = {m.eps:g}"
        elif isinstance(m, (nn.ReLU, nn.SELU, nn.ELU, nn.LeakyReLU, nn.GELU, nn.SiLU)):
            label = type(m).__name__.lower()
        else:
            continue
        if label not in labels:
            labels.append(label)
    return "; ".join(labels) or "no known activation"


class LayerStats:
    """Forward hooks that accumulate Σh², Σh and the element count of each layer's output.

    Everything accumulates in place in one float32 tensor on the layers' device, so a hook
    never syncs. Hooks run eagerly: dynamo does not replay their effects from a cached graph,
    so inside a ``torch.compile``-d model a logging step breaks the graph at each monitored
    layer, while every other step runs the hook-free compiled graph (one more compile each).
    Calls in eval mode are ignored. ``inputs=True`` also records the layer input's Σx², Σx
    and count (``app diagnose`` starts the theory from a layer's input).
    """

    def __init__(self, layers: Sequence[tuple[str, nn.Module]], inputs: bool = False) -> None:
        self.layers = list(layers)
        self.inputs = inputs
        self._handles: list[Any] = []
        self._acc: Tensor | None = None  # [layers, (Σh², Σh, n_h[, Σx², Σx, n_x])]
        # one hook object per layer, reused on every attach (stable identity for torch.compile)
        self._hooks = [self._make_hook(i) for i in range(len(self.layers))]

    @property
    def device(self) -> torch.device:
        return self.layers[0][1].weight.device

    def reset(self) -> None:
        if self._acc is not None:
            self._acc.zero_()

    def attach(self) -> None:
        if self._acc is None or self._acc.device != self.device:
            self._acc = torch.zeros(len(self.layers), 6 if self.inputs else 3,
                                    device=self.device)
        if not self._handles:
            self._handles = [m.register_forward_hook(hook)
                             for (_, m), hook in zip(self.layers, self._hooks)]

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _make_hook(self, i: int):
        @torch.compiler.disable  # eager even inside a compiled model (class docstring)
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            if module.training:
                self._add(self._acc[i, :3], output)
                if self.inputs:
                    self._add(self._acc[i, 3:], args[0])
        return hook

    @staticmethod
    def _add(acc: Tensor, t: Tensor) -> None:
        t = t.detach()
        acc[:2] += torch.stack([torch.linalg.vector_norm(t, dtype=torch.float32).square(),
                                t.sum(dtype=torch.float32)])
        acc[2] += t.numel()

    def moments(self) -> Tensor:
        """[layers, 3 or 6] float32 on the device: E[h²], E[h], count of h (, E[x²], E[x],
        count of x); the means are NaN for a layer that did not run."""
        assert self._acc is not None, "attach() first"
        acc = self._acc.clone()
        for k in range(0, acc.shape[1], 3):
            acc[:, k:k + 2] /= acc[:, k + 2:k + 3]
        return acc


def grad_norms(layers: Sequence[tuple[str, nn.Module]], device: torch.device) -> Tensor:
    """‖∂L/∂W‖_F of each layer's weight as a float32 vector on ``device`` (0 where no grad)."""
    norms = [torch.linalg.vector_norm(m.weight.grad, dtype=torch.float32).to(device)
             if m.weight.grad is not None else torch.zeros((), device=device)
             for _, m in layers]
    return torch.stack(norms)


@dataclass(frozen=True)
class Bounds:
    """Upper bounds of the explosion guard (``None``: only non-finite values trip it)."""

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


class NormalizationMonitor(L.Callback):
    """Figure 4's per-layer E[h²] and ‖∂L/∂W‖_F during training, and the explosion guard.

    Args:
        every_n_steps: record every N optimizer steps (step 0, the initialisation, included).
        layers: fnmatch pattern(s) selecting layers by name; default every conv/linear layer.
        figure_every_n_logs: every K records, log the Figure 4 image and histograms.
        window: records each figure summarises (default ``figure_every_n_logs``).
        guard: stop on explosion (non-finite or out-of-bound loss / statistics).
        max_loss: loss bound (default: non-finite only).
        max_h2: E[h²] bound; 1e6 means an RMS 1000× the fixed point q = 1.
        max_grad_w: ‖∂L/∂W‖_F bound (default: non-finite only).
        title: figure title; default: the model's activations and ε.
    """

    def __init__(self, every_n_steps: int = 50, layers: str | list[str] | None = None,
                 figure_every_n_logs: int = 10, window: int | None = None, guard: bool = True,
                 max_loss: float | None = None, max_h2: float | None = 1e6,
                 max_grad_w: float | None = None, title: str | None = None) -> None:
        for name, value in (("every_n_steps", every_n_steps),
                            ("figure_every_n_logs", figure_every_n_logs),
                            ("window", figure_every_n_logs if window is None else window)):
            if not (isinstance(value, int) and value >= 1):
                raise UserError(f"NormalizationMonitor {name} must be a positive integer, "
                                f"got {value!r}.")
        for name, value in (("max_loss", max_loss), ("max_h2", max_h2),
                            ("max_grad_w", max_grad_w)):
            if value is not None and not value > 0:
                raise UserError(f"NormalizationMonitor {name} must be positive or null, "
                                f"got {value!r}.")
        self.every_n_steps = every_n_steps
        self.patterns = layers
        self.figure_every_n_logs = figure_every_n_logs
        self.guard = guard
        self.bounds = Bounds(max_loss, max_h2, max_grad_w)
        self.title = title
        self.history: deque[tuple[int, np.ndarray]] = deque(maxlen=window or figure_every_n_logs)
        self.layers: list[tuple[str, nn.Module]] = []
        self.stats: LayerStats | None = None
        self._logs = 0
        self._drawn = 0
        self._step = 0                 # optimizer step of the current batch
        self._recorded_step = -1
        self._pending: deque[tuple[int, Tensor, Any]] = deque()  # (step, [bad, loss], event)

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.layers]

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
        if self.guard and any(getattr(cb, "save_on_exception", False)
                              for cb in trainer.checkpoint_callbacks):
            rank_zero_warn("ModelCheckpoint(save_on_exception=True) also saves the diverged "
                           "weights (and last.ckpt) when the explosion guard stops training; "
                           "turn it off to keep the last good checkpoint.")
        if trainer.is_global_zero:
            rows = "\n".join(f"| {i} | {name} | {type(m).__name__} |"
                             for i, (name, m) in enumerate(self.layers))
            for exp in _tensorboards(trainer):
                exp.add_text("norm/layers", "| # | layer | type |\n|---|---|---|\n" + rows, 0)

    # ---- per step -------------------------------------------------------------------------

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        self._step = trainer.global_step
        if (self.stats is not None and trainer.is_global_zero and self._logging_step()):
            self.stats.attach()  # stays for every micro-batch of this optimizer step

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        if not self._logging_step():
            return
        self._recorded_step = self._step  # once per step, whatever the number of optimizers
        violation = None
        if trainer.is_global_zero and self.stats is not None:
            stats, measured = self._record()
            self._log(trainer, stats)
            if self.guard:
                violation = self._check(trainer, stats, measured)
        if self.guard:
            violation = _agree(trainer, violation)
            if violation is not None:
                self._diverged(trainer, self._step, violation)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        if not self.guard:
            return
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, Tensor):
            self._pending.append(self._loss_flag(loss))
        # Act on the previous step's loss, waiting for its copy if need be (the host stays at most
        # one step ahead of the device, enough to keep it busy). Never "whatever copy has landed":
        # that moment differs between ranks, which would then enter _diverged's collectives at
        # different steps and hang DDP. Before a checkpoint may be written, wait for all.
        self._check_losses(trainer, wait=_checkpoint_due(trainer))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.guard:
            self._check_losses(trainer, wait=True)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.guard and not trainer.sanity_checking:
            self._check_losses(trainer, wait=True)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.guard:
            self._check_losses(trainer, wait=True)
        if trainer.is_global_zero and self._logs > self._drawn:
            self._draw(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule,
                     exception: BaseException) -> None:
        self.teardown(trainer, pl_module, "fit")

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.stats is not None:
            self.stats.detach()
            self.stats.reset()
        self._pending.clear()

    def _logging_step(self) -> bool:
        return self._step % self.every_n_steps == 0 and self._recorded_step != self._step

    # ---- recording and logging --------------------------------------------------------------

    def _record(self) -> tuple[np.ndarray, np.ndarray]:
        """[layers, 3] (E[h²], mean, ‖∂L/∂W‖_F) in one device-to-host copy, and which entries
        were measured; the hooks are removed."""
        assert self.stats is not None
        self.stats.detach()
        grads = grad_norms(self.layers, self.stats.device)[:, None]
        both = torch.cat([self.stats.moments(), grads], dim=1).cpu().numpy()
        self.stats.reset()
        stats, ran = both[:, [0, 1, 3]], both[:, 2] > 0
        self.history.append((self._step, stats))
        self._logs += 1
        return stats, np.stack([ran, ran, np.ones_like(ran)], axis=1)

    def _log(self, trainer: L.Trainer, stats: np.ndarray) -> None:
        metrics = {self.tag(kind, i): float(v)
                   for i, row in enumerate(stats) for kind, v in zip(KINDS, row)}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=self._step)
        if self._logs % self.figure_every_n_logs == 0:
            self._draw(trainer)

    def _draw(self, trainer: L.Trainer) -> None:
        """Figure 4 over the recent window, and histograms of this step's values over depth."""
        self._drawn = self._logs
        exps = _tensorboards(trainer)
        if not exps:
            return
        from models.monitor_plot import figure4, to_rgb

        steps = [s for s, _ in self.history]
        window = np.stack([st for _, st in self.history])  # [records, layers, kinds]
        image = to_rgb(figure4(window[..., 0], window[..., 2], names=self.names,
                               title=f"{self.title} — steps {steps[0]}–{steps[-1]}"))
        latest = window[-1]
        for exp in exps:
            exp.add_image("norm/figure4", image, steps[-1], dataformats="HWC")
            for k, kind in enumerate(KINDS):
                values = latest[:, k][np.isfinite(latest[:, k])]
                if values.size:
                    exp.add_histogram(f"norm/{kind}_over_depth", values, steps[-1])

    # ---- the guard ------------------------------------------------------------------------

    def _check(self, trainer: L.Trainer, stats: np.ndarray, measured: np.ndarray) -> str | None:
        if _grad_scaler(trainer) is not None:
            # with a GradScaler, non-finite gradients are its overflow signal (that step is
            # skipped and the scale lowered): only the forward statistics are guarded
            measured = measured.copy()
            measured[:, KINDS.index("grad_w")] = False
        return self.bounds.first_violation(stats, self.names, KINDS, measured)

    def _loss_flag(self, loss: Tensor) -> tuple[int, Tensor, Any]:
        """(step, [bad, loss], event): copied to the host without a sync; ``bad`` agreed over
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
            return self._step, both, None
        host = torch.empty(2, pin_memory=True)
        host.copy_(both, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return self._step, host, event

    def _check_losses(self, trainer: L.Trainer, wait: bool) -> None:
        """Act on every pending loss but the newest device copy (on all of them when ``wait``).
        Which losses are acted on depends only on the step, so all ranks agree."""
        while self._pending:
            step, host, event = self._pending[0]
            if event is not None:
                if not wait and len(self._pending) == 1:
                    return  # this step's copy: look at it after the next step
                event.synchronize()
            self._pending.popleft()
            bad, loss = host.tolist()
            if bad:
                what = f"loss = {loss:.4g}"
                if self.bounds.loss is not None and math.isfinite(loss):
                    what += f" (bound {self.bounds.loss:g})"
                self._diverged(trainer, step, what + self._first_bad_layer())

    def _first_bad_layer(self) -> str:
        """'; first layer out of bounds: …' judged from the weights and their gradients."""
        if not self.layers:
            return ""
        device = self.layers[0][1].weight.device
        w = torch.stack([torch.linalg.vector_norm(m.weight.detach(), dtype=torch.float32)
                         .to(device) for _, m in self.layers])
        stats = torch.stack([w, grad_norms(self.layers, device)], dim=1).cpu().numpy()
        found = self.bounds.first_violation(stats, self.names, ("weight", "grad_w"))
        return f"; first layer out of bounds: {found}" if found else ""

    def _diverged(self, trainer: L.Trainer, step: int, what: str) -> None:
        """Write the diagnostic checkpoint (every rank calls this) and stop with one line."""
        # rank 0 names the file: another rank could otherwise see it written and pick a -v1
        path = trainer.strategy.broadcast(_diagnostic_path(trainer, step), src=0)
        trainer.save_checkpoint(path)
        raise TrainingDiverged(f"training diverged at step {step}: {what}; diagnostic "
                               f"checkpoint {path} (earlier checkpoints untouched)")


def _tensorboards(trainer: L.Trainer) -> list[Any]:
    """The SummaryWriters among the trainer's loggers (other loggers get scalars only)."""
    return [lg.experiment for lg in trainer.loggers
            if hasattr(lg.experiment, "add_image") and hasattr(lg.experiment, "add_histogram")]


def _grad_scaler(trainer: L.Trainer) -> Any:
    return getattr(trainer.precision_plugin, "scaler", None)


def _checkpoint_due(trainer: L.Trainer) -> bool:
    """Whether a ModelCheckpoint may save at the end of this batch (its every_n_train_steps)."""
    return any((n := getattr(cb, "_every_n_train_steps", 0)) and trainer.global_step % n == 0
               for cb in trainer.checkpoint_callbacks)


def _agree(trainer: L.Trainer, violation: str | None) -> str | None:
    """Rank 0's verdict on every rank (a logging-step broadcast, outside any hook)."""
    return trainer.strategy.broadcast(violation, src=0) if trainer.world_size > 1 else violation


def _diagnostic_path(trainer: L.Trainer, step: int) -> Path:
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
