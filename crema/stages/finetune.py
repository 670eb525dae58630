"""Fine-tuning evaluation: `python -m crema.stages.finetune --task configs/tasks/ptbxl_superdiagnostic.yaml [key=value ...]`.

Also `crema finetune`, and `ray job submit -- python -m crema.stages.finetune ...` on a cluster.

For each selected encoder and label fraction, a Ray Tune sweep over lr, weight decay, layer decay and
drop path (ASHA on the validation macro AUROC). A trial is a function that fine-tunes encoder + head
on one device (a GPU per trial when the cluster has them); the task's windows are read once by the
driver and shared with every trial through Ray's object store. The best trial's best checkpoint is
scored once on val (thresholds) and test, in a Ray task with a trial's resources, then logged to MLflow as
a pyfunc model without pickle (safetensors weights + model code, :func:`crema.tracking.log_classifier`; its
predict gives the class probabilities by class name) and registered if ``finetune.register_model`` names a
model, tagged with the encoder artifact and the pretraining run it came from.

Exit codes: 0 done; 2 invalid configuration.
"""

from __future__ import annotations

import math
import os
import tempfile
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray
import torch
import typer
from rich.console import Console

from crema import tracking
from crema.config import SweepConfig, TaskConfig
from crema.data.batches import iter_table_batches
from crema.data.catalog import dataset_version, read_windows
from crema.evaluation.encoders import build_task_encoder
from crema.evaluation.lead_sets import hide_leads
from crema.evaluation.tasks import (META_COLUMNS, SIGNAL_COLUMNS, LabelledWindows, label_fraction_subset, role_filter,
                                    split_roles)
from crema.model.network import Classifier
from crema.stages.common import init_ray
from crema.stages.sweep import (METRIC, BestTrialScores, SweepInputs, SweepResult, TrialContext, cluster_gpus,
                                prepare_task, run_sweep, select_encoders, sweep_command, trial_run)
from crema.train.artifacts import CLASSIFIER_FILE, encoder_from_bytes, encoder_to_bytes, save_classifier
from crema.train.checkpoint import load_weights, save_weights
from crema.train.engine_finetune import build_optimizer, multilabel_loss, predict, train_one_epoch, with_drop_path
from crema.train.optim import warmup_cosine
from crema.train.precision import autocast_dtype

console = Console()
HYPERPARAMETERS = ("lr", "weight_decay", "layer_decay", "drop_path")


def build_classifier(encoder_blob: bytes, drop_path: float, num_classes: int,
                     device: str | torch.device = "cpu") -> Classifier:
    """The encoder's own weights (pretrained, or the baseline's seeded init) under a fresh head."""
    return Classifier(with_drop_path(encoder_from_bytes(encoder_blob, map_location=device), drop_path), num_classes).to(device)


def window_batches(model: Classifier, windows: pa.Table, batch_size: int, y: np.ndarray | None = None, *,
                   seed: int | None = None):
    """{"x", "lead_mask"[, "y"]} batches of a windows table, every row once, conditioned as the encoder's
    pretraining was; shuffled when a seed is given."""
    return iter_table_batches(windows, batch_size, model.encoder.cfg.input, seed=seed, drop_last=False, labels=y,
                              record_group=False)


def trial_device() -> torch.device:
    """This trial's GPU when it has one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def finetune_trial(config: dict, *, context: TrialContext, encoder_blob: bytes, train: pa.Table,
                   y_train: np.ndarray, val_windows: pa.Table, val: LabelledWindows, sweep: SweepConfig,
                   seed: int) -> None:
    """One Tune trial: fine-tune encoder + head with this config, report the val macro AUROC every epoch."""
    torch.manual_seed(seed)
    device = trial_device()
    dtype = autocast_dtype(sweep.precision, device)
    with trial_run(context, config, sweep.epochs) as reporter:
        model = build_classifier(encoder_blob, config["drop_path"], y_train.shape[1], device)
        optimizer = build_optimizer(model, lr=config["lr"], weight_decay=config["weight_decay"],
                                    layer_decay=config["layer_decay"])
        steps_per_epoch = math.ceil(train.num_rows / sweep.batch_size)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, warmup_cosine(sweep.warmup_epochs * steps_per_epoch, sweep.epochs * steps_per_epoch))
        loss_fn = multilabel_loss(y_train)
        for epoch in range(1, sweep.epochs + 1):
            train_loss = train_one_epoch(
                model, window_batches(model, train, sweep.batch_size, y_train, seed=seed + epoch), optimizer, scheduler,
                loss_fn, device=device, amp_dtype=dtype, clip_grad=sweep.clip_grad)
            scores = predict(model, window_batches(model, val_windows, sweep.batch_size), device=device,
                             amp_dtype=dtype)
            metrics = {"epoch": epoch, "train_loss": train_loss, METRIC: val.macro_auroc(scores)}
            reporter.report(metrics, partial(save_weights, model=model))


def score_windows(model: Classifier, batch_size: int, precision: str, *tables: pa.Table) -> list[np.ndarray]:
    """Class probabilities of every window of each table (run as a Ray task, on a GPU when there is one)."""
    device = trial_device()
    model = model.to(device)
    return [predict(model, window_batches(model, t, batch_size), device=device, amp_dtype=autocast_dtype(precision, device))
            for t in tables]


def log_chosen_classifier(model: Classifier, classes: list[str], config: dict, tags: dict[str, str],
                          sweep: SweepConfig) -> str:
    """Log (and register, if asked) the chosen model to the active run as safetensors + pyfunc code (no pickle),
    its outputs named by the task's classes, tagged with the encoder it came from."""
    provenance = {k: v for k, v in tags.items() if k.startswith(tracking.TAG_ENCODER)
                  or k in (tracking.TAG_TASK, tracking.TAG_LABEL_FRACTION)}
    model = model.cpu().eval()
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, CLASSIFIER_FILE)
        save_classifier(model, path, classes)
        return tracking.log_classifier(path, model.encoder.cfg.window_samples, list(classes),
                                       {k: config[k] for k in HYPERPARAMETERS}, provenance, sweep.register_model)


def score_best_classifier(result, tags: dict[str, str], *, encoder_blob: bytes, classes: list[str],
                          sweep: SweepConfig, score_task, tables: tuple) -> BestTrialScores:
    """Score val and test with the chosen checkpoint (in a Ray task with a trial's resources), then log it."""
    model = build_classifier(encoder_blob, result.config["drop_path"], len(classes))
    with result.get_best_checkpoint(METRIC, "max").as_directory() as folder:
        load_weights(folder, model)
    val_scores, test_scores = ray.get(score_task.remote(model, sweep.batch_size, sweep.precision, *tables))
    return BestTrialScores(val_scores, test_scores, log_chosen_classifier(model, classes, result.config, tags, sweep))


def read_role_windows(task: TaskConfig, version: str | None) -> dict[str, pa.Table]:
    """The task's windows (signals and identity) of every role at dataset `version`, read once in the driver."""
    table = read_windows(task.dataset, columns=[*SIGNAL_COLUMNS, *META_COLUMNS],
                         filter=role_filter(task, "train") | role_filter(task, "val") | role_filter(task, "test"),
                         storage_options=task.storage_options, version=version)
    return split_roles(table, task)


def run(task: TaskConfig | str | Path, overrides: dict | None = None,
        encoders: list[str] | None = None) -> list[SweepResult]:
    """Fine-tune every selected encoder of the task at every lead set and label fraction; one SweepResult per
    sweep."""
    task = prepare_task(task, overrides)
    specs = select_encoders(task, "finetune", encoders)
    init_ray()
    sweep = task.finetune
    gpus = sweep.gpus_per_trial if sweep.gpus_per_trial is not None else (1.0 if cluster_gpus() else 0.0)
    resources = {"cpu": sweep.cpus_per_trial, "gpu": gpus}
    score_task = ray.remote(score_windows).options(num_cpus=sweep.cpus_per_trial, num_gpus=gpus)
    version = dataset_version(task.dataset, task.storage_options)  # resolved once: what is read and logged
    all_leads = read_role_windows(task, version)
    val = LabelledWindows.from_table(all_leads["val"], task.classes)
    test = LabelledWindows.from_table(all_leads["test"], task.classes)
    results = []
    for lead_set in task.lead_sets:
        roles = {role: hide_leads(table, lead_set) for role, table in all_leads.items()}
        val_ref, test_ref = ray.put(roles["val"]), ray.put(roles["test"])
        for spec in specs:
            blob = encoder_to_bytes(build_task_encoder(spec, task))
            for fraction, fraction_seed in task.label_subsets():
                train = label_fraction_subset(roles["train"], fraction, fraction_seed)
                results.append(run_sweep(SweepInputs(
                    task=task, method="finetune", spec=spec, fraction=fraction, sweep=sweep, trainable=finetune_trial,
                    trial_inputs=dict(encoder_blob=blob, train=train,
                                      y_train=LabelledWindows.from_table(train, task.classes).y,
                                      val_windows=roles["val"], val=val, sweep=sweep, seed=task.seed),
                    hyperparameters=HYPERPARAMETERS, resources=resources, val=val, test=test,
                    n_train_windows=train.num_rows,
                    score_best=partial(score_best_classifier, encoder_blob=blob, classes=list(task.classes),
                                       sweep=sweep, score_task=score_task, tables=(val_ref, test_ref)),
                    dataset_version=version, lead_set=lead_set, fraction_seed=fraction_seed)))
    return results


main = sweep_command(run, "Fine-tune the task's encoders (layer decay, drop path) in a Ray Tune sweep; best "
                           "model to MLflow.")


if __name__ == "__main__":
    typer.run(main)
