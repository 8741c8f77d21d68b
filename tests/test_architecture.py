"""The layers of the code base: each package imports only downward, no import touches sys.path,
``app solve``'s math imports no torch, and a user's ./data folder cannot shadow our packages."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# package -> the project packages it may import (lowest layer first)
ALLOWED = {"cuda_ops": set(), "models": {"cuda_ops"}, "data": set(),
           "app": {"models", "data", "cuda_ops"}}
IMPORT = re.compile(r"^\s*(?:from|import)\s+(app|models|data|cuda_ops)\b", re.M)


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_a_package_imports_only_the_layers_below_it(package):
    found = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        for name in set(IMPORT.findall(path.read_text())) - {package} - ALLOWED[package]:
            found.setdefault(name, []).append(str(path.relative_to(ROOT)))
    assert not found, f"{package} imports {found}"


def _fresh(code: str, cwd: Path = ROOT) -> dict:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=cwd, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("module", ["cuda_ops", "models", "models.theory.solver",
                                    "models.training.module", "data", "data.datamodule",
                                    "app", "app.cli", "app.main"])
def test_importing_a_package_leaves_sys_path_untouched(module):
    # the third-party stack first: what it does to sys.path is not ours to judge
    got = _fresh(f"""
import json, sys
import torch, lightning, torchmetrics, ffcv, numba, jsonargparse, matplotlib
before = list(sys.path)
import {module}
print(json.dumps({{"same": sys.path == before, "added": [p for p in sys.path
                                                        if p not in before]}}))
""")
    assert got["same"], got["added"]


def test_the_solver_and_app_solve_import_no_torch():
    got = _fresh("""
import json, sys
import models.theory.solver, models.theory.propagation, app.solve
heavy = sorted(m for m in ("torch", "lightning", "ffcv", "numba") if m in sys.modules)
print(json.dumps(heavy))
""")
    assert got == []


def test_a_data_folder_in_the_working_directory_does_not_shadow_the_packages(tmp_path):
    # where datasets live: ./data/imagenet, ./models/... (namespace folders, no __init__.py)
    for folder in ("data/imagenet", "models/pretrained", "app", "cuda_ops"):
        (tmp_path / folder).mkdir(parents=True)
    got = _fresh("""
import json
import app.solve, data, models, cuda_ops.reference
print(json.dumps([m.__file__ for m in (app.solve, data, models, cuda_ops.reference)]))
""", cwd=tmp_path)
    assert all(f and f.startswith(str(ROOT)) for f in got), got
    done = subprocess.run([sys.executable, "-m", "app", "solve", "--activation", "selu",
                           "--json"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["activation"] == "selu"
