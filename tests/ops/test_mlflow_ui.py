"""The MLflow UI, in a real browser, on what crema logs: the experiment page crema prints opens on the runs
(not on MLflow 3's GenAI overview) and the Datasets column names the data `<sources>@<version>`.

A real `mlflow server` on loopback over a SQLite store written through crema.tracking; headless Chromium
(`apt-get install chromium` on Debian) renders the page and the test reads the DOM it dumps. Skipped, and said
so, where no Chromium is installed."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from crema import tracking
from tests.conftest import free_port
from tests.ops.test_mlflow_server import _wait_for_port

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def rendered_dom(url: str) -> str:
    """The page's DOM after its scripts ran (20 s of virtual time: the runs table is fetched by the page)."""
    result = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=20000",
                             "--dump-dom", url], capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium here: apt-get install chromium (Debian) for the browser check")
def test_the_printed_experiment_page_opens_on_its_runs_with_a_readable_dataset_name(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment_id = tracking.ensure_experiment("crema-pretrain", uri)
    assert MlflowClient(uri).get_experiment(experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(experiment_id=experiment_id, run_name="crema-cpu-ui-check") as run:
        mlflow.log_metric("val_loss", 0.5)
        tracking.log_dataset_input({"dataset": str(tmp_path / "dataset"), "dataset_version": "5120937165117307421",
                                    "dataset_sources": "ludb,ptbxl"}, {"train": 10, "val": 2, "test": 2})

    # What crema prints after a run (`mlflow ui` serves on port 5000) is that page.
    assert tracking.experiment_page(experiment_id) in tracking.browse_hint(uri, run.info.run_id)
    port = free_port()
    log = tmp_path / "server.log"
    with open(log, "w") as out:
        server = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", uri,
                                   "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                                  stdout=out, stderr=subprocess.STDOUT, env={**os.environ})
    try:
        _wait_for_port(port, server, log)
        dom = rendered_dom(tracking.experiment_page(experiment_id, f"http://127.0.0.1:{port}"))
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert "crema-cpu-ui-check" in dom  # the runs table, with our run in it
    assert "ludb,ptbxl@5120937165117307421" in dom  # the Datasets column: sources and version, not a digest
    assert "Detect Issues" not in dom  # not the GenAI overview's trace tools
