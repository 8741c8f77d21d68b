"""LightningModules: ``ImageClassifier`` and ``TabularClassifier`` over one shared base.

``ClassifierModule`` holds every training argument once; the two subclasses add only what the
input decides (image channels and memory format, or the number of tabular columns), which the
app fills in from the data module. The defaults are generic (SELU, plain SGD); each paper recipe
lives in its config (``configs/``), nowhere else.

The model comes from ``models.create_model``; the optimizer is SGD (or AdamW) with parameter
groups that keep weight decay off λ, biases and norm scales unless ``decay_all``; the schedule is
``models.training.schedule``'s, stepped every optimizer step.

Batches are ``(inputs, labels, ...)`` from FFCV or a torch DataLoader, already on the device.
Labels are class indices, or probability rows (soft targets) when a batch mixer (the
``models.training.mixup.Mixup`` callback) is active; the loss is cross-entropy against either,
and training accuracy is measured against the argmax of the mixed targets. Gradient clipping and
precision are Trainer settings.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.hooks import RemovableHandle
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from models.archs.registry import create_model
from models.errors import ModelError
from models.training.runs import check_compatible
from models.training.schedule import SCHEDULES, LrFactor, StepSchedule

# (inputs, labels, num_classes) -> (inputs, soft targets); set by models.training.mixup.Mixup.
BatchMixer = Callable[[Tensor, Tensor, int], tuple[Tensor, Tensor]]
OPTIMIZERS = ("sgd", "adamw")


def _accuracy(num_classes: int, prefix: str) -> MetricCollection:
    # top-5 only where it means something (tabular data is often binary); validate_args would
    # run torch.unique on the device, two host syncs per step
    ks = (1, 5) if num_classes > 5 else (1,)
    return MetricCollection({f"top{k}": MulticlassAccuracy(num_classes, top_k=k, average="micro",
                                                           validate_args=False)
                             for k in ks}, prefix=f"{prefix}/")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ModelError(message)


def watch_cpu_bf16_strided_width_1(model: torch.nn.Module) -> list[RemovableHandle]:
    """Hooks that warn (once) if a conv meets a oneDNN bug; install them for CPU bf16 only.

    Seen with torch 2.14.1 (oneDNN 3.12) on AVX-512 CPUs: the bf16 weight gradient (bf16-mixed
    and bf16-true alike) of a conv with kernel and stride widths > 1 over a 1-pixel-wide map is
    garbage (up to inf/NaN, from uninitialized memory); float32 and wider maps are exact. Conv
    MobileNet V1 meets it on inputs of 16 px or less, where its last stride-2 conv sees a 1×1
    map. Returns the hook handles (remove them after one forward: shapes do not change within
    a run).
    """
    warned = False

    def check(conv: torch.nn.Module, args: tuple) -> None:
        nonlocal warned
        if not warned and args[0].shape[-1] == 1:
            warned = True
            rank_zero_warn(
                f"bf16 on the CPU: a stride-{conv.stride[1]} conv sees a 1-pixel-wide map, "
                "where oneDNN computes wrong weight gradients; train with precision 32-true "
                "or larger inputs (> 16 px for conv_mobilenet_v1).")

    return [m.register_forward_pre_hook(check) for m in model.modules()
            if isinstance(m, torch.nn.Conv2d) and m.stride[1] > 1 and m.kernel_size[1] > 1]


class ClassifierModule(L.LightningModule):
    """Shared training logic; use ``ImageClassifier`` or ``TabularClassifier``.

    Args:
        model: architecture name in the ``models`` registry.
        num_classes: number of classes (filled in from the data).
        act: activation (relu, selu, dselu, sselu, lselu).
        eps: ε of dselu/sselu/lselu (paper eq. 11); null for relu and selu.
        central: solve the centralized activation (eq. 13: E[f] = 0 at the fixed point).
        trainable_lambda: make each activation's λ a parameter.
        weight_centralization: centralize each unit's weights in forward (section 5).
        norm: ``none`` (self-normalizing) or ``batchnorm`` (the BN+ReLU baseline).
        lambda_min: the solver's constraint λ ≥ lambda_min (eq. 11; 1.0 in the paper).
        model_kwargs: architecture keywords (``width_mult``, ``depth``, ...).
        optimizer: ``sgd`` (the paper's) or ``adamw``.
        lr: peak learning rate.
        momentum: SGD momentum (AdamW: β₁).
        nesterov: Nesterov momentum (SGD).
        weight_decay: weight decay on conv/linear weights (AdamW: decoupled).
        decay_all: also decay biases, λ and norm parameters.
        schedule: ``multistep`` or ``cosine``.
        milestones: epochs at which ``multistep`` multiplies the LR by ``gamma``.
        gamma: ``multistep`` decay factor.
        warmup_epochs: linear LR warmup length in epochs (fractions allowed).
        min_lr_ratio: ``cosine``'s final LR as a fraction of ``lr``.
        label_smoothing: cross-entropy label smoothing.
        compile: ``torch.compile`` the network.
    """

    def __init__(self, model: str, num_classes: int, act: str = "selu",
                 eps: float | None = None, central: bool = False,
                 trainable_lambda: bool = False, weight_centralization: bool = False,
                 norm: str = "none", lambda_min: float = 1.0,
                 model_kwargs: dict[str, Any] | None = None, optimizer: str = "sgd",
                 lr: float = 0.01, momentum: float = 0.9, nesterov: bool = False,
                 weight_decay: float = 0.0, decay_all: bool = False,
                 schedule: str = "multistep", milestones: tuple[int, ...] = (),
                 gamma: float = 0.1, warmup_epochs: float = 0.0, min_lr_ratio: float = 0.0,
                 label_smoothing: float = 0.0, compile: bool = False) -> None:
        super().__init__()
        self.save_hyperparameters()
        _check(optimizer in OPTIMIZERS,
               f"unknown optimizer {optimizer!r}; choose one of: {', '.join(OPTIMIZERS)}.")
        _check(lr > 0, f"lr must be positive, got {lr!r}.")
        _check(0 <= momentum < 1, f"momentum must be in [0, 1), got {momentum!r}.")
        _check(weight_decay >= 0, f"weight_decay must be ≥ 0, got {weight_decay!r}.")
        _check(schedule in SCHEDULES,
               f"unknown schedule {schedule!r}; choose one of: {', '.join(SCHEDULES)}.")
        milestones = list(milestones)
        _check(all(isinstance(m, int) and m > 0 for m in milestones)
               and milestones == sorted(set(milestones)),
               f"milestones must be increasing positive epochs, got {milestones!r}.")
        _check(gamma > 0, f"gamma must be positive, got {gamma!r}.")
        _check(warmup_epochs >= 0, f"warmup_epochs must be ≥ 0, got {warmup_epochs!r}.")
        _check(0 <= min_lr_ratio <= 1, f"min_lr_ratio must be in [0, 1], got {min_lr_ratio!r}.")
        _check(0 <= label_smoothing < 1,
               f"label_smoothing must be in [0, 1), got {label_smoothing!r}.")
        model_kwargs = dict(model_kwargs or {})
        for key, value in self.input_kwargs().items():
            if key in model_kwargs:
                raise ModelError(f"give {key} as the model's own argument, not inside "
                                 f"model_kwargs (got model_kwargs.{key}={model_kwargs[key]!r}).")
            model_kwargs[key] = value

        self.num_classes = num_classes
        self.model = create_model(model, num_classes=num_classes, act=act, eps=eps,
                                  central=central, trainable_lambda=trainable_lambda,
                                  weight_centralization=weight_centralization, norm=norm,
                                  lambda_min=lambda_min, **model_kwargs)
        if compile:
            self.model.compile()  # in place: state-dict keys stay those of the eager model
        self.batch_mixer: BatchMixer | None = None
        self._shape_hooks: list[RemovableHandle] = []
        self.train_metrics = _accuracy(num_classes, "train")
        # nan_strategy "disable": the default checks each update for NaN, a host sync per step
        self.train_loss = MeanMetric(nan_strategy="disable")
        # the epoch's running train statistics travel in checkpoints: a run resumed mid-epoch
        # reports the same epoch metrics as an uninterrupted one
        self.train_metrics.persistent(True)
        self.train_loss.persistent(True)
        self.val_metrics = _accuracy(num_classes, "val")
        self.test_metrics = _accuracy(num_classes, "test")

    def input_kwargs(self) -> dict[str, Any]:
        """The architecture keywords the input decides (``in_chans``, ``in_features``)."""
        return {}

    # ---- forward and loss -------------------------------------------------------------------

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    @staticmethod
    def _labels(y: Tensor) -> Tensor:
        """Class indices as a 1-d int64 tensor (FFCV yields (B, 1) int32), soft targets as is."""
        return y if y.is_floating_point() else y.reshape(-1).long()

    def loss(self, logits: Tensor, y: Tensor) -> Tensor:
        """Cross-entropy against class indices or probability rows (soft targets)."""
        return F.cross_entropy(logits.float(), y, label_smoothing=self.hparams.label_smoothing)

    def _shared_step(self, batch: Any, metrics: MetricCollection, stage: str) -> Tensor:
        x, y = batch[0], self._labels(batch[1])
        logits = self(x)
        loss = self.loss(logits, y)
        metrics.update(logits.detach(), y)
        self.log(f"{stage}/loss", loss, prog_bar=True, sync_dist=True, batch_size=x.shape[0])
        self.log_dict(metrics, prog_bar=stage != "train", batch_size=x.shape[0])
        return loss

    # ---- Lightning hooks --------------------------------------------------------------------

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch[0], self._labels(batch[1])
        if self.batch_mixer is not None:
            x, y = self.batch_mixer(x, y, self.num_classes)
        logits = self(x)
        loss = self.loss(logits, y)
        target = y.argmax(dim=1) if y.is_floating_point() else y
        self.train_metrics.update(logits.detach(), target)
        self.train_loss.update(loss.detach())
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False,
                 batch_size=x.shape[0])
        self.log("train/loss_epoch", self.train_loss, on_step=False, on_epoch=True)
        self.log_dict(self.train_metrics, on_step=False, on_epoch=True, batch_size=x.shape[0])
        return loss

    def on_train_start(self) -> None:
        if self.device.type == "cpu" and self.trainer.precision.startswith("bf16"):
            self._shape_hooks = watch_cpu_bf16_strided_width_1(self.model)
        # The schedule reads the run's length now that the train loader exists; a resumed run
        # restored the optimizer's settings from its checkpoint: the ones configured now take
        # effect (the LR through the schedule, the rest here).
        for config in self.trainer.lr_scheduler_configs:
            if isinstance(config.scheduler, StepSchedule):
                config.scheduler.refresh()
        hp = self.hparams
        for optimizer in self.trainer.optimizers:
            for group in optimizer.param_groups:
                group["weight_decay"] = hp.weight_decay if group.get("name") == "decay" else 0.0
                if "nesterov" in group:
                    group["momentum"], group["nesterov"] = hp.momentum, hp.nesterov
                elif "betas" in group:
                    group["betas"] = (hp.momentum, group["betas"][1])

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_compatible(checkpoint, "the checkpoint", self.hparams, type(self).__name__)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        for h in self._shape_hooks:
            h.remove()
        self._shape_hooks = []

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # The LR this step trains with (the scheduler steps after the optimizer). A CPU tensor:
        # Lightning would turn a float into a tensor on the GPU, a blocking copy every step.
        lr = torch.tensor(float(self.trainer.optimizers[0].param_groups[0]["lr"]))
        self.log("lr", lr, on_step=True, on_epoch=False, batch_size=1)

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._shared_step(batch, self.val_metrics, "val")

    def test_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._shared_step(batch, self.test_metrics, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        return self(x).softmax(dim=1)

    def param_groups(self) -> list[dict[str, Any]]:
        """Weight decay on conv/linear weights only (ndim > 1), unless ``decay_all``."""
        decay, no_decay = [], []
        for p in self.model.parameters():
            if p.requires_grad:
                (decay if p.ndim > 1 or self.hparams.decay_all else no_decay).append(p)
        groups = [{"params": decay, "weight_decay": self.hparams.weight_decay, "name": "decay"},
                  {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
        return [g for g in groups if g["params"]]

    def _lengths(self) -> tuple[float, float]:
        """(optimizer steps per epoch, total optimizer steps), checked for the schedule."""
        hp = self.hparams
        total = self.trainer.estimated_stepping_batches
        batches = self.trainer.num_training_batches
        per_epoch = (math.ceil(batches / self.trainer.accumulate_grad_batches)
                     if math.isfinite(batches) else math.inf)
        if (hp.milestones and hp.schedule == "multistep") or hp.warmup_epochs:
            _check(math.isfinite(per_epoch), "milestones and warmup_epochs count epochs, but the "
                   "train loader has no length; give it one or drop them.")
        if hp.schedule == "cosine":
            _check(math.isfinite(total), "the cosine schedule needs a finite run; set "
                   "trainer.max_epochs or trainer.max_steps.")
        return per_epoch, total

    def _optimizer(self) -> torch.optim.Optimizer:
        hp = self.hparams
        if hp.optimizer == "adamw":
            return torch.optim.AdamW(self.param_groups(), lr=hp.lr, betas=(hp.momentum, 0.999))
        return torch.optim.SGD(self.param_groups(), lr=hp.lr, momentum=hp.momentum,
                               nesterov=hp.nesterov)

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        optimizer = self._optimizer()
        factor = LrFactor(hp.schedule, tuple(hp.milestones), hp.gamma, hp.warmup_epochs,
                          hp.min_lr_ratio, lengths=self._lengths)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": StepSchedule(optimizer, factor),
                                 "interval": "step", "frequency": 1}}


class ImageClassifier(ClassifierModule):
    """Image classification (Conv MobileNet V1, the serial CNN).

    Args:
        in_chans: image channels (the app fills it in from the data; None: 3).
        channels_last: NHWC memory format for the network, faster convs on tensor cores (the
            app fills it in from the data, whose batches decide it; None: off).
        **kwargs: the ``ClassifierModule`` arguments.
    """

    def __init__(self, in_chans: int | None = None, channels_last: bool | None = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.channels_last = bool(channels_last)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)

    def input_kwargs(self) -> dict[str, Any]:
        in_chans = self.hparams.in_chans
        return {"in_chans": 3 if in_chans is None else in_chans}

    def forward(self, x: Tensor) -> Tensor:
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model(x)


class TabularClassifier(ClassifierModule):
    """Tabular classification with the fully-connected SNN (paper Appendix E).

    Args:
        in_features: the number of input columns (filled in from the data).
        **kwargs: the ``ClassifierModule`` arguments.
    """

    def __init__(self, in_features: int | None = None, **kwargs: Any) -> None:
        # None only until the app fills it in from the data module (a required argument would be
        # demanded by the config parser before the data is known)
        _check(in_features is not None, "TabularClassifier needs in_features; set "
               "model.init_args.in_features or use a data module that provides it.")
        super().__init__(**kwargs)

    def input_kwargs(self) -> dict[str, Any]:
        return {"in_features": self.hparams.in_features}
