"""Fine-tuning evaluation: `python -m pipelines.finetune --task configs/tasks/ptbxl_superdiagnostic.yaml [key=value ...]`.

Also `crema finetune`, and `ray job submit -- python -m pipelines.finetune ...` on a cluster.

For each selected encoder and label fraction, a Ray Tune sweep over lr, weight decay, layer decay and
drop path (ASHA on the validation macro AUROC). A trial is a function that fine-tunes encoder + head
on one device (a GPU per trial when the cluster has them); the task's windows are read once by the
driver and shared with every trial through Ray's object store. The best trial's best checkpoint is
scored once on val (thresholds) and test, in a Ray task with a trial's resources, then logged with
``mlflow.pytorch.log_model`` (and registered if ``finetune.register_model`` names a model), tagged with
the encoder artifact and the pretraining run it came from.

Exit codes: 0 done; 2 invalid configuration.
"""

from __future__ import annotations

import math
import os
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
import typer
from rich.console import Console

from crema.config import SweepConfig, TaskConfig
from crema.dataset import read_windows
from crema.engine import autocast_dtype, warmup_cosine
from crema.finetune import (Classifier, build_optimizer, multilabel_loss, predict, train_one_epoch,
                            window_batches, with_drop_path)
from crema.tasks import (META_COLUMNS, SIGNAL_COLUMNS, LabelledWindows, build_task_encoder,
                         encoder_bytes, encoder_from_bytes, label_fraction_subset, role_filter, split_roles)
from pipelines.common import init_ray
from pipelines.downstream import (METRIC, sweep_command, BestTrialScores, SweepResult, TrialContext, cluster_gpus, prepare_task,
                                  run_sweep, select_encoders, trial_run)

console = Console()
STATE_FILE = "classifier.pt"
HYPERPARAMETERS = ("lr", "weight_decay", "layer_decay", "drop_path")


def build_classifier(encoder_blob: bytes, drop_path: float, num_classes: int,
                     device: str | torch.device = "cpu") -> Classifier:
    """The encoder's own weights (pretrained, or the baseline's seeded init) under a fresh head."""
    return Classifier(with_drop_path(encoder_from_bytes(encoder_blob, device), drop_path), num_classes).to(device)


def trial_device() -> torch.device:
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
                model, window_batches(train, y_train, sweep.batch_size, seed=seed + epoch), optimizer, scheduler,
                loss_fn, device=device, amp_dtype=dtype, clip_grad=sweep.clip_grad)
            scores = predict(model, window_batches(val_windows, None, sweep.batch_size), device=device,
                             amp_dtype=dtype)
            metrics = {"epoch": epoch, "train_loss": train_loss, METRIC: val.macro_auroc(scores)}
            reporter.report(metrics, lambda folder: torch.save(model.state_dict(), os.path.join(folder, STATE_FILE)))


def score_windows(model: Classifier, batch_size: int, precision: str, *tables: pa.Table) -> list[np.ndarray]:
    """Class probabilities of every window of each table (run as a Ray task, on a GPU when there is one)."""
    device = trial_device()
    model = model.to(device)
    return [predict(model, window_batches(t, None, batch_size), device=device, amp_dtype=autocast_dtype(precision, device))
            for t in tables]


def log_classifier(model: Classifier, config: dict, tags: dict[str, str], sweep: SweepConfig) -> str:
    """Log (and register, if asked) the chosen model to the active run, tagged with the encoder it came from."""
    import mlflow
    from mlflow.tracking import MlflowClient

    provenance = {k: v for k, v in tags.items() if k.startswith("encoder") or k in ("task", "label_fraction")}
    # Pickled: MLflow 3's default (pt2, torch.export) cannot trace the encoder's data-dependent attention mask.
    info = mlflow.pytorch.log_model(
        model.cpu().eval(), name="model", serialization_format="pickle", registered_model_name=sweep.register_model,
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
        params={k: config[k] for k in HYPERPARAMETERS}, tags=provenance)
    if sweep.register_model:
        client = MlflowClient()
        for key, value in provenance.items():
            client.set_model_version_tag(sweep.register_model, str(info.registered_model_version), key, value)
    return info.model_uri


def score_best_classifier(result, tags: dict[str, str], *, encoder_blob: bytes, num_classes: int,
                          sweep: SweepConfig, score_task, tables: tuple) -> BestTrialScores:
    """Score val and test with the chosen checkpoint (in a Ray task with a trial's resources), then log it."""
    import ray

    model = build_classifier(encoder_blob, result.config["drop_path"], num_classes)
    with result.get_best_checkpoint(METRIC, "max").as_directory() as folder:
        model.load_state_dict(torch.load(os.path.join(folder, STATE_FILE), weights_only=True))
    val_scores, test_scores = ray.get(score_task.remote(model, sweep.batch_size, sweep.precision, *tables))
    return BestTrialScores(val_scores, test_scores, log_classifier(model, result.config, tags, sweep))


def read_role_windows(task: TaskConfig) -> dict[str, pa.Table]:
    table = read_windows(task.dataset, columns=[*SIGNAL_COLUMNS, *META_COLUMNS],
                         filter=role_filter(task, "train") | role_filter(task, "val") | role_filter(task, "test"),
                         storage_options=task.storage_options)
    return split_roles(table, task)


def run(task: TaskConfig | str | Path, overrides: dict | None = None,
        encoders: list[str] | None = None) -> list[SweepResult]:
    """Fine-tune every selected encoder of the task at every label fraction; one SweepResult per sweep."""
    import ray

    task = prepare_task(task, overrides)
    specs = select_encoders(task, "finetune", encoders)
    init_ray()
    sweep = task.finetune
    gpus = sweep.gpus_per_trial if sweep.gpus_per_trial is not None else (1.0 if cluster_gpus() else 0.0)
    resources = {"cpu": sweep.cpus_per_trial, "gpu": gpus}
    score_task = ray.remote(score_windows).options(num_cpus=sweep.cpus_per_trial, num_gpus=gpus)
    roles = read_role_windows(task)
    val = LabelledWindows.from_table(roles["val"], task.classes)
    test = LabelledWindows.from_table(roles["test"], task.classes)
    val_ref, test_ref = ray.put(roles["val"]), ray.put(roles["test"])
    results = []
    for spec in specs:
        blob = encoder_bytes(build_task_encoder(spec, task))
        for fraction in task.label_fractions:
            train = label_fraction_subset(roles["train"], fraction, task.fraction_seed)

            results.append(run_sweep(
                task=task, method="finetune", spec=spec, fraction=fraction, sweep=sweep, trainable=finetune_trial,
                trial_inputs=dict(encoder_blob=blob, train=train,
                                  y_train=LabelledWindows.from_table(train, task.classes).y,
                                  val_windows=roles["val"], val=val, sweep=sweep, seed=task.seed),
                hyperparameters=HYPERPARAMETERS, resources=resources, val=val, test=test,
                n_train_windows=train.num_rows,
                score_best=partial(score_best_classifier, encoder_blob=blob, num_classes=len(task.classes), sweep=sweep,
                                   score_task=score_task, tables=(val_ref, test_ref))))
    return results


main = sweep_command(run, "Fine-tune the task's encoders (layer decay, drop path) in a Ray Tune sweep; best "
                           "model to MLflow.")


if __name__ == "__main__":
    typer.run(main)
