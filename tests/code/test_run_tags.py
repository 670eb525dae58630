"""What ties a run to its code and its job: the git commit (from CREMA_GIT_COMMIT when the code has no
.git) and the Ray job id; logging set up once with the level from the CLI or the environment."""

from __future__ import annotations

import logging

import pytest
from typer.testing import CliRunner

from crema import logs
from crema.stages import common


def test_commit_from_the_environment_and_ray_job_id(monkeypatch):
    from crema import tracking

    monkeypatch.setattr(tracking, "dataset_tags", lambda dataset, options, version=None: {"dataset": dataset})
    monkeypatch.setattr(common, "git_commit", lambda: None)  # an image: no .git
    monkeypatch.setenv("CREMA_GIT_COMMIT", "0123abcd")
    monkeypatch.setenv("RAY_JOB_ID", "05000000")
    monkeypatch.setenv("RAY_JOB_SUBMISSION_ID", "pretrain-crema-base-v1")
    tags = common.run_tags("s3://b/ds", None)
    assert tags["git_commit"] == "0123abcd" and tags["ray_job_id"] == "05000000"
    assert tags["ray_job_submission_id"] == "pretrain-crema-base-v1" and tags["dataset"] == "s3://b/ds"

    monkeypatch.setattr(common, "git_commit", lambda: "fedcba98")  # a checkout wins over the variable
    assert common.run_tags("d", None)["git_commit"] == "fedcba98"


def test_logging_configured_once_with_level_from_cli_or_environment(monkeypatch):
    from crema.stages.cli import app

    logger = logging.getLogger("crema")
    monkeypatch.setenv(logs.ENV_LEVEL, "warning")
    logs.configure()
    logs.configure()
    assert logger.level == logging.WARNING
    assert sum(getattr(h, "_crema_handler", False) for h in logger.handlers) == 1
    result = CliRunner().invoke(app, ["--log-level", "debug", "sources", "formats"])
    assert result.exit_code == 0 and logger.level == logging.DEBUG
    result = CliRunner().invoke(app, ["--log-level", "loud", "sources", "formats"])
    assert result.exit_code == 2 and "unknown log level" in result.output
    with pytest.raises(ValueError):
        logs.level_name("loud")
    logs.configure("INFO")


def test_pseudonym_key_from_a_file_named_by_the_environment(tmp_path, monkeypatch):
    from crema.config import ConfigError
    from crema.data.labels import pseudonym_key

    key_file = tmp_path / "pseudonym-key"
    key_file.write_text("file-key\n")
    monkeypatch.setenv("CREMA_PSEUDONYM_KEY", "env-key")
    monkeypatch.setenv("CREMA_PSEUDONYM_KEY_FILE", str(key_file))
    assert pseudonym_key() == b"file-key"  # the file wins; its trailing newline is not part of the key
    monkeypatch.delenv("CREMA_PSEUDONYM_KEY_FILE")
    assert pseudonym_key() == b"env-key"  # still accepted
    monkeypatch.setenv("CREMA_PSEUDONYM_KEY_FILE", str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="CREMA_PSEUDONYM_KEY_FILE=.*missing.*cannot read"):
        pseudonym_key()


def test_mlflow_credentials_from_a_file_named_by_the_environment(tmp_path, monkeypatch):
    from crema import tracking

    creds = tmp_path / "mlflow-credentials"
    creds.write_text("[mlflow]\nmlflow_tracking_username = crema-jobs\nmlflow_tracking_password = s3cret\n")
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    monkeypatch.setenv("CREMA_MLFLOW_CREDENTIALS_FILE", str(creds))
    tracking.resolve_tracking_uri("http://127.0.0.1:5000")
    import os

    assert os.environ["MLFLOW_TRACKING_USERNAME"] == "crema-jobs" and os.environ["MLFLOW_TRACKING_PASSWORD"] == "s3cret"
