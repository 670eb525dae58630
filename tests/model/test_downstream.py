"""Downstream evaluation on real PTB-XL windows: embeddings with Ray Data, probe and fine-tune sweeps on
Ray Tune with nested MLflow runs, test metrics checked against scikit-learn, label fractions by
patient, cross-hospital roles, the comparison table, and the probe entrypoint via `ray job submit`.

The dataset holds two "hospitals": PTB-XL's 500 Hz records (source ptbxl) and 150 of its 100 Hz
records from other patients (source hospital_b, resampled to 500 Hz by the ingest stage).
"""

from __future__ import annotations

import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pytest
import torch
from mlflow.tracking import MlflowClient
from sklearn.metrics import average_precision_score, f1_score, roc_auc_score

from crema.config import ConfigError, IngestConfig, ModelConfig
from crema.data.batches import MODEL_COLUMNS, iter_table_batches
from crema.data.catalog import read_windows
from crema.data.schema import decode_signals
from crema.evaluation.embeddings import embed_windows, embedding_matrix
from crema.evaluation.features import FEATURES_PER_LEAD, hand_made_features
from crema.train.engine_pretrain import train_one_epoch
from crema.train.optim import warmup_cosine
from crema.stages.ingest import ingest
from crema.model.network import Classifier
from crema.train.engine_finetune import build_optimizer
from crema.model.network import CREMA, SiTEncoder
from crema.train.artifacts import encoder_to_bytes, load_encoder, save_encoder
from crema.evaluation.encoders import build_task_encoder
from crema.evaluation.tasks import (META_COLUMNS, SIGNAL_COLUMNS, label_fraction_subset, load_task, record_keys,
                                    split_roles)
from crema.evaluation.probe import DEFAULT_CS
from crema.stages import compare, finetune, probe
from tests.conftest import REPO, submit_job
from tests.data.test_ingest import KEY, ptbxl_source

TASK_FILE = REPO / "configs/tasks/ptbxl_superdiagnostic.yaml"
CLASSES = ["NORM", "MI", "STTC", "CD", "HYP"]
# 10 s windows at 500 Hz (the ingest defaults) in 20 patches of 250 samples: cheap on two cores.
TINY = dict(size="tiny", window_samples=5000, patch_size=250, embed_dim=32, depth=2, num_heads=2,
            decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2, contrastive_weight=0.1)
QUICK_PROBE = {"probe.epochs": 4, "probe.grace_period": 1, "probe.num_samples": 1, "probe.lr": [1e-3, 1e-2],
               "probe.weight_decay": [0.0], "probe.batch_size": 64}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("downstream")


@pytest.fixture(scope="module")
def dataset(ptbxl_root, ray_local, workdir) -> Path:
    records = workdir / "RECORDS_b"
    records.write_text("\n".join(f"01000/{i:05d}_lr" for i in range(1000, 1150)))
    out = workdir / "dataset"
    ingest([ptbxl_source(ptbxl_root), ptbxl_source(ptbxl_root, "records100", "hospital_b", records=records.as_uri())],
           str(out), IngestConfig(), pseudonym=KEY)
    return out


@pytest.fixture(scope="module")
def tracking_uri(workdir) -> str:
    return f"sqlite:///{workdir}/mlflow.db"


@pytest.fixture(scope="module")
def pretrained(dataset, workdir, tracking_uri) -> tuple[Path, str]:
    """A tiny CR-MAE encoder after a few real pretraining steps, and the MLflow run that 'produced' it."""
    torch.set_num_threads(2)
    torch.manual_seed(0)
    train = read_windows(str(dataset), columns=MODEL_COLUMNS, filter=pc.field("split") == "train")
    model = CREMA(ModelConfig(**TINY))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(2, 8))
    train_one_epoch(model, iter_table_batches(train, 16, model.cfg.input, seed=0), optimizer, scheduler, num_steps=8, start_step=0,
                    device=torch.device("cpu"), clip_grad=1.0)
    path = workdir / "encoder.pt"
    save_encoder(model, path)
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment("pretrain-for-downstream-test")
    with mlflow.start_run(run_name="tiny-pretrain") as run:
        mlflow.set_tag("encoder_path", str(path))
    return path, run.info.run_id


def task_overrides(dataset: Path, workdir: Path, tracking_uri: str, encoder: Path, **more) -> dict:
    return {"dataset": str(dataset), "output": str(workdir / "downstream"), "n_boot": 200,
            "tracking.tracking_uri": tracking_uri,
            "encoders": [{"name": "crema", "path": str(encoder)},
                         {"name": "random_init", "init": "random", "like": "crema", "seed": 0}],
            **more}


@pytest.fixture(scope="module")
def probe_results(dataset, workdir, tracking_uri, pretrained):
    return probe.run(TASK_FILE, task_overrides(dataset, workdir, tracking_uri, pretrained[0], **QUICK_PROBE))


@pytest.fixture(scope="module")
def finetune_result(dataset, workdir, tracking_uri, pretrained):
    (result,) = finetune.run(TASK_FILE, task_overrides(
        dataset, workdir, tracking_uri, pretrained[0], label_fractions=[0.3],
        **{"finetune.epochs": 2, "finetune.grace_period": 1, "finetune.num_samples": 1, "finetune.lr": [1e-4],
           "finetune.layer_decay": [0.75], "finetune.drop_path": [0.1], "finetune.warmup_epochs": 1,
           "finetune.batch_size": 32, "finetune.register_model": "crema-test-superdiagnostic"}),
        encoders=["crema"])
    return result


def labelled_windows(dataset: Path, sources: list[str], splits: list[str]):
    table = read_windows(str(dataset), columns=META_COLUMNS,
                         filter=pc.field("source").isin(sources) & pc.field("split").isin(splits))
    has_class = [bool(set(labels) & set(CLASSES)) for labels in table["labels"].to_pylist()]
    return table.filter(has_class)


def embeddings_of(workdir: Path, encoder: str):
    folders = sorted((workdir / "downstream/ptbxl_superdiagnostic/embeddings").glob(f"{encoder}-*"))
    return folders, (pads.dataset(folders[0], format="parquet").to_table() if folders else None)


# ----------------------------------------------------------------------------------------- probe

def test_probe_sweep_leaves_parent_run_with_nested_trials_and_artifacts(probe_results, tracking_uri, pretrained):
    client = MlflowClient(tracking_uri)
    assert [(r.method, r.encoder) for r in probe_results] == [
        ("probe_lbfgs", "crema"), ("probe", "crema"), ("probe_lbfgs", "random_init"), ("probe", "random_init")]
    for result in [r for r in probe_results if r.method == "probe"]:
        parent = client.get_run(result.parent_run_id)
        tags = parent.data.tags
        assert parent.info.status == "FINISHED"
        assert (tags["crema.kind"], tags["task"], tags["method"], tags["encoder"]) == \
            ("sweep", "ptbxl_superdiagnostic", "probe", result.encoder)
        (dataset_input,) = parent.inputs.dataset_inputs  # lineage: the exact dataset version and rows evaluated
        input_tags = {t.key: t.value for t in dataset_input.tags}
        assert input_tags["mlflow.data.context"] == "evaluation"
        assert input_tags["version"] == tags["dataset_version"] and input_tags["sources"] == tags["dataset_sources"]
        assert dataset_input.dataset.name == f"{tags['dataset_sources']}@{tags['dataset_version']}"
        assert client.get_experiment(parent.info.experiment_id).tags["mlflow.experimentKind"] == \
            "custom_model_development"
        assert int(input_tags["rows_train"]) > 0 and int(input_tags["rows_test"]) > 0
        children = client.search_runs([parent.info.experiment_id],
                                      filter_string=f"tags.`mlflow.parentRunId` = '{result.parent_run_id}'")
        assert len(children) == result.n_trials == 2  # the lr grid
        assert sorted(c.data.params["lr"] for c in children) == ["0.001", "0.01"]
        best = [c for c in children if c.data.tags.get("best_trial") == "true"]
        assert [c.info.run_id for c in best] == [result.best_trial_run_id] == [tags["best_trial_run_id"]]
        for child in children:
            history = client.get_metric_history(child.info.run_id, "val_macro_auroc")
            assert [m.step for m in history] == list(range(1, len(history) + 1)) and history
            stopped = child.data.tags["stopped_early"] == "true"
            assert child.info.status == ("KILLED" if stopped else "FINISHED")
            assert len(history) < 4 if stopped else len(history) == 4
        # The best trial is the one whose best epoch scored highest on validation.
        best_val = {c.info.run_id: max(m.value for m in client.get_metric_history(c.info.run_id, "val_macro_auroc"))
                    for c in children}
        assert max(best_val, key=best_val.get) == result.best_trial_run_id
        assert result.val_macro_auroc == pytest.approx(best_val[result.best_trial_run_id], abs=1e-9)

        artifacts = {a.path for a in client.list_artifacts(result.parent_run_id)}
        assert {"roc_curves.png", "cross_domain.png", "task.yaml", "best_config.json", "metrics",
                "predictions"} <= artifacts
        # The test records come from two sources (both trained on): the by-source table is logged too.
        assert {a.path for a in client.list_artifacts(result.parent_run_id, "metrics")} == \
            {"metrics/test_metrics.csv", "metrics/test_metrics.json", "metrics/cross_domain.csv"}
        by_source = pd.read_csv(client.download_artifacts(result.parent_run_id, "metrics/cross_domain.csv"))
        macro = by_source[by_source["class"] == "macro"].set_index("source")
        assert set(macro.index) == {"in-domain", "hospital_b", "ptbxl"} and set(macro["domain"]) == {"in-domain"}
        assert macro.loc["in-domain", "n_records"] == macro.loc[["hospital_b", "ptbxl"], "n_records"].sum()
        assert parent.data.metrics["test_on_ptbxl_macro_auroc"] == pytest.approx(macro.loc["ptbxl", "auroc"])
        png = Path(client.download_artifacts(result.parent_run_id, "roc_curves.png"))
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        table = pd.read_csv(client.download_artifacts(result.parent_run_id, "metrics/test_metrics.csv"))
        auroc = table.set_index("metric").loc["macro_auroc"]
        assert auroc.value == pytest.approx(parent.data.metrics["test_macro_auroc"])
        assert auroc.ci_low <= auroc.value <= auroc.ci_high
    crema_tags = client.get_run(probe_results[1].parent_run_id).data.tags
    assert crema_tags["encoder_artifact"] == str(pretrained[0])
    assert crema_tags["encoder_run_id"] == pretrained[1]


def test_converged_probe_is_logged_and_scored_like_a_sweep(probe_results, tracking_uri):
    """The L-BFGS probe (the SSL literature's protocol): C chosen on validation from the grid, test scored once."""
    client = MlflowClient(tracking_uri)
    for result in [r for r in probe_results if r.method == "probe_lbfgs"]:
        run = client.get_run(result.parent_run_id)
        assert (run.data.tags["crema.kind"], run.data.tags["method"]) == ("sweep", "probe_lbfgs")
        assert result.best_config["C"] in DEFAULT_CS and result.n_trials == len(DEFAULT_CS)
        assert result.val_macro_auroc == pytest.approx(run.data.metrics["best_val_macro_auroc"])
        assert 0.5 < result.test_metrics["macro_auroc"] <= 1


def test_logged_test_metrics_agree_with_scikit_learn(probe_results, tracking_uri, dataset):
    client = MlflowClient(tracking_uri)
    for result in probe_results:
        metrics = client.get_run(result.parent_run_id).data.metrics
        predictions = pd.read_parquet(client.download_artifacts(result.parent_run_id,
                                                                "predictions/test_records.parquet"))
        expected = labelled_windows(dataset, ["ptbxl", "hospital_b"], ["test"])
        assert sorted(predictions["record"]) == sorted(record_keys(expected))
        assert metrics["test_n_records"] == len(predictions)
        y = predictions[[f"label_{c}" for c in CLASSES]].to_numpy()
        s = predictions[[f"score_{c}" for c in CLASSES]].to_numpy()
        defined = [c for c in range(len(CLASSES)) if 0 < y[:, c].sum() < len(y)]
        thresholds = np.array([metrics[f"test_threshold_{c}"] for c in CLASSES])
        assert metrics["test_macro_auroc"] == pytest.approx(np.mean([roc_auc_score(y[:, c], s[:, c]) for c in defined]))
        assert metrics["test_macro_auprc"] == pytest.approx(
            np.mean([average_precision_score(y[:, c], s[:, c]) for c in defined]))
        assert metrics["test_macro_f1"] == pytest.approx(
            np.mean([f1_score(y[:, c], s[:, c] >= thresholds[c], zero_division=0) for c in defined]))
        assert 0 <= metrics["test_macro_auroc_ci_low"] <= metrics["test_macro_auroc"] <= metrics["test_macro_auroc_ci_high"]


def test_ray_data_embeddings_match_the_plain_loop_and_differ_from_random_init(probe_results, workdir, dataset,
                                                                             pretrained):
    (folder,), crema = embeddings_of(workdir, "crema")
    (_,), random_init = embeddings_of(workdir, "random_init")
    windows = read_windows(str(dataset), columns=[*SIGNAL_COLUMNS, *META_COLUMNS])
    assert crema.num_rows == random_init.num_rows == windows.num_rows  # every window of both sources, once
    assert crema.schema.field("embedding").type.list_size == 2 * TINY["embed_dim"]  # the SEP and patch means

    def by_window(table):
        keys = [f"{k}#{w}" for k, w in zip(record_keys(table), table["window_index"].to_pylist())]
        return dict(zip(keys, embedding_matrix(table)))

    crema_rows, random_rows = by_window(crema), by_window(random_init)
    sample = windows.slice(0, 48)
    plain = embed_windows(load_encoder(pretrained[0]), sample, batch_size=16)
    keys = [f"{k}#{w}" for k, w in zip(record_keys(sample), sample["window_index"].to_pylist())]
    np.testing.assert_allclose(np.stack([crema_rows[k] for k in keys]), plain, rtol=1e-4, atol=1e-5)
    difference = np.linalg.norm(np.stack([crema_rows[k] - random_rows[k] for k in keys]), axis=1)
    assert (difference > 1e-2 * np.linalg.norm(plain, axis=1)).all()


def test_the_feature_floor_is_probed_like_an_encoder_on_its_hand_made_features(dataset, workdir, tracking_uri):
    """`init: features`: the Ray pass writes the nine features per lead of every window (as the formula computes
    them from the stored mV), and the probe scores them like any encoder's embeddings, beside the others."""
    results = probe.run(TASK_FILE, {"dataset": str(dataset), "output": str(workdir / "downstream"), "n_boot": 200,
                                    "tracking.tracking_uri": tracking_uri,
                                    "encoders": [{"name": "features", "init": "features"}], **QUICK_PROBE})
    assert [(r.method, r.encoder) for r in results] == [("probe_lbfgs", "features"), ("probe", "features")]
    (_,), features = embeddings_of(workdir, "features")
    windows = read_windows(str(dataset), columns=[*SIGNAL_COLUMNS, *META_COLUMNS])
    assert features.num_rows == windows.num_rows
    assert features.schema.field("embedding").type.list_size == 12 * FEATURES_PER_LEAD
    keys = [f"{k}#{w}" for k, w in zip(record_keys(features), features["window_index"].to_pylist())]
    rows = dict(zip(keys, embedding_matrix(features)))
    sample = windows.slice(0, 32)
    sample_keys = [f"{k}#{w}" for k, w in zip(record_keys(sample), sample["window_index"].to_pylist())]
    np.testing.assert_allclose(np.stack([rows[k] for k in sample_keys]),
                               hand_made_features(decode_signals(sample), 500.0), rtol=1e-5, atol=1e-6)
    client = MlflowClient(tracking_uri)
    for result in results:
        assert client.get_run(result.parent_run_id).data.tags["encoder_init"] == "features"
        assert 0.6 < result.test_metrics["macro_auroc"] <= 1.0  # the features carry the diagnosis: far from chance


def test_label_fraction_keeps_whole_patients(dataset):
    task = load_task(TASK_FILE, {"dataset": str(dataset), "output": "unused",
                                 "encoders": [{"name": "r", "init": "random", "model": TINY}]})
    train = split_roles(read_windows(str(dataset), columns=META_COLUMNS), task)["train"]
    patients = train["patient_key"].to_numpy(zero_copy_only=False)
    small, large = label_fraction_subset(train, 0.1, seed=0), label_fraction_subset(train, 0.5, seed=0)
    for subset, fraction in ((small, 0.1), (large, 0.5)):
        kept = set(subset["patient_key"].to_pylist())
        assert len(kept) == round(fraction * len(set(patients)))
        # Every record of a kept patient is in, and nothing of any other patient.
        assert sorted(record_keys(subset)) == sorted(record_keys(train)[np.isin(patients, list(kept))])
    assert set(record_keys(small)) < set(record_keys(large))


def test_each_label_fraction_below_one_is_swept_once_per_patient_draw(dataset):
    task = load_task(TASK_FILE, {"dataset": str(dataset), "output": "unused", "label_fractions": [0.1, 1.0],
                                 "fraction_seeds": [0, 1, 2], "encoders": [{"name": "r", "init": "random", "model": TINY}]})
    assert task.label_subsets() == [(0.1, 0), (0.1, 1), (0.1, 2), (1.0, None)]  # all patients: nothing to draw
    train = split_roles(read_windows(str(dataset), columns=META_COLUMNS), task)["train"]
    draws = [frozenset(label_fraction_subset(train, 0.1, seed)["patient_key"].to_pylist()) for seed in (0, 1, 2)]
    assert len(set(draws)) == 3 and len({len(d) for d in draws}) == 1  # three different draws of one size
    with pytest.raises(ValueError, match="seed of its patient draw"):
        label_fraction_subset(train, 0.1, None)
    with pytest.raises(ConfigError, match="fraction seeds"):
        load_task(TASK_FILE, {"dataset": str(dataset), "output": "unused", "fraction_seeds": [1, 1],
                              "encoders": [{"name": "r", "init": "random", "model": TINY}]})


def test_cross_hospital_trains_on_one_source_and_tests_on_another(probe_results, dataset, workdir, tracking_uri,
                                                                  pretrained):
    with pytest.raises(ConfigError, match="overlap"):
        load_task(TASK_FILE, task_overrides(dataset, workdir, tracking_uri, pretrained[0], test_splits=["val"]))
    (result,) = probe.run(TASK_FILE, task_overrides(
        dataset, workdir, tracking_uri, pretrained[0], train_sources=["ptbxl"], test_sources=["hospital_b"],
        test_splits=["train", "val", "test"], converged_probe=False,
        **{**QUICK_PROBE, "probe.epochs": 2, "probe.lr": [1e-2]}), encoders=["crema"])
    run = MlflowClient(tracking_uri).get_run(result.parent_run_id)
    assert (run.data.tags["train_sources"], run.data.tags["test_sources"]) == ("ptbxl", "hospital_b")
    assert int(run.data.params["n_train_windows"]) == labelled_windows(dataset, ["ptbxl"], ["train"]).num_rows
    assert int(run.data.params["n_val_windows"]) == labelled_windows(dataset, ["ptbxl"], ["val"]).num_rows
    external = labelled_windows(dataset, ["hospital_b"], ["train", "val", "test"])
    assert run.data.metrics["test_n_records"] == len(set(record_keys(external)))
    # The same encoder on the same dataset version and sources: the first run's embeddings are reused.
    folders, _ = embeddings_of(workdir, "crema")
    assert len(folders) == 1, folders


# -------------------------------------------------------------------------------------- finetune

def test_finetune_starts_from_the_pretrained_weights(finetune_result, pretrained, tracking_uri, dataset, workdir):
    encoder_path, pretrain_run_id = pretrained
    weights = load_encoder(encoder_path).state_dict()
    task = load_task(TASK_FILE, task_overrides(dataset, workdir, tracking_uri, encoder_path))
    random_weights = build_task_encoder(task.encoders[1], task).state_dict()

    # What a trial builds before its first step: the artifact's weights (not a fresh init) under drop path.
    built = finetune.build_classifier(encoder_to_bytes(build_task_encoder(task.encoders[0], task)), 0.1, len(CLASSES))
    assert built.encoder.cfg.drop_path == 0.1 and built.encoder.blocks[-1].drop_path.rate == pytest.approx(0.1)
    for name, tensor in built.encoder.state_dict().items():
        assert torch.equal(tensor, weights[name]), name

    # The logged model (a pyfunc over safetensors, no pickle): a few small steps away from the pretrained
    # weights, far from the random init; its outputs are named by the task's classes.
    mlflow.set_tracking_uri(tracking_uri)
    served = mlflow.pyfunc.load_model(finetune_result.model_uri)
    assert [c.name for c in served.metadata.signature.outputs.inputs] == CLASSES
    tuned = served.unwrap_python_model().model.encoder.state_dict()
    flat = {k: torch.cat([d[n].flatten() for n in weights]) for k, d in
            (("tuned", tuned), ("pretrained", weights), ("random", random_weights))}
    moved = (flat["tuned"] - flat["pretrained"]).norm()
    assert 0 < moved < 0.1 * (flat["random"] - flat["pretrained"]).norm()

    client = MlflowClient(tracking_uri)
    tags = client.get_run(finetune_result.parent_run_id).data.tags
    assert (tags["method"], tags["encoder_artifact"], tags["encoder_run_id"]) == \
        ("finetune", str(encoder_path), pretrain_run_id)
    (version,) = client.search_model_versions("name = 'crema-test-superdiagnostic'")
    assert version.run_id == finetune_result.parent_run_id
    assert version.tags["encoder_run_id"] == pretrain_run_id
    assert finetune_result.best_config["drop_path"] == 0.1
    assert 0 <= finetune_result.test_metrics["macro_auroc"] <= 1


def test_finetune_optimizer_decays_the_rate_by_layer_and_keeps_the_head_at_full_rate():
    encoder = SiTEncoder(ModelConfig(**TINY))
    model = Classifier(encoder, len(CLASSES))
    optimizer = build_optimizer(model, lr=1e-3, weight_decay=0.05, layer_decay=0.5)
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    assert len(group_of) == len(list(model.parameters()))  # every parameter in exactly one group
    # Layers: 0 embeddings, 1..depth blocks, depth + 1 the final norm; scale = decay ** (depth + 1 - layer).
    expected = {model.head.weight: 1.0, model.head.bias: 1.0, encoder.norm.weight: 1.0,
                encoder.blocks[1].mlp[0].weight: 0.5, encoder.blocks[0].attn.qkv.weight: 0.25,
                encoder.patch_embed.proj.weight: 0.125, encoder.sep_token: 0.125}
    for param, scale in expected.items():
        assert group_of[id(param)]["lr"] == pytest.approx(1e-3 * scale)
    assert group_of[id(model.head.weight)]["weight_decay"] == 0.05
    assert group_of[id(model.head.bias)]["weight_decay"] == group_of[id(encoder.sep_token)]["weight_decay"] == 0.0


def test_compare_table_lists_encoders_and_baselines_by_task(probe_results, finetune_result, tracking_uri):
    table = compare.run(tracking_uri)
    for result in [*probe_results, finetune_result]:
        column = "ptbxl_superdiagnostic" if result.label_fraction == 1 else \
            f"ptbxl_superdiagnostic @ {result.label_fraction:g}"
        # Rows are keyed by the pretraining run of the encoder (found through its encoder_path tag).
        row = f"{result.method} · {result.encoder}" + (" · tiny-pretrain" if result.encoder == "crema" else "")
        cell = table.loc[row, column]
        m = result.test_metrics
        assert cell == f"{m['macro_auroc']:.3f} [{m['macro_auroc_ci_low']:.3f}, {m['macro_auroc_ci_high']:.3f}]"
    assert "ptbxl_superdiagnostic (ptbxl → hospital_b)" in table.columns


# -------------------------------------------------------------------------------------- cluster

@pytest.mark.slow
def test_probe_entrypoint_via_ray_job_submit(ray_cluster, probe_results, dataset, workdir, pretrained):
    db = workdir / "job-mlflow.db"
    result = submit_job(
        ray_cluster,
        [sys.executable, "-m", "crema.stages.probe", "--task", str(TASK_FILE), "--encoder", "crema",
         "probe.epochs=2", "probe.num_samples=1", "probe.lr=[0.01]", "probe.weight_decay=[0.0]", "n_boot=100",
         "converged_probe=false"],
        {"PYTHONPATH": str(REPO), "CREMA_DATASET": str(dataset), "CREMA_DOWNSTREAM": str(workdir / "downstream"),
         "CREMA_ENCODER": str(pretrained[0]), "MLFLOW_TRACKING_URI": f"sqlite:///{db}"},
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "succeeded" in output and "reusing" in output  # the embeddings of the in-process run served
    client = MlflowClient(f"sqlite:///{db}")
    experiment = client.get_experiment_by_name("crema-downstream")
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("crema.kind") == "sweep"]
    (child,) = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert parent.data.tags["encoder"] == "crema" and child.info.status == "FINISHED"
    assert 0 <= parent.data.metrics["test_macro_auroc"] <= 1
