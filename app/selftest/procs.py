"""Work in fresh processes: spawned Python functions (a DDP rank, the GPU loader) and commands
(the full runs), each stopped with all it started when it outlives its time."""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import signal
import subprocess
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from app.selftest.core import ROOT, Failed, one_line


def _child(target: Callable[[int, dict], dict], rank: int, payload: dict, path: str) -> None:
    """Entry of a spawned process: ``target``'s result, or its error, as JSON in ``path``."""
    os.dup2(2, 1)  # the parent's stdout carries the table or the JSON: child output goes to stderr
    try:
        result = target(rank, payload)
    except BaseException as err:  # noqa: BLE001 (the parent reports what went wrong here)
        result = {"error": one_line(err), "traceback": traceback.format_exc()}
    Path(path).write_text(json.dumps(result))


def spawn(target: Callable[[int, dict], dict], payloads: list[dict], folder: Path,
          timeout: float) -> list[dict]:
    """``target(rank, payload)`` in one fresh process per payload (spawned: no CUDA state or
    threads of this process are inherited), all at once; their results. Raises Failed when one
    raised, died or outlived ``timeout`` (then all are stopped)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    paths = [folder / f"result-{os.getpid()}-{time.monotonic_ns()}-{r}.json"
             for r in range(len(payloads))]
    procs = [ctx.Process(target=_child, args=(target, r, p, str(paths[r])), daemon=True)
             for r, p in enumerate(payloads)]
    try:
        for proc in procs:
            proc.start()
        deadline = time.monotonic() + timeout
        for proc in procs:
            proc.join(max(0.0, deadline - time.monotonic()))
        late = [r for r, proc in enumerate(procs) if proc.is_alive()]
    finally:  # also when this process is stopped: no rank outlives the check
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
                if proc.is_alive():
                    proc.kill()
                    proc.join()
    if late:
        raise Failed(f"rank(s) {', '.join(map(str, late))} still running after {timeout:.0f} s; "
                     f"stopped")
    results = []
    for r, (proc, path) in enumerate(zip(procs, paths)):
        if not path.is_file():
            raise Failed(f"rank {r} exited with code {proc.exitcode} without a result")
        result = json.loads(path.read_text())
        path.unlink()
        if "error" in result:
            raise Failed(f"rank {r}: {result['error']}", {"traceback": result.get("traceback")})
        results.append(result)
    return results


def run_command(argv: list[str], log: Path, timeout: float,
                header: str | None = None) -> tuple[int | None, str]:
    """Run ``argv`` from the checkout with its output appended to ``log``; (exit code or None
    when stopped at ``timeout``, this run's output). Its whole process group is stopped at the
    timeout, so no worker it started outlives it."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log, "a") as f:
        if header:
            f.write(f"\n==== {header} ({datetime.datetime.now():%Y-%m-%d %H:%M:%S}): "
                    f"{' '.join(argv)}\n")
            f.flush()
        start = f.tell()
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        code: int | None = None
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        finally:  # at the timeout, and when this process is stopped
            if proc.poll() is None:
                _stop_group(proc)
    with open(log) as f:
        f.seek(start)
        return code, f.read()


def _stop_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue
