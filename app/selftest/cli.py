"""``python -m app selftest``'s arguments and run: the checks in order, the table or the JSON,
the report after every check, and SIGTERM turned into a report of the checks so far."""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from app.errors import UserError
from app.paths import check_output_folder
from app.selftest.core import CHECKS, FAIL, Result, Stopped
from app.selftest.report import (REPORT_MD, ROW, machine, print_row, report, rerun_hint, summary,
                                 write_report)
from app.selftest.runner import make_env, run_check, select


def _on_sigterm(signum: int, frame: object) -> None:
    raise Stopped(signal.Signals(signum).name)


def _parser() -> argparse.ArgumentParser:
    names = "\n".join(f"  {c.name:<14} {c.help}" + (" (--full)" if c.full else "")
                      for c in CHECKS.values())
    doc = sys.modules[__package__].__doc__  # the package's docstring is the --help text
    p = argparse.ArgumentParser(prog="python -m app selftest", description=doc,
                                epilog=f"checks:\n{names}",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true",
                   help="also the CUDA test suite and the full benchmarks (about 8 minutes on "
                        "one H200)")
    p.add_argument("--only", metavar="NAME[,NAME]",
                   help="run only these checks or groups (op, loader, ddp, kernels, train, "
                        "full); with --out, merged into the report there")
    p.add_argument("--out", type=Path, metavar="DIR",
                   help="write report.md, report.json and the full runs' outputs here")
    p.add_argument("--json", action="store_true", help="print one JSON object, not the table")
    p.add_argument("--budget", type=float, metavar="SECONDS",
                   help="checks not started after this many seconds are skipped, and the full "
                        "runs stop at it")
    return p


@contextlib.contextmanager
def _sigterm_stops() -> Iterator[None]:
    """SIGTERM raises Stopped here, so the check in progress stops its processes and the report
    is written, instead of Python dying on the spot with its subprocesses left running."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _scratch() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="selfnorm-selftest-") as tmp:
        yield Path(tmp)


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    checks, named = select(args.only, args.full)
    if args.budget is not None and args.budget <= 0:
        raise UserError(f"--budget {args.budget:g} must be a positive number of seconds")
    if args.out is not None:
        check_output_folder(args.out, "--out")
        try:
            args.out.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UserError(f"cannot create --out {args.out} ({err.strerror or err}); choose a "
                            f"writable folder") from None
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    t0 = time.perf_counter()
    stopped = None
    with _scratch() as scratch, _sigterm_stops():
        env = make_env(args, scratch)
        if not args.json:
            print(f"selftest: {machine(env)}")
            print(ROW.format("check", "status", "seconds", "detail"), flush=True)
        results: list[Result] = []
        for c in checks:
            begun = time.perf_counter()
            try:
                results.append(run_check(c, env, named))
            except Stopped as sig:
                stopped = sig
                results.append(Result(c.name, FAIL, round(time.perf_counter() - begun, 2),
                                      f"stopped by {sig} while running"))
            if not args.json:
                print_row(results[-1])
            if args.out is not None:  # after every check: a run stopped later keeps these
                write_report(args.out, report(results, env, started, time.perf_counter() - t0),
                             merge=args.only is not None)
            if stopped:
                break
    seconds = time.perf_counter() - t0
    if args.json:
        print(json.dumps(report(results, env, started, seconds), default=str))
    else:
        print(summary(results, env, seconds))
        hint = rerun_hint(results, args)
        if hint:
            print(hint)
        if args.out is not None:
            print(f"report: {args.out / REPORT_MD}")
    if stopped:
        return 128 + signal.SIGTERM
    return 1 if any(r.status == FAIL for r in results) else 0
