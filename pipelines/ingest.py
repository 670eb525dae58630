"""Ingest entrypoint: `python -m pipelines.ingest SOURCE.yaml [...] --output URI` (also `crema ingest`).

Exit codes: 0 done; 1 more records rejected than `max_reject_fraction` allows (the dataset and its
manifest are still written, for inspection); 2 invalid configuration.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from crema.config import ConfigError, IngestConfig, SourceConfig, load_yaml, parse_overrides, validate
from crema.ingest import IngestFailed, IngestSummary, ingest
from crema.labels import pseudonym_key
from pipelines.common import init_ray

console = Console()


def print_summary(summary: IngestSummary) -> None:
    table = Table(title=f"ingest → {summary.output}")
    for column in ("source", "discovered", "ok", "rejected", "duplicate", "windows", "note"):
        table.add_column(column, justify="left" if column in ("source", "note") else "right")
    for s in summary.sources:
        notes = []
        if s.skipped_unchanged:
            notes.append("unchanged, kept")
        if s.unmatched_label_rows:
            notes.append(f"{s.unmatched_label_rows} label rows without a record")
        table.add_row(s.name, str(s.discovered), str(s.ok), str(s.rejected), str(s.duplicate), str(s.windows),
                      "; ".join(notes))
    console.print(table)
    for s in summary.sources:
        for reason, count in s.reasons.most_common():
            console.print(f"  {s.name}: rejected {count} × {reason}")
    console.print(f"{summary.discovered} records in {summary.seconds:.1f} s "
                  f"({summary.records_per_second:.0f} records/s)")


def run(sources: list[Path], output: str, config: Optional[Path] = None, overrides: list[str] | None = None,
        pseudonym: bytes | None = None) -> IngestSummary:
    """Load and validate every config, then ingest. Raises ConfigError before any work on a bad config."""
    cfg = load_yaml(config, IngestConfig, parse_overrides(overrides or [])) if config else \
        validate(IngestConfig, parse_overrides(overrides or []))
    source_cfgs = [load_yaml(path, SourceConfig) for path in sources]
    key = pseudonym if pseudonym is not None else pseudonym_key()
    init_ray()
    return ingest(source_cfgs, output, cfg, pseudonym=key)


def main(
    sources: Annotated[list[Path], typer.Argument(help="Source YAML files (name, format, path, ...)")],
    output: Annotated[str, typer.Option("--output", "-o", help="Dataset URI: a folder or s3://bucket/prefix")],
    config: Annotated[Optional[Path], typer.Option(help="Ingest settings YAML (rate, window, filters)")] = None,
    set_: Annotated[list[str], typer.Option("--set", help="Override an ingest setting: key=value")] = [],
) -> None:
    """Read hospital ECG records and write canonical 12-lead windows and a manifest."""
    try:
        summary = run(sources, output, config, set_)
    except ConfigError as err:
        console.print(f"[red]invalid configuration:[/red] {err}")
        raise typer.Exit(2)
    except IngestFailed as err:
        console.print(f"[red]ingest failed:[/red] {err}")
        raise typer.Exit(1)
    print_summary(summary)


if __name__ == "__main__":
    typer.run(main)
