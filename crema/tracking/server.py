"""Where to log: the tracking server's URI, its credentials and whether it answers, the experiment and its page
in the MLflow UI."""

from __future__ import annotations

import os
from pathlib import Path

import requests
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from crema.config import ConfigError, redact_uri
from crema.tracking.names import EXPERIMENT_KIND_TRAINING, TAG_EXPERIMENT_KIND


class TrackingUnavailable(ConfigError):
    """The tracking server does not answer: the job stops at once rather than after MLflow's retries."""


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
