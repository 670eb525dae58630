"""The static checks CI runs before the suite (`make lint`): ruff and mypy, configured in pyproject.toml."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


@pytest.mark.parametrize("command", [["ruff", "check", "crema"], ["mypy"]])
def test_static_checks_pass(command):
    exe = BIN / command[0]
    if not exe.exists():
        pytest.skip(f"{command[0]} is not installed (pip install -e '.[dev]')")
    result = subprocess.run([str(exe), *command[1:]], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def test_the_wheel_ships_the_configs_and_configs_paths_resolve_from_anywhere(tmp_path, monkeypatch):
    import zipfile

    from crema.config import PretrainConfig, find_config, load_yaml

    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                             "-w", str(tmp_path / "dist"), str(REPO)], capture_output=True, text=True, timeout=600,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("crema-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {p.relative_to(REPO).as_posix() for p in (REPO / "configs").rglob("*.yaml")}
    assert {f"crema/{p}" for p in shipped} <= names

    monkeypatch.chdir(tmp_path)  # no configs/ here: the documented paths still work
    assert find_config("configs/pretrain/tiny.yaml").is_file()
    assert load_yaml("configs/pretrain/tiny.yaml", PretrainConfig).model.size == "tiny"
    assert not find_config("configs/nope.yaml").exists()
