"""Fixtures shared by the suite: where the real data is, and the real services tests start on loopback."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


# The fast tier (`make test-fast`, `pytest -m "not slow"`) leaves out every test that starts a service: a test
# using one of these fixtures is marked slow here, so that no test has to remember to say so.
SERVICE_FIXTURES = {"ray_local", "ray_cluster", "s3_server"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if SERVICE_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


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


def readme_node_environment(tmp: Path) -> dict[str, str]:
    """What the README's local head-node block exports before `ray start` (jobs on the node inherit it): the
    project's venv first on PATH (`source .venv/bin/activate`), a pseudonym key file, and PTBXL_ROOT at a
    small PTB-XL (its tables and four 500 Hz records) where the shared data is present."""
    import secrets

    env = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    key_file = tmp / "pseudonym-key"
    key_file.write_text(secrets.token_hex(32) + "\n")
    key_file.chmod(0o600)
    env["CREMA_PSEUDONYM_KEY_FILE"] = str(key_file)
    ptbxl = shared_data_root() / "ptbxl"
    if ptbxl.is_dir():
        root = tmp / "ptb-xl"
        (root / "records500/00000").mkdir(parents=True)
        for table in ("ptbxl_database.csv", "scp_statements.csv"):
            shutil.copy(ptbxl / table, root / table)
        for i in range(1, 5):
            for ext in ("hea", "dat"):
                shutil.copy(ptbxl / f"records500/00000/{i:05d}_hr.{ext}", root / "records500/00000")
        env["PTBXL_ROOT"] = str(root)
    return env


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """A real local Ray cluster (`ray start --head`, dashboard on) to `ray job submit` entrypoints to, started
    as the README's local block starts it (:func:`readme_node_environment`).

    Every port is picked free, so another process can take one between the pick and Ray's bind: a start
    that fails is stopped and tried again on fresh ports (3 times, each failure's output kept for the
    message). Stopped by killing only its own processes: `ray stop` would also end the in-process test cluster.
    """
    import secrets
    import tempfile

    # Token authentication on, as on a real cluster; the job CLI presents the same token.
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("CREMA_PSEUDONYM")},
           **readme_node_environment(tmp_path_factory.mktemp("ray-node")),
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    failures = []
    for _ in range(3):
        gcs_port, dashboard_port = free_port(), free_port()
        temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must stay < 108 bytes
        started = subprocess.run(
            [str(Path(sys.executable).parent / "ray"), "start", "--head", f"--port={gcs_port}", "--num-cpus=2",
             "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
             f"--temp-dir={temp_dir}", "--disable-usage-stats", "--node-ip-address=127.0.0.1",
             # Every port free-picked: other Ray instances (the in-process test cluster) may hold the defaults.
             f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
             f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
             f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}"],
            capture_output=True, text=True, timeout=180, env=env,
        )
        if started.returncode == 0:
            break
        failures.append(f"{started.stdout[-2000:]}\n{started.stderr[-2000:]}")
        _stop_cluster(temp_dir, gcs_port)
    else:
        pytest.fail("ray start --head failed 3 times:\n" + "\n---\n".join(failures))
    yield RayCluster(f"http://127.0.0.1:{dashboard_port}", env)
    _stop_cluster(temp_dir, gcs_port)


def _stop_cluster(temp_dir: str, gcs_port: int) -> None:
    """Kill the processes of the cluster started in `temp_dir` on `gcs_port`, and nothing else."""
    import psutil

    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if temp_dir in cmdline or f"gcs_server_port={gcs_port}" in cmdline or f"127.0.0.1:{gcs_port}" in cmdline:
            try:
                proc.kill()
            except psutil.Error:
                pass
    shutil.rmtree(temp_dir, ignore_errors=True)


@dataclass(frozen=True)
class RayCluster:
    address: str  # the dashboard URL that `ray job submit --address` takes
    cli_env: dict  # environment for the `ray` CLI (carries the cluster's auth token)


def submit_job(cluster: RayCluster, entrypoint: list[str], env_vars: dict[str, str], timeout: int = 600):
    """`ray job submit` exactly as a platform team runs it; returns the completed CLI process."""
    import json

    deadline = time.time() + 90
    while True:
        result = subprocess.run(
            [str(Path(sys.executable).parent / "ray"), "job", "submit", f"--address={cluster.address}",
             f"--runtime-env-json={json.dumps({'env_vars': env_vars})}", "--", *entrypoint],
            capture_output=True, text=True, timeout=timeout, cwd=REPO, env=cluster.cli_env,
        )
        # A fresh head node answers before its job agent is up; a real user would retry too.
        if "No available agent" not in result.stderr or time.time() > deadline:
            return result
        time.sleep(3)
