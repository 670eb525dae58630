"""The sweep machinery of the probe and fine-tune stages: the task's encoders, one Ray Tune sweep per encoder and
label fraction with its MLflow runs, and the single test evaluation of the sweep's best trial.

MLflow layout of a sweep: a parent run (tags task, method, encoder, label_fraction, label_draw; the sweep's
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

import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import pandas as pd
import ray
import typer
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from rich.console import Console
from rich.table import Table

from crema import tracking
from crema.config import (ConfigError, EncoderSpec, SearchSpace, SweepConfig, TaskConfig, parse_overrides,
                          redact_uri)
from crema.evaluation.cross_domain import (MACRO, ScoredRecords, by_source_metrics, cross_domain_figure,
                                           cross_domain_table)
from crema.data.signals import ALL_LEADS
from crema.evaluation.encoders import encoder_exists
from crema.evaluation.lead_sets import lead_set_suffix
from crema.evaluation.metrics import evaluate, macro_auroc, metrics_table, roc_curve_figure, tune_thresholds
from crema.evaluation.tasks import LabelledWindows, load_task, with_absolute_paths
from crema.stages.common import announce_outputs, exit_2_on_config_error, run_tags

METRIC = tracking.METRIC_VAL_AUROC  # trials are compared on it, in Tune and in MLflow

# Not a terminal (a log, `ray job logs`): rich would wrap the tables at 80 columns; a log line may be longer.
console = Console(width=None if sys.stdout.isatty() else 160)


@dataclass(frozen=True)
class TrialContext:
    """What every trial needs to open its nested MLflow run."""

    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    tags: dict[str, str]


@dataclass(frozen=True)
class SweepResult:
    """One sweep's outcome: its MLflow runs, the best trial's settings and its test metrics."""

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
    cross_domain: pd.DataFrame | None = None  # by source, when the test records come from several or another
    lead_set: str = ALL_LEADS  # the leads the model saw (crema.evaluation.lead_sets)
    fraction_seed: int | None = None  # the training patients' draw (SweepInputs.fraction_seed)

    @property
    def label_subset(self) -> str:
        """The label fraction as the tables print it: 0.01 (draw 2), or 1."""
        return f"{self.label_fraction:g}" + ("" if self.fraction_seed is None else f" (draw {self.fraction_seed})")


@dataclass(frozen=True)
class BestTrialScores:
    """Window scores of the chosen checkpoint, in the row order of the task's val and test windows."""

    val: np.ndarray
    test: np.ndarray
    model_uri: str | None = None


# ------------------------------------------------------------------------------------------ task

def prepare_task(task: TaskConfig | str | Path, overrides: dict | None = None) -> TaskConfig:
    """A validated task with absolute local paths (trials run in other folders); its tracking server must
    answer (a dead one fails here, within seconds, rather than after the embedding pass)."""
    if not isinstance(task, TaskConfig):
        task = load_task(task, overrides)
    elif overrides:
        raise ConfigError("overrides apply to a task file, not to a TaskConfig object")
    tracking_uri = tracking.resolve_tracking_uri(task.tracking.tracking_uri)
    tracking.check_reachable(tracking_uri)
    task = with_absolute_paths(task)
    folder = f"{task.output.rstrip('/')}/{task.name}"
    announce_outputs({"embeddings": f"{folder}/embeddings", "trials": f"{folder}/tune",
                      "mlflow": f"{redact_uri(tracking_uri)} (experiment {task.tracking.experiment})",
                      "dataset": task.dataset})
    return task


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


# ------------------------------------------------------------------------------------------ trials

class TrialReporter:
    """Inside a trial: each epoch's metrics to MLflow and Tune, with a checkpoint when validation improves."""

    def __init__(self, epochs: int):
        self.epochs = epochs
        self.epochs_done = 0
        self.best = -math.inf

    def report(self, metrics: dict[str, float], save_checkpoint: Callable[[str], None]) -> None:
        """`metrics` holds "epoch" and METRIC; `save_checkpoint(folder)` writes the model into folder."""
        tracking.log_metrics(metrics, int(metrics["epoch"]))
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
    trial = tune.get_context()
    tracking.start_trial_run(context.tracking_uri, context.experiment_id, context.parent_run_id, context.tags,
                             trial.get_trial_name(), trial.get_trial_id(), params)
    reporter = TrialReporter(epochs)
    try:
        yield reporter
    except SystemExit:
        # Tune ends a trial by raising SystemExit in its next report: after max_t, or when ASHA stops it.
        # The driver records the outcome itself (_close_trial_runs) if this process is gone first.
        stopped = reporter.epochs_done < epochs
        tracking.end_trial_run("KILLED" if stopped else "FINISHED", stopped_early=stopped)
        raise
    except BaseException:
        tracking.end_trial_run("FAILED")
        raise
    tracking.end_trial_run("FINISHED", stopped_early=False)


# ------------------------------------------------------------------------------------------ Tune

def search_space(sweep: SweepConfig, names: tuple[str, ...]) -> dict:
    """Tune's param_space: a list is a grid axis, a log_uniform range is sampled."""
    def axis(space: SearchSpace):
        if isinstance(space, list):
            return tune.grid_search(space)
        return tune.loguniform(*space.log_uniform)

    return {name: axis(getattr(sweep, name)) for name in names}


def cluster_gpus() -> int:
    """GPUs in the Ray cluster."""
    return int(ray.cluster_resources().get("GPU", 0))


def _tune(trainable, *, sweep: SweepConfig, param_space: dict, resources: dict, storage_path: str, name: str):
    """Run the Tune sweep (ASHA on METRIC, best checkpoint per trial kept); fails if any trial failed."""
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


# ------------------------------------------------------------------------------------ evaluation

def _close_trial_runs(context: TrialContext, grid: tune.ResultGrid, best: tune.Result, epochs: int) -> str | None:
    """Tag the best trial's MLflow run and close the runs their trials could not; the best run's id."""
    trials = [(r.metrics.get("trial_id"), r.metrics.get("training_iteration", 0)) for r in grid]
    return tracking.close_trial_runs(context.tracking_uri, context.experiment_id, context.parent_run_id, trials,
                                     best.metrics.get("trial_id"), epochs)


def _record_predictions(keys: np.ndarray, patients: np.ndarray, labels: np.ndarray, scores: np.ndarray,
                        classes: list[str]) -> pd.DataFrame:
    """One row per test record: its key, patient, and per class its label and score."""
    frame = pd.DataFrame({"record": keys, "patient_key": patients})
    for c, name in enumerate(classes):
        frame[f"label_{name}"] = labels[:, c].astype(np.int8)
        frame[f"score_{name}"] = scores[:, c]
    return frame


@dataclass(frozen=True)
class SweepEvaluation:
    """The chosen model's scores: what evaluate_on_test logged."""

    val_macro_auroc: float  # of the chosen model, on the validation records
    metrics: dict[str, float]  # metrics.evaluate keys, on every test record
    cross_domain: pd.DataFrame | None  # cross_domain_table, when the test records span sources


def evaluate_on_test(task: TaskConfig, val: LabelledWindows, test: LabelledWindows,
                     scores: BestTrialScores) -> SweepEvaluation:
    """Thresholds from validation, metrics with patient bootstrap CIs on test, and by source when the test
    records come from several sources or one the task does not train on; all logged to the active run."""
    _, val_labels, _, val_scores = val.records(scores.val)
    thresholds = tune_thresholds(val_labels, val_scores)
    val_auroc = macro_auroc(val_labels, val_scores).value
    keys, test_labels, test_patients, test_scores = test.records(scores.test)
    results = evaluate(test_labels, test_scores, test_patients, task.classes, thresholds, n_boot=task.n_boot,
                       seed=task.seed)
    tracking.log_test_evaluation(val_auroc, results, roc_curve_figure(test_labels, test_scores, task.classes),
                                 metrics_table(results).to_csv(index=False),
                                 _record_predictions(keys, test_patients, test_labels, test_scores, task.classes))
    records = ScoredRecords(keys, test_labels, test_patients, test_scores)
    table = None
    if task.external_test_sources() or len(set(records.sources())) > 1:
        table = cross_domain_table(records, task.classes, task.in_domain_test_sources(), task.n_boot, task.seed)
        tracking.log_cross_domain(by_source_metrics(table), table, cross_domain_figure(table))
    return SweepEvaluation(val_auroc, results, table)


# ----------------------------------------------------------------------------------------- sweep

def check_evaluable(task: TaskConfig, val: LabelledWindows, test: LabelledWindows) -> None:
    """Validation must rank trials and test must score them: each needs a class with both label values."""
    for role, windows in (("val", val), ("test", test)):
        _, labels, _, _ = windows.records(np.zeros(windows.y.shape))
        positives = labels.sum(axis=0)
        if not ((positives > 0) & (positives < len(labels))).any():
            raise ConfigError(f"task {task.name}: no class of {task.classes} has both positive and negative "
                              f"{role} records ({len(labels)} records): AUROC is undefined")


@dataclass(frozen=True)
class SweepInputs:
    """What one sweep is run on: the task, the method and encoder, the label fraction, and the method's
    trainable with its inputs. `trainable(config, context=TrialContext, **trial_inputs)` runs one trial;
    `score_best(result, tags)` turns the chosen Tune result into window scores on val and test (and may
    log a model with `tags`)."""

    task: TaskConfig
    method: str  # probe | probe_lbfgs | finetune
    spec: EncoderSpec
    fraction: float
    sweep: SweepConfig
    trainable: Callable
    trial_inputs: dict
    hyperparameters: tuple[str, ...]
    resources: dict
    val: LabelledWindows
    test: LabelledWindows
    n_train_windows: int
    score_best: Callable[[object, dict[str, str]], BestTrialScores]
    dataset_version: str | None = None  # the version the stage resolved once and read: the one logged
    lead_set: str = ALL_LEADS  # the leads its windows keep
    fraction_seed: int | None = None  # the seed of the training patients' draw; None at fraction 1 (all of them)

    @property
    def run_name(self) -> str:
        draw = "" if self.fraction_seed is None else f"-s{self.fraction_seed}"
        return (f"{self.method}-{self.task.name}-{self.spec.name}{lead_set_suffix(self.lead_set)}"
                f"-f{self.fraction:g}{draw}")


@contextmanager
def _parent_run(inputs: SweepInputs) -> Iterator[TrialContext]:
    """The method's MLflow parent run (evaluability checked first), active inside the block."""
    task = inputs.task
    check_evaluable(task, inputs.val, inputs.test)
    tracking_uri = tracking.resolve_tracking_uri(task.tracking.tracking_uri)
    experiment_id = tracking.ensure_experiment(task.tracking.experiment, tracking_uri)
    tags = _sweep_tags(inputs, tracking_uri)
    with tracking.sweep_run(tracking_uri, experiment_id, inputs.run_name,
                            {**tags, **run_tags(task.dataset, task.storage_options, inputs.dataset_version)},
                            _sweep_params(inputs), tracking.redact(task.model_dump(mode="json")),
                            {"train": inputs.n_train_windows, "val": len(inputs.val), "test": len(inputs.test)},
                            ) as parent_run_id:
        yield TrialContext(tracking_uri, experiment_id, parent_run_id, tags)


def run_fitted(inputs: SweepInputs, fit: Callable[[], tuple[BestTrialScores, dict, int]]) -> SweepResult:
    """A method without trials to schedule (the converged linear probe): `fit()` -> (scores, chosen settings,
    fits tried), logged and evaluated on test exactly as a sweep's best trial is."""
    with _parent_run(inputs) as context:
        scores, chosen, n_fits = fit()
        tracking.record_best_trial("", None, chosen)
        evaluation = evaluate_on_test(inputs.task, inputs.val, inputs.test, scores)
    return SweepResult(inputs.task.name, inputs.method, inputs.spec.name, inputs.fraction, context.parent_run_id,
                       context.parent_run_id, chosen, evaluation.val_macro_auroc, evaluation.metrics, n_fits, None,
                       context.tags, evaluation.cross_domain, inputs.lead_set, inputs.fraction_seed)


def run_sweep(inputs: SweepInputs) -> SweepResult:
    """One sweep under its MLflow parent run: Tune over the hyperparameters, then the best trial on test."""
    task = inputs.task
    with _parent_run(inputs) as context:
        grid = _run_trials(inputs, context)
        best = grid.get_best_result(METRIC, "max", scope="all")
        best_run_id = _close_trial_runs(context, grid, best, inputs.sweep.epochs)
        best_config = {k: best.config[k] for k in inputs.hyperparameters}
        tracking.record_best_trial(best.metrics["trial_id"], best_run_id, best_config)
        scores = inputs.score_best(best, context.tags)
        evaluation = evaluate_on_test(task, inputs.val, inputs.test, scores)
    return SweepResult(task.name, inputs.method, inputs.spec.name, inputs.fraction, context.parent_run_id,
                       best_run_id, best_config, evaluation.val_macro_auroc, evaluation.metrics, len(grid),
                       scores.model_uri, context.tags, evaluation.cross_domain, inputs.lead_set, inputs.fraction_seed)


def _sweep_tags(inputs: SweepInputs, tracking_uri: str) -> dict[str, str]:
    """What identifies the sweep (the comparison table groups by these) and its encoder's lineage."""
    task = inputs.task
    return {
        tracking.TAG_TASK: task.name, tracking.TAG_METHOD: inputs.method,
        tracking.TAG_LABEL_FRACTION: f"{inputs.fraction:g}", tracking.TAG_LEAD_SET: inputs.lead_set,
        tracking.TAG_LABEL_DRAW: "" if inputs.fraction_seed is None else str(inputs.fraction_seed),
        tracking.TAG_TRAIN_SOURCES: ",".join(task.sources_for("train") or ["*"]),
        tracking.TAG_TEST_SOURCES: ",".join(task.sources_for("test") or ["*"]),
        **tracking.encoder_provenance(inputs.spec, tracking_uri),
    }


def _sweep_params(inputs: SweepInputs) -> dict[str, object]:
    """The sweep's settings and data sizes, as the parent run's params."""
    task = inputs.task
    return {**tracking.flatten_params({"sweep": inputs.sweep.model_dump(mode="json"),
                                       "classes": ",".join(task.classes), "n_boot": task.n_boot,
                                       "seed": task.seed}),
            "n_train_windows": inputs.n_train_windows, "n_val_windows": len(inputs.val),
            "n_test_windows": len(inputs.test)}


def _run_trials(inputs: SweepInputs, context: TrialContext) -> tune.ResultGrid:
    """The Tune sweep itself, its checkpoints under <output>/<task>/tune/."""
    return _tune(tune.with_parameters(inputs.trainable, context=context, **inputs.trial_inputs), sweep=inputs.sweep,
                 param_space=search_space(inputs.sweep, inputs.hyperparameters), resources=inputs.resources,
                 storage_path=f"{inputs.task.output.rstrip('/')}/{inputs.task.name}/tune",
                 name=f"{inputs.run_name}-{time.strftime('%Y%m%d-%H%M%S')}")


# ---------------------------------------------------------------------------------------- commands

def print_results(results: list[SweepResult]) -> None:
    """The sweeps' test results as a table, then each one's best settings and MLflow run."""
    table = Table(title="test split, best trial chosen on validation")
    for column in ("method", "encoder", "leads", "fraction", "trials", "val AUROC", "test AUROC [95% CI]", "test F1"):
        table.add_column(column)
    for r in results:
        m = r.test_metrics
        table.add_row(r.method, r.encoder, r.lead_set, r.label_subset, str(r.n_trials), f"{r.val_macro_auroc:.3f}",
                      f"{m['macro_auroc']:.3f} [{m['macro_auroc_ci_low']:.3f}, {m['macro_auroc_ci_high']:.3f}]",
                      f"{m['macro_f1']:.3f}")
    console.print(table)
    print_cross_domain(results)
    for r in results:
        best = ", ".join(f"{k}={v:.3g}" for k, v in r.best_config.items())
        console.print(f"{r.method} {r.encoder} ({r.lead_set} leads) @ {r.label_subset}: best {best}; MLflow run {r.parent_run_id}"
                      + (f"; model {r.model_uri}" if r.model_uri else ""))


def _class_cell(row: dict) -> str:
    return f"{row['auroc']:.2f}" if np.isfinite(row["auroc"]) else f"– ({row['note']})"


def print_cross_domain(results: list[SweepResult]) -> None:
    """Each sweep's test AUROC by source: the macro with its 95% CI and its change from in-domain (Δ), and
    each class's; a class a source lacks is a dash with the reason."""
    with_table = [r for r in results if r.cross_domain is not None]
    if not with_table:
        return
    classes = [c for c in dict.fromkeys(with_table[0].cross_domain["class"]) if c != MACRO]
    table = Table(title="test AUROC by source (95% patient-bootstrap CI; Δ: change from in-domain)")
    for column in ("method", "encoder", "leads", "fraction", "source", "records", "macro [95% CI]", "Δ", *classes):
        table.add_column(column)
    for r in with_table:
        for source, rows in r.cross_domain.groupby("source", sort=False):
            cells = {row["class"]: row for row in rows.to_dict("records")}
            macro = cells[MACRO]
            change = f"{-macro['drop']:+.3f}" if np.isfinite(macro["drop"]) and macro["drop"] else ""
            table.add_row(r.method, r.encoder, r.lead_set, r.label_subset, f"{source} ({macro['domain']})",
                          str(int(macro["n_records"])),
                          f"{macro['auroc']:.3f} [{macro['ci_low']:.3f}, {macro['ci_high']:.3f}]", change,
                          *(_class_cell(cells[c]) for c in classes))
    console.print(table)


def sweep_command(run_stage: Callable[..., list[SweepResult]], doc: str) -> Callable[..., None]:
    """The typer command of a sweep stage (probe, finetune): same options, same exit codes."""

    def main(
        task: Annotated[Path, typer.Option("--task", "-t", help="Task YAML (configs/tasks/*.yaml)")],
        encoder: Annotated[Optional[list[str]], typer.Option(
            "--encoder", "-e", help="Only this encoder of the task (repeatable)")] = None,
        overrides: Annotated[Optional[list[str]], typer.Argument(help="key=value settings, e.g. probe.epochs=10")] = None,
    ) -> None:
        with exit_2_on_config_error():
            results = run_stage(task, parse_overrides(overrides or []), encoder or None)
        print_results(results)

    main.__doc__ = doc
    return main
