"""`crema compare`: rows keyed by the encoder's pretraining run, filters, CSV/JSON/Markdown output."""

from __future__ import annotations

import io
import json

import mlflow
import pandas as pd
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from crema.stages.cli import app


def sweep(client, experiment_id, *, encoder, run_id, task="t1", method="probe", auroc=0.8, fraction="1", draw=""):
    tags = {"crema.kind": "sweep", "task": task, "method": method, "encoder": encoder, "encoder_init": "pretrained",
            "label_fraction": fraction, "label_draw": draw, "train_sources": "*", "test_sources": "*"}
    if run_id:
        tags["encoder_run_id"] = run_id
    run = client.create_run(experiment_id, tags=tags)
    client.log_metric(run.info.run_id, "test_macro_auroc", auroc)
    client.set_terminated(run.info.run_id)


def test_rows_by_pretraining_run_filters_and_formats(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    pre = client.create_experiment("crema-pretrain")
    runs = {name: client.create_run(pre, run_name=name).info.run_id for name in ("crema-a", "crema-b")}
    down = client.create_experiment("crema-downstream")
    # Two pretraining runs whose encoders share the name "crema": two rows, not the latest one only.
    sweep(client, down, encoder="crema", run_id=runs["crema-a"], auroc=0.81)
    sweep(client, down, encoder="crema", run_id=runs["crema-b"], auroc=0.84)
    sweep(client, down, encoder="random_init", run_id=None, auroc=0.6)
    sweep(client, down, encoder="crema", run_id=runs["crema-b"], task="t2", auroc=0.7)

    runner = CliRunner()
    result = runner.invoke(app, ["compare", "--tracking-uri", uri, "--format", "csv"])
    assert result.exit_code == 0, result.output
    table = pd.read_csv(io.StringIO(result.output), dtype=str).set_index("test_macro_auroc")
    assert table.loc["probe · crema · crema-a", "t1"] == "0.810"
    assert table.loc["probe · crema · crema-b", "t1"] == "0.840" and table.loc["probe · crema · crema-b", "t2"] == "0.700"
    assert table.loc["probe · random_init", "t1"] == "0.600"

    result = runner.invoke(app, ["compare", "--tracking-uri", uri, "--format", "json", "--pretrain-run", "crema-b"])
    rows = json.loads(result.output)
    assert [r["test_macro_auroc"] for r in rows] == ["probe · crema · crema-b"] and rows[0]["t2"] == "0.700"

    result = runner.invoke(app, ["compare", "--tracking-uri", uri, "--format", "markdown", "--task", "t2"])
    assert result.output.splitlines()[0] == "| test_macro_auroc | t2 |"
    assert "| probe · crema · crema-b | 0.700 |" in result.output

    result = runner.invoke(app, ["compare", "--tracking-uri", uri, "--format", "xml"])
    assert result.exit_code == 2 and "unknown format" in result.output
    mlflow.set_tracking_uri(None)


def test_the_draws_of_a_label_fraction_share_one_cell_mean_and_spread(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    down = client.create_experiment("crema-downstream")
    for draw, auroc in (("0", 0.70), ("1", 0.74), ("2", 0.72)):
        sweep(client, down, encoder="random_init", run_id=None, fraction="0.01", draw=draw, auroc=auroc)
    sweep(client, down, encoder="random_init", run_id=None, fraction="0.1", draw="0", auroc=0.75)
    sweep(client, down, encoder="random_init", run_id=None, auroc=0.8)

    result = CliRunner().invoke(app, ["compare", "--tracking-uri", uri, "--format", "json"])
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.output)
    assert row["t1 @ 0.01"] == "0.720 ± 0.020 (3 draws)"  # sd with n - 1: the three draws' spread
    assert row["t1 @ 0.1"] == "0.750" and row["t1"] == "0.800"  # one draw, one sweep: the cell as it is
    mlflow.set_tracking_uri(None)
