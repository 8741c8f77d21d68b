#!/usr/bin/env bash
# One idempotent set-up step, shared by the README, CI and the Dockerfile:
#   1. system packages FFCV and the op build need (apt, when root or sudo is available),
#   2. a virtual environment (.venv, or $SELFNORM_VENV, e.g. the Docker image's /opt/venv;
#      SELFNORM_VENV=system installs into the current interpreter),
#   3. the project, editable, with its dev extra; torch pinned by constraints.txt,
#   4. the compiled SELU-family op (cuda_ops), ahead of time, so no first step waits on it.
# SELFNORM_DEPS_ONLY=1 stops after the dependencies (1 and 2, and 3 without the project itself):
# it needs only pyproject.toml, constraints.txt and this script, so the Docker image caches that
# layer and a source edit rebuilds only the project and the op.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
say() { printf '[setup] %s\n' "$*"; }

# g++ builds ffcv and the op; Debian's own python3 also needs -venv (ensurepip) and -dev
# (Python.h, for ffcv's extension); other Pythons (pyenv, conda, python.org) bring both.
apt_pkgs=(libopencv-dev libturbojpeg0-dev pkg-config ninja-build g++)
base_py="${PYTHON:-python3}"
if ! command -v "$base_py" >/dev/null; then
  apt_pkgs+=(python3 python3-venv python3-dev)
else
  "$base_py" -c 'import ensurepip' 2>/dev/null || apt_pkgs+=(python3-venv)
  "$base_py" -c 'import os, sys, sysconfig
sys.exit(not os.path.isfile(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' ||
    apt_pkgs+=(python3-dev)
fi
missing=()
for p in "${apt_pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
  if [ "$(id -u)" = 0 ]; then sudo=""; elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then sudo="sudo"
  else
    echo "setup: missing system packages: ${missing[*]}; install them with 'sudo apt-get install -y ${missing[*]}' and re-run." >&2
    exit 1
  fi
  say "installing system packages: ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

venv="${SELFNORM_VENV:-$root/.venv}"
if [ "$venv" = system ]; then
  py="$(command -v "$base_py")"
else
  if [ ! -x "$venv/bin/python" ]; then
    say "creating $venv"
    "$base_py" -m venv "$venv"
  fi
  py="$venv/bin/python"
fi

pip_args=(-q --disable-pip-version-check)
[ -n "${SELFNORM_NO_CONSTRAINTS:-}" ] || pip_args+=(-c "$root/constraints.txt")
stamp="$venv/.selfnorm-installed"
[ "$venv" = system ] && stamp="$root/build/.selfnorm-installed"
want="$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)"
if [ -n "${SELFNORM_DEPS_ONLY:-}" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  what="the project and its dependencies"
  [ -z "${SELFNORM_DEPS_ONLY:-}" ] || what="the project's dependencies"
  say "installing $what into $venv (first time: several minutes)"
  "$py" -m pip install "${pip_args[@]}" --upgrade pip setuptools wheel
  # numpy first: ffcv's sdist build needs it, and ffcv builds against the system opencv/turbojpeg.
  "$py" -m pip install "${pip_args[@]}" numpy
  if [ -n "${SELFNORM_DEPS_ONLY:-}" ]; then
    # pyproject's dependencies and dev extra, read without building the project (its source is
    # not there yet); pip vendors a TOML parser for Pythons before 3.11.
    reqs="$(mktemp)"
    "$py" - pyproject.toml >"$reqs" <<'PY'
import sys
try:
    import tomllib
except ImportError:
    from pip._vendor import tomli as tomllib
with open(sys.argv[1], "rb") as f:
    project = tomllib.load(f)["project"]
print("\n".join(project["dependencies"] + project["optional-dependencies"]["dev"]))
PY
    "$py" -m pip install "${pip_args[@]}" ${SELFNORM_PIP_EXTRA:-} -r "$reqs"
    rm -f "$reqs"
    say "done (dependencies only): $py"
    exit 0
  fi
  "$py" -m pip install "${pip_args[@]}" ${SELFNORM_PIP_EXTRA:-} -e ".[dev]"
  mkdir -p "$(dirname "$stamp")" && echo "$want" > "$stamp"
else
  say "dependencies up to date ($venv)"
fi
# The checkout itself on sys.path (a .pth file, as setuptools' transitional "compat" editable
# mode does): Python's path finder then takes these regular packages over a same-named folder in the
# user's working directory (a ./data folder of datasets), which the editable finder, asked
# last, cannot.
"$py" - "$root" <<'PY'
import pathlib, site, sys
pth = pathlib.Path(site.getsitepackages()[0]) / "selfnorm-checkout.pth"
if not pth.is_file() or pth.read_text().strip() != sys.argv[1]:
    pth.write_text(sys.argv[1] + "\n")
PY

say "building the compiled op (cuda_ops): cached after the first build"
# SELFNORM_REQUIRE_CUDA=1 (the Docker image): fail unless the CUDA kernels compiled.
"$py" -m cuda_ops build ${SELFNORM_REQUIRE_CUDA:+--require-cuda}
say "done: $py"
