"""Build and load the compiled op (``cuda_ops/csrc``) with ``torch.utils.cpp_extension``.

One shared library holds the schema, the CPU kernels and, when nvcc and a CUDA build of torch
exist, the CUDA kernels (no GPU needed to build them). It is compiled once into a directory keyed
by the torch version and a hash of the sources and build flags, so the set-up build
(``python -m cuda_ops build``) is what every later import loads, with no ninja run and no
recompilation. The directory is ``build/cuda_ops/`` in a source checkout, else
``$XDG_CACHE_HOME/selfnorm/cuda_ops`` (default ``~/.cache``); ``$SELFNORM_OPS_DIR`` overrides both.

``TORCH_CUDA_ARCH_LIST`` picks the GPU architectures, as for any torch extension. Unset, it is a
fixed default (A100 and H100/H200 natively, PTX for newer GPUs) rather than "the GPU I see", so a
build made where no GPU is visible is the one the GPU nodes load.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

NAME = "selfnorm_ops"
CSRC = Path(__file__).resolve().parent / "csrc"
CPU_SOURCES = ("selu_family.cpp", "cpu/kernel_DEFAULT.cpp", "cpu/kernel_AVX2.cpp",
               "cpu/kernel_AVX512.cpp")
CUDA_SOURCES = ("selu_family_cuda.cu",)
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"
# -fopenmp: at::parallel_for is inline OpenMP in torch's builds; without it the CPU kernels would
# run on one thread.
CFLAGS = ("-O3", "-fopenmp")
CUDA_CFLAGS = ("-O3",)
LDFLAGS = ("-fopenmp",)
HEARTBEAT_S = 30.0


class BuildError(RuntimeError):
    """The library could not be compiled or loaded; the message carries the compiler output."""


class MissingToolchain(BuildError):
    """No compiler (or no ninja) to build with: the Python reference is all there is."""


def _log(msg: str) -> None:
    print(f"[cuda_ops] {msg}", file=sys.stderr, flush=True)


def cuda_home() -> Path | None:
    """The CUDA toolkit with a real nvcc (the nvcc on PATH may be a wrapper script), or None."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parent.parent))
    for home in filter(None, candidates):
        if os.access(Path(home) / "bin" / "nvcc", os.X_OK):
            return Path(home)
    return None


def arch_list() -> str:
    return os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_ARCH_LIST


def cache_root() -> Path:
    if os.environ.get("SELFNORM_OPS_DIR"):
        return Path(os.environ["SELFNORM_OPS_DIR"])
    checkout = CSRC.parent.parent
    if (checkout / "pyproject.toml").is_file():
        return checkout / "build" / "cuda_ops"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "selfnorm" / "cuda_ops"


@dataclass(frozen=True)
class Plan:
    """Everything that determines one build; its hash names the build directory."""

    with_cuda: bool
    sources: tuple[str, ...]
    cflags: tuple[str, ...]
    cuda_cflags: tuple[str, ...]
    ldflags: tuple[str, ...]
    arch_list: str | None
    include_dirs: tuple[str, ...]

    @property
    def key(self) -> str:
        h = hashlib.sha256()
        for path in sorted(p for p in CSRC.rglob("*") if p.is_file()):
            h.update(str(path.relative_to(CSRC)).encode() + b"\0" + path.read_bytes())
        meta = [torch.__version__, torch.version.cuda, self.with_cuda, self.sources, self.cflags,
                self.cuda_cflags, self.ldflags, self.arch_list]
        h.update(json.dumps(meta).encode())
        kind = "cuda" if self.with_cuda else "cpu"
        return f"torch{torch.__version__}-{kind}-{h.hexdigest()[:12]}"

    @property
    def directory(self) -> Path:
        return cache_root() / self.key

    @property
    def library(self) -> Path:
        return self.directory / f"{NAME}.so"


def plan(with_cuda: bool) -> Plan:
    sources = CPU_SOURCES + (CUDA_SOURCES if with_cuda else ())
    # Only the toolkit's own CUDA headers: the sources include c10/cuda and cub, not
    # torch/extension.h, so the pip CUDA wheels' headers (possibly another minor version) are
    # not needed and must not shadow nvcc's.
    includes = (str(CSRC),)
    return Plan(with_cuda=with_cuda, sources=sources, cflags=CFLAGS,
                cuda_cflags=CUDA_CFLAGS if with_cuda else (), ldflags=LDFLAGS,
                arch_list=arch_list() if with_cuda else None, include_dirs=includes)


@contextlib.contextmanager
def _toolchain_env(p: Plan) -> Iterator[None]:
    """CUDA_HOME and TORCH_CUDA_ARCH_LIST as cpp_extension reads them, restored afterwards."""
    saved = {k: os.environ.get(k) for k in ("CUDA_HOME", "TORCH_CUDA_ARCH_LIST")}
    home = cuda_home() if p.with_cuda else None
    if home is not None:
        os.environ["CUDA_HOME"] = str(home)
        os.environ["TORCH_CUDA_ARCH_LIST"] = p.arch_list or DEFAULT_ARCH_LIST
    from torch.utils import cpp_extension
    saved_home = cpp_extension.CUDA_HOME
    if home is not None:
        # cpp_extension resolves CUDA_HOME once, at import; it may have been imported before.
        cpp_extension.CUDA_HOME = str(home)
    try:
        yield
    finally:
        cpp_extension.CUDA_HOME = saved_home
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _heartbeat(what: str) -> Iterator[None]:
    start, done = time.monotonic(), threading.Event()

    def beat() -> None:
        while not done.wait(HEARTBEAT_S):
            _log(f"still compiling {what} ({time.monotonic() - start:.0f} s)")

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def compile_and_load(p: Plan, verbose: bool = False) -> float:
    """Build ``p`` (unless its directory holds a finished build) and load it; returns seconds
    spent compiling (0 when the cached build was reused)."""
    if (p.directory / "complete").is_file() and p.library.is_file():
        _load(p.library)
        return 0.0
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        raise MissingToolchain("no C++ compiler found (install g++, or point $CXX at one)")
    if shutil.which("ninja") is None:
        raise MissingToolchain("ninja not found (pip install ninja)")
    what = "CPU + CUDA kernels" if p.with_cuda else "CPU kernels"
    arch = f", TORCH_CUDA_ARCH_LIST={p.arch_list}" if p.with_cuda else ""
    _log(f"compiling {what}{arch} into {p.directory} (once; 1-2 minutes on 2 cores)")
    start = time.monotonic()
    try:
        p.directory.mkdir(parents=True, exist_ok=True)
        with _toolchain_env(p), _heartbeat(what):
            from torch.utils.cpp_extension import load
            load(NAME, [str(CSRC / s) for s in p.sources], extra_cflags=list(p.cflags),
                 extra_cuda_cflags=list(p.cuda_cflags), extra_ldflags=list(p.ldflags),
                 extra_include_paths=list(p.include_dirs), build_directory=str(p.directory),
                 with_cuda=p.with_cuda, is_python_module=False, verbose=verbose)
        seconds = time.monotonic() - start
        (p.directory / "complete").write_text(f"{seconds:.1f}\n")
    except Exception as err:  # noqa: BLE001 (a failed build must leave the reference usable)
        raise BuildError(f"compiling {what} failed{_save_log(p, err)}\n{err}") from err
    _log(f"built {what} in {seconds:.0f} s")
    return seconds


def _save_log(p: Plan, err: Exception) -> str:
    """Keeps the compiler output next to the failed build, where the directory is writable."""
    log = p.directory / "build.log"
    try:
        log.write_text(str(err))
    except OSError:
        return ""
    return f"; full output in {log}"


def _load(library: Path) -> None:
    try:
        torch.ops.load_library(str(library))
    except OSError as err:
        raise BuildError(f"could not load {library} ({err}); delete {library.parent} to rebuild "
                         f"it") from err


@dataclass(frozen=True)
class Status:
    """What ``cuda_ops`` runs on each backend; ``python -m cuda_ops info`` prints it.

    cpu: "compiled" or "fallback" (the Python reference). cuda: "compiled"; "not built" when
    this torch has no CUDA, so there is nothing to build; or "fallback" when torch has CUDA but
    the kernels could not be built, so CUDA tensors use the Python reference.
    """

    cpu: str
    cuda: str
    library: str | None = None
    cuda_arch_list: str | None = None
    build_seconds: float = 0.0
    reason: str | None = None
    error: str | None = None  # full output of a compile that failed although a toolchain exists

    @property
    def fallbacks(self) -> list[str]:
        return [name for name, s in (("cpu", self.cpu), ("cuda", self.cuda)) if s == "fallback"]


def ensure(verbose: bool | None = None) -> Status:
    """Load the op, compiling it first if this machine has not built this version yet.

    Tries CPU + CUDA when nvcc and a CUDA build of torch exist, else (or when that fails) CPU
    only; ``verbose`` (default: $SELFNORM_OPS_VERBOSE) prints the compiler commands.
    """
    if verbose is None:
        verbose = bool(os.environ.get("SELFNORM_OPS_VERBOSE"))
    cuda_torch = torch.version.cuda is not None
    plans, reason, error = [plan(with_cuda=False)], None, None
    if cuda_torch and cuda_home() is not None:
        plans.insert(0, plan(with_cuda=True))
    elif cuda_torch:
        reason = "no CUDA toolkit with nvcc found (set CUDA_HOME)"
    for p in plans:
        try:
            seconds = compile_and_load(p, verbose=verbose)
        except MissingToolchain as err:
            reason = str(err)  # no other plan can build either; cuda_ops warns once
            break
        except BuildError as err:
            error = error or str(err)
            reason = str(err).splitlines()[0]
            _log(reason)
            continue
        cuda = "compiled" if p.with_cuda else ("fallback" if cuda_torch else "not built")
        return Status(cpu="compiled", cuda=cuda, library=str(p.library),
                      cuda_arch_list=p.arch_list, build_seconds=seconds, reason=reason,
                      error=error)
    return Status(cpu="fallback", cuda="fallback" if cuda_torch else "not built", reason=reason,
                  error=error)
