"""CR-MAE pretraining as a Ray Train job: `python -m pipelines.pretrain --config CONFIG.yaml [key=value ...]`.

Also `crema pretrain ...`, and `ray job submit -- python -m pipelines.pretrain ...` on a cluster.

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
import pyarrow.compute as pc
import pyarrow.dataset as pads
import mlflow
import ray
import ray.train
import ray.train.torch
import torch
import typer
import yaml
from fsspec.core import url_to_fs
from pyarrow.fs import FSSpecHandler, PyFileSystem
from ray.data import FileShuffleConfig
from ray.data.datasource import PathPartitionFilter
from ray.data.datasource.partitioning import Partitioning
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from rich.console import Console

from crema.config import ConfigError, PretrainConfig, load_yaml, parse_overrides
from crema.data import MODEL_COLUMNS, WindowCollate, decode_window_batch
from crema.dataset import HIVE_PARTITIONING, windows_uri
from crema.engine import StepStats, autocast_dtype, evaluate, train_one_epoch, warmup_cosine
from crema.model import CREMA, save_encoder
from crema.plots import plot_reconstruction
from crema.tracking import (copy_to_storage, dataset_tags, find_run, flatten_params, git_commit, log_figure,
                            log_new_params, redact, resolve_tracking_uri, start_or_resume_run)
from pipelines.common import init_ray

console = Console()
STATE_FILE = "state.pt"
NO_DECAY_NAMES = {"lead_embed", "sep_token", "mask_token", "pos_embed"}  # besides biases and norm weights


@dataclass(frozen=True)
class PretrainResult:
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
    return f"{storage_root(cfg).rstrip('/')}/{cfg.name}/encoder.pt"


# ------------------------------------------------------------------------------------------- driver

def _windows_dataset(cfg: PretrainConfig) -> pads.Dataset:
    fs, root = url_to_fs(windows_uri(cfg.data.dataset), **cfg.data.storage_options)
    return pads.dataset(root, filesystem=fs, format="parquet", partitioning=HIVE_PARTITIONING)


def _split_rows(dataset: pads.Dataset, split: str) -> int:
    return dataset.count_rows(filter=pc.field("split") == split)


def _check_window_length(dataset: pads.Dataset, cfg: PretrainConfig) -> None:
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


def _run_tags(cfg: PretrainConfig) -> dict[str, str]:
    tags = dataset_tags(cfg.data.dataset, cfg.data.storage_options)
    commit = git_commit()
    if commit:
        tags["git_commit"] = commit
    tags["ray_version"] = ray.__version__
    return tags


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
    tracking_uri = resolve_tracking_uri(cfg.tracking.tracking_uri)
    init_ray()
    storage_filesystem, storage_path = storage_target(cfg)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "cfg": cfg.model_dump(mode="json"),
            "plan": asdict(plan),
            "tracking_uri": tracking_uri,
            "tags": _run_tags(cfg),
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
    mlflow_run = find_run(cfg.name, cfg.tracking.experiment, tracking_uri)
    return PretrainResult(
        run_name=cfg.name,
        checkpoint_path=_checkpoint_uri(cfg, result.checkpoint.path) if result.checkpoint else None,
        encoder_path=encoder_uri(cfg),
        mlflow_run_id=mlflow_run.info.run_id if mlflow_run else None,
        metrics=dict(result.metrics or {}),
    )


# ------------------------------------------------------------------------------------------- worker

def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases, norms, tokens and embeddings: decaying them only hurts (as in MAE)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exempt = p.ndim <= 1 or name.rsplit(".", 1)[-1] in NO_DECAY_NAMES
        (no_decay if exempt else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@dataclass
class Position:
    epoch: int = 0
    step_in_epoch: int = 0  # optimiser steps done in `epoch`
    global_step: int = 0


def save_checkpoint(model, optimizer, scheduler, position: Position, metrics: dict, is_rank0: bool) -> None:
    """Every rank reports (report is a barrier); only rank 0 writes the files, the weights being equal."""
    if not is_rank0:
        ray.train.report(metrics)
        return
    # Whatever a checkpoint covers is in MLflow too, even if the job dies right after.
    mlflow.flush_async_logging()
    with tempfile.TemporaryDirectory() as folder:
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "position": asdict(position)},
                   os.path.join(folder, STATE_FILE))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder),
                         checkpoint_dir_name=f"checkpoint_step{position.global_step:08d}")


def load_checkpoint(checkpoint, model, optimizer, scheduler) -> Position:
    with checkpoint.as_directory() as folder:
        state = torch.load(os.path.join(folder, STATE_FILE), map_location="cpu", weights_only=False)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return Position(**state["position"])


def log_reconstruction(model, window: dict, device: torch.device, epoch: int, seed: int) -> None:
    model.eval()
    x = torch.from_numpy(window["x"]).to(device)
    lead_mask = torch.from_numpy(window["lead_mask"]).to(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        recon, masked = model.reconstruct(x, lead_mask, generator=generator)
    fig = plot_reconstruction(window["x"][0], recon[0].float().cpu().numpy(), masked[0].cpu().numpy(),
                              window["lead_mask"][0], window["fs"], title=f"validation ECG, epoch {epoch + 1}")
    log_figure(fig, f"reconstruction/epoch_{epoch + 1:03d}.png")


def _start_tracking(cfg: PretrainConfig, config: dict, resumed_from: Position | None) -> None:
    _, resumed = start_or_resume_run(cfg.name, cfg.tracking.experiment, config["tracking_uri"])
    public = redact(config["cfg"])
    log_new_params(flatten_params(public))
    mlflow.set_tags(config["tags"])
    if not resumed:
        mlflow.log_text(yaml.safe_dump(public, sort_keys=False), "config.yaml")
    if resumed_from is not None:
        mlflow.log_metric("resumed_from_step", resumed_from.global_step, step=resumed_from.global_step)


def _finish_tracking(model, cfg: PretrainConfig) -> None:
    with tempfile.TemporaryDirectory() as folder:
        local = os.path.join(folder, "encoder.pt")
        save_encoder(model, local)
        copy_to_storage(local, encoder_uri(cfg), cfg.storage_options)
    # Pickled rather than a traced pt2 graph: users call the encoder's `embed`, not only `forward`.
    mlflow.pytorch.log_model(model.encoder, name="encoder", serialization_format="pickle",
                             pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"])
    mlflow.set_tag("encoder_path", encoder_uri(cfg))
    mlflow.flush_async_logging()
    mlflow.end_run()


def _shuffle_seed(seed: int, position: Position, rank: int) -> int:
    """Differs per epoch and rank, and for a resumed epoch (which starts at a later step)."""
    return int(np.random.SeedSequence([seed, position.epoch, position.global_step, rank]).generate_state(1)[0])


def train_loop_per_worker(config: dict) -> None:
    cfg = PretrainConfig.model_validate(config["cfg"])
    plan = EpochPlan(**config["plan"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    is_rank0 = rank == 0
    device = ray.train.torch.get_device()
    amp_dtype = autocast_dtype(cfg.precision, device)
    torch.manual_seed(cfg.seed)  # DDP broadcasts rank 0's weights anyway; this makes runs reproducible

    model = CREMA(cfg.model).to(device)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr,
                                  betas=cfg.optim.betas)
    total_steps = plan.steps_per_epoch * cfg.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(cfg.optim.warmup_steps, total_steps, cfg.optim.min_lr_ratio))
    checkpoint = ray.train.get_checkpoint()
    restored = load_checkpoint(checkpoint, model, optimizer, scheduler) if checkpoint else None
    position = restored or Position()
    # Masks and noise differ per rank, and a resumed run does not replay the draws it already made.
    torch.manual_seed(cfg.seed + 1_000_003 * position.global_step + rank)
    ddp_model = ray.train.torch.prepare_model(model)

    if is_rank0:
        _start_tracking(cfg, config, restored)
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")

    def on_step(stats: StepStats) -> None:
        position.global_step = stats.step
        position.step_in_epoch += 1
        if is_rank0 and stats.step % cfg.tracking.log_every_steps == 0:
            mlflow.log_metrics({k: v for k, v in asdict(stats).items() if k != "step"}, step=stats.step,
                               synchronous=False)
        at_epoch_end = position.step_in_epoch == plan.steps_per_epoch  # the epoch-end checkpoint follows
        if stats.step % cfg.checkpoint.every_steps == 0 and not at_epoch_end:
            save_checkpoint(model, optimizer, scheduler, position,
                            {"step": stats.step, "epoch": position.epoch, "loss": stats.loss}, is_rank0)
        drill = cfg.chaos.exit_after_step
        if drill is not None and restored is None and stats.step == drill and rank == world - 1:
            # Die once Ray has committed the checkpoints reported so far, so the drill's outcome is
            # deterministic: a report still in flight when its worker dies is lost with it.
            ray.train.get_all_reported_checkpoints()
            os._exit(1)

    while position.epoch < cfg.epochs:
        remaining = plan.steps_per_epoch - position.step_in_epoch
        epoch_metrics = {}
        if remaining > 0:
            started = time.perf_counter()
            batches = train_shard.iter_torch_batches(
                batch_size=cfg.data.batch_size, drop_last=True, collate_fn=WindowCollate(),
                local_shuffle_buffer_size=cfg.data.shuffle_buffer or None,
                local_shuffle_seed=_shuffle_seed(cfg.seed, position, rank) if cfg.data.shuffle_buffer else None,
                prefetch_batches=cfg.data.prefetch_batches)
            train_one_epoch(ddp_model, batches, optimizer, scheduler, num_steps=remaining,
                            start_step=position.global_step, device=device, amp_dtype=amp_dtype,
                            accum_steps=cfg.optim.accum_steps, clip_grad=cfg.optim.clip_grad, on_step=on_step)
            # Wall clock of the whole epoch's training, checkpoints and logging included.
            global_batch = cfg.data.batch_size * cfg.optim.accum_steps * world
            epoch_metrics["epoch_samples_per_s"] = remaining * global_batch / (time.perf_counter() - started)
        val_batches = val_shard.iter_torch_batches(batch_size=plan.val_batch_size, drop_last=True,
                                                   collate_fn=WindowCollate(),
                                                   prefetch_batches=cfg.data.prefetch_batches)
        val = evaluate(ddp_model, val_batches, num_steps=plan.val_steps, device=device, amp_dtype=amp_dtype,
                       seed=cfg.seed)
        if is_rank0:
            mlflow.log_metrics({**val, **epoch_metrics}, step=position.global_step)
            mlflow.log_metric("epoch", position.epoch + 1, step=position.global_step)
            log_reconstruction(model, config["fixed_val_window"], device, position.epoch, cfg.seed)
        position.epoch += 1
        position.step_in_epoch = 0
        save_checkpoint(model, optimizer, scheduler, position,
                        {"step": position.global_step, "epoch": position.epoch, **val, **epoch_metrics}, is_rank0)

    if is_rank0:
        _finish_tracking(model, cfg)


# ------------------------------------------------------------------------------------------ command

def main(
    config: Annotated[Path, typer.Option("--config", "-c", help="Pretraining YAML (configs/pretrain/*.yaml)")],
    overrides: Annotated[Optional[list[str]], typer.Argument(help="key=value settings, e.g. optim.lr=3e-4")] = None,
) -> None:
    """Pretrain the CREMA encoder (CR-MAE) on the ingested windows, resuming a run of the same name."""
    try:
        cfg = load_yaml(config, PretrainConfig, parse_overrides(overrides or []))
        result = run(cfg)
    except ConfigError as err:
        console.print(f"[red]invalid configuration:[/red] {err}")
        raise typer.Exit(2)
    console.print(f"run {result.run_name}: checkpoint {result.checkpoint_path}")
    console.print(f"encoder → {result.encoder_path} (MLflow run {result.mlflow_run_id})")
    console.print({k: v for k, v in result.metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)})


if __name__ == "__main__":
    typer.run(main)
