"""``python -m app table CONFIG ... --out DIR``: configs × seeds (× an LR grid) → a paper table.

Each run is one subprocess, ``python -m app fit --config C --seed_everything S --run NAME
--ckpt_path last --trainer.default_root_dir DIR [--model.init_args.lr LR] [overrides]``, so a run
folder ``DIR/lightning_logs/NAME/`` holds its checkpoints and ``summary.json``, and a stopped
sweep continues where it was: a run whose summary.json shows its full budget is not run again,
and an interrupted one resumes from its ``last.ckpt``. A run that diverges (exit 3) is recorded
and not retried: runs are reproducible, it would diverge again.

With ``--lrs``, each config first runs ``--sweep-seeds`` at every LR on a held-out share of the
train split (``source_options.holdout``, see ``data.sources.folder``), takes the LR with the best
mean held-out top-1, then runs ``--seeds`` with it on the official val set. The table reports the
mean ± the 95% confidence interval of Student's t over the seeds, as the paper's Tables 1 and 2.
"""
from __future__ import annotations

import argparse
import inspect
import json
import math
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from app.cli import LOGS, load_config, resolve_config
from app.errors import UserError
from app.paths import check_output_folder

EXIT_DIVERGED = 3
# set by the table for every run (an override would break resuming), and what to use instead
OWN_FLAGS = {"--config": "pass the configs as positional arguments",
             "--seed_everything": "the seeds are --seeds (and --sweep-seeds)",
             "--run": "the table names each run after its config, LR and seed",
             "--ckpt_path": "the table resumes each run from its own last.ckpt",
             "--trainer.default_root_dir": "the results folder is --out"}
SOURCE_OPTIONS = "--data.init_args.source_options"


@dataclass
class Row:
    """One line of the table: a config and what its runs reached."""

    label: str
    config: str
    budget: tuple[str, int] | None      # ("epochs", n) or ("steps", n): a finished run's
    lr: float | None = None             # the LR chosen on the holdout (None without --lrs)
    # lr -> held-out metric per finished sweep seed, and the reported metric per finished seed
    # (None: diverged); runs that have not finished yet (--collect) are left out
    sweep: dict[str, list[float | None]] = field(default_factory=dict)
    values: list[float | None] = field(default_factory=list)
    sweep_complete: bool = True
    images_per_s: list[float] = field(default_factory=list)  # train throughput of each seed
    config_lr: float | None = None      # the config's LR (or its override), used without --lrs


@dataclass
class Run:
    name: str
    config: str
    seed: int
    lr: float | None
    holdout: bool
    status: str = "pending"             # done, diverged
    metric: float | None = None
    summary: dict[str, Any] | None = None


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float | None]:
    """Mean and the half-width of its Student-t confidence interval (None for one value)."""
    from scipy import stats

    n = len(values)
    if n == 0:
        raise ValueError("mean_ci needs at least one value")
    mean = sum(values) / n
    if n == 1:
        return mean, None
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)


def format_cell(values: Sequence[float | None]) -> str:
    """``61.23% ± 1.20%`` over the finished values; diverged ones are counted beside it."""
    done = [v for v in values if v is not None]
    lost = len(values) - len(done)
    if not done:
        return f"diverged ({lost}/{lost})" if lost else "—"
    mean, half = mean_ci([100 * v for v in done])
    text = f"{mean:.2f}%" + ("" if half is None else f" ± {half:.2f}%")
    return text + (f" ({lost} of {len(values)} diverged)" if lost else "")


def markdown(rows: Sequence[Row], title: str, metric: str, holdout: float | None) -> str:
    """The paper-style table: method, LR, val top-1 (mean ± 95% CI), n, and the LR sweep."""
    swept = any(r.sweep for r in rows)
    head = ["Method", "lr", "val top-1 (95% CI)", "n", "img/s"] + (
        [f"held-out top-1 by lr ({round(100 * holdout)}% of train)"] if swept else [])
    lines = [f"**{title}**", "", "| " + " | ".join(head) + " |",
             "|" + "---|" * len(head)]
    for r in rows:
        lr = ("—" if r.config_lr is None else f"{r.config_lr:g}") if r.lr is None else (
            f"{r.lr:g}" + ("" if r.sweep_complete else " (so far)"))
        speed = f"{sum(r.images_per_s) / len(r.images_per_s):,.0f}" if r.images_per_s else "—"
        cells = [r.label, lr, format_cell(r.values), str(sum(v is not None for v in r.values)),
                 speed]
        if swept:
            cells.append(", ".join(
                (f"**{lr}: {format_cell(v)}**" if r.lr is not None and float(lr) == r.lr
                 else f"{lr}: {format_cell(v)}") for lr, v in r.sweep.items()))
        lines.append("| " + " | ".join(cells) + " |")
    which = "final-epoch" if metric == "final" else "best-epoch"
    lines += ["", f"{which} val/top1; ± is the 95% confidence interval of Student's t over "
                  f"the n seeds (none for n = 1); img/s: mean training throughput."]
    return "\n".join(lines) + "\n"


# ---- runs ---------------------------------------------------------------------------------------

def _take_flag(args: Sequence[str], flag: str) -> tuple[list[str], list[str]]:
    """The values given to ``flag`` (as ``flag value`` or ``flag=value``), in order, and the
    other arguments."""
    values, rest, i = [], [], 0
    while i < len(args):
        if args[i] == flag and i + 1 < len(args):
            values.append(args[i + 1])
            i += 2
            continue
        if args[i].startswith(flag + "="):
            values.append(args[i].split("=", 1)[1])
        else:
            rest.append(args[i])
        i += 1
    return values, rest


def _flag_value(args: Sequence[str], flag: str) -> str | None:
    """The value ``flag`` is given last (the one that wins), None if it is not given."""
    values, _ = _take_flag(args, flag)
    return values[-1] if values else None


def budget(cfg: dict, overrides: Sequence[str]) -> tuple[str, int] | None:
    """What a finished run has done: max_steps when set, else max_epochs (None: unknown)."""
    trainer = cfg.get("trainer") or {}
    steps = _whole(_flag_value(overrides, "--trainer.max_steps") or trainer.get("max_steps"),
                   "trainer.max_steps")
    if steps is not None and steps > 0:
        return ("steps", steps)
    epochs = _whole(_flag_value(overrides, "--trainer.max_epochs") or trainer.get("max_epochs"),
                    "trainer.max_epochs")
    return ("epochs", epochs) if epochs is not None and epochs > 0 else None


def _whole(value: Any, what: str) -> int | None:
    if value is None:
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise UserError(f"{what} {value!r} must be a whole number, e.g. 24") from None


def run_name(config: str, seed: int, lr: float | None, holdout: bool) -> str:
    stem = Path(config).name.removesuffix(".yaml")
    return stem + (f"-lr{lr:g}" if lr is not None else "") + f"-s{seed}" + (
        "-holdout" if holdout else "")


def row_label(path: Path) -> str:
    """The config's first line ``# Table …: <label>`` gives the label, else the file name."""
    first = (path.read_text().splitlines() or [""])[0]
    if first.startswith("# Table") and ": " in first:
        return first.split(": ", 1)[1].strip()
    return path.stem


class Sweep:
    """Runs (or finds) each run of the table, one subprocess at a time."""

    def __init__(self, out: Path, fit_command: list[str], overrides: list[str], metric: str,
                 holdout: float, collect_only: bool) -> None:
        self.out, self.fit_command, self.overrides = out, fit_command, overrides
        self.metric, self.holdout, self.collect_only = metric, holdout, collect_only
        self.runs: list[Run] = []
        self.launched = 0
        self.user_source_options = False  # given on the command line: passed to every run

    def folder(self, name: str) -> Path:
        return self.out / LOGS / name

    def _status_file(self, name: str) -> Path:
        return self.out / "status" / f"{name}.json"

    def result(self, row: Row, run: Run, source_options: dict) -> Run:
        """The run's outcome, running (or resuming) it first unless it is finished."""
        self.runs.append(run)
        if self._read(row, run) or self.collect_only:
            return run
        argv = [*self.fit_command, "--config", run.config, "--seed_everything", str(run.seed),
                "--run", run.name, "--ckpt_path", "last",
                "--trainer.default_root_dir", str(self.out)]
        if run.lr is not None:
            argv += ["--model.init_args.lr", repr(run.lr)]
        if run.holdout:
            argv += [SOURCE_OPTIONS, json.dumps({**source_options, "holdout": self.holdout})]
        elif self.user_source_options:
            argv += [SOURCE_OPTIONS, json.dumps(source_options)]
        argv += self.overrides
        log = self.out / "logs" / f"{run.name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        print(f"[run {len(self.runs)}] {run.name}: started, log {log}", flush=True)
        start = time.monotonic()
        with open(log, "ab") as fh:
            try:
                proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT)
            except OSError as err:
                raise UserError(f"cannot start the training command {argv[0]!r} "
                                f"({err.strerror or err}); fix --fit-command") from None
            # a scheduler's SIGTERM to the table goes on to the run, which saves last.ckpt
            # and exits 128 + 15; the table then stops with that code
            previous = signal.signal(signal.SIGTERM, lambda signum, _: proc.send_signal(signum))
            try:
                rc = proc.wait()
            except KeyboardInterrupt:  # Ctrl-C: stop the run as a preemption, saving last.ckpt
                proc.send_signal(signal.SIGTERM)
                rc = proc.wait()
            finally:
                signal.signal(signal.SIGTERM, previous)
        if rc < 0:  # killed by a signal before it could handle it (e.g. the OOM killer)
            rc = 128 - rc
        self.launched += 1
        if rc == EXIT_DIVERGED:
            self._status_file(run.name).parent.mkdir(parents=True, exist_ok=True)
            self._status_file(run.name).write_text(json.dumps(
                {"status": "diverged", "exit_code": rc, "message": _last_line(log)}) + "\n")
        elif rc != 0:
            raise RunFailed(run.name, rc, log)
        if not self._read(row, run):
            raise UserError(f"run {run.name} ended without a summary.json covering its "
                            f"{_budget_text(row.budget)}; see {log}")
        print(f"[run {len(self.runs)}] {run.name}: {_outcome(run)} in "
              f"{time.monotonic() - start:.0f} s", flush=True)
        return run

    def _read(self, row: Row, run: Run) -> bool:
        """Fill in a finished (or diverged) run's outcome; False if it has to run."""
        if self._status_file(run.name).is_file():
            run.status = "diverged"
            return True
        path = self.folder(run.name) / "summary.json"
        if not path.is_file():
            return False
        summary = json.loads(path.read_text())
        if not _covers(summary, row.budget):
            return False
        run.status, run.summary = "done", summary
        final = (summary.get("final_metrics") or {}).get("val/top1")
        run.metric = final if self.metric == "final" else summary.get("best_val_top1")
        return True


class RunFailed(Exception):
    def __init__(self, name: str, code: int, log: Path) -> None:
        super().__init__(
            f"run {name} stopped (exit code {code}); rerun the same command to resume it"
            if code >= 128 else
            f"run {name} failed with exit code {code}: {_last_line(log)} (log: {log}); fix it "
            f"and rerun the same command to continue")
        self.code = code


def _covers(summary: dict, want: tuple[str, int] | None) -> bool:
    if want is None:
        return True
    kind, n = want
    return (summary.get("global_step") or 0) >= n if kind == "steps" \
        else (summary.get("epochs") or 0) >= n


def _budget_text(want: tuple[str, int] | None) -> str:
    return "budget" if want is None else f"{want[1]} {want[0]}"


def _outcome(run: Run) -> str:
    if run.status == "diverged":
        return "diverged"
    return "no val/top1" if run.metric is None else f"val top-1 {100 * run.metric:.2f}%"


def _last_line(log: Path) -> str:
    lines = [l.strip() for l in log.read_text(errors="replace").splitlines() if l.strip()]
    return lines[-1][:300] if lines else "(empty log)"


# ---- the command --------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m app table", allow_abbrev=False,
        description="Train configs × seeds (× an LR grid) one subprocess at a time, resumably, "
                    "and print a Markdown table of val top-1 (mean ± 95% CI, Student t). "
                    "Options this tool does not know (e.g. --trainer.max_epochs 12, "
                    "--data.init_args.root DIR) go to every run.")
    p.add_argument("configs", nargs="+", metavar="[LABEL=]CONFIG",
                   help="configs (paths or shipped names), one table row each; the label "
                        "defaults to the config's first line '# Table …: <label>'")
    p.add_argument("--out", type=Path, required=True,
                   help="results folder: run folders, logs, table.md and table.json")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1],
                   help="seeds of the reported runs (default 0 1)")
    p.add_argument("--lrs", type=float, nargs="+", default=None,
                   help="LR grid; each config's LR is chosen on the held-out share")
    p.add_argument("--sweep-seeds", type=int, nargs="+", default=None,
                   help="seeds of the LR sweep (default: the first of --seeds)")
    p.add_argument("--holdout", type=float, default=0.1,
                   help="share of each class of the train split held out for the LR sweep "
                        "(default 0.1)")
    p.add_argument("--metric", choices=("final", "best"), default="final",
                   help="final-epoch val top-1 (default) or the best epoch's")
    p.add_argument("--title", default=None, help="table title (default: the results folder)")
    p.add_argument("--collect", action="store_true",
                   help="launch nothing: tabulate the runs that have finished")
    p.add_argument("--fit-command", default=None,
                   help=f"the training command (default: '{sys.executable} -m app fit')")
    return p


def _rows(specs: Sequence[str], overrides: Sequence[str], user_options: dict
          ) -> list[tuple[Row, dict]]:
    """One row per config: its label, budget and LR, and its source with the source options
    (the config's, updated by the command line's)."""
    rows, stems = [], {}
    for spec in specs:
        label, _, config = spec.rpartition("=")
        path = resolve_config(config)
        stem = path.name.removesuffix(".yaml")
        if stem in stems:  # run folders are named after the stem
            raise UserError(f"configs {stems[stem]} and {config} share the name {stem!r}, which "
                            f"names their runs; copy one under another name")
        stems[stem] = config
        cfg = load_config(path)
        data = ((cfg.get("data") or {}).get("init_args") or {})
        lr = _flag_value(overrides, "--model.init_args.lr") or (
            ((cfg.get("model") or {}).get("init_args") or {}).get("lr"))
        row = Row(label or row_label(path), config, budget(cfg, overrides),
                  config_lr=None if lr is None else float(lr))
        source = _flag_value(overrides, "--data.init_args.source") or data.get("source")
        paths = [k for k in ("train_path", "val_path")
                 if (_flag_value(overrides, f"--data.init_args.{k}") or data.get(k))
                 not in (None, "null", "None")]
        rows.append((row, {"source": source, "fixed_paths": paths,
                           "options": {**(data.get("source_options") or {}), **user_options}}))
    return rows


def _check_sweepable(row: Row, info: dict) -> None:
    """The LR sweep reads a held-out share of the train split: refuse what would read the
    official val set instead."""
    if info["source"] in (None, "null", "None"):
        raise UserError(f"config {row.config} reads fixed .beton files; the LR sweep needs "
                        f"data.source (tiny-imagenet or imagefolder) for its holdout")
    from data.sources import get_source

    if "holdout" not in inspect.signature(get_source(str(info["source"]))).parameters:
        raise UserError(f"source {info['source']!r} of {row.config} has no holdout option; the "
                        f"LR sweep needs tiny-imagenet or imagefolder, or drop --lrs")
    if info["fixed_paths"]:
        raise UserError(f"{row.config} sets data.{info['fixed_paths'][0]}, which would be read "
                        f"instead of the held-out split; drop it for the LR sweep (the table's "
                        f"runs prepare their own .beton files)")


def _check(args: argparse.Namespace, overrides: list[str]) -> None:
    own = {**OWN_FLAGS, **({"--model.init_args.lr": "the LR grid is --lrs"} if args.lrs else {})}
    for flag, instead in own.items():
        if any(a == flag or a.startswith(flag + "=") for a in overrides):
            raise UserError(f"{flag} is set by the table for each run; drop it ({instead})")
    if not 0 < args.holdout < 1:
        raise UserError(f"--holdout {args.holdout:g} must be a fraction in (0, 1), e.g. 0.1")
    if args.lrs and any(lr <= 0 for lr in args.lrs):
        raise UserError(f"--lrs {' '.join(map(str, args.lrs))}: every LR must be positive")
    for flag, seeds in (("--seeds", args.seeds), ("--sweep-seeds", args.sweep_seeds or [])):
        if len(set(seeds)) != len(seeds):  # a seed twice would count one run twice
            raise UserError(f"{flag} {' '.join(map(str, seeds))} repeats a seed; give each once")


def _pop_source_options(overrides: list[str]) -> tuple[list[str], dict]:
    """The command line's source options (merged into each run's, so that the holdout is kept
    beside them) and the other overrides."""
    given, rest = _take_flag(overrides, SOURCE_OPTIONS)
    options: dict = {}
    for text in given:
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = None
        if not isinstance(value, dict):
            raise UserError(f"{SOURCE_OPTIONS} {text!r} must be a mapping, e.g. "
                            f"'{{holdout_seed: 1}}'")
        options.update(value)
    return rest, options


def _check_folder(out: Path, overrides: list[str], args: argparse.Namespace) -> None:
    """A results folder holds runs of one set of options: refuse to mix in others."""
    check_output_folder(out, "--out")
    previous = out / "table.json"
    if not previous.is_file():
        return
    try:
        before = json.loads(previous.read_text())
    except (OSError, ValueError):
        return  # unreadable: rewritten at the end; the run folders decide what is done
    said = {"overrides": overrides, "holdout": args.holdout if args.lrs else None}
    for key, now in said.items():
        was = before.get(key)
        if key in before and was is not None and now is not None and was != now:
            raise UserError(f"{out} holds runs made with {key} {was!r}, this command gives "
                            f"{now!r}; give the same options, or a new --out")


def main(argv: list[str]) -> int:
    args, overrides = _parser().parse_known_args(argv)
    _check(args, overrides)
    run_overrides, user_options = _pop_source_options(overrides)
    rows = _rows(args.configs, run_overrides, user_options)
    if args.lrs:
        for row, info in rows:
            _check_sweepable(row, info)
            row.config_lr = None  # the sweep chooses it
    try:
        fit = (shlex.split(args.fit_command) if args.fit_command
               else [sys.executable, "-m", "app", "fit"])
    except ValueError as err:
        raise UserError(f"--fit-command {args.fit_command!r}: {err}; fix its quoting") from None
    if not fit:
        raise UserError("--fit-command is empty; give the training command, e.g. "
                        "'python -m app fit'")
    out = args.out.expanduser().resolve()
    _check_folder(out, overrides, args)
    out.mkdir(parents=True, exist_ok=True)
    sweep = Sweep(out, fit, run_overrides, args.metric, args.holdout, args.collect)
    sweep.user_source_options = bool(user_options)
    sweep_seeds = args.sweep_seeds or args.seeds[:1]
    try:
        for row, info in rows:
            options = info["options"]
            if args.lrs:
                for lr in args.lrs:
                    runs = [sweep.result(row, Run(run_name(row.config, s, lr, True), row.config,
                                                  s, lr, True), options) for s in sweep_seeds]
                    row.sweep[f"{lr:g}"] = _outcomes(runs)
                    row.sweep_complete &= len(row.sweep[f"{lr:g}"]) == len(runs)
                row.lr = _choose(row.sweep)
                if row.lr is None or not row.sweep_complete:
                    continue  # every LR diverged, or (--collect) the sweep is not finished
            runs = [sweep.result(row, Run(run_name(row.config, s, row.lr, False), row.config, s,
                                          row.lr, False), options) for s in args.seeds]
            row.values = _outcomes(runs)
            row.images_per_s = [r.summary["images_per_s"] for r in runs
                                if r.summary and r.summary.get("images_per_s")]
    except RunFailed as err:
        _write(out, rows, sweep, args, overrides)
        print(f"error: {err}", file=sys.stderr)
        return err.code
    text = _write(out, rows, sweep, args, overrides)
    print(text, end="")
    print(f"wrote {out / 'table.md'} and {out / 'table.json'} ({sweep.launched} runs launched, "
          f"{len(sweep.runs)} in the table)")
    return 0


def _outcomes(runs: Sequence[Run]) -> list[float | None]:
    """The metric of each finished run, None for each diverged one; runs that have not finished,
    or finished without validating, are left out."""
    return [run.metric if run.status == "done" else None for run in runs
            if run.status == "diverged" or run.metric is not None]


def _choose(sweep: dict[str, list[float | None]]) -> float | None:
    """The LR with the best mean held-out metric; an LR with a diverged seed is out."""
    scores = {lr: sum(v) / len(v) for lr, v in sweep.items()
              if v and all(x is not None for x in v)}
    return float(max(scores, key=scores.get)) if scores else None


def _write(out: Path, rows: list[tuple[Row, dict]], sweep: Sweep, args: argparse.Namespace,
           overrides: list[str]) -> str:
    plain = [r for r, _ in rows]
    text = markdown(plain, args.title or out.name, args.metric,
                    args.holdout if args.lrs else None)
    (out / "table.md").write_text(text)
    (out / "table.json").write_text(json.dumps(
        {"title": args.title or out.name, "metric": args.metric, "seeds": args.seeds,
         "lrs": args.lrs, "holdout": args.holdout if args.lrs else None,
         "overrides": overrides,
         "rows": [asdict(r) for r in plain],
         "runs": [{**asdict(run), "folder": str(sweep.folder(run.name))}
                  for run in sweep.runs]}, indent=1) + "\n")
    return text
