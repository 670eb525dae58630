"""CR-MAE pretraining on real PTB-XL windows: the step loop learns, and the Ray Train job survives a
lost worker — resumed from its checkpoint by a re-run of the same name, in the same MLflow run."""

from __future__ import annotations

from pathlib import Path

import boto3
import mlflow
import numpy as np
import pyarrow.compute as pc
import pytest
import s3fs
import torch
from mlflow.tracking import MlflowClient

from crema.config import CatalogConfig, ConfigError, ModelConfig, PretrainConfig, load_yaml
from crema.data.batches import MODEL_COLUMNS, iter_table_batches
from crema.data.catalog import read_windows, write_windows
from crema.train.engine_pretrain import train_one_epoch, validate
from crema.train.optim import warmup_cosine
from crema.model.network import CREMA
from crema.train.artifacts import load_encoder
from crema.train.checkpoint import STATE_FILE, read_training_state
from crema.data.schema import decode_masks, decode_signals
from tests.model.pretrain_fixtures import write_ptbxl_windows

WINDOW_S, FS = 2.0, 500
# Small enough for two CPU cores, big enough to learn something in a few dozen steps.
SMALL_MODEL = dict(size="tiny", window_samples=int(WINDOW_S * FS), patch_size=50, embed_dim=64, depth=2,
                   num_heads=4, decoder_embed_dim=64, decoder_depth=1, decoder_num_heads=4)


@pytest.fixture(scope="module")
def windows_120(ptbxl_root, tmp_path_factory) -> Path:
    return write_ptbxl_windows(ptbxl_root, tmp_path_factory.mktemp("ptbxl120"), n_records=120, window_s=WINDOW_S)


@pytest.fixture(scope="module")
def windows_40(ptbxl_root, tmp_path_factory) -> Path:
    return write_ptbxl_windows(ptbxl_root, tmp_path_factory.mktemp("ptbxl40"), n_records=40, window_s=WINDOW_S)


def test_loss_falls_on_real_ptbxl_windows(windows_120):
    torch.set_num_threads(2)
    torch.manual_seed(0)
    train = read_windows(str(windows_120), columns=MODEL_COLUMNS, filter=pc.field("split") == "train")
    val = read_windows(str(windows_120), columns=MODEL_COLUMNS, filter=pc.field("split") == "val")
    model = CREMA(ModelConfig(**SMALL_MODEL))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05, betas=(0.9, 0.95))
    steps = 16
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(4, steps))
    cpu = torch.device("cpu")

    before = validate(model, iter_table_batches(val, 16, model.cfg.input), num_steps=4, device=cpu)
    seen = []
    done = train_one_epoch(model, iter_table_batches(train, 16, model.cfg.input, seed=0), optimizer, scheduler, num_steps=steps,
                           start_step=0, device=cpu, clip_grad=1.0, on_step=seen.append)
    after = validate(model, iter_table_batches(val, 16, model.cfg.input), num_steps=4, device=cpu)

    assert done == steps and [s.step for s in seen] == list(range(1, steps + 1))
    # The same validation windows and masks (fixed seed) before and after: the model has learnt.
    assert after["val_recon_loss"] < 0.8 * before["val_recon_loss"], (before, after)
    assert after["val_contrastive_loss"] < before["val_contrastive_loss"], (before, after)
    assert sum(s.loss for s in seen[-4:]) < 0.8 * sum(s.loss for s in seen[:4])
    assert seen[0].lr < seen[3].lr and seen[-1].lr < seen[4].lr  # warm-up, then cosine decay
    assert all(s.grad_norm > 0 and s.samples_per_s > 0 for s in seen)


class WithExtraTerm(CREMA):
    """What adding a loss term takes in the model: its weight and its value; the loops carry it by name."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.loss_weights["decoder_scale"] = 0.01

    def forward(self, x, lead_mask, record_group=None, generator=None):
        out = super().forward(x, lead_mask, record_group, generator)
        out.terms["decoder_scale"] = out.pred.square().mean()
        out.loss = out.loss + self.loss_weights["decoder_scale"] * out.terms["decoder_scale"]
        return out


def test_a_new_loss_term_is_logged_and_validated_by_its_name(windows_40):
    torch.manual_seed(0)
    rows = read_windows(str(windows_40), columns=MODEL_COLUMNS)
    model = WithExtraTerm(ModelConfig(**SMALL_MODEL))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    cpu = torch.device("cpu")
    seen = []
    train_one_epoch(model, iter_table_batches(rows, 8, model.cfg.input, seed=0), optimizer, scheduler, num_steps=2,
                    start_step=0, device=cpu, accum_steps=2, on_step=seen.append)
    val = validate(model, iter_table_batches(rows, 8, model.cfg.input), num_steps=2, device=cpu)

    assert list(seen[0].terms) == ["recon_loss", "contrastive_loss", "decoder_scale"]
    assert set(seen[0].metrics()) == {"loss", "recon_loss", "contrastive_loss", "decoder_scale", "lr", "grad_norm",
                                      "samples_per_s"}
    assert set(val) == {"val_loss", "val_recon_loss", "val_contrastive_loss", "val_decoder_scale"}
    weighted = sum(model.loss_weights[name] * value for name, value in seen[-1].terms.items())
    assert seen[-1].loss == pytest.approx(weighted, rel=1e-6)  # the step's loss is its terms, weighted
    assert val["val_loss"] == pytest.approx(
        sum(model.loss_weights[name] * val[f"val_{name}"] for name in seen[0].terms), rel=1e-6)


def test_gradient_accumulation_takes_the_step_of_the_whole_batch(windows_120):
    """2 micro-batches of 8 must step exactly as one batch of 16 (the loss is scaled per micro-batch).

    Without the contrastive term the loss is a mean over masked patches, equally many per window,
    and the masks are drawn from one RNG stream either way, so the two runs must agree to rounding.
    """
    import copy

    torch.set_num_threads(2)
    train = read_windows(str(windows_120), columns=MODEL_COLUMNS, filter=pc.field("split") == "train")
    torch.manual_seed(0)
    whole = CREMA(ModelConfig(**{**SMALL_MODEL, "contrastive_weight": 0.0}))
    accumulated = copy.deepcopy(whole)

    def two_steps(model, batch_size, accum_steps):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        torch.manual_seed(1)
        seen = []
        train_one_epoch(model, iter_table_batches(train, batch_size, model.cfg.input), optimizer, scheduler, num_steps=2,
                        start_step=0, device=torch.device("cpu"), accum_steps=accum_steps, on_step=seen.append)
        return [s.loss for s in seen]

    assert two_steps(whole, 16, 1) == pytest.approx(two_steps(accumulated, 8, 2), rel=1e-5)
    for p, q in zip(whole.parameters(), accumulated.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)


def test_presets_validate():
    repo = Path(__file__).resolve().parents[2]
    tiny = load_yaml(repo / "configs/pretrain/tiny.yaml", PretrainConfig)
    base = load_yaml(repo / "configs/pretrain/base.yaml", PretrainConfig)
    assert tiny.model.size == "tiny" and not tiny.scaling.use_gpu and tiny.scaling.num_workers == 1
    assert base.model.size == "base" and base.scaling.use_gpu and base.scaling.num_workers == 8
    assert base.precision == "bf16"


def test_a_materialized_split_is_read_once_then_every_epoch_streams_it_from_memory(ptbxl_root, ray_local, tmp_path):
    import shutil

    from crema.stages.pretrain import read_split

    dataset = write_ptbxl_windows(ptbxl_root, tmp_path / "dataset", n_records=12, window_s=WINDOW_S)
    train_ids = set(read_windows(str(dataset), columns=["record_id"], filter=pc.field("split") == "train")
                    ["record_id"].to_pylist())
    streamed = read_split(pretrain_config(dataset, tmp_path), "train")
    cached = read_split(pretrain_config(dataset, tmp_path, data=dict(dataset=str(dataset), materialize=True)), "train")
    shutil.rmtree(dataset)  # the files are gone: only a split already in the object store can still be read
    for _ in range(2):
        assert {row["record_id"] for row in cached.iter_rows()} == train_ids
    with pytest.raises(Exception, match="No such file|not found|does not exist"):
        streamed.take_all()


def pretrain_config(dataset: Path, tmp_path: Path, **changes) -> PretrainConfig:
    data = dict(
        name="resume-drill",
        storage_path=str(tmp_path / "runs"),
        epochs=2,
        max_failures=0,
        model=SMALL_MODEL,
        data=dict(dataset=str(dataset), batch_size=8, shuffle_buffer=32, prefetch_batches=1),
        optim=dict(lr=1e-3, warmup_steps=2),
        # Half a CPU each: the other core of a 2-CPU Ray cluster is left to Ray Data's read tasks.
        scaling=dict(num_workers=2, use_gpu=False, cpus_per_worker=0.5),
        checkpoint=dict(every_steps=3, num_to_keep=2),
        tracking=dict(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", experiment="test-pretrain", log_every_steps=1),
    )
    data.update(changes)
    return PretrainConfig.model_validate(data)


def checkpoint_state(folder: Path) -> dict:
    return read_training_state(str(folder))


@pytest.mark.timeout(420)
def test_lost_worker_then_rerun_resumes_from_checkpoint_in_the_same_mlflow_run(windows_40, ray_local, tmp_path):
    import ray.train

    from crema.stages.pretrain import run

    torch.set_num_threads(1)
    # The last rank dies hard (os._exit, as under an OOM kill) after step 5, only in an attempt that
    # started without a checkpoint. With max_failures=0 the job fails; the re-run must pick it up.
    cfg = pretrain_config(windows_40, tmp_path, chaos={"exit_after_step": 5}, checkpoint=dict(every_steps=2,
                                                                                              num_to_keep=2))
    with pytest.raises(ray.train.TrainingFailedError):
        run(cfg)

    run_dir = tmp_path / "runs" / cfg.name
    checkpoints = sorted(run_dir.glob("checkpoint_step*"))
    assert [c.name for c in checkpoints] == ["checkpoint_step00000002", "checkpoint_step00000004"]
    crashed = checkpoint_state(checkpoints[-1])
    assert crashed["position"] == {"epoch": 0, "step_in_epoch": 4, "global_step": 4}
    assert not (run_dir / "encoder.safetensors").exists()
    # The latest checkpoint torn (a half-written file): the re-run falls back to the one before, and says so.
    latest = checkpoints[-1] / STATE_FILE
    latest.write_bytes(latest.read_bytes()[:1000])
    # Other settings under the same run name are refused, unless resumed on purpose.
    with pytest.raises(ConfigError, match="already exists.*optim.lr: 0.001 -> 0.002.*--resume"):
        run(cfg.model_copy(update={"optim": cfg.optim.model_copy(update={"lr": 2e-3})}))

    result = run(cfg)  # same name, same storage: resumes; the drill does not fire in a resumed attempt

    train_rows = read_windows(str(windows_40), columns=["record_id"], filter=pc.field("split") == "train").num_rows
    steps_per_epoch = (train_rows // 2) // 8
    total = 2 * steps_per_epoch
    assert result.metrics["step"] == total and result.metrics["epoch"] == 2
    final = checkpoint_state(Path(result.checkpoint_path))
    assert final["position"] == {"epoch": 2, "step_in_epoch": 0, "global_step": total}
    # AdamW's per-parameter step counts carried on from the checkpoint: a fresh optimiser in the
    # resumed attempt would have counted only the total - 3 steps it took itself.
    adam_states = list(final["optimizer"]["state"].values())
    assert adam_states and all(int(s["step"]) == total for s in adam_states)
    assert all(s["exp_avg"].abs().sum() > 0 for s in adam_states)
    assert final["scheduler"]["last_epoch"] == total

    client = MlflowClient(cfg.tracking.tracking_uri)
    experiment = client.get_experiment_by_name("test-pretrain")
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_name for r in runs] == [cfg.name] and result.mlflow_run_id == runs[0].info.run_id
    run_id = result.mlflow_run_id
    assert runs[0].info.status == "FINISHED"
    assert [m.value for m in client.get_metric_history(run_id, "resumed_from_step")] == [2]
    assert runs[0].data.tags["resumed_from_checkpoint"].endswith("checkpoint_step00000002")
    assert runs[0].data.tags["skipped_checkpoints"].endswith("checkpoint_step00000004")
    logged_steps = {m.step for m in client.get_metric_history(run_id, "loss")}
    assert logged_steps == set(range(1, total + 1))  # one history, continued past the crash
    assert len(client.get_metric_history(run_id, "val_loss")) == 2
    assert {"lr", "grad_norm", "samples_per_s", "recon_loss", "contrastive_loss"} <= set(runs[0].data.metrics)
    assert runs[0].data.params["model.mask_ratio"] == "0.75" and runs[0].data.params["data.batch_size"] == "8"
    assert runs[0].data.tags["dataset_sources"] == "ptbxl"
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.yaml", "reconstruction"} <= artifacts
    figures = [a.path for a in client.list_artifacts(run_id, "reconstruction")]
    assert figures == ["reconstruction/epoch_001.png", "reconstruction/epoch_002.png"]
    # Artifacts sit beside the SQLite store, not in the Ray worker's scratch directory.
    pngs = sorted((tmp_path / "mlartifacts").rglob("epoch_*.png"))
    assert [p.name for p in pngs] == ["epoch_001.png", "epoch_002.png"] and pngs[0].stat().st_size > 10_000

    encoder = load_encoder(result.encoder_path)
    val = read_windows(str(windows_40), columns=MODEL_COLUMNS, filter=pc.field("split") == "val")
    batch = next(iter_table_batches(val, 4, encoder.cfg.input))
    with torch.no_grad():
        embedding = encoder.embed(batch["x"], batch["lead_mask"])
    assert embedding.shape == (4, 2 * SMALL_MODEL["embed_dim"]) and torch.isfinite(embedding).all()

    mlflow.set_tracking_uri(cfg.tracking.tracking_uri)
    logged = mlflow.pyfunc.load_model(f"runs:/{run_id}/encoder")  # safetensors + model code, no pickle
    raw = val.slice(0, 4)  # the served model takes raw mV windows and conditions them itself
    served = logged.predict({"x": decode_signals(raw).astype(np.float32), "lead_mask": decode_masks(raw["lead_mask"])},
                            params={"fs": 500.0})
    torch.testing.assert_close(torch.from_numpy(served), embedding, rtol=1e-4, atol=1e-5)
    (dataset_input,) = client.get_run(run_id).inputs.dataset_inputs
    input_tags = {t.key: t.value for t in dataset_input.tags}
    assert dataset_input.dataset.source == str(windows_40) or str(windows_40) in dataset_input.dataset.source
    assert input_tags["sources"] == "ptbxl" and input_tags["rows_train"] == str(train_rows)
    assert dataset_input.dataset.name == f"ptbxl@{input_tags['version']}"  # readable in the UI's Datasets column
    experiment = client.get_experiment(client.get_run(run_id).info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI opens on its runs


@pytest.mark.timeout(420)
def test_a_deleted_run_folder_restarts_in_a_new_mlflow_run_not_the_old_history(windows_40, ray_local, tmp_path,
                                                                                capsys):
    """Deleting the run folder (Ray's advice for a fresh start) and re-running the name trains from step 0 again:
    that must open a new MLflow run tagged with the one it replaces, never log steps 1.. twice into the old one."""
    import shutil

    from crema import tracking
    from crema.stages.pretrain import RAY_TRAIN_STATE_FILE, run

    torch.set_num_threads(1)
    cfg = pretrain_config(windows_40, tmp_path, name="fresh-start", epochs=1,
                          data=dict(dataset=str(windows_40), batch_size=32, shuffle_buffer=32, prefetch_batches=1),
                          scaling=dict(num_workers=1, use_gpu=False, cpus_per_worker=0.5),
                          checkpoint=dict(every_steps=1000, num_to_keep=1))
    first = run(cfg)
    run_dir = tmp_path / "runs" / cfg.name
    assert (run_dir / RAY_TRAIN_STATE_FILE).exists()
    assert tracking.TAG_REPLACES_RUN not in capsys.readouterr().out
    shutil.rmtree(run_dir)

    second = run(cfg)
    out = capsys.readouterr().out
    assert second.mlflow_run_id and second.mlflow_run_id != first.mlflow_run_id
    assert f"{tracking.TAG_REPLACES_RUN}={first.mlflow_run_id}" in out and "holds no checkpoint state" in out

    train_rows = read_windows(str(windows_40), columns=["record_id"], filter=pc.field("split") == "train").num_rows
    total = train_rows // 32
    client = MlflowClient(cfg.tracking.tracking_uri)
    old_steps = [m.step for m in client.get_metric_history(first.mlflow_run_id, "loss")]
    assert sorted(old_steps) == list(range(1, total + 1))  # each step once: nothing appended by the re-run
    assert len(client.get_metric_history(first.mlflow_run_id, "val_loss")) == 1
    new_steps = [m.step for m in client.get_metric_history(second.mlflow_run_id, "loss")]
    assert sorted(new_steps) == list(range(1, total + 1))
    old, new = client.get_run(first.mlflow_run_id), client.get_run(second.mlflow_run_id)
    assert old.info.run_name == new.info.run_name == cfg.name
    assert old.info.status == new.info.status == "FINISHED"
    assert new.data.tags[tracking.TAG_REPLACES_RUN] == first.mlflow_run_id
    assert tracking.TAG_REPLACES_RUN not in old.data.tags
    assert "resumed_from_step" not in new.data.metrics


def test_window_length_mismatch_is_a_config_error_before_any_training(windows_40, tmp_path):
    from crema.stages.pretrain import run

    cfg = pretrain_config(windows_40, tmp_path, model={**SMALL_MODEL, "window_samples": 2000})
    with pytest.raises(ConfigError, match="1000 samples"):
        run(cfg)
    assert not (tmp_path / "runs").exists()


@pytest.mark.timeout(300)
def test_dataset_checkpoints_and_encoder_on_s3(windows_40, s3_server, ray_local, tmp_path):
    from crema.stages.pretrain import run

    options = {"key": "testing", "secret": "testing",
               "client_kwargs": {"endpoint_url": s3_server, "region_name": "us-east-1"}}
    boto3.client("s3", endpoint_url=s3_server, aws_access_key_id="testing", aws_secret_access_key="testing",
                 region_name="us-east-1").create_bucket(Bucket="pretrain")
    s3 = s3fs.S3FileSystem(**options)
    # The same windows committed to an S3 warehouse (catalog: SQL on a local SQLite file, as a stand-in
    # for a REST or Glue catalog; readers find it through s3://pretrain/dataset/catalog.json).
    local = read_windows(str(windows_40))
    write_windows("s3://pretrain/dataset", local, int(local.schema.metadata[b"crema.window_samples"]),
                  catalog=CatalogConfig(type="sql", uri=f"sqlite:///{tmp_path}/catalog.db"), storage_options=options)

    cfg = pretrain_config(windows_40, tmp_path, name="on-s3", epochs=1, storage_path="s3://pretrain/runs",
                          storage_options=options,
                          data=dict(dataset="s3://pretrain/dataset", storage_options=options, batch_size=32),
                          scaling=dict(num_workers=1, cpus_per_worker=1))
    result = run(cfg)

    assert result.checkpoint_path.startswith("s3://pretrain/runs/on-s3/checkpoint_step")
    assert s3.exists(result.checkpoint_path + "/" + STATE_FILE)
    assert result.encoder_path == "s3://pretrain/runs/on-s3/encoder.safetensors"
    with s3.open(result.encoder_path, "rb") as f:
        encoder = load_encoder(f)
    val = read_windows(str(windows_40), columns=MODEL_COLUMNS, filter=pc.field("split") == "val")
    batch = next(iter_table_batches(val, 2, encoder.cfg.input))
    with torch.no_grad():
        assert encoder.embed(batch["x"], batch["lead_mask"]).shape == (2, 2 * SMALL_MODEL["embed_dim"])
    run_info = MlflowClient(cfg.tracking.tracking_uri).get_run(result.mlflow_run_id)
    assert run_info.data.tags["dataset"] == "s3://pretrain/dataset"
    assert run_info.data.tags["dataset_sources"] == "ptbxl" and "val_loss" in run_info.data.metrics
    # The S3 credentials in the config stay out of MLflow.
    params = run_info.data.params
    assert params["storage_options"] == params["data.storage_options"] == "<redacted>"
    config_yaml = mlflow.artifacts.load_text(f"{run_info.info.artifact_uri}/config.yaml")
    assert "<redacted>" in config_yaml and "secret" not in config_yaml and "endpoint_url" not in config_yaml


@pytest.mark.timeout(420)
def test_relative_storage_path_from_another_directory_then_probe_the_printed_encoder(
        windows_40, windows_120, ray_local, tmp_path, monkeypatch, capsys):
    """storage_path is resolved once, in the driver: the encoder lands where the job says, not in a Ray
    worker's own directory, and the next step (a probe, from yet another directory) finds it."""
    import re

    from crema.stages import probe
    from crema.stages.pretrain import run

    torch.set_num_threads(1)
    launch = tmp_path / "launch"
    launch.mkdir()
    monkeypatch.chdir(launch)
    cfg = pretrain_config(windows_40, tmp_path, name="relative", epochs=1, storage_path="rel/runs",
                          scaling=dict(num_workers=1, cpus_per_worker=1))
    result = run(cfg)
    printed = capsys.readouterr().out
    locations = dict(re.findall(r"^(\w+)\s+→ (\S+)", printed, flags=re.M))
    assert locations["encoder"] == result.encoder_path == str(launch / "rel/runs/relative/encoder.safetensors")
    assert locations["checkpoints"] == str(launch / "rel/runs/relative") + "/checkpoint_step*"
    assert Path(result.encoder_path).is_file() and Path(result.checkpoint_path).is_relative_to(launch / "rel/runs")

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    repo = Path(__file__).resolve().parents[2]
    results = probe.run(repo / "configs/tasks/ptbxl_rhythm.yaml", {
        # A larger dataset than pretraining's, so that its test split has both classes.
        "dataset": str(windows_120), "output": str(tmp_path / "downstream"), "n_boot": 20,
        "classes": ["SR", "NORM"], "tracking.tracking_uri": cfg.tracking.tracking_uri,
        "encoders": [{"name": "crema", "path": locations["encoder"]}],
        "probe.epochs": 2, "probe.grace_period": 1, "probe.num_samples": 1, "probe.lr": [1e-2],
        "probe.weight_decay": [0.0], "probe.batch_size": 64, "embed.num_actors": 1})
    assert results and {r.encoder for r in results} == {"crema"}
    for sweep in results:
        provenance = MlflowClient(cfg.tracking.tracking_uri).get_run(sweep.parent_run_id).data.tags
        assert provenance["encoder_run_id"] == result.mlflow_run_id  # lineage through the printed path
