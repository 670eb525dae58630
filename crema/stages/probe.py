"""Linear-probe evaluation: `python -m crema.stages.probe --task configs/tasks/ptbxl_superdiagnostic.yaml [key=value ...]`.

Also `crema probe`, and `ray job submit -- python -m crema.stages.probe ...` on a cluster.

For each selected encoder, one Ray Data pass over the task's windows (an actor pool, one encoder per
actor, a GPU each when the cluster has them) writes the frozen embeddings to Parquet under
``<output>/<task>/embeddings/``; the pass is skipped when the same encoder weights have already
embedded the same dataset. Then, per label fraction, a Ray Tune sweep trains linear heads on those
embeddings (ASHA on the validation macro AUROC), and the best one is evaluated once on the test split
(see :mod:`crema.stages.sweep` for the MLflow runs it leaves). Before each sweep, with the task's
``converged_probe`` (the default), the measuring stick of the SSL literature is run and logged the same way
as method ``probe_lbfgs``: an L-BFGS logistic regression trained to convergence, its C chosen on validation.

Exit codes: 0 done; 2 invalid configuration (bad task file, unknown encoder, missing artifact).
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import torch
import typer
from fsspec.core import url_to_fs
from rich.console import Console

from crema.config import EncoderSpec, TaskConfig
from crema.data.signals import ALL_LEADS
from crema.tracking import TAG_DATASET_VERSION, dataset_tags
from crema.evaluation.embeddings import embedding_matrix
from crema.evaluation.encoders import build_task_encoder
from crema.evaluation.features import FEATURES_ID
from crema.evaluation.lead_sets import hide_leads, lead_set_suffix
from crema.model.network import REPRESENTATION
from crema.evaluation.probe import DEFAULT_CS, LinearProbe, fit_converged_probe, predict_probe, train_probe
from crema.evaluation.tasks import (META_COLUMNS, SIGNAL_COLUMNS, LabelledWindows, label_fraction_subset, split_roles,
                                    task_sources)
from crema.stages.common import init_ray, pyarrow_filesystem, read_windows_table
from crema.train import safe_files
from crema.train.artifacts import encoder_to_bytes
from crema.train.checkpoint import load_weights, save_weights
from crema.stages.embed import embed_dataset
from crema.stages.sweep import (METRIC, BestTrialScores, SweepInputs, SweepResult, TrialContext, prepare_task,
                                print_results, run_fitted, run_sweep, select_encoders, sweep_command, trial_run)

console = Console()
COMPLETE_MARKER = "_COMPLETE"  # written last; a leading "_" keeps Parquet readers off it
HYPERPARAMETERS = ("lr", "weight_decay")

# A sweep small enough for the `crema demo` budget on 2 CPUs: 4 trials of 8 epochs, a 200-resample CI.
DEMO_OVERRIDES = {"probe.epochs": 8, "probe.grace_period": 2, "probe.num_samples": 1,
                  "probe.lr": [1e-3, 1e-2], "probe.weight_decay": [0.0, 1e-3], "probe.batch_size": 128,
                  "n_boot": 200, "label_fractions": [1.0]}


# ------------------------------------------------------------------------------------- embeddings

def read_task_windows(task: TaskConfig, sources: list[str], version: str | None = None):
    """The windows of `sources` (at dataset `version`, default the current one) as a Ray Dataset read
    through the catalog: the partition filter skips other sources' files unopened."""
    from pyiceberg.expressions import In

    return read_windows_table(task.dataset, task.storage_options, In("source", sources),
                              [*SIGNAL_COLUMNS, *META_COLUMNS], version)


def embeddings_key(blob: bytes | None, dataset_tags: dict[str, str], sources: list[str]) -> str:
    """Same encoder weights and representation (None: the feature floor's formula), same dataset content, same
    sources: same embeddings."""
    weights = FEATURES_ID if blob is None else (safe_files.content_digest(blob)  # see content_digest
                                                 + REPRESENTATION).encode()
    digest = hashlib.sha256(weights)
    digest.update(json.dumps([dataset_tags["dataset"], dataset_tags.get(TAG_DATASET_VERSION), sorted(sources)])
                  .encode())
    return digest.hexdigest()[:16]


def task_embeddings(task: TaskConfig, spec: EncoderSpec, blob: bytes | None, sources: list[str],
                    dataset_tags: dict[str, str], lead_set: str = ALL_LEADS) -> pa.Table:
    """Every window of `sources`, with only the leads of `lead_set`, embedded by the encoder of `blob` (None:
    the feature floor's features): computed once, then read back from Parquet."""
    name = f"{spec.name}{lead_set_suffix(lead_set)}-{embeddings_key(blob, dataset_tags, sources)}"
    uri = f"{task.output.rstrip('/')}/{task.name}/embeddings/{name}"
    fs, path = url_to_fs(uri, **task.storage_options)
    marker = f"{path}/{COMPLETE_MARKER}"
    if fs.exists(marker):
        console.print(f"embeddings of {spec.name}: reusing {uri}")
    else:
        if fs.exists(path):  # an interrupted pass: its files are incomplete
            fs.rm(path, recursive=True)
        console.print(f"embeddings of {spec.name}: one pass over {', '.join(sources)} → {uri}")
        windows = read_task_windows(task, sources, dataset_tags.get(TAG_DATASET_VERSION))
        if lead_set != ALL_LEADS:
            windows = windows.map_batches(hide_leads, fn_kwargs={"name": lead_set}, batch_format="pyarrow",
                                          udf_modifying_row_count=False)
        write_fs, write_path = pyarrow_filesystem(uri, task.storage_options)
        embed_dataset(windows, blob, write_path, write_fs, settings=task.embed)
        fs.pipe(marker, json.dumps({"encoder": spec.name, "sources": sources, "lead_set": lead_set}).encode())
    return pads.dataset(path, filesystem=fs, format="parquet").to_table()


# ------------------------------------------------------------------------------------------ trial

def probe_trial(config: dict, *, context: TrialContext, z_train: np.ndarray, y_train: np.ndarray,
                z_val: np.ndarray, val: LabelledWindows, epochs: int, batch_size: int, seed: int) -> None:
    """One Tune trial: a linear probe with this config's lr and weight decay, reported every epoch."""
    with trial_run(context, config, epochs) as reporter:
        for step in train_probe(z_train, y_train, lr=config["lr"], weight_decay=config["weight_decay"],
                                epochs=epochs, batch_size=batch_size, seed=seed):
            metrics = {"epoch": step.epoch, "train_loss": step.train_loss,
                       METRIC: val.macro_auroc(predict_probe(step.model, z_val))}
            reporter.report(metrics, partial(save_weights, model=step.model))


def load_probe(result, dim: int, num_classes: int) -> LinearProbe:
    """The best checkpoint's probe of a Tune result."""
    checkpoint = result.get_best_checkpoint(METRIC, "max")
    model = LinearProbe(torch.zeros(dim), torch.ones(dim), num_classes)
    with checkpoint.as_directory() as folder:
        load_weights(folder, model)
    return model


def score_best_probe(result, tags: dict[str, str], *, z_val: np.ndarray, z_test: np.ndarray,
                     num_classes: int) -> BestTrialScores:
    """The chosen probe's window scores on val and test (a head on embeddings: cheap, in the driver)."""
    model = load_probe(result, z_val.shape[1], num_classes)
    return BestTrialScores(predict_probe(model, z_val), predict_probe(model, z_test))


# ---------------------------------------------------------------------------------------- command

def run(task: TaskConfig | str | Path, overrides: dict | None = None,
        encoders: list[str] | None = None) -> list[SweepResult]:
    """Probe every selected encoder of the task at every lead set and label fraction; one SweepResult per sweep."""
    task = prepare_task(task, overrides)
    specs = select_encoders(task, "probe", encoders)
    init_ray()
    tags = dataset_tags(task.dataset, task.storage_options)  # the version, resolved once: every read and run uses it
    sources = task_sources(task, [s for s in tags["dataset_sources"].split(",") if s])
    sweep = task.probe
    results = []
    for spec, lead_set in itertools.product(specs, task.lead_sets):
        blob = None if spec.init == "features" else encoder_to_bytes(build_task_encoder(spec, task))
        roles = split_roles(task_embeddings(task, spec, blob, sources, tags, lead_set), task)
        val = LabelledWindows.from_table(roles["val"], task.classes)
        test = LabelledWindows.from_table(roles["test"], task.classes)
        z_val, z_test = embedding_matrix(roles["val"]), embedding_matrix(roles["test"])
        for fraction, fraction_seed in task.label_subsets():
            train = label_fraction_subset(roles["train"], fraction, fraction_seed)
            y_train = LabelledWindows.from_table(train, task.classes).y
            z_train = embedding_matrix(train)
            inputs = SweepInputs(
                task=task, method="probe", spec=spec, fraction=fraction, sweep=sweep, trainable=probe_trial,
                trial_inputs=dict(z_train=z_train, y_train=y_train, z_val=z_val, val=val,
                                  epochs=sweep.epochs, batch_size=sweep.batch_size, seed=task.seed),
                hyperparameters=HYPERPARAMETERS,
                resources={"cpu": sweep.cpus_per_trial, "gpu": sweep.gpus_per_trial or 0},
                val=val, test=test, n_train_windows=train.num_rows,
                score_best=partial(score_best_probe, z_val=z_val, z_test=z_test, num_classes=len(task.classes)),
                dataset_version=tags.get(TAG_DATASET_VERSION), lead_set=lead_set, fraction_seed=fraction_seed)
            if task.converged_probe:
                results.append(run_fitted(replace(inputs, method="probe_lbfgs", hyperparameters=("C",)),
                                          partial(converged_probe_scores, z_train, y_train, z_val, z_test, val)))
            results.append(run_sweep(inputs))
    return results


def converged_probe_scores(z_train: np.ndarray, y_train: np.ndarray, z_val: np.ndarray, z_test: np.ndarray,
                           val: LabelledWindows) -> tuple[BestTrialScores, dict, int]:
    """The L-BFGS probe trained to convergence, C chosen on the validation records: window scores, C, fits."""
    probe = fit_converged_probe(z_train, y_train, z_val, val.y,
                                score=lambda _, window_scores: val.macro_auroc(window_scores))
    return BestTrialScores(probe.predict(z_val), probe.predict(z_test)), {"C": probe.C}, len(DEFAULT_CS)


def run_demo(task: str | Path, *, dataset: str, encoders: list[dict], tracking_uri: str) -> list[SweepResult]:
    """The probe step of `crema demo`: its pretrained encoders (EncoderSpec dicts), a random-init baseline of
    the same architecture and the feature floor, in a sweep small enough for 2 CPUs."""
    random_init = {"name": "random_init", "init": "random", "like": encoders[0]["name"],
                   "description": "random initialisation, same architecture"}
    features = {"name": "features", "init": "features", "description": "nine hand-made features per lead"}
    overrides = {**DEMO_OVERRIDES, "dataset": dataset, "output": str(Path(dataset).parent / "downstream"),
                 "tracking.tracking_uri": tracking_uri, "encoders": [*encoders, random_init, features]}
    results = run(task, overrides)
    print_results(results)
    return results


main = sweep_command(run, "Linear-probe the task's encoders: embeddings in one Ray Data pass, a Ray Tune sweep "
                           "of heads, MLflow.")


if __name__ == "__main__":
    typer.run(main)
