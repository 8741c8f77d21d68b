"""The report: the table's rows and summary, the JSON, the Markdown, and its merge on a rerun."""
from __future__ import annotations

import argparse
import json
import os
import platform
from dataclasses import asdict
from pathlib import Path
from typing import Any

from app.selftest.core import CHECKS, FAIL, PASS, SKIP, Env, Result

REPORT_JSON, REPORT_MD = "report.json", "report.md"


def machine(env: Env) -> str:
    import torch

    return (f"torch {torch.__version__} on {platform.node() or 'this host'}: {os.cpu_count()} CPU "
            f"cores, {env.gpu_note}")


def report(results: list[Result], env: Env, started: str, seconds: float) -> dict[str, Any]:
    counts = {s: sum(r.status == s for r in results) for s in (PASS, FAIL, SKIP)}
    return {"selftest": "selfnorm", "started": started, "seconds": round(seconds, 1),
            "machine": machine(env), "gpus": env.gpus, "full": env.full,
            "passed": counts[FAIL] == 0, "counts": counts,
            "checks": [asdict(r) for r in results]}


def merged(previous: Path, current: dict[str, Any]) -> dict[str, Any]:
    """``current``'s checks in place of those of the same names in the report at ``previous``,
    the others kept (marked with the run they come from), so a rerun with --only completes it."""
    try:
        old = json.loads(previous.read_text())
        old_checks = list(old["checks"])
    except (OSError, ValueError, KeyError, TypeError):
        return current
    new = {c["name"]: c for c in current["checks"]}
    checks = []
    for c in old_checks:
        if c.get("name") in new:
            checks.append(new.pop(c["name"]))
        else:
            checks.append({**c, "from_run": c.get("from_run", old.get("started"))})
    checks += new.values()
    counts = {s: sum(c.get("status") == s for c in checks) for s in (PASS, FAIL, SKIP)}
    return {**current, "checks": checks, "counts": counts, "passed": counts[FAIL] == 0}


def markdown(rep: dict[str, Any]) -> str:
    lines = [f"# selftest, {rep['started']}", "", rep["machine"] + ".", "",
             f"{rep['counts'][PASS]} passed, {rep['counts'][FAIL]} failed, "
             f"{rep['counts'][SKIP]} skipped{' (with --full)' if rep['full'] else ''}.", "",
             "| check | status | seconds | detail |", "|---|---|---|---|"]
    for c in rep["checks"]:
        detail = c["detail"].replace("|", "\\|")
        if c.get("from_run"):
            detail += f" *(from the run of {c['from_run']})*"
        lines.append(f"| {c['name']} | {c['status']} | {c['seconds']:.1f} | {detail} |")
    lines += ["", "## Data", ""]
    for c in rep["checks"]:
        if c.get("data"):
            lines += [f"### {c['name']}", "", "```json", json.dumps(c["data"], indent=1,
                                                                     default=str), "```", ""]
    return "\n".join(lines)


def write_report(out: Path, rep: dict[str, Any], merge: bool) -> None:
    if merge:
        rep = merged(out / REPORT_JSON, rep)
    for name, text in ((REPORT_JSON, json.dumps(rep, indent=1, default=str)),
                       (REPORT_MD, markdown(rep))):
        tmp = out / f".{name}.partial"
        tmp.write_text(text)
        tmp.replace(out / name)  # a run stopped mid-write leaves the previous report whole


ROW = "{:<14} {:<6} {:>8}  {}"


def print_row(r: Result) -> None:
    print(ROW.format(r.name, r.status, f"{r.seconds:.1f}", r.detail), flush=True)


def summary(results: list[Result], env: Env, seconds: float) -> str:
    counts = {s: sum(r.status == s for r in results) for s in (PASS, FAIL, SKIP)}
    line = (f"{counts[PASS]} passed, {counts[FAIL]} failed, {counts[SKIP]} skipped in "
            f"{seconds:.1f} s")
    if not env.gpus and any(CHECKS[r.name].gpu for r in results):
        line += f"; GPU checks skipped: {env.gpu_note}"
    return line


def rerun_hint(results: list[Result], args: argparse.Namespace) -> str | None:
    failed = [r.name for r in results if r.status == FAIL]
    if not failed:
        return None
    extra = (" --full" if args.full else "") + (f" --out {args.out}" if args.out else "")
    return f"rerun the failed checks: python -m app selftest{extra} --only {','.join(failed)}"
