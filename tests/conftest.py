"""Fixtures shared by the suite: where the real data is, and the real services tests start on loopback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def shared_data_root() -> Path:
    return Path(os.environ.get("CREMA_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    root = shared_data_root()
    if not (root / "ptbxl" / "ptbxl_database.csv").exists():
        pytest.skip(f"real ECG data not found at {root} (set CREMA_SHARED_DATA)")
    return root


@pytest.fixture(scope="session")
def ptbxl_root(shared_data) -> Path:
    return shared_data / "ptbxl"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for the in-process tests (2 CPUs, like CI)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 API server (moto's server mode) on loopback, used through s3fs/pyarrow like real S3."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("moto server did not start")
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": endpoint}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield endpoint
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """A real local Ray cluster (`ray start --head`, dashboard on) to `ray job submit` entrypoints to.

    Stopped by killing only its own processes: `ray stop` would also end the in-process test cluster.
    """
    import psutil

    gcs_port, dashboard_port = free_port(), free_port()
    temp_dir = tmp_path_factory.mktemp("ray")
    subprocess.run(
        [str(Path(sys.executable).parent / "ray"), "start", "--head", f"--port={gcs_port}", "--num-cpus=2",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
         f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        check=True, capture_output=True, timeout=180,
    )
    address = f"http://127.0.0.1:{dashboard_port}"
    yield address
    marker = f"{gcs_port}"
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if str(temp_dir) in cmdline or f"gcs_server_port={marker}" in cmdline or f":{marker}" in cmdline:
            try:
                proc.kill()
            except psutil.Error:
                pass


def submit_job(address: str, entrypoint: list[str], env_vars: dict[str, str], timeout: int = 600):
    """`ray job submit` exactly as a platform team runs it; returns the completed CLI process."""
    import json

    return subprocess.run(
        [str(Path(sys.executable).parent / "ray"), "job", "submit", f"--address={address}",
         f"--runtime-env-json={json.dumps({'env_vars': env_vars})}", "--", *entrypoint],
        capture_output=True, text=True, timeout=timeout, cwd=REPO,
    )
