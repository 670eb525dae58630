"""Sweeps: their parent and trial runs, and reading finished sweeps back (:func:`sweep_runs`, behind
``crema compare``).

A sweep (probe, fine-tune) leaves a parent run (``crema.kind=sweep``; tags task, method, encoder,
label_fraction, sources; the test metrics) and one nested run per trial (``crema.kind=trial``), which the
trial opens in its own process. A pretraining sweep's parent run (``crema.kind=pretrain_sweep``) holds its
trials' pretraining runs.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import mlflow
import pandas as pd
import yaml
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from crema.tracking.names import (KIND_PRETRAIN_SWEEP, KIND_SWEEP, KIND_TRIAL, PRETRAIN_RUN, SWEEP_FILTER,
                                  SWEEP_GROUP, TAG_BEST_TRIAL, TAG_ENCODER_INIT, TAG_ENCODER_RUN_ID, TAG_KIND,
                                  TAG_PARENT_RUN_ID, TAG_STOPPED_EARLY, TAG_TRIAL_ID, TEST_METRIC_PREFIX)
from crema.tracking.runs import log_dataset_input
from crema.tracking.server import apply_credentials_file, ensure_experiment


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
