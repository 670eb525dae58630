"""CR-MAE pretraining as a Ray Train job: `python -m crema.stages.pretrain --config CONFIG.yaml [key=value ...]`.

Also `crema pretrain ...`, and `ray job submit -- python -m crema.stages.pretrain ...` on a cluster.

The job reads the ingest stage's windows (train and val splits) with Ray Data, trains on
`scaling.num_workers` DDP workers, checkpoints to `storage_path/<name>/`, and writes the final
encoder to `storage_path/<name>/encoder.pt` (and to MLflow as the model "encoder").

Resuming. Running a job again with the same `name` and `storage_path` continues from its latest
checkpoint, in the same MLflow run; so does Ray itself after a worker failure, up to `max_failures`
times. A checkpoint holds the model, optimiser, LR schedule, epoch and the steps done in that epoch.
A resumed epoch takes only its remaining steps, from a fresh shuffle of the split: the step count,
learning-rate schedule and optimiser state continue exactly, but the sample order is not replayed
(Ray Data's streaming split hands out blocks dynamically, so there is no position to seek back to).
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

import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
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
from pyarrow.fs import FSSpecHandler, PyFileSystem
from ray.data import FileShuffleConfig
from ray.data.collate_fn import ArrowBatchCollateFn
from ray.data.datasource import PathPartitionFilter
from ray.data.datasource.partitioning import Partitioning
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from rich.console import Console

from crema import tracking
from crema.config import ConfigError, PretrainConfig, load_yaml, parse_overrides
from crema.data.batches import MODEL_COLUMNS, decode_window_batch
from crema.data.schema import HIVE_PARTITIONING, windows_uri
from crema.evaluation.plots import plot_reconstruction
from crema.model.network import CREMA
from crema.stages.common import exit_2_on_config_error, init_ray, run_tags
from crema.train.artifacts import save_encoder
from crema.train.checkpoint import Position, load_training_state, save_training_state
from crema.train.engine_pretrain import StepStats, train_one_epoch, validate
from crema.train.optim import param_groups, warmup_cosine
from crema.train.precision import autocast_dtype

console = Console()


@dataclass(frozen=True)
class PretrainResult:
    """Where a finished (or resumed and finished) job left its outputs."""

    run_name: str
    checkpoint_path: str | None  # the latest checkpoint: a folder (or s3:// prefix) in storage_path
    encoder_path: str  # storage_path/<name>/encoder.pt, for load_encoder
    mlflow_run_id: str | None
    metrics: dict  # the last metrics rank 0 reported


@dataclass(frozen=True)
class EpochPlan:
    """Worked out once in the driver, so that every rank agrees on it."""

    steps_per_epoch: int  # optimiser steps
    val_steps: int
    val_batch_size: int


def storage_root(cfg: PretrainConfig) -> str:
    """Ray needs an absolute local path or a URI."""
    return cfg.storage_path if "://" in cfg.storage_path else str(Path(cfg.storage_path).resolve())


def storage_target(cfg: PretrainConfig) -> tuple[PyFileSystem | None, str]:
    """(filesystem, path) for RunConfig. Ray infers the filesystem of a plain path or URI; fsspec
    options (an S3-compatible endpoint, say) need an explicit filesystem and the scheme stripped."""
    if not cfg.storage_options:
        return None, storage_root(cfg)
    fs, path = url_to_fs(cfg.storage_path, **cfg.storage_options)
    return PyFileSystem(FSSpecHandler(fs)), path


def encoder_uri(cfg: PretrainConfig) -> str:
    """storage_path/<name>/encoder.pt: where the job writes its final encoder."""
    return f"{storage_root(cfg).rstrip('/')}/{cfg.name}/encoder.pt"


# ------------------------------------------------------------------------------------------- driver

def _windows_dataset(cfg: PretrainConfig) -> pads.Dataset:
    """The windows dataset as pyarrow sees it (for counts and the schema, read in the driver)."""
    fs, root = url_to_fs(windows_uri(cfg.data.dataset), **cfg.data.storage_options)
    return pads.dataset(root, filesystem=fs, format="parquet", partitioning=HIVE_PARTITIONING)


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
    """For ``iter_torch_batches(collate_fn=WindowCollate())``: Ray runs it in its prefetch threads."""

    def __call__(self, batch: pa.Table) -> dict[str, torch.Tensor]:
        return decode_window_batch(batch)


def read_split(cfg: PretrainConfig, split: str) -> ray.data.Dataset:
    """The columns the model needs, of one split: the path filter skips other splits' files unopened."""
    path, filesystem = windows_uri(cfg.data.dataset), None
    if cfg.data.storage_options:
        fs, path = url_to_fs(path, **cfg.data.storage_options)
        filesystem = PyFileSystem(FSSpecHandler(fs))
    return ray.data.read_parquet(
        path,
        filesystem=filesystem,
        partitioning=Partitioning("hive"),
        partition_filter=PathPartitionFilter.of(lambda keys: keys.get("split") == split, style="hive"),
        # A new file order every epoch (reseeded per execution); the workers' buffers shuffle rows.
        shuffle=FileShuffleConfig(seed=cfg.seed) if split == "train" else None,
    ).select_columns(MODEL_COLUMNS)


def _fixed_val_window(dataset: pads.Dataset) -> dict:
    """The first val window: the same ECG is drawn every epoch, so the figures show progress."""
    head = dataset.head(1, columns=[*MODEL_COLUMNS, "fs"], filter=pc.field("split") == "val")
    return {**{k: v.numpy() for k, v in decode_window_batch(head).items()}, "fs": float(head["fs"][0].as_py())}


def _checkpoint_uri(cfg: PretrainConfig, path: str) -> str:
    """Ray reports remote paths without their scheme."""
    if "://" not in cfg.storage_path:
        return path
    return f"{cfg.storage_path.split('://', 1)[0]}://{path.lstrip('/')}"


def run(cfg: PretrainConfig) -> PretrainResult:
    """Train (or resume) the job described by `cfg`; returns where its outputs are."""
    windows = _windows_dataset(cfg)
    _check_window_length(windows, cfg)
    plan = plan_epochs(cfg, _split_rows(windows, "train"), _split_rows(windows, "val"))
    tracking_uri = tracking.resolve_tracking_uri(cfg.tracking.tracking_uri)
    init_ray()
    storage_filesystem, storage_path = storage_target(cfg)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "cfg": cfg.model_dump(mode="json"),
            "plan": asdict(plan),
            "tracking_uri": tracking_uri,
            "tags": run_tags(cfg.data.dataset, cfg.data.storage_options),
            "fixed_val_window": _fixed_val_window(windows),
        },
        scaling_config=ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                                     resources_per_worker={"CPU": cfg.scaling.cpus_per_worker}),
        run_config=RunConfig(
            name=cfg.name,
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.num_to_keep),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
        ),
        datasets={"train": read_split(cfg, "train"), "val": read_split(cfg, "val")},
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
    worker = _setup_worker(config)
    restored = _resume(worker)
    if worker.is_rank0:
        tracking.open_training_run(worker.cfg.name, worker.cfg.tracking.experiment, config["tracking_uri"],
                                   tracking.redact(config["cfg"]), config["tags"],
                                   restored.global_step if restored is not None else None)
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

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0


def _setup_worker(config: dict) -> Worker:
    """Model, AdamW (:func:`crema.train.optim.param_groups`) and warm-up + cosine schedule on this worker."""
    cfg = PretrainConfig.model_validate(config["cfg"])
    plan = EpochPlan(**config["plan"])
    context = ray.train.get_context()
    device = ray.train.torch.get_device()
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
        with checkpoint.as_directory() as folder:
            restored = load_training_state(folder, worker.model, worker.optimizer, worker.scheduler)
        worker.position = restored
    # Masks and noise differ per rank, and a resumed run does not replay the draws it already made.
    torch.manual_seed(worker.cfg.seed + 1_000_003 * worker.position.global_step + worker.rank)
    worker.ddp_model = ray.train.torch.prepare_model(worker.model)
    worker.train_shard = ray.train.get_dataset_shard("train")
    worker.val_shard = ray.train.get_dataset_shard("val")
    return restored


def _step_callback(worker: Worker, resumed: bool):
    """The `on_step` of the step loop: advance the position, log (rank 0), checkpoint, and the failure drill."""
    cfg, position = worker.cfg, worker.position

    def on_step(stats: StepStats) -> None:
        position.global_step = stats.step
        position.step_in_epoch += 1
        if worker.is_rank0 and stats.step % cfg.tracking.log_every_steps == 0:
            tracking.log_metrics({k: v for k, v in asdict(stats).items() if k != "step"}, stats.step,
                                 synchronous=False)
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
            batch_size=cfg.data.batch_size, drop_last=True, collate_fn=WindowCollate(),
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
                                                      collate_fn=WindowCollate(),
                                                      prefetch_batches=cfg.data.prefetch_batches)
    val = validate(worker.ddp_model, val_batches, num_steps=plan.val_steps, device=worker.device,
                   amp_dtype=worker.amp_dtype, seed=cfg.seed)
    if worker.is_rank0:
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
                         checkpoint_dir_name=f"checkpoint_step{worker.position.global_step:08d}")


def log_reconstruction(model, window: dict, device: torch.device, epoch: int, seed: int) -> None:
    """The fixed validation ECG against the model's masked reconstruction, as a figure in MLflow."""
    model.eval()
    x = torch.from_numpy(window["x"]).to(device)
    lead_mask = torch.from_numpy(window["lead_mask"]).to(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        recon, masked = model.reconstruct(x, lead_mask, generator=generator)
    fig = plot_reconstruction(window["x"][0], recon[0].float().cpu().numpy(), masked[0].cpu().numpy(),
                              window["lead_mask"][0], window["fs"], title=f"validation ECG, epoch {epoch + 1}")
    tracking.log_figure(fig, f"reconstruction/epoch_{epoch + 1:03d}.png")


def _finish_tracking(model: CREMA, cfg: PretrainConfig) -> None:
    """Write the final encoder to storage_path and log it to MLflow; end the run."""
    with tempfile.TemporaryDirectory() as folder:
        local = os.path.join(folder, "encoder.pt")
        save_encoder(model, local)
        tracking.copy_to_storage(local, encoder_uri(cfg), cfg.storage_options)
    tracking.close_training_run(model.encoder, encoder_uri(cfg))


def _shuffle_seed(seed: int, position: Position, rank: int) -> int:
    """Differs per epoch and rank, and for a resumed epoch (which starts at a later step)."""
    return int(np.random.SeedSequence([seed, position.epoch, position.global_step, rank]).generate_state(1)[0])


# ------------------------------------------------------------------------------------------ command

def main(
    config: Annotated[Path, typer.Option("--config", "-c", help="Pretraining YAML (configs/pretrain/*.yaml)")],
    overrides: Annotated[Optional[list[str]], typer.Argument(help="key=value settings, e.g. optim.lr=3e-4")] = None,
) -> None:
    """Pretrain the CREMA encoder (CR-MAE) on the ingested windows, resuming a run of the same name."""
    with exit_2_on_config_error():
        cfg = load_yaml(config, PretrainConfig, parse_overrides(overrides or []))
        result = run(cfg)
    console.print(f"run {result.run_name}: checkpoint {result.checkpoint_path}")
    console.print(f"encoder → {result.encoder_path} (MLflow run {result.mlflow_run_id})")
    console.print({k: v for k, v in result.metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)})


if __name__ == "__main__":
    typer.run(main)
