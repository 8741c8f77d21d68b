"""Which checks run, and running one: skipped, passed or failed, never raising."""
from __future__ import annotations

import argparse
import contextlib
import gc
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from app.errors import UserError
from app.selftest.core import (CHECKS, FAIL, PASS, SKIP, Check, Env, Failed, Result, Skipped,
                               one_line)
from app.selftest.versions import gpu_list


def select(only: str | None, full: bool) -> tuple[list[Check], set[str]]:
    """The checks to run, in their order, and the names the user gave one by one."""
    if only is None:
        return [c for c in CHECKS.values() if full or not c.full], set()
    names = [s.strip() for s in only.split(",") if s.strip()]
    groups = {c.group for c in CHECKS.values()}
    bad = [n for n in names if n not in CHECKS and n not in groups]
    if bad or not names:
        raise UserError(f"--only {only!r} names {', '.join(map(repr, bad)) or 'nothing'}; choose "
                        f"from: {', '.join(CHECKS)} (or a group: "
                        f"{', '.join(sorted(groups - set(CHECKS)))})")
    chosen = {c.name for c in CHECKS.values() if c.name in names or c.group in names}
    return [c for c in CHECKS.values() if c.name in chosen], set(names) & set(CHECKS)


def skip_reason(c: Check, env: Env, named: set[str]) -> str | None:
    if c.gpu and not env.gpus:
        return env.gpu_note
    if c.cpu_only and env.gpus and c.name not in named:
        return f"a GPU is visible: {c.group}-cuda covers it (name {c.name} in --only to run it)"
    if env.deadline is not None and time.monotonic() >= env.deadline:
        return "not started: the --budget was spent"
    return None


def _free_gpu_memory() -> None:
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.empty_cache()  # the next check (or its subprocess) gets the memory


def run_check(c: Check, env: Env, named: set[str]) -> Result:
    reason = skip_reason(c, env, named)
    if reason:
        return Result(c.name, SKIP, 0.0, reason)
    start = time.perf_counter()
    data: dict[str, Any] = {}
    try:
        # whatever a check prints goes to stderr: stdout carries the table or the JSON
        with contextlib.redirect_stdout(sys.stderr):
            detail, data = c.run(env)
        status = PASS
    except Skipped as why:
        status, detail = SKIP, str(why)
    except Failed as err:
        status, detail, data = FAIL, err.detail, err.data
    except Exception as err:  # noqa: BLE001 (one failing check must not stop the others)
        status, detail, data = FAIL, one_line(err), {"traceback": traceback.format_exc()}
    finally:
        _free_gpu_memory()
    return Result(c.name, status, round(time.perf_counter() - start, 2), detail, data)


def make_env(args: argparse.Namespace, scratch: Path) -> Env:
    import warnings

    import torch

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus:
        names = [g["name"] for g in gpu_list()]
        note = ", ".join(f"{names.count(n)}× {n}" for n in dict.fromkeys(names))
    elif torch.version.cuda is None:
        note = "no CUDA GPU: this torch is a CPU build"
    elif caught:
        note = f"no CUDA GPU visible ({str(caught[0].message).strip().splitlines()[0]})"
    elif os.environ.get("CUDA_VISIBLE_DEVICES") is not None:
        note = f"no CUDA GPU visible (CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']!r})"
    else:
        note = "no CUDA GPU visible"
    deadline = time.monotonic() + args.budget if args.budget else None
    return Env(gpus=gpus, gpu_note=note, scratch=scratch, out=args.out, full=args.full,
               deadline=deadline)
