"""Build and load the compiled op (``cuda_ops/csrc``) with ``torch.utils.cpp_extension.load``.

One shared library holds the schema, the CPU kernels and, when nvcc and a CUDA build of torch
exist, the CUDA kernels (no GPU needed to build them). It is compiled once into a folder named
by the torch version and a hash of the sources and flags; a finished folder is loaded directly
(no ninja run). The folder is ``build/cuda_ops/`` in a source checkout, else
``$XDG_CACHE_HOME/selfnorm/cuda_ops``; ``$SELFNORM_OPS_DIR`` overrides both.
``cuda_ops/README.md`` says why this is a build at first import (or ``python -m cuda_ops build``)
rather than a ``setup.py`` extension.

``TORCH_CUDA_ARCH_LIST`` picks the GPU architectures, as for any torch extension. Unset, it is a
fixed default rather than "the GPU I see", so a build made where no GPU is visible is the one the
GPU nodes load.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

NAME = "selfnorm_ops"
CSRC = Path(__file__).resolve().parent / "csrc"
CPU_SOURCES = ("selu_family.cpp", "cpu/kernel_DEFAULT.cpp", "cpu/kernel_AVX2.cpp",
               "cpu/kernel_AVX512.cpp")
CUDA_SOURCES = ("selu_family_cuda.cu",)
# A100 and H100/H200 natively, Blackwell (B200) natively, PTX of the newest for later GPUs.
DEFAULT_ARCH_LIST = "8.0;9.0;10.0+PTX"
# -fopenmp: at::parallel_for is inline OpenMP in torch's builds (without it: one thread).
CFLAGS = ("-O3", "-fopenmp")
# -lineinfo: source lines for profilers (Nsight Compute) at no run-time cost; no fast-math, which
# would break the agreement of the CUDA and CPU kernels with the reference.
CUDA_CFLAGS = ("-O3", "-lineinfo")
LDFLAGS = ("-fopenmp",)


class BuildError(RuntimeError):
    """The library could not be compiled or loaded; the message carries the compiler output."""


class MissingToolchain(BuildError):
    """No compiler (or no ninja) to build with: the Python reference is all there is."""


def cuda_home() -> Path | None:
    """The CUDA toolkit with a real nvcc (the nvcc on PATH may be a wrapper script), or None."""
    nvcc = shutil.which("nvcc")
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda",
                  str(Path(nvcc).resolve().parent.parent) if nvcc else None]
    for home in filter(None, candidates):
        if os.access(Path(home) / "bin" / "nvcc", os.X_OK):
            return Path(home)
    return None


def cache_root() -> Path:
    if os.environ.get("SELFNORM_OPS_DIR"):
        return Path(os.environ["SELFNORM_OPS_DIR"])
    checkout = CSRC.parent.parent
    if (checkout / "pyproject.toml").is_file():
        return checkout / "build" / "cuda_ops"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "selfnorm" / "cuda_ops"


@dataclass(frozen=True)
class Plan:
    """Everything that determines one build; its hash names the build folder."""

    with_cuda: bool

    @property
    def sources(self) -> tuple[str, ...]:
        return CPU_SOURCES + (CUDA_SOURCES if self.with_cuda else ())

    @property
    def arch_list(self) -> str | None:
        return (os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_ARCH_LIST) if self.with_cuda \
            else None

    @property
    def directory(self) -> Path:
        h = hashlib.sha256()
        for path in sorted(p for p in CSRC.rglob("*") if p.is_file()):
            h.update(str(path.relative_to(CSRC)).encode() + b"\0" + path.read_bytes())
        h.update(json.dumps([torch.__version__, torch.version.cuda, self.sources, CFLAGS,
                             CUDA_CFLAGS, LDFLAGS, self.arch_list]).encode())
        kind = "cuda" if self.with_cuda else "cpu"
        return cache_root() / f"torch{torch.__version__}-{kind}-{h.hexdigest()[:12]}"


def compile_and_load(p: Plan, verbose: bool = False) -> tuple[Path, float]:
    """Build ``p`` (unless its folder holds a finished build) and load it; returns the library
    and the seconds spent compiling (0 when the cached build was reused)."""
    folder = p.directory  # hashed once: a source edited meanwhile belongs to the next build
    library = folder / f"{NAME}.so"
    if (folder / "complete").is_file() and library.is_file():
        _load(library)
        return library, 0.0
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        raise MissingToolchain("no C++ compiler found (install g++, or point $CXX at one)")
    if shutil.which("ninja") is None:
        raise MissingToolchain("ninja not found (pip install ninja)")
    what = "CPU + CUDA kernels" if p.with_cuda else "CPU kernels"
    arch = f", TORCH_CUDA_ARCH_LIST={p.arch_list}" if p.with_cuda else ""
    print(f"[cuda_ops] compiling {what}{arch} into {folder} (once; 1-2 minutes on 2 cores)",
          file=sys.stderr, flush=True)
    start = time.monotonic()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if p.with_cuda:
            os.environ["TORCH_CUDA_ARCH_LIST"] = p.arch_list or DEFAULT_ARCH_LIST
            os.environ["CUDA_HOME"] = str(cuda_home())
        from torch.utils import cpp_extension

        if p.with_cuda:  # it resolves the toolkit once, when first imported: point it at ours
            cpp_extension.CUDA_HOME = os.environ["CUDA_HOME"]
        # Only the toolkit's own CUDA headers: the sources include c10/cuda and cub, not
        # torch/extension.h, so the pip CUDA wheels' headers (maybe another minor) stay out.
        cpp_extension.load(NAME, [str(CSRC / s) for s in p.sources], extra_cflags=list(CFLAGS),
                           extra_cuda_cflags=list(CUDA_CFLAGS), extra_ldflags=list(LDFLAGS),
                           extra_include_paths=[str(CSRC)], build_directory=str(folder),
                           with_cuda=p.with_cuda, is_python_module=False, verbose=verbose)
    except Exception as err:  # noqa: BLE001 (a failed build must leave the reference usable)
        log = folder / "build.log"
        try:
            log.write_text(str(err))
            where = f"; full output in {log}"
        except OSError:
            where = ""
        raise BuildError(f"compiling {what} failed{where}\n{err}") from err
    seconds = time.monotonic() - start
    (folder / "complete").write_text(f"{seconds:.1f}\n")
    print(f"[cuda_ops] built {what} in {seconds:.0f} s", file=sys.stderr, flush=True)
    return library, seconds


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
    plans, reason, error = [Plan(with_cuda=False)], None, None
    if cuda_torch and cuda_home() is not None:
        plans.insert(0, Plan(with_cuda=True))
    elif cuda_torch:
        reason = "no CUDA toolkit with nvcc found (set CUDA_HOME)"
    for p in plans:
        try:
            library, seconds = compile_and_load(p, verbose=verbose)
        except MissingToolchain as err:
            reason = str(err)  # no other plan can build either; cuda_ops warns once
            break
        except BuildError as err:
            error = error or str(err)
            reason = str(err).splitlines()[0]
            print(f"[cuda_ops] {reason}", file=sys.stderr, flush=True)
            continue
        cuda = "compiled" if p.with_cuda else ("fallback" if cuda_torch else "not built")
        return Status(cpu="compiled", cuda=cuda, library=str(library),
                      cuda_arch_list=p.arch_list, build_seconds=seconds, reason=reason,
                      error=error)
    return Status(cpu="fallback", cuda="fallback" if cuda_torch else "not built", reason=reason,
                  error=error)
