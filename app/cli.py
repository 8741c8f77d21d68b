"""The LightningCLI behind ``python -m app fit|validate|test|predict``.

Configs compose: a YAML file may list ``base:`` files (paths relative to itself), merged first,
so shared settings live once (configs/base/*.yaml). A bare config name such as
``imagenet_sselu.yaml`` resolves to the shipped ``configs/`` from any directory.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import yaml

from app.errors import USER_ERRORS, UserError

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

        def add_arguments_to_parser(self, parser) -> None:
            for name in DATA_TO_MODEL:
                parser.link_arguments(f"data.{name}", f"model.init_args.{name}",
                                      apply_on="instantiate")

        def _parse_ckpt_path(self) -> None:
            # LightningCLI would replace the model options of the config and the command line
            # with the checkpoint's, silently; the given options stand.
            return

        def before_instantiate_classes(self) -> None:
            cfg = self.config.get(self.subcommand) if self.subcommand else self.config
            _refuse_linked_values(cfg)
            if cfg.get("ckpt_path") == "last":
                cfg["ckpt_path"] = str(find_last_checkpoint(cfg))

    return SelfnormCLI


def _refuse_linked_values(cfg: Any) -> None:
    """A value given for an argument the data fills in would be silently replaced: refuse it."""
    init_args = (cfg.get("model") or {}).get("init_args") or {}
    for name in DATA_TO_MODEL:
        if init_args.get(name) is not None:
            raise UserError(f"model.init_args.{name} is taken from the data module "
                            f"(data.{name}); drop it from the config and the command line")


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
    make_cli(argv, run=True)
    return 0
