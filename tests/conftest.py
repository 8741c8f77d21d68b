"""Fixtures shared by the test files."""
import pytest


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A fresh working directory with its own .beton cache (the demo prepares digits there)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SELFNORM_DATA_DIR", str(tmp_path / "betons"))
    return tmp_path
