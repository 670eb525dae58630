"""infra/mlflow-server.sh, local variant: SQLite tracking store, artifacts proxied to an S3 API server on loopback
(moto's server mode), basic auth on. A client with credentials logs a run and an artifact through the server; the
artifact lands in the bucket; a client without credentials gets 401; the script refuses to bind every interface."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from tests.conftest import REPO, free_port

SCRIPT = REPO / "infra" / "mlflow-server.sh"
BUCKET = "crema-mlflow"
PASSWORD = "a-long-test-password-1234"


def _wait_for_port(port: int, proc: subprocess.Popen, log: Path, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"mlflow server exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"mlflow server did not listen on {port} within {timeout:.0f} s:\n{log.read_text()[-4000:]}")


def _server_env(tmp_path: Path, s3_endpoint: str, port: int) -> dict[str, str]:
    password_file = tmp_path / "admin-password"
    password_file.write_text(PASSWORD + "\n")
    password_file.chmod(0o600)
    return {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "MLFLOW_DB_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "MLFLOW_ARTIFACTS": f"s3://{BUCKET}/mlflow",
        "MLFLOW_ADMIN_PASSWORD_FILE": str(password_file),
        "MLFLOW_STATE_DIR": str(tmp_path / "state"),
        "MLFLOW_HOST": "127.0.0.1",
        "MLFLOW_PORT": str(port),
        "MLFLOW_WORKERS": "1",
        # the server (not the client) talks to S3
        "MLFLOW_S3_ENDPOINT_URL": s3_endpoint,
        "AWS_ENDPOINT_URL": s3_endpoint,
    }


def test_refuses_all_interfaces(tmp_path):
    env = _server_env(tmp_path, "http://127.0.0.1:1", free_port())
    env["MLFLOW_HOST"] = "0.0.0.0"
    result = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "refusing to bind 0.0.0.0" in result.stderr


def test_requires_admin_password_file(tmp_path):
    env = _server_env(tmp_path, "http://127.0.0.1:1", free_port())
    env.pop("MLFLOW_ADMIN_PASSWORD_FILE")
    result = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "MLFLOW_ADMIN_PASSWORD_FILE" in result.stderr


@pytest.mark.slow
def test_server_with_auth_and_s3_artifacts(tmp_path, s3_server, monkeypatch):
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_server)
    s3.create_bucket(Bucket=BUCKET)

    port = free_port()
    env = _server_env(tmp_path, s3_server, port)
    log = tmp_path / "server.log"
    with log.open("w") as out:
        proc = subprocess.Popen(["bash", str(SCRIPT)], env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        _wait_for_port(port, proc, log)
        base = f"http://127.0.0.1:{port}"
        search = f"{base}/api/2.0/mlflow/experiments/search"

        # No credentials, wrong credentials: 401.
        assert requests.post(search, json={"max_results": 1}, timeout=30).status_code == 401
        assert requests.post(search, json={"max_results": 1}, auth=("admin", "wrong"), timeout=30).status_code == 401
        # A Host header the server was not told about: refused before auth (DNS rebinding guard).
        assert requests.post(search, json={"max_results": 1}, auth=("admin", PASSWORD), timeout=30,
                             headers={"Host": "evil.example.com"}).status_code == 403
        assert requests.post(search, json={"max_results": 1}, auth=("admin", PASSWORD), timeout=30).status_code == 200

        # A client with credentials logs a run and an artifact through the server; it holds no S3 credentials.
        import mlflow

        for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL"):
            monkeypatch.delenv(var, raising=False)
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        client = mlflow.MlflowClient(tracking_uri=base)
        experiment_id = client.create_experiment("ops-test")
        run = client.create_run(experiment_id, run_name="ops-test-run")
        client.log_param(run.info.run_id, "alpha", "0.5")
        client.log_metric(run.info.run_id, "loss", 0.25)
        artifact = tmp_path / "report.txt"
        artifact.write_text("encoder card\n")
        client.log_artifact(run.info.run_id, str(artifact), artifact_path="cards")
        client.set_terminated(run.info.run_id)
        assert client.get_run(run.info.run_id).data.params == {"alpha": "0.5"}
        assert [f.path for f in client.list_artifacts(run.info.run_id, "cards")] == ["cards/report.txt"]

        # The artifact is in the bucket, under the configured prefix.
        keys = [obj["Key"] for obj in s3.list_objects_v2(Bucket=BUCKET, Prefix="mlflow/").get("Contents", [])]
        matches = [k for k in keys if k.endswith(f"{run.info.run_id}/artifacts/cards/report.txt")]
        assert matches, keys
        body = s3.get_object(Bucket=BUCKET, Key=matches[0])["Body"].read()
        assert body == b"encoder card\n"

        # The same artifact through the proxy without credentials: 401.
        url = f"{base}/api/2.0/mlflow-artifacts/artifacts/{experiment_id}/{run.info.run_id}/artifacts/cards/report.txt"
        assert requests.get(url, timeout=30).status_code == 401

        # The generated auth config (it holds the admin password) is private to the server's user.
        ini = tmp_path / "state" / "basic_auth.ini"
        assert ini.stat().st_mode & 0o077 == 0
        assert (tmp_path / "state").stat().st_mode & 0o077 == 0
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    """End the server's own process group (the script execs mlflow, which starts uvicorn workers)."""
    try:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait(timeout=10)
