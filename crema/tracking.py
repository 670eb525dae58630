"""MLflow helpers shared by the training stages: where to log, which run, what to tag it with.

A stage's MLflow run is named after its Ray run (``RunConfig(name=...)``). Re-running a job with
the same name looks that run up and continues it, so a resumed job adds to one history instead
of scattering it over several runs.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections.abc import Mapping
from pathlib import Path

import mlflow
from fsspec.core import url_to_fs
from matplotlib.figure import Figure
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from crema.dataset import windows_uri


def resolve_tracking_uri(configured: str | None, default_dir: str | Path = ".") -> str:
    """The config's URI, else $MLFLOW_TRACKING_URI, else a SQLite file in `default_dir`."""
    if configured:
        return configured
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path(default_dir).resolve() / 'mlflow.db'}"


SECRET_KEYS = frozenset({"storage_options"})  # fsspec options carry cloud credentials


def redact(tree: Mapping) -> dict:
    """The config without credentials, for params and artifacts that anyone with MLflow access reads."""
    return {key: "<redacted>" if key in SECRET_KEYS and value else
            redact(value) if isinstance(value, Mapping) else value
            for key, value in tree.items()}


def flatten_params(tree: Mapping, prefix: str = "") -> dict[str, str]:
    """Nested config → {"optim.lr": "0.001", ...}: MLflow params are flat strings."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten_params(value, f"{name}."))
        else:
            flat[name] = str(value)
    return flat


def find_run(run_name: str, experiment: str, tracking_uri: str) -> Run | None:
    """The latest run called `run_name` in `experiment`, or None."""
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    quoted = run_name.replace("'", "\\'")
    runs = client.search_runs([exp.experiment_id], filter_string=f"attributes.run_name = '{quoted}'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


def default_artifact_location(tracking_uri: str) -> str | None:
    """Beside a SQLite store: MLflow's default (./mlruns of the creating process) would put the
    artifacts in whatever directory a Ray worker runs in. A server decides for itself (None)."""
    if tracking_uri.startswith("sqlite:///"):
        return (Path(tracking_uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri()
    return None


def ensure_experiment(experiment: str, tracking_uri: str) -> str:
    """The experiment's id, creating it (with artifacts beside a SQLite store) if needed."""
    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(experiment, artifact_location=default_artifact_location(tracking_uri))
    except MlflowException:  # created meanwhile by a concurrent job
        return client.get_experiment_by_name(experiment).experiment_id


def start_or_resume_run(run_name: str, experiment: str, tracking_uri: str) -> tuple[mlflow.ActiveRun, bool]:
    """Make the run called `run_name` the active one, creating it if new. Returns (run, resumed)."""
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment(experiment_id=ensure_experiment(experiment, tracking_uri))
    existing = find_run(run_name, experiment, tracking_uri)
    if existing is not None:
        return mlflow.start_run(run_id=existing.info.run_id), True
    return mlflow.start_run(run_name=run_name), False


def log_new_params(params: Mapping[str, str]) -> None:
    """Log params the active run does not have yet: MLflow refuses to change a logged value, and a
    resumed run with a changed setting (more epochs, say) keeps its original record of it."""
    run = mlflow.active_run()
    known = MlflowClient().get_run(run.info.run_id).data.params
    fresh = {k: v for k, v in params.items() if k not in known}
    if fresh:
        mlflow.log_params(fresh)


def git_commit(repo_dir: str | Path | None = None) -> str | None:
    """HEAD of the checkout the code runs from (None outside git), to tie a run to its code."""
    where = Path(repo_dir) if repo_dir else Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def dataset_tags(dataset: str, storage_options: dict | None = None) -> dict[str, str]:
    """Identify the training data: sha256 of its manifest (when there is one) and its sources."""
    fs, root = url_to_fs(dataset, **(storage_options or {}))
    root = root.rstrip("/")
    tags: dict[str, str] = {"dataset": dataset}
    manifest = f"{root}/manifest.parquet"
    if fs.exists(manifest):
        digest = hashlib.sha256()
        with fs.open(manifest, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        tags["dataset_manifest_sha256"] = digest.hexdigest()
    _, windows_root = url_to_fs(windows_uri(dataset), **(storage_options or {}))
    partitions = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(windows_root, detail=False)]
    tags["dataset_sources"] = ",".join(sorted(p.split("=", 1)[1] for p in partitions if p.startswith("source=")))
    return tags


def log_figure(fig: Figure, artifact_file: str) -> None:
    import matplotlib.pyplot as plt

    mlflow.log_figure(fig, artifact_file)
    plt.close(fig)


def copy_to_storage(local_path: str | Path, uri: str, storage_options: dict | None = None) -> str:
    """Put one local file at a local path or a remote URI (s3://...)."""
    fs, path = url_to_fs(uri, **(storage_options or {}))
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    fs.put_file(str(local_path), path)
    return uri
