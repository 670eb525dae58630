"""What the probe and fine-tune stages share: the task's encoders, one Ray Tune sweep per encoder and
label fraction with its MLflow runs, and the single test evaluation of the sweep's best trial.

MLflow layout of a sweep: a parent run (tags task, method, encoder, label_fraction; the sweep's
settings as params; the task config, the test metrics, ROC curves, metrics table and record-level
test predictions as artifacts) and one nested run per trial, which the trial creates itself in its
own process under the parent's id (tag ``mlflow.parentRunId``), holding its hyperparameters and
per-epoch curves. After the sweep the driver tags the best trial's run ``best_trial=true`` and closes
the runs of trials ASHA stopped (``stopped_early=true``, status KILLED).

Trials are compared on the validation macro AUROC (records: mean of their windows' scores). The best
trial is the one whose best epoch scored highest, and that epoch's checkpoint is the model: thresholds
are tuned on its validation scores, and the test split is scored once, with it.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import pandas as pd
import yaml

import typer
from rich.console import Console
from rich.table import Table

from crema.config import ConfigError, EncoderSpec, SearchSpace, SweepConfig, TaskConfig, parse_overrides
from crema.metrics import evaluate, macro_auroc, metrics_table, roc_curve_figure, tune_thresholds
from crema.tasks import LabelledWindows, encoder_exists, load_task, with_absolute_paths
from crema.tracking import ensure_experiment

METRIC = "val_macro_auroc"
KIND_TAG = "crema.kind"  # "sweep" on a parent run, "trial" on its children


console = Console()


@dataclass(frozen=True)
class TrialContext:
    """What every trial needs to open its nested MLflow run."""

    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    tags: dict[str, str]


@dataclass(frozen=True)
class SweepResult:
    task: str
    method: str  # probe | finetune
    encoder: str
    label_fraction: float
    parent_run_id: str
    best_trial_run_id: str
    best_config: dict
    val_macro_auroc: float  # of the chosen checkpoint, recomputed on the validation records
    test_metrics: dict[str, float]  # metrics.evaluate keys, on the test records
    n_trials: int
    model_uri: str | None = None  # fine-tune: the logged model
    tags: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class BestTrialScores:
    """Window scores of the chosen checkpoint, in the row order of the task's val and test windows."""

    val: np.ndarray
    test: np.ndarray
    model_uri: str | None = None


# ------------------------------------------------------------------------------------------ task

def prepare_task(task: TaskConfig | str | Path, overrides: dict | None = None) -> TaskConfig:
    """A validated task with absolute local paths (trials run in other folders)."""
    if not isinstance(task, TaskConfig):
        task = load_task(task, overrides)
    elif overrides:
        raise ConfigError("overrides apply to a task file, not to a TaskConfig object")
    return with_absolute_paths(task)


def select_encoders(task: TaskConfig, method: str, names: list[str] | None) -> list[EncoderSpec]:
    """The task's encoders evaluated by `method`, or only the named ones; their artifacts must exist."""
    known = {e.name: e for e in task.encoders}
    unknown = sorted(set(names or []) - set(known))
    if unknown:
        raise ConfigError(f"task {task.name} has no encoder {unknown}; it has {sorted(known)}")
    chosen = [e for e in task.encoders if (names is None or e.name in names) and method in e.methods]
    if not chosen:
        raise ConfigError(f"task {task.name}: no encoder selected for {method}")
    needed = {e.path for e in chosen if e.path} | {known[e.like].path for e in chosen if e.like}
    missing = sorted(p for p in needed if not encoder_exists(p, task.storage_options))
    if missing:
        raise ConfigError(f"encoder artifacts not found: {missing}")
    return chosen


# ---------------------------------------------------------------------------------------- MLflow

def encoder_provenance(spec: EncoderSpec, tracking_uri: str) -> dict[str, str]:
    """Tags that tie a downstream run to its encoder: the artifact and the pretraining run that wrote it."""
    from mlflow.tracking import MlflowClient

    tags = {"encoder": spec.name, "encoder_init": spec.init}
    if spec.description:
        tags["encoder_description"] = spec.description
    if spec.init == "random":
        tags["encoder_seed"] = str(spec.seed)
        if spec.like:
            tags["encoder_like"] = spec.like
        return tags
    # Not "encoder_path": the pretraining run that wrote the artifact carries that tag, and is found by it.
    tags["encoder_artifact"] = spec.path
    run_id = spec.mlflow_run_id
    if run_id is None:
        client = MlflowClient(tracking_uri)
        quoted = spec.path.replace("'", "\\'")
        experiments = [e.experiment_id for e in client.search_experiments()]
        runs = client.search_runs(experiments, filter_string=f"tags.encoder_path = '{quoted}'",
                                  order_by=["attributes.start_time DESC"], max_results=1) if experiments else []
        run_id = runs[0].info.run_id if runs else None
    if run_id:
        tags["encoder_run_id"] = run_id
    return tags


class TrialReporter:
    """Inside a trial: each epoch's metrics to MLflow and Tune, with a checkpoint when validation improves."""

    def __init__(self, epochs: int):
        self.epochs = epochs
        self.epochs_done = 0
        self.best = -math.inf

    def report(self, metrics: dict[str, float], save_checkpoint: Callable[[str], None]) -> None:
        """`metrics` holds "epoch" and METRIC; `save_checkpoint(folder)` writes the model into folder."""
        import mlflow
        from ray import tune

        mlflow.log_metrics(metrics, step=int(metrics["epoch"]))
        self.epochs_done = int(metrics["epoch"])
        if metrics[METRIC] > self.best:
            self.best = metrics[METRIC]
            with tempfile.TemporaryDirectory() as folder:
                save_checkpoint(folder)
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))
        else:
            tune.report(metrics)


@contextmanager
def trial_run(context: TrialContext, params: dict, epochs: int) -> Iterator[TrialReporter]:
    """Inside a Tune trial: this trial's MLflow run, nested under the sweep's parent run."""
    import mlflow
    from ray import tune

    trial = tune.get_context()
    mlflow.set_tracking_uri(context.tracking_uri)
    mlflow.start_run(experiment_id=context.experiment_id, run_name=trial.get_trial_name(),
                     parent_run_id=context.parent_run_id,
                     tags={**context.tags, KIND_TAG: "trial", "ray_trial_id": trial.get_trial_id()})
    reporter = TrialReporter(epochs)
    try:
        mlflow.log_params(params)
        yield reporter
    except SystemExit:
        # Tune ends a trial by raising SystemExit in its next report: after max_t, or when ASHA stops it.
        # The driver records the outcome itself (_close_trial_runs) if this process is gone first.
        stopped = reporter.epochs_done < epochs
        mlflow.set_tag("stopped_early", str(stopped).lower())
        mlflow.end_run("KILLED" if stopped else "FINISHED")
        raise
    except BaseException:
        mlflow.end_run("FAILED")
        raise
    mlflow.set_tag("stopped_early", "false")
    mlflow.end_run("FINISHED")


# ------------------------------------------------------------------------------------------ Tune

def search_space(sweep: SweepConfig, names: tuple[str, ...]) -> dict:
    """Tune's param_space: a list is a grid axis, a log_uniform range is sampled."""
    from ray import tune

    def axis(space: SearchSpace):
        if isinstance(space, list):
            return tune.grid_search(space)
        return tune.loguniform(*space.log_uniform)

    return {name: axis(getattr(sweep, name)) for name in names}


def cluster_gpus() -> int:
    import ray

    return int(ray.cluster_resources().get("GPU", 0))


def _tune(trainable, *, sweep: SweepConfig, param_space: dict, resources: dict, storage_path: str, name: str):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    scheduler = ASHAScheduler(time_attr="training_iteration", max_t=sweep.epochs,
                              grace_period=min(sweep.grace_period, sweep.epochs),
                              reduction_factor=sweep.reduction_factor)
    tuner = tune.Tuner(
        tune.with_resources(trainable, resources),
        param_space=param_space,
        # Reused actors spare each trial a process start and the torch/MLflow imports (seconds per trial).
        tune_config=tune.TuneConfig(metric=METRIC, mode="max", scheduler=scheduler, num_samples=sweep.num_samples,
                                    max_concurrent_trials=sweep.max_concurrent_trials, reuse_actors=True),
        run_config=tune.RunConfig(
            name=name, storage_path=storage_path, verbose=1,
            # Trials report a checkpoint only when their validation score improves: the one kept is their best.
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1, checkpoint_score_attribute=METRIC,
                                                    checkpoint_score_order="max"),
        ),
    )
    # num_to_keep forces an experiment snapshot per checkpoint; Tune warns about it every few seconds.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    grid = tuner.fit()
    if grid.errors:
        raise RuntimeError(f"{len(grid.errors)} of {len(grid)} trials failed; first: {grid.errors[0]}")
    return grid


def _settled_run(client, run_id: str, timeout_s: float = 30.0):
    """The run once its trial has closed it (trial_run), or as it is after timeout_s (a process killed first)."""
    deadline = time.monotonic() + timeout_s
    run = client.get_run(run_id)
    while run.info.status == "RUNNING" and time.monotonic() < deadline:
        time.sleep(0.2)
        run = client.get_run(run_id)
    return run


def _close_trial_runs(tracking_uri: str, experiment_id: str, parent_run_id: str, grid, best, epochs: int) -> str:
    """Tag the best trial's run, close any run its trial could not; returns the best trial's run id."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    children = client.search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'")
    by_trial = {run.data.tags.get("ray_trial_id"): run for run in children}
    best_run_id = None
    for result in grid:
        run = by_trial.get(result.metrics.get("trial_id"))
        if run is None:
            raise RuntimeError(f"trial {result.metrics.get('trial_id')} left no MLflow run under {parent_run_id}")
        # Waiting first: a trial still closing its own run would race these writes (SQLite rejects the twin tag).
        run = _settled_run(client, run.info.run_id)
        if run.info.status == "RUNNING":  # the trial's process ended before it closed its run
            stopped = result.metrics.get("training_iteration", 0) < epochs
            if "stopped_early" not in run.data.tags:
                client.set_tag(run.info.run_id, "stopped_early", str(stopped).lower())
            client.set_terminated(run.info.run_id, "KILLED" if stopped else "FINISHED")
        if result.metrics.get("trial_id") == best.metrics.get("trial_id"):
            client.set_tag(run.info.run_id, "best_trial", "true")
            best_run_id = run.info.run_id
    return best_run_id


# ------------------------------------------------------------------------------------ evaluation

def _record_predictions(keys: np.ndarray, patients: np.ndarray, labels: np.ndarray, scores: np.ndarray,
                        classes: list[str]) -> pd.DataFrame:
    frame = pd.DataFrame({"record": keys, "patient_key": patients})
    for c, name in enumerate(classes):
        frame[f"label_{name}"] = labels[:, c].astype(np.int8)
        frame[f"score_{name}"] = scores[:, c]
    return frame


def log_test_evaluation(task: TaskConfig, val: LabelledWindows, test: LabelledWindows,
                        scores: BestTrialScores) -> tuple[float, dict[str, float]]:
    """Thresholds from validation, metrics with patient bootstrap CIs on test, all logged to the active run."""
    import mlflow

    _, val_labels, _, val_scores = val.records(scores.val)
    thresholds = tune_thresholds(val_labels, val_scores)
    val_auroc = macro_auroc(val_labels, val_scores).value
    keys, test_labels, test_patients, test_scores = test.records(scores.test)
    results = evaluate(test_labels, test_scores, test_patients, task.classes, thresholds, n_boot=task.n_boot,
                       seed=task.seed)
    mlflow.log_metric("best_val_macro_auroc", val_auroc)
    mlflow.log_metrics({f"test_{k}": v for k, v in results.items()})
    mlflow.log_figure(roc_curve_figure(test_labels, test_scores, task.classes), "roc_curves.png")
    mlflow.log_text(metrics_table(results).to_csv(index=False), "metrics/test_metrics.csv")
    mlflow.log_text(json.dumps(results, indent=2), "metrics/test_metrics.json")
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "test_records.parquet"
        _record_predictions(keys, test_patients, test_labels, test_scores, task.classes).to_parquet(path)
        mlflow.log_artifact(str(path), "predictions")
    return val_auroc, results


# ----------------------------------------------------------------------------------------- sweep

def _dataset_tags(task: TaskConfig) -> dict[str, str]:
    import ray

    from crema.tracking import dataset_tags, git_commit

    tags = dataset_tags(task.dataset, task.storage_options)
    commit = git_commit()
    if commit:
        tags["git_commit"] = commit
    tags["ray_version"] = ray.__version__
    return tags


def check_evaluable(task: TaskConfig, val: LabelledWindows, test: LabelledWindows) -> None:
    """Validation must rank trials and test must score them: each needs a class with both label values."""
    for role, windows in (("val", val), ("test", test)):
        _, labels, _, _ = windows.records(np.zeros(windows.y.shape))
        positives = labels.sum(axis=0)
        if not ((positives > 0) & (positives < len(labels))).any():
            raise ConfigError(f"task {task.name}: no class of {task.classes} has both positive and negative "
                              f"{role} records ({len(labels)} records): AUROC is undefined")


def run_sweep(*, task: TaskConfig, method: str, spec: EncoderSpec, fraction: float, sweep: SweepConfig,
              trainable: Callable, trial_inputs: dict, hyperparameters: tuple[str, ...], resources: dict,
              val: LabelledWindows, test: LabelledWindows, n_train_windows: int,
              score_best: Callable[[object, dict[str, str]], BestTrialScores]) -> SweepResult:
    """One sweep under its MLflow parent run: Tune over `hyperparameters`, then the best trial on test.

    `trainable(config, context=TrialContext, **trial_inputs)` runs one trial; `score_best(result, tags)`
    turns the chosen Tune result into window scores on val and test (and may log a model with `tags`).
    """
    import mlflow
    from ray import tune

    from crema.tracking import flatten_params, redact, resolve_tracking_uri

    check_evaluable(task, val, test)
    tracking_uri = resolve_tracking_uri(task.tracking.tracking_uri)
    experiment_id = ensure_experiment(task.tracking.experiment, tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    tags = {
        "task": task.name, "method": method, "label_fraction": f"{fraction:g}",
        "train_sources": ",".join(task.sources_for("train") or ["*"]),
        "test_sources": ",".join(task.sources_for("test") or ["*"]),
        **encoder_provenance(spec, tracking_uri),
    }
    run_name = f"{method}-{task.name}-{spec.name}-f{fraction:g}"
    with mlflow.start_run(experiment_id=experiment_id, run_name=run_name,
                          tags={**tags, **_dataset_tags(task), KIND_TAG: "sweep"}) as parent:
        mlflow.log_params(flatten_params({"sweep": sweep.model_dump(mode="json"), "classes": ",".join(task.classes),
                                          "n_boot": task.n_boot, "seed": task.seed}))
        mlflow.log_params({"n_train_windows": n_train_windows, "n_val_windows": len(val),
                           "n_test_windows": len(test)})
        mlflow.log_text(yaml.safe_dump(redact(task.model_dump(mode="json")), sort_keys=False), "task.yaml")
        context = TrialContext(tracking_uri, experiment_id, parent.info.run_id, tags)
        grid = _tune(tune.with_parameters(trainable, context=context, **trial_inputs), sweep=sweep,
                     param_space=search_space(sweep, hyperparameters), resources=resources,
                     storage_path=f"{task.output.rstrip('/')}/{task.name}/tune",
                     name=f"{run_name}-{time.strftime('%Y%m%d-%H%M%S')}")
        best = grid.get_best_result(METRIC, "max", scope="all")
        best_run_id = _close_trial_runs(tracking_uri, experiment_id, parent.info.run_id, grid, best, sweep.epochs)
        best_config = {k: best.config[k] for k in hyperparameters}
        mlflow.set_tags({"best_trial_id": best.metrics["trial_id"], "best_trial_run_id": best_run_id})
        mlflow.log_dict(best_config, "best_config.json")
        scores = score_best(best, tags)
        val_auroc, results = log_test_evaluation(task, val, test, scores)
    return SweepResult(task.name, method, spec.name, fraction, parent.info.run_id, best_run_id, best_config,
                       val_auroc, results, len(grid), scores.model_uri, tags)


# ---------------------------------------------------------------------------------------- commands

def print_results(results: list[SweepResult]) -> None:
    table = Table(title="test split, best trial chosen on validation")
    for column in ("method", "encoder", "fraction", "trials", "val AUROC", "test AUROC [95% CI]", "test F1"):
        table.add_column(column)
    for r in results:
        m = r.test_metrics
        table.add_row(r.method, r.encoder, f"{r.label_fraction:g}", str(r.n_trials), f"{r.val_macro_auroc:.3f}",
                      f"{m['macro_auroc']:.3f} [{m['macro_auroc_ci_low']:.3f}, {m['macro_auroc_ci_high']:.3f}]",
                      f"{m['macro_f1']:.3f}")
    console.print(table)
    for r in results:
        best = ", ".join(f"{k}={v:.3g}" for k, v in r.best_config.items())
        console.print(f"{r.method} {r.encoder} @ {r.label_fraction:g}: best {best}; MLflow run {r.parent_run_id}"
                      + (f"; model {r.model_uri}" if r.model_uri else ""))


def sweep_command(run_stage: Callable[..., list[SweepResult]], doc: str) -> Callable[..., None]:
    """The typer command of a sweep stage (probe, finetune): same options, same exit codes."""

    def main(
        task: Annotated[Path, typer.Option("--task", "-t", help="Task YAML (configs/tasks/*.yaml)")],
        encoder: Annotated[Optional[list[str]], typer.Option(
            "--encoder", "-e", help="Only this encoder of the task (repeatable)")] = None,
        overrides: Annotated[Optional[list[str]], typer.Argument(help="key=value settings, e.g. probe.epochs=10")] = None,
    ) -> None:
        try:
            results = run_stage(task, parse_overrides(overrides or []), encoder or None)
        except ConfigError as err:
            console.print(f"[red]invalid configuration:[/red] {err}")
            raise typer.Exit(2)
        print_results(results)

    main.__doc__ = doc
    return main
