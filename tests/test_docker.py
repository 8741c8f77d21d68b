"""Lint the Dockerfile (Docker cannot run here): every install step must go through the shared
set-up script that CI exercises, on a CUDA devel base, with the app as entry point."""
import json
import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def instructions():
    text = (ROOT / "Dockerfile").read_text()
    text = re.sub(r"\\\n", " ", text)  # join continuation lines
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def test_known_instructions_only_and_from_first():
    ins = instructions()
    known = {"FROM", "ARG", "ENV", "WORKDIR", "COPY", "RUN", "ENTRYPOINT", "CMD", "LABEL"}
    assert {op for op, _ in ins} <= known
    first = next(i for i, (op, _) in enumerate(ins) if op != "ARG")
    assert ins[first][0] == "FROM"


def test_base_image_is_a_cuda_devel_image():
    ins = dict(instructions()[:3])
    arg = next(rest for op, rest in instructions() if op == "ARG" and "BASE_IMAGE" in rest)
    image = arg.split("=", 1)[1]
    assert "devel" in image and "cuda" in image
    assert ins["FROM"] == "${BASE_IMAGE}"


def test_installs_only_through_the_setup_script():
    runs = [rest for op, rest in instructions() if op == "RUN"]
    assert any("scripts/setup.sh" in r for r in runs)
    for r in runs:
        assert "pip install" not in r and "apt-get install" not in r, r
    env = " ".join(rest for op, rest in instructions() if op == "ENV")
    assert "SELFNORM_PIP_EXTRA=--no-build-isolation" in env
    assert "SELFNORM_REQUIRE_CUDA=1" in env  # a GPU image must not fall back to the reference
    assert "TORCH_CUDA_ARCH_LIST" in env
    assert (ROOT / "scripts" / "setup.sh").is_file()


def test_setup_script_builds_the_op_and_installs_system_packages():
    script = (ROOT / "scripts" / "setup.sh").read_text()
    for pkg in ("libopencv-dev", "libturbojpeg0-dev", "pkg-config", "ninja-build"):
        assert pkg in script
    assert "-m cuda_ops build" in script
    assert "${SELFNORM_REQUIRE_CUDA:+--require-cuda}" in script
    assert "${SELFNORM_PIP_EXTRA" in script


def test_entrypoint_is_the_app_in_exec_form():
    ep = [rest for op, rest in instructions() if op == "ENTRYPOINT"]
    assert len(ep) == 1 and json.loads(ep[0]) == ["python", "-m", "app"]


def test_copy_sources_exist_and_dockerignore_keeps_local_state_out():
    for op, rest in instructions():
        if op == "COPY":
            for src in shlex.split(rest)[:-1]:
                assert (ROOT / src).exists(), src
    ignored = (ROOT / ".dockerignore").read_text().split()
    for entry in (".venv", ".git", "lightning_logs", "*.beton", "*.ckpt"):
        assert entry in ignored
