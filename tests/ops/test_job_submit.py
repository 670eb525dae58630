"""The README's `ray job submit` example, run as written on a `ray start --head` with token auth.

The cluster is started as the README's local block starts it (tests/conftest.py: readme_node_environment:
the project's venv on PATH, a pseudonym key file, PTBXL_ROOT at a small PTB-XL), and the example line runs in
bash as written, with HOME at a temporary folder (so `~/crema/ecg-v1` is one). The pseudonym key reaches the
job as a file path from the node's environment: it is in no job metadata.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

MARKER = "<!-- submit-example:"


def readme_submit_block() -> str:
    """The shell text of the README's marked submit example."""
    text = (REPO / "README.md").read_text()
    after = text[text.index(MARKER):]
    return re.search(r"```bash\n(.*?)```", after, re.S).group(1)


def test_readme_command_is_the_documented_ingest_submit():
    argv = shlex.split(readme_submit_block().replace("\\\n", " "))
    assert argv[:3] == ["ray", "job", "submit"] and "--runtime-env-json" not in argv
    assert argv[argv.index("--") + 1:argv.index("--") + 4] == ["python", "-m", "crema.stages.ingest"]
    for stage in ("ingest", "pretrain", "probe", "finetune"):
        env = yaml.safe_load((REPO / f"infra/runtime_env/{stage}.runtime_env.yaml").read_text())
        assert set(env) == {"env_vars"}  # code from the image: nothing uploaded, nothing installed
        assert not [k for k in env["env_vars"] if re.search(r"KEY$|PASSWORD|SECRET|TOKEN", k)], env
        if stage == "ingest":
            assert "CREMA_PSEUDONYM_KEY_FILE" in env["env_vars"] and "CREMA_PSEUDONYM_KEY" not in env["env_vars"]


@pytest.mark.slow
def test_readme_submit_example_on_a_token_auth_cluster(ray_cluster, ptbxl_root, tmp_path):
    assert "PTBXL_ROOT" in ray_cluster.cli_env  # the node was started with the shared PTB-XL present
    key = Path(ray_cluster.cli_env["CREMA_PSEUDONYM_KEY_FILE"]).read_text().strip()
    env = {**ray_cluster.cli_env, "RAY_ADDRESS": ray_cluster.address, "HOME": str(tmp_path)}
    out = tmp_path / "crema" / "ecg-v1"
    deadline = time.time() + 90
    while True:
        result = subprocess.run(["bash", "-c", readme_submit_block()], capture_output=True, text=True, timeout=600,
                                cwd=REPO, env=env)
        # A fresh head node answers before its job agent is up; a real user would retry too.
        if "No available agent" not in result.stderr or time.time() > deadline:
            break
        time.sleep(3)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "succeeded" in output
    # What the job's log shows a platform engineer: where the outputs go, then progress by phase.
    assert f"dataset      → {out}" in output
    assert "crema.data.ingest: planned 4 records of 1 sources" in output
    assert re.search(r"crema\.data\.ingest: committed \d+ data files of 4 records: dataset version \d+", output)
    assert any(out.rglob("*.parquet")), sorted(p.name for p in out.rglob("*"))[:20]

    # The key reaches the job from the node's environment: no job metadata, no output carries it.
    listed = subprocess.run(["ray", "job", "list"], capture_output=True, text=True, timeout=120, env=env)
    assert listed.returncode == 0, listed.stderr[-2000:]
    assert key not in listed.stdout and key not in output
