"""`crema sweep-pretrain`: a grid of pretraining recipes on Ray Tune, every trial a real pretraining job (Ray
Train) nested under the sweep's MLflow run, scored on validation windows only."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from crema.config import ConfigError, PretrainConfig, PretrainSweepConfig
from tests.model.pretrain_fixtures import write_ptbxl_windows
from tests.model.test_pretrain import SMALL_MODEL, WINDOW_S


@pytest.fixture(scope="module")
def windows_60(ptbxl_root, tmp_path_factory) -> Path:
    return write_ptbxl_windows(ptbxl_root, tmp_path_factory.mktemp("ptbxl60"), n_records=60, window_s=WINDOW_S)


def write_configs(tmp_path: Path, dataset: Path, grid: dict, **sweep) -> tuple[Path, Path]:
    base = dict(name="unused", storage_path=str(tmp_path / "runs"), epochs=2, model=SMALL_MODEL,
                data=dict(dataset=str(dataset), batch_size=8, shuffle_buffer=0, prefetch_batches=1),
                optim=dict(lr=1e-3, warmup_steps=2), scaling=dict(num_workers=1, cpus_per_worker=0.5),
                checkpoint=dict(every_steps=1000),
                tracking=dict(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", experiment="sweeps", log_every_steps=1))
    # The fixture's labels are raw SCP codes; NORM and IMI have positives and negatives among 60 records.
    task = dict(name="probe", dataset="unused", output=str(tmp_path / "downstream"), classes=["NORM", "IMI"],
                require_label=False, encoders=[{"name": "unused", "init": "random", "model": SMALL_MODEL}])
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    (tmp_path / "task.yaml").write_text(yaml.safe_dump(task))
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(
        {"name": "lam", "grid": grid, "probe_task": str(tmp_path / "task.yaml"), **sweep}))
    return tmp_path / "base.yaml", tmp_path / "sweep.yaml"


@pytest.mark.timeout(600)
def test_a_two_trial_sweep_ranks_real_pretraining_runs_on_validation_only(windows_60, ray_local, tmp_path):
    from crema.stages.sweep_pretrain import run

    # No ASHA rung before the last epoch: both trials run to the end and are probed.
    base, sweep = write_configs(tmp_path, windows_60, {"model.contrastive_weight": [0.0, 0.05]}, grace_period=2)
    table = run(base, sweep)

    assert sorted(table["run"]) == ["lam-000", "lam-001"]
    assert sorted(table["model.contrastive_weight"]) == [0.0, 0.05]
    assert (table["epochs"] == 2).all() and not table["stopped_early"].any()
    assert table["val_probe_macro_auroc"].between(0, 1).all() and (table["val_recon_loss"] > 0).all()
    assert table["val_probe_macro_auroc"].is_monotonic_decreasing  # best first
    for name in table["run"]:
        assert (tmp_path / "runs" / name / "encoder.safetensors").is_file()

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("sweeps")
    (parent,) = client.search_runs([experiment.experiment_id], "tags.`crema.kind` = 'pretrain_sweep'")
    children = client.search_runs([experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(c.info.run_name for c in children) == ["lam-000", "lam-001"]
    for child in children:
        weight = float(child.data.params["model.contrastive_weight"])
        row = table[table["run"] == child.info.run_name].iloc[0]
        assert weight == row["model.contrastive_weight"]
        assert child.data.metrics["val_probe_macro_auroc"] == pytest.approx(row["val_probe_macro_auroc"])
        assert len(client.get_metric_history(child.info.run_id, "val_recon_loss")) == 2  # one per epoch
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"sweep.yaml", "trials.csv"} <= artifacts
    assert parent.data.tags["best_trial_run_name"] == table["run"].iloc[0]


def test_a_grid_key_that_is_no_pretraining_setting_fails_before_any_trial(windows_60, tmp_path):
    from crema.stages.sweep_pretrain import run

    base, sweep = write_configs(tmp_path, windows_60, {"model.contrastive_wieght": [0.0]})
    with pytest.raises(ConfigError, match="contrastive_wieght"):
        run(base, sweep)
    base, sweep = write_configs(tmp_path, windows_60, {"model.temperature": [0.1, -1.0]})
    with pytest.raises(ConfigError, match="trial 1"):
        run(base, sweep)


def test_sweep_schema_and_shipped_sweep():
    with pytest.raises(ValueError, match="probe_task"):
        PretrainSweepConfig(name="x", grid={"model.temperature": [0.1]})
    with pytest.raises(ValueError, match="seeds"):
        PretrainSweepConfig(name="x", grid={"seed": [0, 1]}, rank_by="val_recon_loss")
    from crema.config import load_yaml
    from crema.stages.sweep_pretrain import trials

    repo = Path(__file__).resolve().parents[2]
    sweep = load_yaml(repo / "configs/sweeps/contrastive.yaml", PretrainSweepConfig)
    base = load_yaml(repo / "configs/pretrain/cpu.yaml", PretrainConfig)
    planned = trials(base, sweep)
    assert len(planned) == 5 * 3 * 2 * 2 * 2 * len(sweep.seeds)
    assert len({t.cfg.name for t in planned}) == len(planned)
    assert {t.cfg.model.contrastive_view for t in planned} == {"mask", "crop"}
