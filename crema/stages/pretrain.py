"""CR-MAE pretraining as a Ray Train job: `python -m crema.stages.pretrain --config CONFIG.yaml [key=value ...]`.

Also `crema pretrain ...`, and `ray job submit -- python -m crema.stages.pretrain ...` on a cluster.

The job reads the ingest stage's windows (train and val splits) with Ray Data, trains on
`scaling.num_workers` DDP workers, checkpoints to `storage_path/<name>/`, and writes the final
encoder to `storage_path/<name>/encoder.safetensors` (and to MLflow as the model "encoder").

Where outputs go. A relative `storage_path` is made absolute once, in the driver, against the directory
the command runs in, and the workers are handed that absolute path (a Train worker runs in a folder of
its own, so it must not resolve anything itself). Every output location is printed when the job starts.

Resuming. Running a job again with the same `name` and `storage_path` continues from its latest
checkpoint, in the same MLflow run; so does Ray itself after a worker failure, up to `max_failures`
times. The MLflow run is continued only when Ray resumes: if the run folder holds no checkpoint state
(deleted, as Ray suggests for a fresh start, or another `storage_path`), training starts from step 0 in a
new MLflow run of the same name, tagged `crema.replaces_run` with the earlier run's id (which is left as
it was), and the job says so; the earlier run's history never gets a second step 1. Other settings under
a used name are refused without `--resume` either way.
A checkpoint holds the model, optimiser, LR schedule, epoch and the steps done in that epoch.
A resumed epoch takes only its remaining steps, from a fresh shuffle of the split: the step count,
learning-rate schedule and optimiser state continue exactly, but the sample order is not replayed
(Ray Data's streaming split hands out blocks dynamically, so there is no position to seek back to).
A checkpoint is a safetensors file (never unpickled); if the latest one cannot be loaded (corrupt, or
not a crema checkpoint), the job says so and resumes from the newest one that loads.
A checkpoint counts once Ray has registered it (it polls the workers every few seconds): one whose
worker died within that window is lost with it, and the job resumes from the one before.

Tracking. Rank 0 alone talks to MLflow (`tracking.tracking_uri`; on a multi-node cluster, an MLflow
server that every node reaches). Step metrics are logged asynchronously and flushed before each
checkpoint, so whatever a checkpoint covers is also in MLflow.

Every rank takes the same number of steps per epoch: the driver computes it from the row counts,
the split is equal (Ray Train's default), and the last uneven batch is dropped. Uneven steps
would leave one rank waiting forever in an all-reduce.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import secrets
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from collections.abc import Iterator
from typing import Annotated, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import ray
import ray.train
import ray.train.torch
import torch
import typer
from fsspec.core import url_to_fs
from pyarrow.fs import FileSelector, FileType
from pyiceberg.expressions import EqualTo
from ray.data.collate_fn import ArrowBatchCollateFn
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from rich.console import Console

from crema import logs, tracking
from crema.config import ConfigError, InputConditioning, PretrainConfig, load_yaml, parse_overrides, redact_uri
from crema.data.batches import MODEL_COLUMNS, decode_window_batch
from crema.data.catalog import dataset_version, windows_dataset
from crema.evaluation.plots import plot_reconstruction
from crema.model.network import CREMA
from crema.stages.common import (announce_outputs, copy_to_storage, exit_2_on_config_error, init_ray,
                                 pyarrow_filesystem, read_windows_table, run_tags)
from crema.train.artifacts import ENCODER_FILE, save_encoder
from crema.train.checkpoint import Position, load_newest_loadable, save_training_state
from crema.train.engine_pretrain import StepStats, train_one_epoch, validate
from crema.train.optim import param_groups, warmup_cosine
from crema.train.precision import autocast_dtype

console = Console()
# Named for the module also under `python -m` (__name__ is then "__main__", outside crema's log handler).
log = logging.getLogger(__spec__.name if __spec__ else __name__)


@dataclass(frozen=True)
class PretrainResult:
    """Where a finished (or resumed and finished) job left its outputs."""

    run_name: str
    checkpoint_path: str | None  # the latest checkpoint: a folder (or s3:// prefix) in storage_path
    encoder_path: str  # storage_path/<name>/encoder.safetensors, for load_encoder
    mlflow_run_id: str | None
    metrics: dict  # the last metrics rank 0 reported


@dataclass(frozen=True)
class EpochPlan:
    """Worked out once in the driver, so that every rank agrees on it."""

    steps_per_epoch: int  # optimiser steps
    val_steps: int
    val_batch_size: int


def storage_root(cfg: PretrainConfig) -> str:
    """Ray needs an absolute local path or a URI: a relative path is resolved against the current directory.

    Called once, in the driver (:func:`resolve_storage`); workers only see the absolute result.
    """
    return cfg.storage_path if "://" in cfg.storage_path else str(Path(cfg.storage_path).resolve())


def resolve_storage(cfg: PretrainConfig) -> PretrainConfig:
    """The config with `storage_path` and a local dataset absolute (or URIs): decided in the driver, handed
    to workers and sweep trials, whose working directories differ (Tune runs each trial in its own)."""
    dataset = cfg.data.dataset if "://" in cfg.data.dataset else str(Path(cfg.data.dataset).resolve())
    return cfg.model_copy(update={"storage_path": storage_root(cfg),
                                  "data": cfg.data.model_copy(update={"dataset": dataset})})


def encoder_uri(cfg: PretrainConfig) -> str:
    """storage_path/<name>/encoder.safetensors: where the job writes its final encoder."""
    if "://" not in cfg.storage_path and not os.path.isabs(cfg.storage_path):
        raise ValueError(f"storage_path {cfg.storage_path!r} is relative: resolve it in the driver (resolve_storage)")
    return f"{cfg.storage_path.rstrip('/')}/{cfg.name}/{ENCODER_FILE}"


# What Ray Train restores a run of the same name from (ray.train.v2's CHECKPOINT_MANAGER_SNAPSHOT_FILENAME).
RAY_TRAIN_STATE_FILE = "checkpoint_manager_snapshot.json"


def has_checkpoint_state(cfg: PretrainConfig) -> bool:
    """Whether storage_path/<name> holds the Ray Train state that a run of this name resumes from."""
    fs, path = url_to_fs(f"{cfg.storage_path.rstrip('/')}/{cfg.name}/{RAY_TRAIN_STATE_FILE}",
                         **(cfg.storage_options or {}))
    return bool(fs.exists(path))


def replaced_mlflow_run(cfg: PretrainConfig, tracking_uri: str) -> str | None:
    """The id of the MLflow run of this name that a fresh start must not continue: one exists, but the run
    folder holds no checkpoint state, so training restarts at step 0 (None when the job resumes, or is new)."""
    if has_checkpoint_state(cfg):
        return None
    previous = tracking.find_run(cfg.name, cfg.tracking.experiment, tracking_uri)
    return previous.info.run_id if previous is not None else None


def output_locations(cfg: PretrainConfig, tracking_uri: str) -> dict[str, str]:
    """Everything the job writes, where: printed when it starts."""
    run_dir = f"{cfg.storage_path.rstrip('/')}/{cfg.name}"
    return {"checkpoints": f"{run_dir}/checkpoint_step*", "encoder": encoder_uri(cfg),
            "mlflow": f"{redact_uri(tracking_uri)} (experiment {cfg.tracking.experiment}, run {cfg.name})",
            "dataset": cfg.data.dataset}


# ------------------------------------------------------------------------------------------- driver

def _windows_dataset(cfg: PretrainConfig, version: str | None) -> pads.Dataset:
    """The windows table at the run's dataset `version` as pyarrow sees it, found through the catalog (for
    counts, the schema and the fixed val window, read in the driver)."""
    return windows_dataset(cfg.data.dataset, cfg.data.storage_options, version)


def _split_rows(dataset: pads.Dataset, split: str) -> int:
    """Windows in one split."""
    return dataset.count_rows(filter=pc.field("split") == split)


def _check_window_length(dataset: pads.Dataset, cfg: PretrainConfig) -> None:
    """The model must be built for the dataset's window length."""
    stored = (dataset.schema.metadata or {}).get(b"crema.window_samples")
    if stored is not None and int(stored) != cfg.model.window_samples:
        raise ConfigError(f"the dataset {cfg.data.dataset} holds windows of {int(stored)} samples, but "
                          f"model.window_samples={cfg.model.window_samples}")


def plan_epochs(cfg: PretrainConfig, train_rows: int, val_rows: int) -> EpochPlan:
    """Steps per epoch after the equal split over workers and dropping the last partial batch."""
    workers = cfg.scaling.num_workers
    per_step = cfg.data.batch_size * cfg.optim.accum_steps
    steps = (train_rows // workers) // per_step
    if steps == 0:
        raise ConfigError(f"{train_rows} train windows over {workers} workers is less than one step of "
                          f"{per_step} windows per worker (data.batch_size × optim.accum_steps)")
    val_per_worker = val_rows // workers
    if val_per_worker == 0:
        raise ConfigError(f"{val_rows} val windows cannot be split over {workers} workers")
    val_batch = min(cfg.data.batch_size, val_per_worker)
    return EpochPlan(steps, val_per_worker // val_batch, val_batch)


class WindowCollate(ArrowBatchCollateFn):
    """For ``iter_torch_batches(collate_fn=WindowCollate(conditioning))``: Ray runs it in its prefetch threads."""

    def __init__(self, conditioning: InputConditioning):
        super().__init__()
        self.conditioning = conditioning

    def __call__(self, batch: pa.Table) -> dict[str, torch.Tensor]:
        return decode_window_batch(batch, self.conditioning)


def read_split(cfg: PretrainConfig, split: str, version: str | None = None) -> ray.data.Dataset:
    """The columns the model needs, of one split, read through the Iceberg catalog (at dataset `version`,
    default the current one): partition pruning skips other splits' files unopened."""
    data = read_windows_table(cfg.data.dataset, cfg.data.storage_options, EqualTo("split", split), MODEL_COLUMNS,
                              version)
    if cfg.data.materialize:
        data = data.materialize()
    # A new block order every epoch (every execution); the workers' buffers shuffle rows.
    return data.randomize_block_order() if split == "train" else data


def _fixed_val_window(dataset: pads.Dataset, conditioning: InputConditioning) -> dict:
    """The first val window, as the model sees it: the same ECG is drawn every epoch, so the figures show progress."""
    head = dataset.head(1, columns=MODEL_COLUMNS, filter=pc.field("split") == "val")
    return {**{k: v.numpy() for k, v in decode_window_batch(head, conditioning).items()},
            "fs": float(head["fs"][0].as_py())}


def _checkpoint_uri(cfg: PretrainConfig, path: str) -> str:
    """Ray reports remote paths without their scheme."""
    if "://" not in cfg.storage_path:
        return path
    return f"{cfg.storage_path.split('://', 1)[0]}://{path.lstrip('/')}"


@contextlib.contextmanager
def quiet_dataset_progress() -> Iterator[None]:
    """No Ray Data progress bars for the datasets made inside: the step lines (loss, rate, ETA) are a training
    job's progress, and the bars of its per-epoch splits only repeat them and flood the console. A dataset
    keeps (a copy of) the context it was made in."""
    context = ray.data.DataContext.get_current()
    bars, context.enable_progress_bars = context.enable_progress_bars, False
    try:
        yield
    finally:
        context.enable_progress_bars = bars


def run(cfg: PretrainConfig, resume: bool = False, *, parent_run_id: str | None = None,
        callbacks: tuple = ()) -> PretrainResult:
    """Train (or resume) the job described by `cfg`; returns where its outputs are.

    `parent_run_id`: the MLflow run this job's run is nested under (a sweep's); `callbacks`: Ray Train
    callbacks (a sweep trial forwards the epochs' validation metrics to Tune with one).

    A run of the same name resumes as long as its settings are the same; with other settings it is a
    ConfigError unless `resume` (the run then continues with the new settings). Its MLflow run is continued only
    when the run folder's checkpoint state is: without it, a new MLflow run replaces the old one (see the module).
    """
    cfg = resolve_storage(cfg)
    # One dataset version for the whole run, resolved once here: the counts, the fixed val window, both
    # splits' reads and the version logged to MLflow, whatever an ingest commits meanwhile.
    version = dataset_version(cfg.data.dataset, cfg.data.storage_options)
    windows = _windows_dataset(cfg, version)
    _check_window_length(windows, cfg)
    rows = {"train": _split_rows(windows, "train"), "val": _split_rows(windows, "val")}
    plan = plan_epochs(cfg, rows["train"], rows["val"])
    tracking_uri = tracking.resolve_tracking_uri(cfg.tracking.tracking_uri)
    tracking.check_reachable(tracking_uri)
    tracking.check_run_params(cfg.name, cfg.tracking.experiment, tracking_uri,
                              tracking.flatten_params(tracking.redact(cfg.model_dump(mode="json"))), resume)
    replaces_run_id = replaced_mlflow_run(cfg, tracking_uri)
    announce_outputs(output_locations(cfg, tracking_uri))
    if replaces_run_id:
        note = (f"run folder {cfg.storage_path.rstrip('/')}/{cfg.name} holds no checkpoint state: training starts "
                f"at step 0 in a new MLflow run (tag {tracking.TAG_REPLACES_RUN}={replaces_run_id}); the earlier "
                f"MLflow run {replaces_run_id} of this name is left as it was")
        log.warning(note)
        typer.echo(note)
    init_ray(dashboard=True)
    with quiet_dataset_progress():
        datasets = {"train": read_split(cfg, "train", version), "val": read_split(cfg, "val", version)}
    storage_filesystem, storage_path = pyarrow_filesystem(storage_root(cfg), cfg.storage_options)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "cfg": cfg.model_dump(mode="json"),
            "plan": asdict(plan),
            "tracking_uri": tracking_uri,
            "tags": {**run_tags(cfg.data.dataset, cfg.data.storage_options, version),
                     **tracking.nested_run_tags(parent_run_id)},
            "dataset_rows": rows,
            "fixed_val_window": _fixed_val_window(windows, cfg.model.input),
            "log_level": logs.level_name(),
            "replaces_run_id": replaces_run_id,
        },
        scaling_config=ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                                     resources_per_worker={"CPU": cfg.scaling.cpus_per_worker}),
        run_config=RunConfig(
            name=cfg.name,
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.num_to_keep),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            callbacks=list(callbacks),
        ),
        datasets=datasets,
    )
    result = trainer.fit()
    mlflow_run = tracking.find_run(cfg.name, cfg.tracking.experiment, tracking_uri)
    return PretrainResult(
        run_name=cfg.name,
        checkpoint_path=_checkpoint_uri(cfg, result.checkpoint.path) if result.checkpoint else None,
        encoder_path=encoder_uri(cfg),
        mlflow_run_id=mlflow_run.info.run_id if mlflow_run else None,
        metrics=dict(result.metrics or {}),
    )


# ------------------------------------------------------------------------------------------- worker

def train_loop_per_worker(config: dict) -> None:
    """One DDP worker of the job: set up, resume if a checkpoint exists, then train epoch by epoch.

    `config` is the driver's train_loop_config: the PretrainConfig as JSON, the EpochPlan, the MLflow URI,
    the run's tags and the fixed validation window for reconstruction figures.
    """
    logs.configure(config.get("log_level"))
    worker = _setup_worker(config)
    restored = _resume(worker)
    if worker.is_rank0:
        tracking.open_training_run(worker.cfg.name, worker.cfg.tracking.experiment, config["tracking_uri"],
                                   tracking.redact(config["cfg"]), {**config["tags"], **worker.resume_tags},
                                   restored.global_step if restored is not None else None,
                                   config.get("dataset_rows"), config.get("replaces_run_id"))
    on_step = _step_callback(worker, resumed=restored is not None)
    while worker.position.epoch < worker.cfg.epochs:
        _run_epoch(worker, on_step, config["fixed_val_window"])
    if worker.is_rank0:
        _finish_tracking(worker.model, worker.cfg)


@dataclass
class Worker:
    """What one worker trains with: its config, rank, device, model (bare and DDP-wrapped), optimiser,
    schedule, position in the run, and its shards of the train and val splits."""

    cfg: PretrainConfig
    plan: EpochPlan
    rank: int
    world: int
    device: torch.device
    amp_dtype: torch.dtype | None
    model: CREMA
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    position: Position
    ddp_model: torch.nn.Module | None = None
    train_shard: object = None
    val_shard: object = None
    resume_tags: dict = field(default_factory=dict)  # which checkpoint a resumed attempt restored, which it skipped
    checkpoint_suffix: str = ""  # set after a fallback: see _checkpoint_dir_name

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0


def _setup_worker(config: dict) -> Worker:
    """Model, AdamW (:func:`crema.train.optim.param_groups`) and warm-up + cosine schedule on this worker."""
    cfg = PretrainConfig.model_validate(config["cfg"])
    plan = EpochPlan(**config["plan"])
    context = ray.train.get_context()
    device = ray.train.torch.get_device()
    torch.set_num_threads(cfg.scaling.torch_threads or max(1, int(cfg.scaling.cpus_per_worker)))
    torch.manual_seed(cfg.seed)  # DDP broadcasts rank 0's weights anyway; this makes runs reproducible
    model = CREMA(cfg.model).to(device)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr,
                                  betas=cfg.optim.betas)
    total_steps = plan.steps_per_epoch * cfg.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(cfg.optim.warmup_steps, total_steps, cfg.optim.min_lr_ratio))
    return Worker(cfg, plan, context.get_world_rank(), context.get_world_size(), device,
                  autocast_dtype(cfg.precision, device), model, optimizer, scheduler, Position())


def _resume(worker: Worker) -> Position | None:
    """Restore the latest checkpoint (if Ray hands one over), seed this rank, wrap the model in DDP and
    take the dataset shards. Returns the restored position, None on a fresh start."""
    checkpoint = ray.train.get_checkpoint()
    restored = None
    if checkpoint:
        restored = _restore_newest_loadable(worker, checkpoint)
        worker.position = restored
    # Masks and noise differ per rank, and a resumed run does not replay the draws it already made.
    torch.manual_seed(worker.cfg.seed + 1_000_003 * worker.position.global_step + worker.rank)
    worker.ddp_model = ray.train.torch.prepare_model(worker.model)
    worker.train_shard = ray.train.get_dataset_shard("train")
    worker.val_shard = ray.train.get_dataset_shard("val")
    return restored


def _older_checkpoints(checkpoint: ray.train.Checkpoint) -> list[ray.train.Checkpoint]:
    """The run's other checkpoint folders older than `checkpoint`, newest first (Ray keeps num_to_keep)."""
    parent, name = checkpoint.path.rstrip("/").rsplit("/", 1)
    infos = checkpoint.filesystem.get_file_info(FileSelector(parent, allow_not_found=True))
    current = _checkpoint_step(name)
    older = [(step, i.base_name) for i in infos if i.type == FileType.Directory
             and (step := _checkpoint_step(i.base_name)) is not None and current is not None and step < current]
    return [ray.train.Checkpoint(f"{parent}/{n}", filesystem=checkpoint.filesystem) for _, n in sorted(older, reverse=True)]


def _checkpoint_step(name: str) -> int | None:
    """The step in a checkpoint folder's name (checkpoint_step00000042[-suffix]), None for other folders."""
    match = re.fullmatch(r"checkpoint_step(\d+)(-[0-9a-f]+)?", name)
    return int(match.group(1)) if match else None


def _checkpoint_dir_name(worker: Worker) -> str:
    """checkpoint_step<step>; after a fallback past unloadable checkpoints, with a suffix of this attempt's, so
    that a step reached again never writes into (or has Ray evict) the unloadable folder of the same step."""
    name = f"checkpoint_step{worker.position.global_step:08d}"
    return f"{name}-{worker.checkpoint_suffix}" if worker.checkpoint_suffix else name


def _restore_newest_loadable(worker: Worker, checkpoint: ray.train.Checkpoint) -> Position:
    """Restore Ray's latest checkpoint or, if it cannot be loaded, the newest older one that can (and say so).

    Every rank walks the same folders in the same order, so all ranks restore the same one; each is
    fetched (from s3) only when the newer ones failed.
    """
    where: dict[str, str] = {}  # local folder -> the checkpoint's path in storage

    with contextlib.ExitStack() as opened:
        def folders():
            for candidate in [checkpoint, *_older_checkpoints(checkpoint)]:
                folder = opened.enter_context(candidate.as_directory())
                where[folder] = candidate.path
                yield folder

        position, used, skipped = load_newest_loadable(folders(), worker.model, worker.optimizer, worker.scheduler)
    skipped_paths = [where[folder] for folder, _ in skipped]
    worker.resume_tags = {"resumed_from_checkpoint": where[used]}
    if skipped_paths:
        worker.resume_tags["skipped_checkpoints"] = ",".join(skipped_paths)
        worker.checkpoint_suffix = secrets.token_hex(3)  # only rank 0 names checkpoint folders
    if worker.is_rank0:
        note = f" (skipped, not loadable: {', '.join(skipped_paths)})" if skipped_paths else ""
        (log.warning if skipped_paths else log.info)(
            "resuming from checkpoint %s at step %d%s", where[used], position.global_step, note)
    return position


def duration(seconds: float) -> str:
    """"42s", "3m05s", "1h12m": an ETA at the precision it has."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _step_callback(worker: Worker, resumed: bool):
    """The `on_step` of the step loop: advance the position, log (rank 0), checkpoint, and the failure drill."""
    cfg, position = worker.cfg, worker.position
    total_steps = worker.plan.steps_per_epoch * cfg.epochs
    started = (time.perf_counter(), position.global_step)  # the ETA's pace: this attempt's steps, evaluations included

    def on_step(stats: StepStats) -> None:
        position.global_step = stats.step
        position.step_in_epoch += 1
        if worker.is_rank0 and stats.step % cfg.tracking.log_every_steps == 0:
            tracking.log_metrics(stats.metrics(), stats.step, synchronous=False)
            pace = (time.perf_counter() - started[0]) / max(1, stats.step - started[1])
            log.info("step %d/%d (epoch %d/%d): loss %.4f, lr %.3g, %.0f samples/s, ETA %s", stats.step,
                     total_steps, position.epoch + 1, cfg.epochs, stats.loss, stats.lr, stats.samples_per_s,
                     duration(pace * (total_steps - stats.step)))
        at_epoch_end = position.step_in_epoch == worker.plan.steps_per_epoch  # the epoch-end checkpoint follows
        if stats.step % cfg.checkpoint.every_steps == 0 and not at_epoch_end:
            save_checkpoint(worker, {"step": stats.step, "epoch": position.epoch, "loss": stats.loss})
        _failure_drill(worker, stats.step, resumed)

    return on_step


def _failure_drill(worker: Worker, step: int, resumed: bool) -> None:
    """`chaos.exit_after_step`: the last rank dies once at that step, to exercise Ray's restart and resume."""
    drill = worker.cfg.chaos.exit_after_step
    if drill is not None and not resumed and step == drill and worker.rank == worker.world - 1:
        # Die once Ray has committed the checkpoints reported so far, so the drill's outcome is
        # deterministic: a report still in flight when its worker dies is lost with it.
        ray.train.get_all_reported_checkpoints()
        os._exit(1)


def _run_epoch(worker: Worker, on_step, fixed_val_window: dict) -> None:
    """The epoch's remaining steps, a validation pass, rank 0's logging and figure, the epoch checkpoint."""
    cfg, position, plan = worker.cfg, worker.position, worker.plan
    remaining = plan.steps_per_epoch - position.step_in_epoch
    epoch_metrics = {}
    if remaining > 0:
        started = time.perf_counter()
        batches = worker.train_shard.iter_torch_batches(
            batch_size=cfg.data.batch_size, drop_last=True, collate_fn=WindowCollate(cfg.model.input),
            local_shuffle_buffer_size=cfg.data.shuffle_buffer or None,
            local_shuffle_seed=_shuffle_seed(cfg.seed, position, worker.rank) if cfg.data.shuffle_buffer else None,
            prefetch_batches=cfg.data.prefetch_batches)
        train_one_epoch(worker.ddp_model, batches, worker.optimizer, worker.scheduler, num_steps=remaining,
                        start_step=position.global_step, device=worker.device, amp_dtype=worker.amp_dtype,
                        accum_steps=cfg.optim.accum_steps, clip_grad=cfg.optim.clip_grad, on_step=on_step)
        # Wall clock of the whole epoch's training, checkpoints and logging included.
        global_batch = cfg.data.batch_size * cfg.optim.accum_steps * worker.world
        epoch_metrics["epoch_samples_per_s"] = remaining * global_batch / (time.perf_counter() - started)
    val_batches = worker.val_shard.iter_torch_batches(batch_size=plan.val_batch_size, drop_last=True,
                                                      collate_fn=WindowCollate(cfg.model.input),
                                                      prefetch_batches=cfg.data.prefetch_batches)
    val = validate(worker.ddp_model, val_batches, num_steps=plan.val_steps, device=worker.device,
                   amp_dtype=worker.amp_dtype, seed=cfg.seed)
    if worker.is_rank0:
        log.info("epoch %d/%d done at step %d: %s", position.epoch + 1, cfg.epochs, position.global_step,
                 ", ".join(f"{k} {v:.4g}" for k, v in {**val, **epoch_metrics}.items()))
        tracking.log_metrics({**val, **epoch_metrics}, position.global_step)
        tracking.log_metric(tracking.METRIC_EPOCH, position.epoch + 1, position.global_step)
        log_reconstruction(worker.model, fixed_val_window, worker.device, position.epoch, cfg.seed)
    position.epoch += 1
    position.step_in_epoch = 0
    save_checkpoint(worker, {"step": position.global_step, "epoch": position.epoch, **val, **epoch_metrics})


def save_checkpoint(worker: Worker, metrics: dict) -> None:
    """Every rank reports (report is a barrier); only rank 0 writes the files, the weights being equal."""
    if not worker.is_rank0:
        ray.train.report(metrics)
        return
    # Whatever a checkpoint covers is in MLflow too, even if the job dies right after.
    tracking.flush()
    with tempfile.TemporaryDirectory() as folder:
        save_training_state(folder, worker.model, worker.optimizer, worker.scheduler, worker.position)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder),
                         checkpoint_dir_name=_checkpoint_dir_name(worker))


def log_reconstruction(model, window: dict, device: torch.device, epoch: int, seed: int) -> None:
    """The fixed validation ECG against the model's masked reconstruction, as a figure in MLflow."""
    model.eval()
    # torch.tensor copies: the window is a read-only view of Ray's batch
    x = torch.tensor(window["x"], device=device)
    lead_mask = torch.tensor(window["lead_mask"], device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        recon, masked = model.reconstruct(x, lead_mask, generator=generator)
    fig = plot_reconstruction(window["x"][0], recon[0].float().cpu().numpy(), masked[0].cpu().numpy(),
                              window["lead_mask"][0], window["fs"], title=f"validation ECG, epoch {epoch + 1}")
    tracking.log_figure(fig, f"reconstruction/epoch_{epoch + 1:03d}.png")


def _finish_tracking(model: CREMA, cfg: PretrainConfig) -> None:
    """Write the final encoder to storage_path and log it to MLflow; end the run."""
    with tempfile.TemporaryDirectory() as folder:
        local = os.path.join(folder, ENCODER_FILE)
        save_encoder(model, local)
        copy_to_storage(local, encoder_uri(cfg), cfg.storage_options)
        tracking.close_training_run(local, encoder_uri(cfg), model.encoder.cfg.window_samples,
                                    model.encoder.representation_dim)


def _shuffle_seed(seed: int, position: Position, rank: int) -> int:
    """Differs per epoch and rank, and for a resumed epoch (which starts at a later step)."""
    return int(np.random.SeedSequence([seed, position.epoch, position.global_step, rank]).generate_state(1)[0])


# ------------------------------------------------------------------------------------------ command

def main(
    config: Annotated[Path, typer.Option("--config", "-c", help="Pretraining YAML (configs/pretrain/*.yaml)")],
    overrides: Annotated[Optional[list[str]], typer.Argument(help="key=value settings, e.g. optim.lr=3e-4")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue a run of this name even though its settings "
                                                          "changed (more epochs, say)")] = False,
) -> None:
    """Pretrain the CREMA encoder (CR-MAE) on the ingested windows, resuming a run of the same name."""
    with exit_2_on_config_error():
        cfg = load_yaml(config, PretrainConfig, parse_overrides(overrides or []))
        result = run(cfg, resume=resume)
    console.print(f"run {result.run_name}: checkpoint {result.checkpoint_path}", soft_wrap=True)
    console.print(f"encoder → {result.encoder_path} (MLflow run {result.mlflow_run_id})", soft_wrap=True)
    console.print({k: v for k, v in result.metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)})


if __name__ == "__main__":
    typer.run(main)
