"""The README's `ray job submit` example, run as written on a fresh `ray start --head` with token auth.

What the test changes in the command line, and only that: the runtime-env file is a copy of
infra/runtime_env/ingest.runtime_env.yaml with this machine's values (PTBXL_ROOT, the key file's path), the
output folder is a temporary one, and `python` is this environment's interpreter (what `python` is after
activating the project's venv). The pseudonym key reaches the job as a file path: it is in no job metadata.
"""

from __future__ import annotations

import os
import re
import secrets
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

MARKER = "<!-- submit-example:"


def readme_submit_command() -> list[str]:
    text = (REPO / "README.md").read_text()
    after = text[text.index(MARKER):]
    block = re.search(r"```bash\n(.*?)```", after, re.S).group(1)
    return shlex.split(block.replace("\\\n", " "))


def test_readme_command_is_the_documented_ingest_submit():
    argv = readme_submit_command()
    assert argv[:3] == ["ray", "job", "submit"] and "--runtime-env-json" not in argv
    runtime_env = Path(argv[argv.index("--runtime-env") + 1])
    env_vars = yaml.safe_load((REPO / runtime_env).read_text())["env_vars"]
    assert "CREMA_PSEUDONYM_KEY_FILE" in env_vars and "CREMA_PSEUDONYM_KEY" not in env_vars
    for stage in ("ingest", "pretrain", "probe", "finetune"):
        env = yaml.safe_load((REPO / f"infra/runtime_env/{stage}.runtime_env.yaml").read_text())
        assert set(env) == {"env_vars"}  # code from the image: nothing uploaded, nothing installed
        assert not [k for k in env["env_vars"] if re.search(r"KEY$|PASSWORD|SECRET|TOKEN", k)], env


@pytest.mark.slow
def test_readme_submit_example_on_a_token_auth_cluster(ray_cluster, ptbxl_root, tmp_path):
    # A small PTB-XL: its tables and four records, laid out as PTBXL_ROOT expects.
    root = tmp_path / "ptbxl"
    (root / "records500/00000").mkdir(parents=True)
    for table in ("ptbxl_database.csv", "scp_statements.csv"):
        shutil.copy(ptbxl_root / table, root / table)
    for i in range(1, 5):
        for ext in ("hea", "dat"):
            shutil.copy(ptbxl_root / f"records500/00000/{i:05d}_hr.{ext}", root / "records500/00000")
    key = secrets.token_hex(32)
    key_file = tmp_path / "pseudonym-key"
    key_file.write_text(key + "\n")
    key_file.chmod(0o600)

    argv = readme_submit_command()
    documented = REPO / argv[argv.index("--runtime-env") + 1]
    runtime_env = yaml.safe_load(documented.read_text())
    runtime_env["env_vars"].update(PTBXL_ROOT=str(root), CREMA_PSEUDONYM_KEY_FILE=str(key_file))
    local_env = tmp_path / "ingest.runtime_env.yaml"
    local_env.write_text(yaml.safe_dump(runtime_env))
    out = tmp_path / "ecg-v1"
    argv = [str(local_env) if a == argv[argv.index("--runtime-env") + 1] else
            str(out) if a == "/data/ecg-v1" else sys.executable if a == "python" else a for a in argv]
    argv[0] = str(Path(sys.executable).parent / "ray")

    env = {k: v for k, v in ray_cluster.cli_env.items() if not k.startswith("CREMA_PSEUDONYM")}
    env["RAY_ADDRESS"] = ray_cluster.address
    deadline = time.time() + 90
    while True:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
        # A fresh head node answers before its job agent is up; a real user would retry too.
        if "No available agent" not in result.stderr or time.time() > deadline:
            break
        time.sleep(3)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "succeeded" in output
    # What the job's log shows a platform engineer: where the outputs go, then progress by phase.
    assert f"dataset      → {out}" in output
    assert "crema.stages.ingest: planned 4 records of 1 sources" in output
    assert re.search(r"crema\.stages\.ingest: committed \d+ data files of 4 records: dataset version \d+", output)
    assert any(out.rglob("*.parquet")), sorted(p.name for p in out.rglob("*"))[:20]

    # The job's metadata carries the key file's path, never the key.
    listed = subprocess.run([argv[0], "job", "list"], capture_output=True, text=True, timeout=120, env=env)
    assert listed.returncode == 0, listed.stderr[-2000:]
    assert str(key_file) in listed.stdout and key not in listed.stdout
    assert key not in output
    assert os.environ.get("CREMA_PSEUDONYM_KEY") != key
