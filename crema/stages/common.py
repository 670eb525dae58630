"""What every stage driver does at its edges: connect to Ray, tag its runs, and fail with a clear message."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import ray
import typer
from fsspec.core import url_to_fs
from pyarrow.fs import FSSpecHandler, PyFileSystem
from ray.data._internal.datasource.iceberg_datasource import IcebergDatasource
from rich.console import Console

from crema import logs
from crema.config import PACKAGED_CONFIGS, ConfigError
from crema.data.catalog import WINDOWS, open_dataset
from crema.data.schema import to_contract_types

console = Console()


def announce_outputs(locations: dict[str, str]) -> None:
    """Where a command's outputs go, printed once when it starts: one unwrapped line each, since paths are
    copied from here (a job's driver output is what `ray job logs` shows, so it is there too)."""
    for what, where in locations.items():
        typer.echo(f"{what:<12} → {where}")


def init_ray(num_cpus: int | None = None, *, dashboard: bool = False) -> None:
    """Join the cluster a job was submitted to (RAY_ADDRESS), or start a local one. Every Ray Train job wants
    `dashboard`: its controller's placement-group watcher asks the dashboard's State API, once a second, whether
    the controller still lives (to release the workers of a job that died or that Tune stopped), and without
    the dashboard it warns on every ask, for the whole of the training."""
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
    else:
        # The workers of the cluster started here inherit this environment; a cluster of one's own keeps
        # the logging it was set up with.
        os.environ.setdefault("RAY_DATA_LOGGING_CONFIG", str(PACKAGED_CONFIGS / "ray_data_logging.yaml"))
        ray.init(num_cpus=num_cpus, include_dashboard=dashboard, log_to_driver=True)


def pyarrow_filesystem(uri: str, storage_options: dict | None) -> tuple[PyFileSystem | None, str]:
    """(filesystem, path) where Ray or pyarrow is to write `uri`. They infer the filesystem of a plain path or
    URI (None); fsspec options (an S3-compatible endpoint, say) need an explicit filesystem, scheme stripped."""
    if not storage_options:
        return None, uri
    fs, path = url_to_fs(uri, **storage_options)
    return PyFileSystem(FSSpecHandler(fs)), path


class _IcebergWindows(IcebergDatasource):
    """Ray's Iceberg datasource, picklable once it has planned its read: it keeps the loaded pyiceberg
    Table, whose SQL catalog (an SQLAlchemy engine) cannot be pickled, and Ray Train pickles the datasets
    it hands its workers. The table is reloaded from the catalog where it is needed again."""

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_table": None}

    def get_read_tasks(self, parallelism: int, **kwargs) -> list:
        # A dataset holds a file or a few per partition, fewer than Ray's default parallelism, and Ray warns
        # on every read (each epoch's splits of a training job) that it reads one task per file: ask for that.
        return super().get_read_tasks(min(parallelism, len(self.plan_files)) or parallelism, **kwargs)


def read_windows_table(dataset_uri: str, storage_options: dict | None, row_filter, columns: list[str],
                       version: str | None = None) -> ray.data.Dataset:
    """The dataset's `windows` table (at `version`, default the current one) as a Ray Dataset, read through
    its catalog: `row_filter` (a pyiceberg expression on `source` / `split`) prunes partitions unopened.
    A stage resolves its version once at its start (:func:`crema.data.catalog.dataset_version`) and passes
    it to every read, so that an ingest committing meanwhile changes none of its reads."""
    dataset = open_dataset(dataset_uri, storage_options)
    return ray.data.read_datasource(_IcebergWindows(
        table_identifier=dataset.identifier(WINDOWS), row_filter=row_filter, selected_fields=tuple(columns),
        snapshot_id=int(version) if version else None, catalog_kwargs=dataset.ray_catalog_kwargs(),
    )).map_batches(to_contract_types, batch_format="pyarrow", batch_size=None, zero_copy_batch=True)


def git_commit(repo_dir: str | Path | None = None) -> str | None:
    """HEAD of the checkout the code runs from (None outside git), to tie a run to its code."""
    where = Path(repo_dir) if repo_dir else Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def copy_to_storage(local_path: str | Path, uri: str, storage_options: dict | None = None) -> str:
    """Put one local file at a local path or a remote URI (s3://...)."""
    fs, path = url_to_fs(uri, **(storage_options or {}))
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    fs.put_file(str(local_path), path)
    return uri


def run_tags(dataset: str, storage_options: dict | None, version: str | None = None) -> dict[str, str]:
    """Tags every training run carries: the dataset's identity (at `version`, the one the stage pinned and
    reads), the code's commit and Ray's version."""
    # Imported here: MLflow and torch come with crema.tracking, and the ingest stage, which shares this
    # module, needs neither (2.4 s of every ingest job's start).
    from crema.tracking import dataset_tags

    tags = dataset_tags(dataset, storage_options, version)
    # A job submitted without .git (code from the image, or --working-dir without it): the submit
    # wrapper passes the commit in CREMA_GIT_COMMIT.
    commit = git_commit() or os.environ.get(GIT_COMMIT_ENV)
    if commit:
        tags["git_commit"] = commit
    job_id = ray_job_id()
    if job_id:
        tags["ray_job_id"] = job_id
    submission_id = os.environ.get("RAY_JOB_SUBMISSION_ID")
    if submission_id:
        tags["ray_job_submission_id"] = submission_id
    tags["ray_version"] = ray.__version__
    return tags


GIT_COMMIT_ENV = "CREMA_GIT_COMMIT"


def ray_job_id() -> str | None:
    """The Ray job this driver is (RAY_JOB_ID, else the runtime context once Ray is initialised)."""
    if os.environ.get("RAY_JOB_ID"):
        return os.environ["RAY_JOB_ID"]
    if ray.is_initialized():
        return ray.get_runtime_context().get_job_id()
    return None


@contextmanager
def exit_2_on_config_error() -> Iterator[None]:
    """A command's invalid configuration: one red line and exit code 2, never a traceback.

    Every stage's command runs inside it, so it also sets up `logging` (level: $CREMA_LOG_LEVEL).
    """
    logs.configure()
    try:
        yield
    except ConfigError as err:
        console.print(f"[red]invalid configuration:[/red] {err}", soft_wrap=True)
        raise typer.Exit(2)

