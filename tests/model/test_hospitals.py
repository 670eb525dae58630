"""Two real hospitals in one dataset: PTB-XL's 500 Hz records and LUDB's 200 (its own label language, mapped by
configs/label_maps/ludb.yaml). A model trained on PTB-XL is scored on LUDB by `crema probe`: the cross-domain
table, checked against scikit-learn on the records it logged; and `crema drift` measures how far LUDB lies
from PTB-XL in embedding space, where PTB-XL's own folds must not lie apart."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch
from mlflow.tracking import MlflowClient
from sklearn.metrics import roc_auc_score

from crema.config import IngestConfig, ModelConfig
from crema.data.catalog import read_windows
from crema.data.schema import decode_masks, decode_signals
from crema.evaluation.cross_domain import MACRO
from crema.evaluation.embeddings import embed_windows
from crema.evaluation.features import window_features
from crema.evaluation.lead_sets import hide_leads
from crema.evaluation.tasks import META_COLUMNS, SIGNAL_COLUMNS
from crema.model.network import CREMA, SiTEncoder
from crema.stages import drift, probe
from crema.stages.ingest import ingest
from crema.train.artifacts import save_encoder
from tests.conftest import REPO
from tests.data.test_ingest import KEY, ptbxl_source
from tests.data.test_label_maps import ludb_source

TASK_FILE = REPO / "configs/tasks/ptbxl_superdiagnostic.yaml"
CLASSES = ["NORM", "MI", "STTC", "CD", "HYP"]
TINY = dict(size="tiny", window_samples=5000, patch_size=250, embed_dim=32, depth=2, num_heads=2,
            decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)
ONE_TRIAL = {"probe.epochs": 3, "probe.grace_period": 1, "probe.num_samples": 1, "probe.lr": [1e-2],
             "probe.weight_decay": [0.0], "probe.batch_size": 64}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("hospitals")


@pytest.fixture(scope="module")
def dataset(ptbxl_root, shared_data, ray_local, workdir):
    ludb_root = shared_data / "ludb"
    if not (ludb_root / "ludb.csv").exists():
        pytest.skip(f"LUDB not found at {ludb_root}")
    with pytest.MonkeyPatch.context() as env:
        sources = [ptbxl_source(ptbxl_root), ludb_source(ludb_root, env)]
    out = workdir / "dataset"
    ingest(sources, str(out), IngestConfig(), pseudonym=KEY)
    return out


def labelled_records(dataset, source: str, splits: list[str]) -> int:
    table = read_windows(str(dataset), columns=META_COLUMNS,
                         filter=(pc.field("source") == source) & pc.field("split").isin(splits))
    return len({r for r, labels in zip(table["record_id"].to_pylist(), table["labels"].to_pylist())
                if set(labels) & set(CLASSES)})


@pytest.fixture(scope="module")
def cross_domain(dataset, workdir):
    tracking_uri = f"sqlite:///{workdir}/mlflow.db"
    overrides = {"dataset": str(dataset), "output": str(workdir / "downstream"), "n_boot": 200,
                 "tracking.tracking_uri": tracking_uri, "train_sources": ["ptbxl"], "test_sources": ["ptbxl", "ludb"],
                 "encoders": [{"name": "random_init", "init": "random", "model": TINY},
                              {"name": "features", "init": "features"}], "lead_sets": ["all", "I"], **ONE_TRIAL}
    return probe.run(TASK_FILE, overrides), tracking_uri


@pytest.mark.slow
def test_probe_scores_each_hospital_apart_trained_on_ptbxl_only(cross_domain, dataset):
    results, tracking_uri = cross_domain
    assert sorted((r.method, r.encoder, r.lead_set) for r in results) == sorted(
        (m, e, leads) for m in ("probe", "probe_lbfgs") for e in ("random_init", "features") for leads in ("all", "I"))
    client = MlflowClient(tracking_uri)
    for result in results:
        table = result.cross_domain
        assert list(dict.fromkeys(table["source"])) == ["ludb", "ptbxl"]
        rows = {(row["source"], row["class"]): row for row in table.to_dict("records")}
        # LUDB was never trained on: every labelled record of it is tested; PTB-XL only on fold 10
        assert rows["ludb", MACRO]["n_records"] == labelled_records(dataset, "ludb", ["train", "val", "test"])
        assert rows["ptbxl", MACRO]["n_records"] == labelled_records(dataset, "ptbxl", ["test"])
        assert rows["ludb", "NORM"]["domain"] == "external" and rows["ptbxl", "NORM"]["drop"] == 0
        # the table's cells are what scikit-learn gives on the records the run logged, source by source
        run = client.get_run(result.parent_run_id)
        folder = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, tracking_uri=tracking_uri)
        predictions = pd.read_parquet(f"{folder}/predictions/test_records.parquet")
        for source in ("ptbxl", "ludb"):
            part = predictions[predictions["record"].str.startswith(f"{source}/")]
            for name in CLASSES:
                labels = part[f"label_{name}"].to_numpy()
                if 0 < labels.sum() < len(labels):
                    expected = roc_auc_score(labels, part[f"score_{name}"])
                    assert rows[source, name]["auroc"] == pytest.approx(expected)
                    assert run.data.metrics[f"test_on_{source}_auroc_{name}"] == pytest.approx(expected)
                else:
                    assert np.isnan(rows[source, name]["auroc"]) and rows[source, name]["note"]
                    assert f"test_on_{source}_auroc_{name}" not in run.data.metrics
        assert run.data.metrics["test_on_ludb_macro_auroc_drop"] == pytest.approx(rows["ludb", MACRO]["drop"])
        assert len(pd.read_csv(Path(folder) / "metrics/cross_domain.csv")) == len(table)
        assert (Path(folder) / "cross_domain.png").stat().st_size > 0


@pytest.mark.slow
def test_drift_tells_ludb_from_ptbxl_and_not_ptbxl_fold_10_from_folds_1_to_8(dataset, workdir):
    """LUDB's gains are normalised per lead (not clinical mV) and its hospital is another: a shift. PTB-XL's
    folds are one hospital split at random by patient: none."""
    tracking_uri = f"sqlite:///{workdir}/drift.db"
    ludb, ludb_lead_one = drift.run(str(dataset), drift.FEATURES, "ptbxl", "ludb", lead_sets=["all", "I"],
                                    n_permutations=500, n_boot=300, tracking_uri=tracking_uri)
    folds, = drift.run(str(dataset), drift.FEATURES, "ptbxl:train", "ptbxl:test", n_permutations=500, n_boot=300,
                       tracking_uri=tracking_uri)
    assert ludb.report.shifted and ludb.report.domain_auroc.low > 0.8 and ludb.report.mmd_p_value < 0.01
    assert not folds.report.shifted and folds.report.domain_auroc.low < 0.5 < folds.report.domain_auroc.high
    assert folds.report.mmd_p_value > 0.05
    # one record per patient: LUDB's 200 patients, PTB-XL fold 10's
    assert ludb.report.n_source == ludb_lead_one.report.n_source == 200
    assert folds.report.n_source == len(set(read_windows(str(dataset), columns=["patient_key"], filter=(
        pc.field("source") == "ptbxl") & (pc.field("split") == "test"))["patient_key"].to_pylist()))
    client = MlflowClient(tracking_uri)
    run = client.get_run(ludb.run_id)
    assert run.data.metrics["domain_auroc"] == pytest.approx(ludb.report.domain_auroc.point)
    assert run.data.params["source"] == "ludb" and run.data.tags["crema.kind"] == "drift"
    assert {a.path for a in client.list_artifacts(ludb.run_id)} == {"drift_map.png", "drift.json"}
    # lead I alone: its own run, measured on other numbers than all twelve leads
    lead_one_run = client.get_run(ludb_lead_one.run_id)
    assert (lead_one_run.data.tags["lead_set"], run.data.tags["lead_set"]) == ("I", "all")
    assert lead_one_run.data.metrics["mmd2"] == pytest.approx(ludb_lead_one.report.mmd2)
    assert ludb_lead_one.report.mmd2 != pytest.approx(ludb.report.mmd2, rel=1e-3)
    # the table joins LUDB's data-quality report, once per (source, reference, encoder), one row per lead set
    report = (dataset / "reports/ludb.md").read_text()
    assert report.startswith("# Data quality: ludb") and report.count("## Drift of ludb from ptbxl") == 1
    for result in (ludb, ludb_lead_one):
        a = result.report.domain_auroc
        assert f"| {result.lead_set} | {result.report.n_reference} | 200 | {a.point:.3f} [{a.low:.3f}, {a.high:.3f}]" \
            in report and result.run_id in report
    assert "## Drift of ptbxl:test from ptbxl:train" in (dataset / "reports/ptbxl.md").read_text()


@pytest.mark.slow
def test_drift_command_embeds_with_an_encoder_artifact_and_refuses_an_unknown_source(dataset, workdir):
    encoder = workdir / "random-encoder.safetensors"
    torch.manual_seed(0)
    save_encoder(CREMA(ModelConfig(**TINY)), encoder)
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": f"sqlite:///{workdir}/drift-cli.db"}
    command = [sys.executable, "-m", "crema.stages.cli", "drift", "--dataset", str(dataset), "--encoder",
               str(encoder), "--reference", "ptbxl", "--permutations", "200"]
    done = subprocess.run([*command, "--source", "ludb"], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "domain classifier AUROC" in done.stdout and "verdict" in done.stdout
    refused = subprocess.run([*command, "--source", "nowhere"], env=env, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "['nowhere'] are not in" in refused.stdout
    refused = subprocess.run([*command, "--source", "ludb", "--lead-set", "I", "--lead-set", "V7"], env=env,
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "lead set 'V7'" in refused.stdout


@pytest.mark.slow
def test_a_model_shown_one_lead_cannot_see_the_others(cross_domain, dataset):
    """Lead set I: what the encoder and the feature floor make of a window does not change when every other lead
    does, and does change when lead I does. The probe runs of lead set I are tagged and score apart from all 12."""
    windows = read_windows(str(dataset), columns=[*SIGNAL_COLUMNS, *META_COLUMNS],
                           filter=pc.field("source") == "ptbxl").slice(0, 16)
    signals = decode_signals(windows).astype(np.float32)
    other_leads, lead_one = signals.copy(), signals.copy()
    other_leads[:, 1:] = np.random.default_rng(0).standard_normal(other_leads[:, 1:].shape)
    lead_one[:, 0] += 0.5
    encoder = SiTEncoder(ModelConfig(**TINY)).eval()

    def seen(signal: np.ndarray, leads: str) -> tuple[np.ndarray, np.ndarray]:
        shown = hide_leads(with_signals(windows, signal), leads)
        return embed_windows(encoder, shown), window_features(shown)

    base = seen(signals, "I")
    for a, b in zip(base, seen(other_leads, "I")):
        np.testing.assert_array_equal(a, b)
    assert all(not np.allclose(a, b) for a, b in zip(base, seen(lead_one, "I")))
    assert all(not np.allclose(a, b) for a, b in zip(seen(signals, "all"), seen(other_leads, "all")))
    shown = hide_leads(windows, "limb6")
    assert decode_masks(shown["lead_mask"])[:, 6:].sum() == 0 and not decode_signals(shown)[:, 6:].any()
    assert (decode_masks(shown["lead_mask"])[:, :6] == decode_masks(windows["lead_mask"])[:, :6]).all()

    results, tracking_uri = cross_domain
    one_lead = [r for r in results if r.lead_set == "I"]
    assert all(r.tags["lead_set"] == "I" and "-leadsI-" in MlflowClient(tracking_uri).get_run(
        r.parent_run_id).info.run_name for r in one_lead)
    score = {(r.method, r.encoder, r.lead_set): r.test_metrics["macro_auroc"] for r in results}
    assert score["probe_lbfgs", "features", "I"] != score["probe_lbfgs", "features", "all"]


def with_signals(windows: pa.Table, signals: np.ndarray) -> pa.Table:
    """The windows with these (n, 12, L) signals, in the column's own dtype."""
    field = windows.schema.field("signal")
    data = signals.astype(decode_signals(windows).dtype).tobytes()
    column = pa.FixedSizeBinaryArray.from_buffers(field.type, len(windows), [None, pa.py_buffer(data)])
    return windows.set_column(windows.schema.get_field_index("signal"), field, column)
