"""``--full``: the CUDA test suite and the full benchmarks, each in its own process, their
outputs in ``--out``."""
from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path
from typing import Any

from app.selftest.core import ROOT, Env, Failed, check
from app.selftest.procs import run_command

# Seconds each full run may take; they run in this order, the train benchmark (torch.compile of
# two models) last, so that a short --budget cuts the longest one.
FULL_TIMEOUTS = {"pytest-cuda": 240, "bench-kernels": 180, "bench-loader": 150,
                 "bench-train": 300}


def _app(*args: str) -> list[str]:
    return [sys.executable, "-m", "app", *args]


def _finished(name: str, code: int | None, output: str, timeout: float, log: Path) -> None:
    if code is None:
        raise Failed(f"stopped after {timeout:.0f} s (see {log.name})")
    if code != 0:
        tail = [line for line in output.strip().splitlines() if line.strip()][-1:] or [""]
        raise Failed(f"{name} exited with code {code}: {tail[0][:200]} (see {log.name})")


PYTEST_COUNT = re.compile(r"(\d+) (passed|failed|skipped|deselected|xfailed|xpassed|errors?)\b")


def pytest_counts(output: str) -> dict[str, int]:
    """The counts of pytest's last summary line ("3 failed, 70 passed, 6 skipped in 80.1s")."""
    for line in reversed(output.strip().splitlines()):
        found = PYTEST_COUNT.findall(line)
        if found and " in " in line:
            counts = {kind if kind != "error" else "errors": int(n) for n, kind in found}
            return counts
    return {}


@check("pytest-cuda", "the CUDA test suite: python -m pytest -m cuda tests/", gpu=True, full=True)
def check_pytest_cuda(env: Env) -> tuple[str, dict[str, Any]]:
    tests = ROOT / "tests"
    if not tests.is_dir():
        raise Failed(f"no tests/ folder in {ROOT} (an installed copy, not a checkout)")
    if importlib.util.find_spec("pytest") is None:
        raise Failed("pytest is not installed; pip install -e '.[dev]'")
    log = env.file("pytest-cuda.log")
    log.unlink(missing_ok=True)
    timeout = env.timeout(FULL_TIMEOUTS["pytest-cuda"])
    # tests/test_selftest.py's GPU test repeats the GPU checks that this run has just done
    code, output = run_command([sys.executable, "-m", "pytest", "-m", "cuda", str(tests), "-q",
                                "-rfE", "-p", "no:cacheprovider",
                                f"--ignore={tests / 'test_selftest.py'}"], log, timeout)
    counts = pytest_counts(output)
    data = {"exit_code": code, "counts": counts, "log": str(log)}
    summary = ", ".join(f"{n} {kind}" for kind, n in counts.items()) or "no summary line"
    if code is None:
        raise Failed(f"stopped after {timeout:.0f} s ({summary} so far; see {log.name})", data)
    if code != 0 or counts.get("failed") or counts.get("errors"):
        failed = [ln.split(" ", 2)[1] for ln in output.splitlines()
                  if ln.startswith(("FAILED ", "ERROR "))]
        data["failed"] = failed
        raise Failed(f"exit code {code}: {summary}; first: {failed[0] if failed else '-'} "
                     f"(see {log.name})", data)
    return f"{summary} (log: {log.name})", data


def _json_line(line: str) -> dict | None:
    """The object a benchmark printed on ``line``, or None for its other output."""
    if not line.startswith("{"):
        return None
    try:
        found = json.loads(line)
    except ValueError:
        return None
    return found if isinstance(found, dict) else None


def _bench_device(env: Env) -> str:
    return "cuda" if env.gpus else "cpu"


@check("bench-kernels", "python -m app bench kernels (the paper's shape on a GPU)", full=True)
def check_bench_kernels(env: Env) -> tuple[str, dict[str, Any]]:
    log, timeout = env.file("bench.log"), env.timeout(FULL_TIMEOUTS["bench-kernels"])
    code, output = run_command(_app("bench", "kernels", "--json", "--device", _bench_device(env)),
                               log, timeout, header="bench kernels")
    _finished("bench kernels", code, output, timeout, log)
    reports = [r for r in map(_json_line, output.splitlines()) if r and "dtype" in r]
    if not reports:
        raise Failed(f"bench kernels printed no report (see {log.name})")
    env.file("bench-kernels.json").write_text(json.dumps(reports, indent=2))
    parts = []
    for r in reports:
        fwd = r["results"]["selu_family, fixed λ"]["forward"]
        fb = r["ratios"]["trainable_fwd_bwd_vs_selu"]
        parts.append(f"{r['dtype']} forward {fwd['pct_copy']:.0f}% of copy "
                     f"({r['copy_GBps']:,.0f} GB/s), trainable fwd+bwd {fb:.3f}× F.selu")
    shape = reports[0]["shape"]
    return f"{shape}: " + "; ".join(parts) + " (bench-kernels.json)", {"reports": reports}


@check("bench-loader", "python -m app bench loader (FFCV vs torchvision)", full=True)
def check_bench_loader(env: Env) -> tuple[str, dict[str, Any]]:
    log, timeout = env.file("bench.log"), env.timeout(FULL_TIMEOUTS["bench-loader"])
    code, output = run_command(_app("bench", "loader", "--device", _bench_device(env)), log,
                               timeout, header="bench loader")
    _finished("bench loader", code, output, timeout, log)
    results = [r for r in map(_json_line, output.splitlines()) if r and r.get("bench") == "loader"]
    if not results:
        raise Failed(f"bench loader printed no result line (see {log.name})")
    data = results[-1]
    env.file("bench-loader.json").write_text(json.dumps(data, indent=2))
    rates = data["images_per_s"]
    ratio = rates["ffcv"] / rates["torchvision"]
    return (f"{data['device']}, {data['workers']} workers, {data['resolution']} px: FFCV "
            f"{rates['ffcv']:,.0f} images/s, torchvision {rates['torchvision']:,.0f}: "
            f"{ratio:.2f}× (bench-loader.json)"), data


@check("bench-train", "python -m app bench train with its defaults", full=True)
def check_bench_train(env: Env) -> tuple[str, dict[str, Any]]:
    log, timeout = env.file("bench.log"), env.timeout(FULL_TIMEOUTS["bench-train"])
    result = env.file("bench-train.json")
    result.unlink(missing_ok=True)
    code, output = run_command(_app("bench", "train", "--device", _bench_device(env), "--json",
                                    str(result)), log, timeout, header="bench train")
    _finished("bench train", code, output, timeout, log)
    data = json.loads(result.read_text())
    rate = {(r["config"], r["mode"]): r["images_per_s"] for r in data["results"]}
    parts = [f"{mode}: sSELU {rate[('sselu', mode)]:,.0f} images/s = "
             f"{rate[('sselu', mode)] / rate[('bn_relu', mode)]:.2f}× BN+ReLU"
             for mode in dict.fromkeys(m for _, m in rate) if ('bn_relu', mode) in rate]
    s = data["settings"]
    precision = "fp32" if s["precision"] == "32" else s["precision"]
    return (f"{s['image_size']} px, batch {s['batch_size']}, {precision}: "
            + "; ".join(parts) + " (bench-train.json)"), data
