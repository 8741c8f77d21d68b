"""What every check shares: the Check registry, the Env a check runs in, its Result, and the
exceptions by which a check says it was skipped or failed."""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]  # the checkout: tests/ and the cwd of the full runs
PASS, FAIL, SKIP = "pass", "fail", "skip"


class Skipped(Exception):
    """The check does not apply here (no GPU, one GPU only, ...); the message says why."""


class Stopped(BaseException):
    """SIGTERM arrived (a scheduler, ``timeout``): not a check's failure, so nothing catches it
    until the report of the checks so far is written."""


class Failed(Exception):
    """The check ran and found a problem: ``detail`` is its one line, ``data`` the evidence."""

    def __init__(self, detail: str, data: dict[str, Any] | None = None):
        super().__init__(detail)
        self.detail, self.data = detail, data or {}


@dataclass
class Result:
    name: str
    status: str
    seconds: float
    detail: str
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class Env:
    """What the checks share: the visible GPUs, where files go and the time left."""

    gpus: int
    gpu_note: str             # why no GPU is visible, or the GPUs' names
    scratch: Path             # temporary files, removed at the end
    out: Path | None          # the report's folder (--out)
    full: bool
    deadline: float | None    # time.monotonic() by which checks must have ended (--budget)

    def file(self, name: str) -> Path:
        """Where a check keeps an output file: in --out when given, else in the scratch folder."""
        return (self.out or self.scratch) / name

    def timeout(self, cap: float) -> float:
        """``cap`` seconds, or what is left of the budget when that is less."""
        if self.deadline is None:
            return cap
        return max(1.0, min(cap, self.deadline - time.monotonic()))


@dataclass(frozen=True)
class Check:
    name: str
    group: str
    help: str
    run: Callable[[Env], tuple[str, dict[str, Any]]]
    gpu: bool = False          # needs a CUDA GPU: skipped without one
    cpu_only: bool = False     # where a GPU is visible its -cuda twin covers this (unless named)
    full: bool = False         # only with --full (or when named in --only)


CHECKS: dict[str, Check] = {}


def check(name: str, help: str, **flags: bool) -> Callable:
    """Register a check: ``run(env) -> (detail, data)``; raises Skipped or Failed."""
    def register(fn: Callable[[Env], tuple[str, dict[str, Any]]]) -> Callable:
        group = "full" if flags.get("full") else name.split("-")[0]
        CHECKS[name] = Check(name, group, help, fn, **flags)
        return fn
    return register


def one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".rstrip(": ")
