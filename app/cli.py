"""The LightningCLI behind ``python -m app fit|validate|test|predict``.

Configs compose: a YAML file may list ``base:`` files (paths relative to itself), merged first,
so shared settings live once (configs/base/*.yaml). A bare config name such as
``imagenet_sselu.yaml`` resolves to the shipped ``configs/`` from any directory.
"""
from __future__ import annotations

import inspect
import warnings
from pathlib import Path
from typing import Any

import yaml

from app.errors import UserError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
_CONFIG_FLAGS = ("--config", "-c")
# data-module attributes that fill the model argument of the same name when the model takes it
# (channels_last too: the batches' memory format decides the model's, and Lightning refuses
# to log two different values of one hyperparameter name)
DATA_TO_MODEL = ("num_classes", "in_features", "in_chans", "channels_last")


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


def _cli_class():
    from lightning.pytorch.cli import LightningCLI

    class SelfnormCLI(LightningCLI):
        """Subclass mode for model and data; the data module's facts fill the model's args."""

        def before_instantiate_classes(self) -> None:
            cfg = self.config.get(self.subcommand) if self.subcommand else self.config
            _link_data_to_model(cfg)
            if cfg.get("ckpt_path") == "last":
                cfg["ckpt_path"] = str(find_last_checkpoint(cfg))

    return SelfnormCLI


def _link_data_to_model(cfg: Any) -> None:
    """Fill model.init_args.num_classes (etc.) from the data module, or fail on a mismatch."""
    from jsonargparse import Namespace
    from lightning.pytorch.cli import instantiate_class

    data_cfg, model_cfg = cfg.get("data"), cfg.get("model")
    if data_cfg is None or model_cfg is None or not hasattr(model_cfg, "class_path"):
        return
    data = instantiate_class((), data_cfg)  # cheap: data modules only read metadata in __init__
    model_cls = _import(model_cfg.class_path)
    params = inspect.signature(model_cls.__init__).parameters
    init_args = model_cfg.get("init_args") or Namespace()
    for name in DATA_TO_MODEL:
        have = getattr(data, name, None)
        if have is None or name not in params:
            continue
        given = init_args.get(name)
        if given not in (None, params[name].default) and given != have:  # a default isn't a choice
            raise UserError(f"model.{name}={given} but the data has {name}={have}; drop "
                            f"model.init_args.{name} (it is taken from the data) or fix the data")
        init_args[name] = have
    model_cfg["init_args"] = init_args


def find_last_checkpoint(cfg: Any) -> Path:
    """The newest ``last.ckpt`` under the run's log root, for ``--ckpt_path last``.

    Lightning looks for "last" only in the new run's own (empty) version folder; resuming means
    the previous run's. The resumed run logs to a new version folder: nothing is overwritten.
    """
    trainer = cfg.get("trainer") or {}
    logger = trainer.get("logger")
    root = None
    if logger is not None and hasattr(logger, "get") and logger.get("init_args"):
        root = logger["init_args"].get("save_dir")
    root = Path(root or trainer.get("default_root_dir") or ".").expanduser()
    found = sorted(root.glob("**/checkpoints/last*.ckpt"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise UserError(f"--ckpt_path last: no last.ckpt under {root.resolve()}; pass the "
                        f"checkpoint's path instead")
    return found[-1]


def _import(class_path: str) -> type:
    import importlib

    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def make_cli(argv: list[str], run: bool = True):
    """Build the LightningCLI for ``argv`` (``run=False``: instantiate only, for tools)."""
    from jsonargparse import ArgumentError
    from lightning.pytorch import LightningDataModule, LightningModule

    argv = expand_configs(list(argv))
    # args= carries sys.argv[1:] with the configs expanded; sys.argv itself stays intact
    # because Lightning's DDP launcher re-runs it for the other ranks.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    try:
        return _cli_class()(
            LightningModule, LightningDataModule, subclass_mode_model=True,
            subclass_mode_data=True, args=argv, run=run, seed_everything_default=0,
            parser_kwargs={"exit_on_error": False},
        )
    except ArgumentError as err:
        msg = " ".join(str(err).split())
        raise UserError(f"bad configuration: {msg}") from None
    except ValueError as err:
        # jsonargparse wraps a class's own UserError (unknown activation, ε ≤ 0, ...) in a
        # ValueError listing every Union subtype; the user needs just the original sentence.
        cause = _user_error_in_chain(err)
        if cause is None:
            raise
        raise cause from None


def _user_error_in_chain(err: BaseException) -> UserError | None:
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, UserError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def cli_main(argv: list[str]) -> int:
    make_cli(argv, run=True)
    return 0
