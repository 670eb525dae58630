"""Everything MLflow: where to log, which run, what to tag it with, and reading the runs back.

The only module that imports MLflow. Tag and metric names are the constants below, used by the writers
(the stages) and the readers (run lookups, lineage, :func:`sweep_runs` behind ``crema compare``) alike,
so a rename cannot silently break one side.

A stage's MLflow run is named after its Ray run (``RunConfig(name=...)``). Re-running a job with
the same name looks that run up and continues it, so a resumed job adds to one history instead
of scattering it over several runs. Only a job that resumes Ray's checkpoint state does: one that starts
from step 0 again (its run folder deleted) opens a new run, tagged ``crema.replaces_run`` with the old
run's id, rather than logging its steps a second time into the old history.

A sweep (probe, fine-tune) leaves a parent run (``crema.kind=sweep``; tags task, method, encoder,
label_fraction, sources; the test metrics) and one nested run per trial (``crema.kind=trial``), which the
trial opens in its own process. A downstream run finds the pretraining run of its encoder through the
``encoder_path`` tag that pretraining writes (lineage).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import mlflow
import numpy as np
import pandas as pd
import requests
import torch
import yaml
from matplotlib.figure import Figure
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from crema.config import ConfigError, EncoderSpec
from crema.data.catalog import dataset_sources, dataset_version

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------ names
# Tags
TAG_KIND = "crema.kind"  # KIND_SWEEP on a sweep's parent run, KIND_TRIAL on its children
KIND_SWEEP = "sweep"
KIND_TRIAL = "trial"
KIND_PRETRAIN_SWEEP = "pretrain_sweep"  # on a pretraining sweep's parent run; its trials are pretraining runs
KIND_DRIFT = "drift"  # on a `crema drift` run: one source against a reference in an encoder's embedding space
TAG_ENCODER_PATH = "encoder_path"  # on a pretraining run: the encoder artifact it wrote
TAG_ENCODER_ARTIFACT = "encoder_artifact"  # on a downstream run: the artifact it evaluated
TAG_ENCODER_RUN_ID = "encoder_run_id"  # on a downstream run: the pretraining run of its encoder
TAG_TASK = "task"
TAG_DATASET_VERSION = "dataset_version"  # the Iceberg snapshot id of the dataset's windows table
# MLflow's experiment type (read by its UI to pick the page an experiment opens on): crema trains models.
TAG_EXPERIMENT_KIND = "mlflow.experimentKind"
EXPERIMENT_KIND_TRAINING = "custom_model_development"
TAG_METHOD = "method"
TAG_ENCODER = "encoder"
TAG_ENCODER_INIT = "encoder_init"
TAG_LABEL_FRACTION = "label_fraction"
TAG_LEAD_SET = "lead_set"  # the leads a downstream model saw: all, limb6, I, ... (crema.evaluation.lead_sets)
TAG_TRAIN_SOURCES = "train_sources"
TAG_TEST_SOURCES = "test_sources"
TAG_TRIAL_ID = "ray_trial_id"
TAG_BEST_TRIAL = "best_trial"
TAG_STOPPED_EARLY = "stopped_early"
TAG_REPLACES_RUN = "crema.replaces_run"  # on a run that restarted a job from scratch: the earlier run of its name
TAG_PARENT_RUN_ID = "mlflow.parentRunId"
# Metrics
METRIC_VAL_AUROC = "val_macro_auroc"  # what trials are compared on
METRIC_BEST_VAL_AUROC = "best_val_macro_auroc"
METRIC_EPOCH = "epoch"
METRIC_RESUMED_FROM_STEP = "resumed_from_step"
TEST_METRIC_PREFIX = "test_"
# What identifies a sweep in the comparison table: the latest finished sweep of each is reported. The
# pretraining run of the encoder is part of it: two runs' encoders under one name are two rows.
SWEEP_GROUP = [TAG_TASK, TAG_TRAIN_SOURCES, TAG_TEST_SOURCES, TAG_LEAD_SET, TAG_LABEL_FRACTION, TAG_METHOD,
               TAG_ENCODER, TAG_ENCODER_RUN_ID]
PRETRAIN_RUN = "pretrain_run"  # sweep_runs' column: the name of the encoder's pretraining run ("" for none)
SWEEP_FILTER = f"tags.`{TAG_KIND}` = '{KIND_SWEEP}' and attributes.status = 'FINISHED'"


class TrackingUnavailable(ConfigError):
    """The tracking server does not answer: the job stops at once rather than after MLflow's retries."""


def redact_uri(uri: str) -> str:
    """The URI without a password (``https://user:***@host``), for messages and logs."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    host = parts.hostname or ""
    netloc = f"{parts.username}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def check_reachable(tracking_uri: str, timeout_s: float = 5.0) -> None:
    """Fail within `timeout_s` if an http(s) tracking server does not answer; any HTTP reply (even 401) will do.

    Without this, MLflow's client retries a dead server for minutes before the job fails.
    """
    if not tracking_uri.startswith(("http://", "https://")):
        return
    try:
        requests.get(f"{tracking_uri.rstrip('/')}/health", timeout=(timeout_s, timeout_s), allow_redirects=False)
    except requests.RequestException as err:
        raise TrackingUnavailable(
            f"the MLflow tracking server {redact_uri(tracking_uri)} is not reachable "
            f"({type(err).__name__} within {timeout_s:g} s); check tracking.tracking_uri / MLFLOW_TRACKING_URI "
            "and that the server is up") from None


CREDENTIALS_FILE_ENV = "CREMA_MLFLOW_CREDENTIALS_FILE"


def apply_credentials_file() -> None:
    """MLflow credentials from the file $CREMA_MLFLOW_CREDENTIALS_FILE names (MLflow's own
    ``~/.mlflow/credentials`` format: ``[mlflow]`` with ``mlflow_tracking_username`` / ``_password``) into
    this process's environment, unless already set: jobs carry the file's path, never the password."""
    import configparser

    path = os.environ.get(CREDENTIALS_FILE_ENV)
    if not path:
        return
    parser = configparser.ConfigParser()
    try:
        with open(path) as f:
            parser.read_file(f)
    except (OSError, configparser.Error) as err:
        raise ConfigError(f"{CREDENTIALS_FILE_ENV}={path}: cannot read the MLflow credentials file ({err})") from None
    section = parser["mlflow"] if parser.has_section("mlflow") else {}
    for key in ("mlflow_tracking_username", "mlflow_tracking_password"):
        if section.get(key) and not os.environ.get(key.upper()):
            os.environ[key.upper()] = section[key]


def resolve_tracking_uri(configured: str | None, default_dir: str | Path = ".") -> str:
    """The config's URI, else $MLFLOW_TRACKING_URI, else a SQLite file in `default_dir`.

    Also loads the credentials file, if one is named (:func:`apply_credentials_file`).
    """
    apply_credentials_file()
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


def default_artifact_location(tracking_uri: str) -> str | None:
    """Beside a SQLite store: MLflow's default (./mlruns of the creating process) would put the
    artifacts in whatever directory a Ray worker runs in. A server decides for itself (None)."""
    if tracking_uri.startswith("sqlite:///"):
        return (Path(tracking_uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri()
    return None


def ensure_experiment(experiment: str, tracking_uri: str) -> str:
    """The experiment's id, creating it (with artifacts beside a SQLite store) if needed, as a model-training
    experiment: without the kind tag the MLflow 3 UI opens an experiment on its GenAI overview (traces, token
    usage), not on its runs. An experiment that lacks the tag gets it; one a user tagged otherwise keeps theirs."""
    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        try:
            return client.create_experiment(experiment, artifact_location=default_artifact_location(tracking_uri),
                                            tags={TAG_EXPERIMENT_KIND: EXPERIMENT_KIND_TRAINING})
        except MlflowException:  # created meanwhile by a concurrent job
            found = client.get_experiment_by_name(experiment)
    if TAG_EXPERIMENT_KIND not in found.tags:
        client.set_experiment_tag(found.experiment_id, TAG_EXPERIMENT_KIND, EXPERIMENT_KIND_TRAINING)
    return found.experiment_id


def experiment_page(experiment_id: str, ui_url: str = "http://127.0.0.1:5000") -> str:
    """The experiment's runs in the MLflow UI. MLflow 3.17's UI picks its pages from a per-browser switch
    (GenAI / Model training, GenAI by default), not from the experiment's kind tag; the query parameter sets it."""
    return f"{ui_url.rstrip('/')}/#/experiments/{experiment_id}?workflowType=machine_learning"


def browse_hint(tracking_uri: str, run_id: str) -> str:
    """How to open the experiment that holds `run_id` in the MLflow UI: the command and the page."""
    experiment_id = MlflowClient(tracking_uri).get_run(run_id).info.experiment_id
    return f"mlflow ui --backend-store-uri {tracking_uri}   then open {experiment_page(experiment_id)}"


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


# The encoder and the classifier are logged as MLflow "models from code": the model is one of these modules
# (encoder_model.py, classifier_model.py), not a pickle; its weights are the safetensors artifact.
PYFUNC_MODELS = Path(__file__).resolve().parent


def _requirements() -> list[str]:
    """What serving the encoder or the classifier needs: this project (reads the artifact, builds the encoder) and torch."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        crema_version = version("crema")
    except PackageNotFoundError:
        import crema

        crema_version = crema.__version__
    return [f"crema=={crema_version}", f"torch>={torch.__version__.split('+')[0]}"]


def log_encoder_model(encoder_file: str | Path, window_samples: int, embed_dim: int, name: str = "encoder"):
    """Log the encoder (a safetensors file of :func:`crema.train.artifacts.save_encoder`) to the active run
    as a pyfunc model with a signature: inputs ``x`` (n, 12, window_samples) float32 raw mV and ``lead_mask``
    (n, 12) bool, params ``fs`` (the windows' rate, for conditioning) and ``batch_size``, output the
    (n, embed_dim) float32 embeddings."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ParamSchema, ParamSpec, Schema, TensorSpec

    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 12, window_samples), "x"),
                       TensorSpec(np.dtype(np.bool_), (-1, 12), "lead_mask")]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, embed_dim), "embedding")]),
        params=ParamSchema([ParamSpec("fs", "double", 500.0), ParamSpec("batch_size", "long", 256)]))
    return mlflow.pyfunc.log_model(name=name, python_model=str(PYFUNC_MODELS / "encoder_model.py"),
                                   artifacts={"encoder": str(encoder_file)}, signature=signature,
                                   pip_requirements=_requirements())


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


def close_training_run(encoder_file: str | Path, encoder_path: str, window_samples: int, embed_dim: int) -> None:
    """Log the encoder as the pyfunc model "encoder", tag where its artifact is (lineage), end the run."""
    log_encoder_model(encoder_file, window_samples, embed_dim)
    mlflow.set_tag(TAG_ENCODER_PATH, encoder_path)
    mlflow.flush_async_logging()
    mlflow.end_run()


# --------------------------------------------------------------------------------- lineage

def encoder_run_id(encoder_path: str, tracking_uri: str) -> str | None:
    """The latest pretraining run, in any experiment, that wrote the encoder artifact at `encoder_path`."""
    client = MlflowClient(tracking_uri)
    quoted = encoder_path.replace("'", "\\'")
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, filter_string=f"tags.{TAG_ENCODER_PATH} = '{quoted}'",
                              order_by=["attributes.start_time DESC"], max_results=1) if experiments else []
    return runs[0].info.run_id if runs else None


def encoder_provenance(spec: EncoderSpec, tracking_uri: str) -> dict[str, str]:
    """Tags that tie a downstream run to its encoder: the artifact and the pretraining run that wrote it."""
    tags = {TAG_ENCODER: spec.name, TAG_ENCODER_INIT: spec.init}
    if spec.description:
        tags["encoder_description"] = spec.description
    if spec.init == "random":
        tags["encoder_seed"] = str(spec.seed)
        if spec.like:
            tags["encoder_like"] = spec.like
    if spec.init != "pretrained":
        return tags
    # Not TAG_ENCODER_PATH: the pretraining run that wrote the artifact carries that tag, and is found by it.
    tags[TAG_ENCODER_ARTIFACT] = spec.path
    run_id = spec.mlflow_run_id or encoder_run_id(spec.path, tracking_uri)
    if run_id:
        tags[TAG_ENCODER_RUN_ID] = run_id
    return tags


# ---------------------------------------------------------------------------------- sweeps

@contextmanager
def sweep_run(tracking_uri: str, experiment_id: str, run_name: str, tags: Mapping[str, str],
              params: Mapping[str, object], task_yaml: dict, dataset_rows: Mapping[str, int]) -> Iterator[str]:
    """A sweep's parent run, active inside the block, with the task's dataset as its input (`dataset_rows`:
    the windows per split it was run on); yields its run id."""
    mlflow.set_tracking_uri(tracking_uri)
    with mlflow.start_run(experiment_id=experiment_id, run_name=run_name,
                          tags={**tags, TAG_KIND: KIND_SWEEP}) as parent:
        mlflow.log_params(dict(params))
        if "dataset" in tags:
            log_dataset_input(tags, dataset_rows, context="evaluation")
        mlflow.log_text(yaml.safe_dump(task_yaml, sort_keys=False), "task.yaml")
        yield parent.info.run_id


@contextmanager
def pretrain_sweep_run(tracking_uri: str, experiment: str, run_name: str, params: Mapping[str, object],
                       sweep_yaml: dict) -> Iterator[str]:
    """A pretraining sweep's parent run, active inside the block (its trials' runs nest under it); yields its id."""
    mlflow.set_tracking_uri(tracking_uri)
    experiment_id = ensure_experiment(experiment, tracking_uri)
    with mlflow.start_run(experiment_id=experiment_id, run_name=run_name,
                          tags={TAG_KIND: KIND_PRETRAIN_SWEEP}) as parent:
        mlflow.log_params(dict(params))
        mlflow.log_text(yaml.safe_dump(sweep_yaml, sort_keys=False), "sweep.yaml")
        yield parent.info.run_id


def log_sweep_table(table: pd.DataFrame, best_run_name: str | None) -> None:
    """On the active pretraining sweep run: every trial's settings and scores, and which one ranked first."""
    mlflow.log_text(table.to_csv(index=False), "trials.csv")
    mlflow.log_table(table, "trials.json")
    if best_run_name:
        mlflow.set_tag("best_trial_run_name", best_run_name)


def log_run_metric(tracking_uri: str, run_id: str, key: str, value: float) -> None:
    """A metric on a run that is not the active one (a trial's score, computed after its job closed the run)."""
    MlflowClient(tracking_uri).log_metric(run_id, key, value)


def record_best_trial(best_trial_id: str, best_run_id: str | None, best_config: dict) -> None:
    """On the active sweep run: which trial won, and its hyperparameters."""
    mlflow.set_tags({"best_trial_id": best_trial_id, "best_trial_run_id": best_run_id})
    mlflow.log_dict(best_config, "best_config.json")


def nested_run_tags(parent_run_id: str | None) -> dict[str, str]:
    """The tags that nest a run under a sweep's parent run (none without a parent)."""
    return {TAG_PARENT_RUN_ID: parent_run_id, TAG_KIND: KIND_TRIAL} if parent_run_id else {}


def start_trial_run(tracking_uri: str, experiment_id: str, parent_run_id: str, tags: Mapping[str, str],
                    trial_name: str, trial_id: str, params: Mapping[str, object]) -> None:
    """Inside a trial's process: its own run, nested under the sweep's parent run."""
    apply_credentials_file()
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.start_run(experiment_id=experiment_id, run_name=trial_name, parent_run_id=parent_run_id,
                     tags={**tags, TAG_KIND: KIND_TRIAL, TAG_TRIAL_ID: trial_id})
    mlflow.log_params(dict(params))


def end_trial_run(status: str, stopped_early: bool | None = None) -> None:
    """Close the active trial run with `status`, tagged stopped_early when that is known."""
    if stopped_early is not None:
        mlflow.set_tag(TAG_STOPPED_EARLY, str(stopped_early).lower())
    mlflow.end_run(status)


def _settled_run(client: MlflowClient, run_id: str, timeout_s: float = 30.0) -> Run:
    """The run once its trial has closed it, or as it is after timeout_s (a process killed first)."""
    deadline = time.monotonic() + timeout_s
    run = client.get_run(run_id)
    while run.info.status == "RUNNING" and time.monotonic() < deadline:
        time.sleep(0.2)
        run = client.get_run(run_id)
    return run


def close_trial_runs(tracking_uri: str, experiment_id: str, parent_run_id: str,
                     trials: list[tuple[str, int]], best_trial_id: str, epochs: int) -> str | None:
    """Tag the best trial's run, close any run its trial could not; returns the best trial's run id.

    `trials` holds (trial id, epochs it ran) for every trial of the sweep.
    """
    client = MlflowClient(tracking_uri)
    children = client.search_runs([experiment_id], filter_string=f"tags.`{TAG_PARENT_RUN_ID}` = '{parent_run_id}'")
    by_trial = {run.data.tags.get(TAG_TRIAL_ID): run for run in children}
    best_run_id = None
    for trial_id, epochs_run in trials:
        run = by_trial.get(trial_id)
        if run is None:
            raise RuntimeError(f"trial {trial_id} left no MLflow run under {parent_run_id}")
        # Waiting first: a trial still closing its own run would race these writes (SQLite rejects the twin tag).
        run = _settled_run(client, run.info.run_id)
        if run.info.status == "RUNNING":  # the trial's process ended before it closed its run
            stopped = epochs_run < epochs
            if TAG_STOPPED_EARLY not in run.data.tags:
                client.set_tag(run.info.run_id, TAG_STOPPED_EARLY, str(stopped).lower())
            client.set_terminated(run.info.run_id, "KILLED" if stopped else "FINISHED")
        if trial_id == best_trial_id:
            client.set_tag(run.info.run_id, TAG_BEST_TRIAL, "true")
            best_run_id = run.info.run_id
    return best_run_id


def log_test_evaluation(val_auroc: float, results: Mapping[str, float], roc_figure: Figure,
                        metrics_csv: str, predictions: pd.DataFrame) -> None:
    """The chosen model's evaluation on the active sweep run: metrics, ROC curves, table, record predictions."""
    mlflow.log_metric(METRIC_BEST_VAL_AUROC, val_auroc)
    mlflow.log_metrics({f"{TEST_METRIC_PREFIX}{k}": v for k, v in results.items()})
    mlflow.log_figure(roc_figure, "roc_curves.png")
    mlflow.log_text(metrics_csv, "metrics/test_metrics.csv")
    mlflow.log_text(json.dumps(dict(results), indent=2), "metrics/test_metrics.json")
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "test_records.parquet"
        predictions.to_parquet(path)
        mlflow.log_artifact(str(path), "predictions")


def log_cross_domain(metrics: Mapping[str, float], table: pd.DataFrame, figure: Figure) -> None:
    """The cross-domain table on the active sweep run: its cells as test metrics, the table and its plot."""
    mlflow.log_metrics({f"{TEST_METRIC_PREFIX}{k}": v for k, v in metrics.items()})
    mlflow.log_text(table.to_csv(index=False), "metrics/cross_domain.csv")
    mlflow.log_figure(figure, "cross_domain.png")


def log_drift_run(tracking_uri: str, experiment: str, run_name: str, tags: Mapping[str, str],
                  params: Mapping[str, object], metrics: Mapping[str, float], embedding_map: Figure,
                  summary: Mapping) -> str:
    """One `crema drift` measurement as its own run: statistics as metrics, the map and a JSON summary."""
    mlflow.set_tracking_uri(tracking_uri)
    experiment_id = ensure_experiment(experiment, tracking_uri)
    with mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags={**tags, TAG_KIND: KIND_DRIFT}) as run:
        mlflow.log_params(dict(params))
        mlflow.log_metrics(dict(metrics))
        mlflow.log_figure(embedding_map, "drift_map.png")
        mlflow.log_dict(dict(summary), "drift.json")
    return run.info.run_id


def log_classifier(classifier_file: str | Path, window_samples: int, classes: list[str],
                   params: Mapping[str, object], provenance: Mapping[str, str], register_model: str | None) -> str:
    """Log (and register, if `register_model` names a model) a fine-tuned classifier to the active run as the
    pyfunc model "model", no pickle in it: the safetensors file of :func:`crema.train.artifacts.save_classifier`
    and :mod:`crema.tracking.classifier_model`. Signature: inputs ``x`` (n, 12, window_samples) float32 raw mV and
    ``lead_mask`` (n, 12) bool, params ``fs`` and ``batch_size``, output one float32 probability column per class
    (named by `classes`). Returns the model's URI."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 12, window_samples), "x"),
                       TensorSpec(np.dtype(np.bool_), (-1, 12), "lead_mask")]),
        outputs=Schema([ColSpec("float", name) for name in classes]),
        params=ParamSchema([ParamSpec("fs", "double", 500.0), ParamSpec("batch_size", "long", 256)]))
    info = mlflow.pyfunc.log_model(name="model", python_model=str(PYFUNC_MODELS / "classifier_model.py"),
                                   artifacts={"classifier": str(classifier_file)}, signature=signature,
                                   pip_requirements=_requirements(), registered_model_name=register_model,
                                   params={k: str(v) for k, v in params.items()}, tags=dict(provenance))
    if register_model:
        client = MlflowClient()
        for key, value in provenance.items():
            client.set_model_version_tag(register_model, str(info.registered_model_version), key, value)
    return info.model_uri


def sweep_runs(tracking_uri: str, experiment: str) -> pd.DataFrame:
    """One row per finished sweep: its SWEEP_GROUP and encoder_init tags, the name of its encoder's
    pretraining run (PRETRAIN_RUN), run id, start time, test_* metrics."""
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    columns = [*SWEEP_GROUP, TAG_ENCODER_INIT, PRETRAIN_RUN, "run_id", "start_time"]
    if exp is None:
        return pd.DataFrame(columns=columns)
    names: dict[str, str] = {}

    def pretrain_run(run_id: str) -> str:
        if run_id and run_id not in names:
            try:
                names[run_id] = client.get_run(run_id).info.run_name or run_id
            except MlflowException:  # deleted since: the id still tells the runs apart
                names[run_id] = run_id
        return names.get(run_id, "")

    rows = []
    page_token = None
    while True:
        page = client.search_runs([exp.experiment_id], filter_string=SWEEP_FILTER, page_token=page_token,
                                  order_by=["attributes.start_time DESC"])
        for run in page:
            tags = run.data.tags
            rows.append({**{k: tags.get(k, "") for k in (*SWEEP_GROUP, TAG_ENCODER_INIT)},
                         PRETRAIN_RUN: pretrain_run(tags.get(TAG_ENCODER_RUN_ID, "")),
                         "run_id": run.info.run_id, "start_time": run.info.start_time,
                         **{k: v for k, v in run.data.metrics.items() if k.startswith(TEST_METRIC_PREFIX)}})
        page_token = page.token
        if not page_token:
            break
    return pd.DataFrame(rows, columns=None if rows else columns)
