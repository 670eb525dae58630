"""What every stage driver does at its edges: connect to Ray, tag its runs, and fail with a clear message."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import ray
import typer
from rich.console import Console

from crema.config import ConfigError
from crema.tracking import dataset_tags, git_commit

console = Console()


def init_ray(num_cpus: int | None = None) -> None:
    """Join the cluster a job was submitted to (RAY_ADDRESS), or start a local one."""
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)


def run_tags(dataset: str, storage_options: dict | None) -> dict[str, str]:
    """Tags every training run carries: the dataset's identity, the code's commit and Ray's version."""
    tags = dataset_tags(dataset, storage_options)
    commit = git_commit()
    if commit:
        tags["git_commit"] = commit
    tags["ray_version"] = ray.__version__
    return tags


@contextmanager
def exit_2_on_config_error() -> Iterator[None]:
    """A command's invalid configuration: one red line and exit code 2, never a traceback."""
    try:
        yield
    except ConfigError as err:
        console.print(f"[red]invalid configuration:[/red] {err}")
        raise typer.Exit(2)

