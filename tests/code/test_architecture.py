"""The import rules of ARCHITECTURE.md, as import-linter contracts (pyproject.toml [tool.importlinter]).

Ray only in crema.stages, MLflow only in crema.tracking, the library never importing its stage
drivers, the model free of Ray, MLflow, the readers and ingest, each layer importing only those below it,
and no import circle inside a layer. Tests also show that the contracts bite, and that an ingest job
starts without the heavy imports it does not use.
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
    assert "6 kept, 0 broken" in result.stdout


def lint_with(tmp_path: Path, module: str, line: str) -> subprocess.CompletedProcess:
    """import-linter on a copy of the package in which `module` (a path under crema/) ends with `line`."""
    copy = tmp_path / "repo"
    shutil.copytree(REPO / "crema", copy / "crema", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", copy / "pyproject.toml")
    edited = copy / "crema" / module
    edited.write_text(edited.read_text() + f"\n{line}  # noqa: E402\n")
    return lint_imports(copy)


def test_the_contracts_fail_when_the_model_imports_ray(tmp_path):
    result = lint_with(tmp_path, "model/network.py", "import ray")
    assert result.returncode != 0
    assert "crema.model is not allowed to import ray" in result.stdout


def test_the_contracts_fail_on_an_arrow_up_a_layer(tmp_path):
    result = lint_with(tmp_path, "data/batches.py", "from crema.model import losses")
    assert result.returncode != 0
    assert "crema.data is not allowed to import crema.model" in result.stdout


def test_the_contracts_fail_on_an_import_circle_inside_a_layer(tmp_path):
    # Lazily, inside a function, as circles are usually hidden: import-linter sees it all the same.
    result = lint_with(tmp_path, "data/schema.py", "def _read():\n    from crema.data.catalog import read_windows")
    assert result.returncode != 0
    assert "No import circles inside a layer BROKEN" in result.stdout


def test_an_ingest_job_starts_without_mlflow_or_torch():
    """`python -m crema.stages.ingest` (what `ray job submit` runs) loads neither: they cost seconds of every
    job's start and ingest uses neither."""
    probe = "import sys, crema.stages.ingest; print(sorted({'mlflow', 'torch'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
