"""The import rules of ARCHITECTURE.md, as import-linter contracts (pyproject.toml [tool.importlinter]).

Ray only in crema.stages, MLflow only in crema.tracking, the library never importing its stage
drivers, and the model free of Ray, MLflow, the readers and ingest. A test also shows the contracts bite.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path


REPO = Path(__file__).resolve().parents[2]


def lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    """Run import-linter's CLI on the package found from `cwd` (its pyproject.toml holds the contracts)."""
    exe = Path(sys.executable).with_name("lint-imports")
    command = [str(exe)] if exe.exists() else [sys.executable, "-m", "importlinter.cli"]
    return subprocess.run([*command, "--no-cache"], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(cwd), "PATH": "/usr/bin:/bin"})


def test_the_import_rules_hold():
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "BROKEN" not in result.stdout
    assert "4 kept, 0 broken" in result.stdout


def test_the_contracts_fail_when_the_model_imports_ray(tmp_path):
    copy = tmp_path / "repo"
    shutil.copytree(REPO / "crema", copy / "crema", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", copy / "pyproject.toml")
    network = copy / "crema" / "model" / "network.py"
    network.write_text(network.read_text() + "\nimport ray  # noqa: E402\n")
    result = lint_imports(copy)
    assert result.returncode != 0
    assert "crema.model is not allowed to import ray" in result.stdout
