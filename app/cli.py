"""The LightningCLI behind ``python -m app fit|validate|test|predict``.

Configs compose: a YAML file may list ``base:`` files (paths relative to itself), merged first,
so shared settings live once (configs/base/*.yaml). A bare config name such as
``imagenet_sselu.yaml`` resolves to the shipped ``configs/`` from any directory.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import yaml

from app.errors import USER_ERRORS, UserError
from app.paths import check_output_folder

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
_CONFIG_FLAGS = ("--config", "-c")
# What the data decides and the model needs, linked at instantiation (the data module is built
# once, first); a data module exposes only the ones it has. channels_last too: the batches'
# memory format decides the network's.
DATA_TO_MODEL = ("num_classes", "in_chans", "in_features", "channels_last")


def resolve_config(value: str) -> Path:
    """A config path as given, else the shipped ``configs/<value>`` (``.yaml`` optional)."""
    p = Path(value).expanduser()
    if p.is_file():
        return p
    for cand in (CONFIG_DIR / value, CONFIG_DIR / f"{value}.yaml"):
        if cand.is_file():
            return cand
    shipped = ", ".join(sorted(x.name for x in CONFIG_DIR.glob("*.yaml")))
    raise UserError(f"config {value!r} not found as a path or in {CONFIG_DIR}; "
                    f"pass a path or one of: {shipped}")


def _merge(a: dict, b: dict) -> dict:
    """Deep merge: mappings merge key by key, anything else is replaced by b's value, except a
    key written ``name+`` (as jsonargparse's ``--name+=`` on the command line), which appends
    its list to the inherited ``name`` (e.g. ``callbacks+:`` adds Mixup to the shared ones)."""
    out = dict(a)
    for k, v in b.items():
        if k.endswith("+"):
            k, v = k[:-1], [*(out.get(k[:-1]) or []), *(v or [])]
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(path: Path, _seen: tuple[Path, ...] = ()) -> dict:
    """A config with its ``base:`` files merged in (bases first, the file itself last)."""
    path = path.resolve()
    if path in _seen:
        raise UserError(f"config {path} includes itself through 'base:'; remove the cycle")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        where = f" (listed under 'base:' in {_seen[-1]})" if _seen else ""
        raise UserError(f"config {path} does not exist{where}; fix the path (a base is "
                        f"relative to the config that lists it)") from None
    except yaml.YAMLError as err:
        raise UserError(f"config {path} is not valid YAML ({str(err).splitlines()[0]}); "
                        f"fix the file") from None
    if not isinstance(data, dict):
        raise UserError(f"config {path} must be a YAML mapping; fix the file")
    bases = data.pop("base", []) or []
    merged: dict = {}
    for base in [bases] if isinstance(bases, str) else bases:
        merged = _merge(merged, load_config(path.parent / base, (*_seen, path)))
    return _merge(merged, data)


def expand_configs(argv: list[str]) -> list[str]:
    """Replace each ``--config X`` by the merged YAML of X (LightningCLI accepts YAML text)."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        flag, value = None, None
        if arg in _CONFIG_FLAGS and i + 1 < len(argv):
            flag, value, i = arg, argv[i + 1], i + 2
        elif arg.startswith("--config="):
            flag, value, i = "--config", arg.split("=", 1)[1], i + 1
        else:
            out.append(arg)
            i += 1
            continue
        out += [flag, yaml.safe_dump(load_config(resolve_config(value)), sort_keys=False)]
    return out


def _refuse_optimizer_flags(argv: list[str]) -> None:
    """LightningCLI's ``--optimizer``/``--lr_scheduler`` would replace the recipe's parameter
    groups (no decay on λ, biases, norm scales) and its per-step schedule: refuse, naming ours."""
    for arg in argv:
        flag = arg.split("=", 1)[0]
        if flag in ("--optimizer", "--lr_scheduler") or flag.startswith(("--optimizer.",
                                                                          "--lr_scheduler.")):
            raise UserError(f"{flag} is not an option here: the optimizer and its schedule are "
                            f"the model's, so the recipe's parameter groups stay; set "
                            f"model.init_args.optimizer (sgd or adamw), .lr, .momentum, "
                            f".weight_decay, .schedule, .milestones, .warmup_epochs instead "
                            f"(see configs/examples/adamw.yaml)")


def _cli_class():
    from lightning.pytorch.callbacks import ModelSummary
    from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

    from models.training.checkpoint import Checkpoint
    from models.training.guard import DivergenceGuard
    from models.training.mixup import Mixup
    from models.training.monitor import NormalizationMonitor
    from models.training.predictions import PredictionWriter
    from models.training.preemption import Preemption
    from models.training.throughput import Throughput

    # the callbacks every run has, as first-class option groups: --checkpoint.*, --monitor.*
    groups = {"checkpoint": Checkpoint, "monitor": NormalizationMonitor,
              "guard": DivergenceGuard, "mixup": Mixup, "preemption": Preemption,
              "throughput": Throughput, "predictions": PredictionWriter}

    class QuietModelSummary(ModelSummary):
        """Lightning's summary without the FLOPs column, which counts nothing ("0 Total Flops")
        unless the model defines an example input."""

        @staticmethod
        def summarize(summary_data, total_parameters, trainable_parameters, model_size,
                      total_training_modes, total_flops, **kwargs) -> None:
            if not total_flops:
                data = [col for col in summary_data if col[0] != "FLOPs"]
                from lightning.pytorch.utilities.model_summary.model_summary import (
                    _format_summary_table)

                table = _format_summary_table(total_parameters, trainable_parameters,
                                              model_size, total_training_modes, 0, *data)
                logging.getLogger("lightning.pytorch.callbacks.model_summary").info(
                    "\n" + table.rsplit("\n", 1)[0])
                return
            ModelSummary.summarize(summary_data, total_parameters, trainable_parameters,
                                   model_size, total_training_modes, total_flops, **kwargs)

    class KeepingSaveConfig(SaveConfigCallback):
        """config.yaml of what runs; a resumed run keeps the earlier ones as config.<k>.yaml."""

        def setup(self, trainer, pl_module, stage: str) -> None:
            log_dir = trainer.log_dir
            if not self.already_saved and trainer.is_global_zero and log_dir:
                old = Path(log_dir) / self.config_filename
                if old.is_file():
                    k = 1
                    while (Path(log_dir) / f"config.{k}.yaml").exists():
                        k += 1
                    old.rename(Path(log_dir) / f"config.{k}.yaml")
            trainer.strategy.barrier("config.yaml kept")
            super().setup(trainer, pl_module, stage)

    class SelfnormCLI(LightningCLI):
        """Subclass mode for model and data; the data module's facts fill the model's args."""

        def add_arguments_to_parser(self, parser) -> None:
            parser.add_argument("--run", type=Optional[str], default=None,
                                help="name of the run folder under lightning_logs/ (default: "
                                     "a new version_N); with --ckpt_path last it starts or "
                                     "continues that run")
            for name, cls in groups.items():
                parser.add_lightning_class_args(cls, name)
            for name in DATA_TO_MODEL:
                parser.link_arguments(f"data.{name}", f"model.init_args.{name}",
                                      apply_on="instantiate")

        def _parse_ckpt_path(self) -> None:
            # LightningCLI would replace the model options of the config and the command line
            # with the checkpoint's, silently; the given options stand, and instantiate_trainer
            # checks the checkpoint against them.
            return

        def before_instantiate_classes(self) -> None:
            cfg = self._subconfig()
            _refuse_linked_values(cfg)
            run = cfg.get("run")
            if run is not None and (not run or run in (".", "..") or "/" in run
                                    or "\\" in run):
                raise UserError(f"--run {run!r} must be a plain folder name (no path "
                                f"separators), e.g. --run imagenet_sselu_seed0")

        def _subconfig(self) -> Any:
            return self.config.get(self.subcommand) if self.subcommand else self.config

        def instantiate_trainer(self, **kwargs: Any):
            from lightning.fabric.utilities.exceptions import MisconfigurationException
            from lightning.pytorch.callbacks import ProgressBar

            cfg = self._subconfig()
            trainer_cfg = cfg.get("trainer") or {}
            _check_accelerator(trainer_cfg.get("accelerator"))
            init = self.config_init[self.subcommand] if self.subcommand else self.config_init
            callbacks = list(init["trainer"].get("callbacks") or [])
            _refuse_group_callbacks(callbacks, groups)
            if trainer_cfg.get("enable_progress_bar") is False:  # the user's "no bar" wins
                callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
            if trainer_cfg.get("enable_model_summary") is not False and not any(
                    isinstance(c, ModelSummary) for c in callbacks):
                callbacks.append(QuietModelSummary())
            init["trainer"]["callbacks"] = callbacks
            # absolute: the paths the run prints (checkpoints, errors) work from anywhere
            root = Path(trainer_cfg.get("default_root_dir") or ".").expanduser().resolve()
            need = checkpoint_bytes(self.model) if self.subcommand == "fit" else 0
            check_output_folder(root, "trainer.default_root_dir", need)
            logger = init["trainer"].get("logger")
            if getattr(logger, "save_dir", None):
                check_output_folder(Path(logger.save_dir).expanduser().resolve(),
                                    "the logger's save_dir", need)
            plan = plan_run(self.subcommand, cfg, self.model, root / LOGS)
            if self.subcommand is not None:
                self.config_init[self.subcommand]["ckpt_path"] = plan.checkpoint
            if trainer_cfg.get("logger") in (None, True):
                from lightning.pytorch.loggers import TensorBoardLogger

                kwargs["logger"] = TensorBoardLogger(save_dir=str(root), name=LOGS,
                                                     version=plan.version,
                                                     default_hp_metric=False)
            try:
                return super().instantiate_trainer(**kwargs)
            except MisconfigurationException as err:
                raise UserError(f"bad trainer setting: {_one_line(err)}") from None

        def _run_subcommand(self, subcommand: str) -> None:
            # a start that fails before the first step leaves no run folder behind
            log_dir = Path(self.trainer.log_dir) if self.trainer.log_dir else None
            new = [d for d in (log_dir, log_dir and log_dir.parent) if d and not d.exists()]
            try:
                super()._run_subcommand(subcommand)
            except Exception:
                if new and self.trainer.global_step == 0 and self.trainer.is_global_zero \
                        and not list(new[-1].rglob("*.ckpt")):
                    shutil.rmtree(new[-1], ignore_errors=True)
                raise

        def before_fit(self) -> None:
            self._started = time.monotonic()

        def after_fit(self) -> None:
            summary = fit_summary(self.trainer, time.monotonic() - self._started)
            if self.trainer.is_global_zero:
                print(summary, flush=True)

    return SelfnormCLI, KeepingSaveConfig


def _refuse_group_callbacks(callbacks: list, groups: dict[str, type]) -> None:
    """A callback every run already has, listed again under trainer.callbacks, would run twice
    (two monitors logging the same tags, two guards, mixup applied twice): refuse it, naming
    its option group. A plain ModelCheckpoint stays allowed (a second, user-defined one)."""
    for c in callbacks:
        for name, cls in groups.items():
            if type(c) is cls:
                raise UserError(f"trainer.callbacks lists {cls.__name__}, which every run "
                                f"already has; drop it and set its options as --{name}.* "
                                f"(in a config: a top-level '{name}:' section)")


def fit_summary(trainer: Any, seconds: float) -> str:
    """timm's "*** Best metric" line: best val top-1 and its epoch, the checkpoints, wall time
    and mean images/s; also written as summary.json in the run folder."""
    from models.training.checkpoint import Checkpoint
    from models.training.throughput import Throughput

    ckpt = next((c for c in trainer.callbacks if isinstance(c, Checkpoint)), None)
    speed = next((c for c in trainer.callbacks if isinstance(c, Throughput)), None)
    best = float(ckpt.best_model_score) if ckpt is not None and ckpt.best_model_score \
        is not None else None
    epoch = _epoch_of(ckpt.best_model_path) if ckpt is not None else None
    rate = speed.mean_images_per_s if speed is not None else None
    total = rate * trainer.world_size if rate else None
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()
               if hasattr(v, "numel") and v.numel() == 1}
    summary = {"best_val_top1": best, "best_epoch": epoch,
               "best_checkpoint": ckpt.best_model_path if ckpt else None,
               "last_checkpoint": str(ckpt.last_path) if ckpt else None,
               "epochs": trainer.current_epoch, "global_step": trainer.global_step,
               "wall_seconds": round(seconds, 2), "images_per_s": total,
               "final_metrics": metrics}
    if trainer.is_global_zero and trainer.log_dir:
        (Path(trainer.log_dir) / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    head = (f"*** best val/top1 {best:.4f} at epoch {epoch} ({summary['best_checkpoint']})"
            if best is not None else "*** no validation ran")
    speed_text = f", {total:,.0f} images/s" if total else ""
    return (f"{head}; last {summary['last_checkpoint']}; {summary['epochs']} epochs, "
            f"{trainer.global_step} steps in {seconds:.1f} s{speed_text}")


def _epoch_of(path: str | None) -> int | None:
    import re

    found = re.search(r"epoch(\d+)", Path(path).name) if path else None
    return int(found[1]) if found else None


LOGS = "lightning_logs"


def checkpoint_bytes(model: Any) -> int:
    """About the size of one checkpoint: the weights and the optimizer's state (SGD momentum:
    one more copy, AdamW: two), plus the metadata."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    copies = 3 if getattr(model.hparams, "optimizer", "sgd") == "adamw" else 2
    return weights * copies + (1 << 20)


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


def _check_accelerator(accelerator: Any) -> None:
    """Lightning's own message ("No supported gpu backend found!") names no fix."""
    import torch

    if str(accelerator) in ("gpu", "cuda") and not torch.cuda.is_available():
        raise UserError(f"--trainer.accelerator {accelerator} but no CUDA GPU is visible here; "
                        f"use --trainer.accelerator cpu (or auto)")


def _refuse_linked_values(cfg: Any) -> None:
    """A value given for an argument the data fills in would be silently replaced: refuse it."""
    init_args = (cfg.get("model") or {}).get("init_args") or {}
    for name in DATA_TO_MODEL:
        if init_args.get(name) is not None:
            raise UserError(f"model.init_args.{name} is taken from the data module "
                            f"(data.{name}); drop it from the config and the command line")


def plan_run(subcommand: str | None, cfg: Any, model: Any, root: Path):
    """Which checkpoint the subcommand loads and which run folder it logs to (``Resume``)."""
    from models.training.checkpoint import load_checkpoint
    from models.training.runs import Resume, check_compatible, resolve_last, run_of

    ckpt, run = cfg.get("ckpt_path"), cfg.get("run")
    hparams, name = dict(model.hparams), type(model).__name__
    if subcommand is None or ckpt in (None, "best", "hpc", "registry"):
        return Resume(ckpt, run if subcommand == "fit" else None)
    if ckpt == "last":
        found = resolve_last(root, hparams, name, run)
        if subcommand != "fit":
            if found.checkpoint is None:
                raise UserError(f"--ckpt_path last: run {run} has no checkpoint under {root}; "
                                f"train it first, or pass a checkpoint's path")
            return Resume(found.checkpoint, None)
        return found
    path = Path(ckpt).expanduser()
    weights_only = cfg.get("weights_only")
    checkpoint = load_checkpoint(path, mmap=True,
                                 weights_only=True if weights_only is None else weights_only)
    check_compatible(checkpoint, path, hparams, name)
    version = (run or run_of(path, root)) if subcommand == "fit" else None
    return Resume(path, version)


def make_cli(argv: list[str], run: bool = True):
    """Build the LightningCLI for ``argv`` (``run=False``: instantiate only, for tools)."""
    from jsonargparse import ArgumentError
    from lightning.pytorch import LightningDataModule, LightningModule

    _refuse_optimizer_flags(argv)
    argv = expand_configs(list(argv))
    # args= carries sys.argv[1:] with the configs expanded; sys.argv itself stays intact
    # because Lightning's DDP launcher re-runs it for the other ranks.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    cli_class, save_config = _cli_class()
    try:
        return cli_class(
            LightningModule, LightningDataModule, subclass_mode_model=True,
            subclass_mode_data=True, args=argv, run=run, seed_everything_default=0,
            save_config_callback=save_config, auto_configure_optimizers=False,
            # allow_abbrev off: argparse would take --trainer.max_epoch for --trainer.max_epochs
            parser_kwargs={"exit_on_error": False, "allow_abbrev": False},
        )
    except ArgumentError as err:
        msg = " ".join(str(err).split())
        raise UserError(f"bad configuration: {msg}") from None
    except ValueError as err:
        # jsonargparse wraps a class's own error (unknown activation, ε ≤ 0, ...) in a
        # ValueError listing every Union subtype; the user needs just the original sentence.
        cause = _user_error_in_chain(err)
        if cause is None:
            raise
        raise cause from None


def _user_error_in_chain(err: BaseException) -> Exception | None:
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, USER_ERRORS):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def cli_main(argv: list[str]) -> int:
    if any(a == "--print_config" or a.startswith("--print_config=") for a in argv):
        return print_config(argv)
    make_cli(argv, run=True)
    return 0


def print_config(argv: list[str]) -> int:
    """``--print_config``, with a comment where the model's linked arguments come from (the
    parser leaves them out: they are known only once the data module exists)."""
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            make_cli(argv, run=True)
        except SystemExit as done:
            if done.code not in (None, 0):
                raise
    lines, shown = out.getvalue().splitlines(), False
    note = (f"    # also {', '.join(DATA_TO_MODEL)}: filled in from the data module's "
            f"attributes of the same names")
    for i, line in enumerate(lines):
        print(line)
        if not shown and line == "  init_args:" and i > 0 and lines[i - 1].startswith(
                "  class_path:") and any(l == "model:" for l in lines[max(0, i - 3):i]):
            print(note)
            shown = True
    return 0
