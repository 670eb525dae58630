"""Pretraining sweeps on Ray Tune: `crema sweep-pretrain --config PRETRAIN.yaml --sweep SWEEP.yaml [key=value ...]`.

Also `python -m crema.stages.sweep_pretrain ...`, and `ray job submit -- python -m crema.stages.sweep_pretrain ...`.

Every trial is a pretraining job of its own, built by :func:`crema.stages.pretrain.run` inside the trial (a Ray
Train run with its checkpoints under ``storage_path/<sweep>-<index>/``), so a trial is exactly what `crema
pretrain` would train with those settings. Its MLflow run is the pretraining run, nested under the sweep's
parent run (``mlflow.parentRunId``). Trials see validation data only: after every epoch the job's validation
reconstruction loss reaches Tune (ASHA stops the trials that lag), and a finished trial embeds the probe task's
train and val windows with its encoder and scores the converged linear probe's val macro AUROC
(``val_probe_macro_auroc``). The test split is never read here: score the chosen encoder once, with `crema probe`.

Re-running a sweep of the same name resumes each trial's pretraining from its checkpoints (same run names).
"""

from __future__ import annotations

import itertools
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import pandas as pd
import pyarrow.compute as pc
import typer
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler
from rich.console import Console
from rich.table import Table

from crema import tracking
from crema.config import (ConfigError, PretrainConfig, PretrainSweepConfig, TaskConfig, load_yaml, parse_overrides,
                          redact_uri)
from crema.data.catalog import read_windows
from crema.evaluation.embeddings import embed_windows
from crema.evaluation.probe import converged_probe_val_auroc
from crema.evaluation.tasks import META_COLUMNS, SIGNAL_COLUMNS, LabelledWindows, load_task, split_roles
from crema.stages.common import announce_outputs, exit_2_on_config_error, init_ray
from crema.stages.pretrain import resolve_storage
from crema.stages.pretrain import run as run_pretraining
from crema.train.artifacts import load_encoder

VAL_RECON = "val_recon_loss"
VAL_PROBE = "val_probe_macro_auroc"
TRIAL_DRIVER_CPUS = 0.01

console = Console()
log = logging.getLogger(__spec__.name if __spec__ else __name__)


class EpochReports(TuneReportCallback):
    """The job's reports to Tune, all but those of its last epoch: Tune ends a trial at its report of max_t,
    mid-job, so the last epoch's validation loss reaches Tune in the trial's final report, after the probe."""

    def __init__(self, last_epoch: int):
        super().__init__()
        self.last_epoch = last_epoch

    def after_report(self, run_context, metrics, checkpoint):
        if metrics[0].get("epoch", 0) < self.last_epoch:
            super().after_report(run_context, metrics, checkpoint)


@dataclass(frozen=True)
class Trial:
    """One grid point at one seed: the settings it changes and the pretraining config they give."""

    index: int
    settings: dict  # dotted keys -> values, seed included
    cfg: PretrainConfig


def trials(base: PretrainConfig, sweep: PretrainSweepConfig) -> list[Trial]:
    """Every grid point once per seed, each validated as a PretrainConfig up front: a bad value fails the
    sweep before any trial starts."""
    axes = list(sweep.grid)
    out = []
    for index, (values, seed) in enumerate(itertools.product(itertools.product(*sweep.grid.values()), sweep.seeds)):
        settings = {**dict(zip(axes, values)), "seed": seed}
        data = base.model_dump(mode="json")
        for dotted, value in {**settings, "name": f"{sweep.name}-{index:03d}"}.items():
            node = data
            *parents, leaf = dotted.split(".")
            for key in parents:
                if not isinstance(node.get(key), dict):
                    raise ConfigError(f"sweep {sweep.name}: grid key {dotted!r} is not a pretraining setting")
                node = node[key]
            if leaf not in node:
                raise ConfigError(f"sweep {sweep.name}: grid key {dotted!r} is not a pretraining setting")
            node[leaf] = value
        try:
            cfg = PretrainConfig.model_validate(data)
        except ValueError as err:
            raise ConfigError(f"sweep {sweep.name}, trial {index} ({settings}): {err}") from err
        out.append(Trial(index, settings, cfg))
    return out


def probe_task_for(sweep: PretrainSweepConfig, base: PretrainConfig) -> TaskConfig | None:
    """The probe task, reading the pretraining dataset (whatever its own YAML names)."""
    if sweep.probe_task is None:
        return None
    return load_task(sweep.probe_task, {"dataset": base.data.dataset, "storage_options": base.data.storage_options})


# ------------------------------------------------------------------------------------------ trial

def val_probe_score(encoder_path: str, task: TaskConfig, storage_options: dict) -> float:
    """The converged probe's val macro AUROC of the encoder at `encoder_path` on the task's train/val windows."""
    encoder = load_encoder(encoder_path)
    table = read_windows(task.dataset, columns=[*SIGNAL_COLUMNS, *META_COLUMNS],
                         filter=pc.field("split").isin([task.train_split, task.val_split]),
                         storage_options=storage_options)
    roles = split_roles(table, task.model_copy(update={"test_splits": [task.val_split]}))
    train, val = (LabelledWindows.from_table(roles[r], task.classes) for r in ("train", "val"))
    return converged_probe_val_auroc(embed_windows(encoder, roles["train"]), train,
                                     embed_windows(encoder, roles["val"]), val)


def pretrain_trial(config: dict, *, parent_run_id: str, task: dict | None) -> None:
    """One Tune trial: its pretraining job (validation losses to Tune every epoch), then its probe score."""
    cfg = PretrainConfig.model_validate(config["cfg"])
    result = run_pretraining(cfg, resume=True, parent_run_id=parent_run_id, callbacks=(EpochReports(cfg.epochs),))
    final = {"epoch": cfg.epochs, VAL_RECON: result.metrics.get(VAL_RECON, math.nan)}
    if task is not None:
        final[VAL_PROBE] = val_probe_score(result.encoder_path, TaskConfig.model_validate(task),
                                           cfg.data.storage_options)
        if result.mlflow_run_id:
            tracking.log_run_metric(tracking.resolve_tracking_uri(cfg.tracking.tracking_uri), result.mlflow_run_id,
                                    VAL_PROBE, final[VAL_PROBE])
    tune.report(final)


# ------------------------------------------------------------------------------------------ sweep

def run(config: str | Path, sweep_file: str | Path, overrides: dict | None = None) -> pd.DataFrame:
    """The sweep over the base pretraining config at `config`; returns one row per trial, best first."""
    base = resolve_storage(load_yaml(config, PretrainConfig, overrides))
    sweep = load_yaml(sweep_file, PretrainSweepConfig)
    planned = trials(base, sweep)
    task = probe_task_for(sweep, base)
    tracking_uri = tracking.resolve_tracking_uri(base.tracking.tracking_uri)
    tracking.check_reachable(tracking_uri)
    base = base.model_copy(update={"tracking": base.tracking.model_copy(update={"tracking_uri": tracking_uri})})
    planned = [Trial(t.index, t.settings, t.cfg.model_copy(update={"tracking": base.tracking})) for t in planned]
    announce_outputs({"trials": f"{base.storage_path}/{sweep.name}-NNN ({len(planned)} trials)",
                      "mlflow": f"{redact_uri(tracking_uri)} (experiment {base.tracking.experiment}, "
                                f"run {sweep.name})",
                      "dataset": base.data.dataset})
    # ASHA ends a lagging trial by killing it mid-training: the State API (the dashboard) is what lets Ray
    # Train's watcher see that the trial's controller is gone and release its workers.
    init_ray(dashboard=True)
    # Epoch-end reports carry the validation loss; mid-epoch checkpoint reports do not, and need not.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    with tracking.pretrain_sweep_run(tracking_uri, base.tracking.experiment, sweep.name,
                                     {"trials": len(planned), "rank_by": sweep.rank_by, "seeds": sweep.seeds,
                                      "base_config": str(config)},
                                     sweep.model_dump(mode="json")) as parent_run_id:
        grid = _tune(planned, sweep, base, parent_run_id, task)
        table = results_table(planned, grid, sweep.rank_by)
        tracking.log_sweep_table(table, table["run"].iloc[0] if len(table) else None)
    return table


def _tune(planned: list[Trial], sweep: PretrainSweepConfig, base: PretrainConfig, parent_run_id: str,
          task: TaskConfig | None) -> tune.ResultGrid:
    # ASHA's rungs fall before the last epoch, whose report comes from the trial itself (EpochReports): a
    # grace period of all the epochs runs every trial to its probe.
    max_epochs = max(t.cfg.epochs for t in planned)
    scheduler = ASHAScheduler(metric=VAL_RECON, mode="min", time_attr="epoch", max_t=max_epochs,
                              grace_period=min(sweep.grace_period, max_epochs),
                              reduction_factor=sweep.reduction_factor)
    trainable = tune.with_parameters(pretrain_trial, parent_run_id=parent_run_id,
                                     task=task.model_dump(mode="json") if task else None)
    tuner = tune.Tuner(
        # The trial only drives (Tune refuses an empty request): its Ray Train job asks for the CPUs (or GPUs)
        # its workers train on.
        tune.with_resources(trainable, {"CPU": TRIAL_DRIVER_CPUS}),
        param_space={"cfg": tune.grid_search([t.cfg.model_dump(mode="json") for t in planned])},
        tune_config=tune.TuneConfig(scheduler=scheduler, max_concurrent_trials=sweep.max_concurrent_trials),
        run_config=tune.RunConfig(name=sweep.name, storage_path=f"{base.storage_path.rstrip('/')}/{sweep.name}-tune",
                                  verbose=1),
    )
    grid = tuner.fit()
    if grid.errors:
        raise RuntimeError(f"{len(grid.errors)} of {len(grid)} trials failed; first: {grid.errors[0]}")
    return grid


def results_table(planned: list[Trial], grid: tune.ResultGrid, rank_by: str) -> pd.DataFrame:
    """One row per trial: its run name, settings, epochs run, validation scores; best `rank_by` first."""
    by_name = {t.cfg.name: t for t in planned}
    rows = []
    for result in grid:
        trial = by_name[result.config["cfg"]["name"]]
        history = result.metrics_dataframe if result.metrics_dataframe is not None else pd.DataFrame()
        epochs = int(history["epoch"].max()) if "epoch" in history else 0
        recon = history[VAL_RECON].dropna() if VAL_RECON in history else pd.Series(dtype=float)
        rows.append({"run": trial.cfg.name, **trial.settings, "epochs": epochs,
                     VAL_RECON: float(recon.iloc[-1]) if len(recon) else math.nan,
                     VAL_PROBE: float(result.metrics.get(VAL_PROBE, math.nan)),
                     "stopped_early": epochs < trial.cfg.epochs})
    table = pd.DataFrame(rows)
    ascending = rank_by == VAL_RECON
    return table.sort_values(rank_by, ascending=ascending, na_position="last").reset_index(drop=True)


def print_table(table: pd.DataFrame, rank_by: str) -> None:
    shown = Table(title=f"pretraining sweep: validation only, ranked by {rank_by}")
    for column in table.columns:
        # The setting's own name (model.contrastive_weight -> contrastive_weight), folded, never cut off.
        shown.add_column(str(column).rsplit(".", 1)[-1], overflow="fold")
    for _, row in table.iterrows():
        shown.add_row(*[f"{v:.4f}" if isinstance(v, float) and not isinstance(v, bool) else str(v)
                        for v in row.tolist()])
    console.print(shown)


# ------------------------------------------------------------------------------------------ command

def main(
    config: Annotated[Path, typer.Option("--config", "-c", help="The base pretraining YAML (configs/pretrain/*.yaml)")],
    sweep: Annotated[Path, typer.Option("--sweep", "-s", help="The sweep YAML (configs/sweeps/*.yaml)")],
    overrides: Annotated[Optional[list[str]], typer.Argument(help="key=value settings of the base config")] = None,
) -> None:
    """Sweep pretraining recipes on Ray Tune: every trial a pretraining job, judged on validation data only."""
    with exit_2_on_config_error():
        table = run(config, sweep, parse_overrides(overrides or []))
    rank_by = load_yaml(sweep, PretrainSweepConfig).rank_by
    print_table(table, rank_by)
    if not table.empty and not np.isnan(table[rank_by].iloc[0]):
        console.print(f"best: {table['run'].iloc[0]} ({rank_by} {table[rank_by].iloc[0]:.4f}); score it once on "
                      "the test split with `crema probe`", soft_wrap=True)


if __name__ == "__main__":
    typer.run(main)
