"""``python -m app selftest``: check an install where it runs, and say what was checked.

For a cluster admin, the Docker image's smoke test (``docker run --gpus all selfnorm selftest``)
and the first run on a new GPU node. The checks: the versions of the stack; the compiled op
(built for this GPU's architecture, equal to the Python reference in fp32 and bf16); the FFCV
pipeline on a small generated .beton; one DDP step; the kernel and train benchmarks at a short
setting. Without a GPU the CPU checks run and the GPU ones are listed as skipped.

``--full`` adds the CUDA test suite and the full benchmarks, whose outputs go to ``--out`` with
the report (Markdown and JSON). ``--only NAME[,NAME]`` runs some checks (a name, or a group such
as ``op``); with ``--out`` their results replace those of the same names in the report there, so
a failed check is rerun alone. Each check runs even when an earlier one failed, and records
pass, fail or skip, its seconds and a one-line detail. Exit code 0: every check that ran passed;
1: a check failed; 2: a usage error.
"""
from __future__ import annotations

# The checks register in import order, which is the table's, the report's and --full's order:
# keep these imports in this order (and out of an import sorter's reach).
# isort: off
from app.selftest.core import CHECKS, Check, Env, Failed, Result, Skipped, check
from app.selftest import versions
from app.selftest import op
from app.selftest import loader
from app.selftest import ddp
from app.selftest import bench
from app.selftest import full
# isort: on
from app.selftest.cli import main
from app.selftest.full import pytest_counts
from app.selftest.op import arch_support
from app.selftest.runner import select

REGISTERED_BY = (versions, op, loader, ddp, bench, full)  # the modules of the checks, in order

__all__ = ["CHECKS", "Check", "Env", "Failed", "Result", "Skipped", "arch_support", "check",
           "main", "pytest_counts", "select"]
