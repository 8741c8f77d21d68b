"""``python -m app selftest``: the table and the JSON, the GPU checks skipped without a GPU,
``--only``, usage errors (one line, exit 2), a failing check (exit 1, the others still run), the
report in ``--out`` and its merge on a rerun; on a GPU, the GPU checks themselves."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cuda_ops
from app import selftest
from app.main import main as app_main
from app.selftest import CHECKS, arch_support, main, pytest_counts

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = [name for name, c in CHECKS.items() if not c.full]
GPU = [name for name, c in CHECKS.items() if c.gpu and not c.full]
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
no_gpu = pytest.mark.skipif(torch.cuda.is_available(),
                            reason="what a machine without a GPU shows")
needs_op = pytest.mark.skipif(cuda_ops.status.cpu != "compiled",
                              reason=f"the compiled op is not built ({cuda_ops.status.reason})")


def rows(out: str) -> dict[str, list[str]]:
    """The table's rows: check name -> [status, seconds, detail]."""
    found = {}
    for line in out.splitlines():
        parts = line.split(maxsplit=3)
        if parts and parts[0] in CHECKS:
            found[parts[0]] = parts[1:]
    return found


def marked(mark: str, command: str = "") -> list[str]:
    """The processes with ``mark`` in their environment and ``command`` in their command line
    (its arguments NUL-separated)."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if (mark.encode() in (proc / "environ").read_bytes()
                    and command.encode() in (proc / "cmdline").read_bytes()):
                found.append(proc.name)
        except OSError:
            pass  # ended meanwhile, or not ours to read
    return found


@pytest.fixture(scope="module")
def default_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """The default run, as a user starts it, with its report written to a folder."""
    out = tmp_path_factory.mktemp("selftest") / "report"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "app", "selftest", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    return done, out


@no_gpu
@needs_op
def test_the_default_run_passes_here_and_says_the_gpu_checks_were_skipped(default_run):
    done, out = default_run
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    table = rows(done.stdout)
    assert list(table) == DEFAULT
    for name, (status, seconds, detail) in table.items():
        assert status == ("skip" if name in GPU else "pass"), (name, detail)
        assert float(seconds) >= 0 and detail
    assert table["op-cuda"][2].startswith("no CUDA GPU")  # visible, or a CPU build of torch
    summary = done.stdout.strip().splitlines()[-2]
    assert summary.startswith(f"{len(DEFAULT) - len(GPU)} passed, 0 failed, {len(GPU)} skipped")
    assert f"GPU checks skipped: {table['op-cuda'][2]}" in summary
    assert "images/s" in table["loader-cpu"][2] and "GB/s" in table["kernels-cpu"][2]
    assert "gloo, world size 2" in table["ddp-cpu"][2]
    report = json.loads((out / "report.json").read_text())
    assert [c["name"] for c in report["checks"]] == DEFAULT and report["passed"]
    assert "| op-cpu | pass |" in (out / "report.md").read_text()


@no_gpu
@needs_op
def test_json_is_one_object_with_the_same_checks(default_run, capsys):
    assert main(["--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    table = rows(default_run[0].stdout)
    assert [(c["name"], c["status"]) for c in report["checks"]] == [
        (name, row[0]) for name, row in table.items()]
    assert report["gpus"] == 0 and report["counts"] == {"pass": len(DEFAULT) - len(GPU),
                                                        "fail": 0, "skip": len(GPU)}
    versions = report["checks"][0]["data"]
    assert versions["torch"] == torch.__version__ and versions["ffcv"] == "1.0.2"
    ddp = next(c for c in report["checks"] if c["name"] == "ddp-cpu")["data"]["ranks"]
    assert len(ddp) == 2 and all(r["weights_equal"] for r in ddp)
    assert ddp[0]["lam"][0] != ddp[0]["lam"][1]


@needs_op
def test_only_runs_the_named_checks_and_groups(capsys):
    assert main(["--only", "versions,op"]) == 0
    assert list(rows(capsys.readouterr().out)) == ["versions", "op-cpu", "op-cuda"]


def test_usage_errors_are_one_line_and_exit_2(tmp_path, capsys):
    assert app_main(["selftest", "--only", "versions,nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --only 'versions,nope' names 'nope'; "
                                               "choose from: versions, op-cpu, op-cuda")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for out in (blocker, blocker / "report"):
        assert app_main(["selftest", "--only", "versions", "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and "--out" in err[0], err
    assert app_main(["selftest", "--budget", "0"]) == 2
    assert "--budget 0 must be a positive" in capsys.readouterr().err


@needs_op
def test_a_failing_check_exits_1_and_the_others_still_run(tmp_path, monkeypatch, capsys):
    real = cuda_ops.selu_family

    def off_by_one_percent(x, lam, alpha, beta=1.0, kappa=0.0):
        return real(x, lam, alpha, beta, kappa) * 1.01

    monkeypatch.setattr(cuda_ops, "selu_family", off_by_one_percent)
    out = tmp_path / "report"
    assert main(["--only", "versions,op-cpu,train-cpu", "--out", str(out)]) == 1
    text = capsys.readouterr().out
    table = rows(text)
    assert [row[0] for row in table.values()] == ["pass", "fail", "pass"]
    assert "results differ from the reference on cpu; worst: " in table["op-cpu"][2]
    assert "0 failed" not in text and "1 failed" in text
    assert f"--out {out} --only op-cpu" in text  # how to rerun what failed
    report = json.loads((out / "report.json").read_text())
    assert [c["status"] for c in report["checks"]] == ["pass", "fail", "pass"]
    assert not report["passed"]

    # fixed: the rerun of the failed check alone completes the report
    monkeypatch.setattr(cuda_ops, "selu_family", real)
    assert main(["--only", "op-cpu", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert [(c["name"], c["status"]) for c in report["checks"]] == [
        ("versions", "pass"), ("op-cpu", "pass"), ("train-cpu", "pass")]
    assert report["passed"] and report["checks"][0]["from_run"]
    assert "from_run" not in report["checks"][1]


@no_gpu
def test_full_checks_without_a_gpu(tmp_path, capsys):
    assert main(["--full", "--only", "pytest-cuda", "--out", str(tmp_path)]) == 0
    assert rows(capsys.readouterr().out)["pytest-cuda"][0] == "skip"
    assert [c.name for c in selftest.select(None, full=True)[0]][-4:] == [
        "pytest-cuda", "bench-kernels", "bench-loader", "bench-train"]
    assert "pytest-cuda" not in [c.name for c in selftest.select(None, full=False)[0]]


def test_checks_not_begun_within_the_budget_are_skipped(capsys):
    assert main(["--only", "versions,op-cpu", "--budget", "1e-9"]) == 0
    table = rows(capsys.readouterr().out)
    assert [row[0] for row in table.values()] == ["skip", "skip"]
    assert table["versions"][2] == "not started: the --budget was spent"


@no_gpu
def test_sigterm_stops_the_run_and_its_processes_and_keeps_the_report(tmp_path):
    """The full runs start their own process groups: a SIGTERM (timeout, a scheduler) must end
    them too, and the report must say which check was stopped."""
    import signal
    import time
    import uuid

    mark = uuid.uuid4().hex
    out = tmp_path / "report"
    proc = subprocess.Popen([sys.executable, "-m", "app", "selftest", "--full", "--only",
                             "versions,bench-kernels", "--out", str(out)], cwd=ROOT,
                            env={**os.environ, "SELFTEST_MARK": mark}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not marked(mark, "bench\0kernels") and time.monotonic() < deadline:
        time.sleep(0.2)  # until the benchmark's own process runs
    assert marked(mark, "bench\0kernels"), proc.communicate()
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, stdout + stderr[-2000:]
    assert rows(stdout)["bench-kernels"][:1] == ["fail"]
    assert "stopped by SIGTERM while running" in stdout
    report = json.loads((out / "report.json").read_text())
    assert [(c["name"], c["status"]) for c in report["checks"]] == [("versions", "pass"),
                                                                   ("bench-kernels", "fail")]
    assert not marked(mark), f"processes left running: {marked(mark)}"


def test_arch_support_follows_cuda_compatibility():
    default = "8.0;9.0;10.0+PTX"
    assert arch_support((9, 0), default) == "sm_90 code"
    assert arch_support((8, 6), default) == "sm_80 code (binary compatible with sm_86)"
    assert arch_support((12, 0), default) == "PTX of 10.0, JIT-compiled for sm_120 at first load"
    assert arch_support((7, 5), default) is None
    assert arch_support((12, 0), "8.0;9.0") is None
    assert arch_support((9, 0), "9.0a") == "sm_90 code"
    assert arch_support((10, 3), "10.0a") is None  # 'a' code runs on its own architecture only


def test_pytest_counts_read_the_summary_line():
    out = ("....F.s\nFAILED tests/x.py::t - boom\n"
           "1 failed, 70 passed, 8 skipped, 2 errors in 81.2s\n")
    assert pytest_counts(out) == {"failed": 1, "passed": 70, "skipped": 8, "errors": 2}
    assert pytest_counts("79 passed in 12.5s") == {"passed": 79}
    assert pytest_counts("collecting ...") == {}


@pytest.mark.cuda
@needs_gpu
def test_the_gpu_checks_pass_on_this_machine(capsys):
    assert main(["--only", "versions,op-cuda,loader-cuda,ddp-cuda"]) == 0, capsys.readouterr().out
    table = rows(capsys.readouterr().out)
    assert [row[0] for row in table.values()] == ["pass"] * 4
    assert "images/s" in table["loader-cuda"][2] and "nccl" in table["ddp-cuda"][2]
