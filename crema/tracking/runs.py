"""One run's life: its params (credentials redacted), finding it again, starting or resuming it, its dataset
input, figures and metrics, and opening and closing a pretraining run.

A stage's MLflow run is named after its Ray run (``RunConfig(name=...)``). Re-running a job with
the same name looks that run up and continues it, so a resumed job adds to one history instead
of scattering it over several runs. Only a job that resumes Ray's checkpoint state does: one that starts
from step 0 again (its run folder deleted) opens a new run, tagged ``crema.replaces_run`` with the old
run's id, rather than logging its steps a second time into the old history.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path

import mlflow
import yaml
from matplotlib.figure import Figure
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from crema.config import ConfigError
from crema.data.catalog import dataset_sources, dataset_version
from crema.tracking.models import log_encoder_model
from crema.tracking.names import (METRIC_RESUMED_FROM_STEP, TAG_DATASET_VERSION, TAG_ENCODER_PATH,
                                  TAG_REPLACES_RUN)
from crema.tracking.server import apply_credentials_file, ensure_experiment


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


# ------------------------------------------------------------------------------ run lookups

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


def start_or_resume_run(run_name: str, experiment: str, tracking_uri: str,
                        replaces_run_id: str | None = None) -> tuple[mlflow.ActiveRun, bool]:
    """Make the run called `run_name` the active one, creating it if new. Returns (run, resumed).

    `replaces_run_id`: the job starts from scratch although a run of this name exists (that run's id, found by
    the driver). That run is never continued: a new one is created, tagged TAG_REPLACES_RUN with its id; a
    later attempt of the same job (a worker restarted by Ray) finds and continues the new one.
    """
    apply_credentials_file()  # in a Ray worker: its own process, its own environment
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment(experiment_id=ensure_experiment(experiment, tracking_uri))
    existing = find_run(run_name, experiment, tracking_uri)
    if existing is not None and existing.info.run_id != replaces_run_id:
        return mlflow.start_run(run_id=existing.info.run_id), True
    return mlflow.start_run(run_name=run_name, tags={TAG_REPLACES_RUN: replaces_run_id} if replaces_run_id else None), False


def log_new_params(params: Mapping[str, str]) -> None:
    """Log params the active run does not have yet: MLflow refuses to change a logged value, and a
    resumed run with a changed setting (more epochs, say) keeps its original record of it."""
    run = mlflow.active_run()
    known = MlflowClient().get_run(run.info.run_id).data.params
    fresh = {k: v for k, v in params.items() if k not in known}
    if fresh:
        mlflow.log_params(fresh)


def dataset_tags(dataset: str, storage_options: dict | None = None, version: str | None = None) -> dict[str, str]:
    """Identify the training data: its URI, its version (the Iceberg snapshot id of its `windows` table,
    :func:`crema.data.catalog.dataset_version`: the exact rows read) and its sources. `version`: the one the
    stage resolved once at its start and reads every time (None: the current one, resolved here)."""
    tags: dict[str, str] = {"dataset": dataset}
    version = version or dataset_version(dataset, storage_options)
    if version:
        tags[TAG_DATASET_VERSION] = version
    tags["dataset_sources"] = ",".join(dataset_sources(dataset, storage_options))
    return tags


def dataset_display_name(tags: Mapping[str, str]) -> str:
    """`<sources>@<version>` (e.g. `ludb,ptbxl@5120937165117307421`): what the MLflow UI's Datasets column shows,
    so an analyst tells one hospital's data, and one version of it, from another. Falls back to the URI's last
    part for a dataset with no recorded sources or version."""
    sources = tags.get("dataset_sources") or tags["dataset"].rstrip("/").rsplit("/", 1)[-1] or tags["dataset"]
    version = tags.get(TAG_DATASET_VERSION)
    return f"{sources}@{version}" if version else sources


def log_dataset_input(tags: Mapping[str, str], rows: Mapping[str, int], context: str = "training") -> None:
    """Dataset lineage on the active run (``mlflow.log_input``): the dataset's URI as its source, its sources
    and the rows per split, from :func:`dataset_tags`. The digest is of the URI, the version (the Iceberg
    snapshot id: the exact rows read) and those counts, so two runs on the same data share it."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    uri = tags["dataset"]
    digest = hashlib.sha256(json.dumps([uri, tags.get(TAG_DATASET_VERSION), tags.get("dataset_sources"), dict(rows)],
                                       sort_keys=True).encode()).hexdigest()
    dataset = MetaDataset(resolve_dataset_source(uri), name=dataset_display_name(tags),
                          digest=digest[:32])  # MLflow stores at most 36 characters
    input_tags = {"sources": tags.get("dataset_sources", ""), **{f"rows_{k}": str(v) for k, v in rows.items()}}
    if tags.get(TAG_DATASET_VERSION):
        input_tags["version"] = tags[TAG_DATASET_VERSION]
    mlflow.log_input(dataset, context=context, tags=input_tags)


def check_run_params(run_name: str, experiment: str, tracking_uri: str, params: Mapping[str, str],
                     allow_changes: bool) -> None:
    """A run name already used with other settings is an error, unless the caller resumes on purpose
    (the run then keeps its original record of the changed settings: MLflow params are write-once)."""
    existing = find_run(run_name, experiment, tracking_uri)
    if existing is None:
        return
    known = existing.data.params
    changed = {k: (known[k], v) for k, v in params.items() if k in known and known[k] != v}
    if changed and not allow_changes:
        listed = "; ".join(f"{k}: {old} -> {new}" for k, (old, new) in sorted(changed.items()))
        raise ConfigError(f"run name {run_name!r} already exists in experiment {experiment!r} (MLflow run "
                          f"{existing.info.run_id}) with other settings: {listed}. Choose a new name, or pass "
                          "--resume to continue that run with the changed settings")


def log_figure(fig: Figure, artifact_file: str) -> None:
    """Log a figure to the active run, and close it."""
    import matplotlib.pyplot as plt

    mlflow.log_figure(fig, artifact_file)
    plt.close(fig)


def flush() -> None:
    """Wait for asynchronously logged metrics to reach the store."""
    mlflow.flush_async_logging()


def log_metrics(metrics: Mapping[str, float], step: int, *, synchronous: bool = True) -> None:
    """Metrics of the active run at `step` (asynchronous ones are flushed by :func:`flush`)."""
    mlflow.log_metrics(dict(metrics), step=step, synchronous=synchronous)


def log_metric(key: str, value: float, step: int) -> None:
    mlflow.log_metric(key, value, step=step)


# ------------------------------------------------------------------------------- pretraining

def open_training_run(run_name: str, experiment: str, tracking_uri: str, public_config: dict,
                      tags: Mapping[str, str], resumed_from_step: int | None,
                      dataset_rows: Mapping[str, int] | None = None, replaces_run_id: str | None = None) -> None:
    """Start (or resume) a pretraining run: its params, tags, dataset input and, once, its config as an artifact.
    `replaces_run_id`: see :func:`start_or_resume_run`."""
    _, resumed = start_or_resume_run(run_name, experiment, tracking_uri, replaces_run_id)
    log_new_params(flatten_params(public_config))
    mlflow.set_tags(dict(tags))
    if dataset_rows is not None and "dataset" in tags:
        log_dataset_input(tags, dataset_rows)
    if not resumed:
        mlflow.log_text(yaml.safe_dump(public_config, sort_keys=False), "config.yaml")
    if resumed_from_step is not None:
        mlflow.log_metric(METRIC_RESUMED_FROM_STEP, resumed_from_step, step=resumed_from_step)


def close_training_run(encoder_file: str | Path, encoder_path: str, window_samples: int, representation_dim: int) -> None:
    """Log the encoder as the pyfunc model "encoder", tag where its artifact is (lineage), end the run."""
    log_encoder_model(encoder_file, window_samples, representation_dim)
    mlflow.set_tag(TAG_ENCODER_PATH, encoder_path)
    mlflow.flush_async_logging()
    mlflow.end_run()
