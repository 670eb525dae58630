"""The ingest stage: `python -m crema.stages.ingest SOURCE.yaml [...] --output URI` (also `crema ingest`).

Hospital records → canonical windows in two Apache Iceberg tables (`windows`, `manifest`), every record
accounted for. Three passes over each source, all streaming: plan (driver, before Ray starts: a source
with no records is a config error), fingerprint (Ray tasks), window (Ray tasks, whose
:class:`WindowsDatasink` writes data files of the `windows` table and hands their metadata back). The
driver then commits them as one Iceberg snapshot (:func:`crema.data.catalog.commit_run`). The run and its
steps are :mod:`crema.data.ingest` (:func:`~crema.data.ingest.run_ingest`, which also runs in-process); the
tables and commits :mod:`crema.data.catalog`; this module hands the run its passes on Ray, and is the command.

Why not ``Dataset.write_iceberg``: Ray 2.60's Iceberg sink does the same thing (tasks write data files
with pyiceberg, the driver commits once, overwrite-by-filter supported), but it commits inside the sink
with no way to also hand back each task's manifest rows, names files with a fresh uuid per task (so the
next run could not tell a killed run's uncommitted files from a concurrent live run's), and retries
catalog errors only, not a lost commit race. This sink is that mechanism plus those three; nothing is
collected in the driver but file metadata and manifest rows (the alternative, collecting the tasks'
Arrow outputs and writing them from the driver as ``table.overwrite`` does, moves every signal byte through
the driver. Measured on 2 CPUs, 1,999 PTB-XL records100 → 1,997 500 Hz windows, 3 forced re-runs each: this
sink 3.9-4.0 s and 846 MiB driver peak RSS; collect-and-write 4.3-4.7 s and 1,771 MiB, the driver's memory
growing with the data; at 500 records the two were within noise, 866 vs 1,064 MiB).

Exit codes: 0 done; 1 more records rejected than `max_reject_fraction` allows (the dataset and its
manifest are still committed, for inspection); 2 invalid configuration; 3 no space left on the device.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Iterable, Optional

import pyarrow as pa
import ray
import typer
from ray.data import Datasink
from ray.data.block import BlockAccessor
from rich.console import Console
from rich.table import Table

from crema.config import IngestConfig, SourceConfig, load_yaml, parse_overrides, redact_uri, validate
from crema.data.catalog import Run, is_disk_full
from crema.data.ingest import (IngestFailed, IngestSummary, fingerprint_batch, run_ingest, source_units, task_chunks,
                               window_batch, write_window_files)
from crema.stages.common import announce_outputs, exit_2_on_config_error, init_ray

EXIT_REJECTS, EXIT_CONFIG, EXIT_DISK_FULL = 1, 2, 3
UNMAPPED_LISTED = 20  # unmapped label statements named in the summary, the most frequent first
console = Console()


def ingest(sources: list[SourceConfig], output: str, cfg: IngestConfig | None = None,
           pseudonym: bytes | None = None, force: bool = False) -> IngestSummary:
    """The ingest run (:func:`crema.data.ingest.run_ingest`) with its passes on Ray Data. Raises IngestFailed
    (after committing) when a source's rejects exceed its allowed fraction, ConfigError (before Ray starts)
    for a bad config, a source without records or a dataset of another window length."""
    cfg = cfg or IngestConfig()

    def announce(resolved: str) -> None:
        announce_outputs({"dataset": resolved, "catalog": _catalog_location(resolved, cfg),
                          "reports": f"{resolved.rstrip('/')}/reports/<source>.md"})

    return run_ingest(sources, output, cfg, pseudonym, force, passes=RayPasses(), on_planned=announce)


def _catalog_location(output: str, cfg: IngestConfig) -> str:
    if cfg.catalog is None:
        return f"{output.rstrip('/')}/catalog.db (embedded SQLite), warehouse {output.rstrip('/')}/warehouse"
    where = redact_uri(cfg.catalog.uri) if cfg.catalog.uri else "from pyiceberg's environment"
    return f"{cfg.catalog.type} catalog {where}, namespace {cfg.catalog.namespace}"


class RayPasses:
    """The two passes of an ingest run as Ray Data tasks (Ray started on first use, after the plan)."""

    def fingerprint(self, work, sources, config_hashes, cfg):
        init_ray()
        refs = _as_dataset(work, cfg.records_per_task * 4).map_batches(
            fingerprint_batch, fn_kwargs={"sources": sources, "config_hashes": config_hashes},
            batch_format="pyarrow", batch_size=None,
        ).to_arrow_refs()
        return ray.get(refs)

    def window(self, pending, sources, cfg, config_hashes, windows, run):
        init_ray()
        sink = WindowsDatasink(windows, run, source_units(sources))
        _as_dataset(pending, cfg.records_per_task).map_batches(
            window_batch, fn_kwargs={"sources": sources, "cfg": cfg, "config_hashes": config_hashes},
            batch_format="pyarrow", batch_size=None,
        ).write_datasink(sink)
        return sink.data_files, sink.manifest_parts


class WindowsDatasink(Datasink[tuple]):
    """Writes ok windows as data files of the `windows` table (committing nothing); returns each task's
    DataFiles and manifest rows to the driver, which commits them all at once."""

    def __init__(self, windows, run: Run, units: dict[str, str] | None = None):
        self.metadata = windows.metadata  # the table as the driver loaded it: every task writes against it
        self.io = windows.io
        self.write_uuid = run.id
        self.units = units or {}  # each source's `units` column (source_units)
        self.data_files: list = []
        self.manifest_parts: list[pa.Table] = []

    def write(self, blocks: Iterable, ctx) -> tuple[list, pa.Table]:
        table = pa.concat_tables([BlockAccessor.for_block(b).to_arrow() for b in blocks])
        return write_window_files(table, self.metadata, self.io, self.write_uuid, ctx.task_idx, self.units)

    def on_write_complete(self, write_result) -> None:
        returns = [r for r in write_result.write_returns if r is not None]
        self.data_files = [written for files, _ in returns for written in files]
        self.manifest_parts = [rows for _, rows in returns]


def _as_dataset(table: pa.Table, rows_per_block: int) -> ray.data.Dataset:
    """One block per task-sized slice: a single block would run as a single task."""
    # Ray Data's default reservation holds part of the CPUs back for operators this one-operator pipeline
    # does not have: on 2 CPUs it ran one task at a time ("backpressured: ResourceBudget"; 8 half-second
    # tasks took 5.1 s, without the reservation 2.2 s). The setting lives in this driver's DataContext only.
    ray.data.DataContext.get_current().op_resource_reservation_enabled = False
    return ray.data.from_arrow(task_chunks(table, rows_per_block))


# ---------------------------------------------------------------------------------------- command

def rate(per_second: float) -> str:
    """Records per second with the precision a reader needs: "0.25 records/s", "3.1 records/s", "1,520 records/s"."""
    if per_second >= 100:
        return f"{per_second:,.0f} records/s"
    return f"{per_second:.2g} records/s" if per_second < 1 else f"{per_second:.1f} records/s"


def print_summary(summary: IngestSummary) -> None:
    """The per-source table of what became of the records, and the reject reasons."""
    table = Table(title=f"ingest → {summary.output}")
    for column in ("source", "discovered", "ok", "rejected", "duplicate", "windows", "note"):
        table.add_column(column, justify="left" if column in ("source", "note") else "right")
    for s in summary.sources:
        notes = []
        if s.skipped_unchanged:
            notes.append("unchanged, kept")
        elif s.reingested is not None:
            notes.append(f"{s.reingested} changed records re-ingested, the rest kept")
        if s.normalised:
            notes.append(f"{s.normalised} records look amplitude-normalised, not mV")
        copies = s.duplicate + s.duplicate_kept
        if copies:
            notes.append(f"{copies} copies of other records ({s.cross_source_duplicates} of another source's)"
                         + (f", {s.duplicate_kept} kept" if s.duplicate_kept else ", dropped"))
        if s.patients_joined:
            notes.append(f"{s.patients_joined} records joined to a copy's patient key and split")
        table.add_row(s.name, str(s.discovered), str(s.ok), str(s.rejected), str(s.duplicate), str(s.windows),
                      "; ".join(notes))
    console.print(table)
    for s in summary.sources:
        if s.has_label_table:
            console.print(f"  {s.name}: labels: {s.discovered - s.records_without_labels} records labelled, "
                          f"{s.records_without_labels} without, {s.unmatched_label_rows} table rows matching no record",
                          soft_wrap=True)
        if s.unmapped_labels:
            listed = ", ".join(f"{statement!r} × {n}" for statement, n in s.unmapped_labels.most_common(UNMAPPED_LISTED))
            more = len(s.unmapped_labels) - UNMAPPED_LISTED
            console.print(f"  {s.name}: {len(s.unmapped_labels)} label statements no label map matches (not stored): "
                          f"{listed}{f', and {more} more' if more > 0 else ''}", soft_wrap=True)
        if s.records_with_unmapped_header_labels:
            console.print(f"  {s.name}: {s.records_with_unmapped_header_labels} records hold statements of their own "
                          f"that no label map matches (manifest flag unmapped_labels; `crema sources check` lists them)",
                          soft_wrap=True)
        for reason, count in s.reasons.most_common():
            console.print(f"  {s.name}: rejected {count} × {reason}")
    console.print(f"{summary.discovered} records in {summary.seconds:.1f} s ({rate(summary.records_per_second)})")


def run(sources: list[Path], output: str, config: Optional[Path] = None, overrides: list[str] | None = None,
        pseudonym: bytes | None = None, force: bool = False) -> IngestSummary:
    """Load and validate every config, then ingest. Raises ConfigError before any work on a bad config."""
    cfg = load_yaml(config, IngestConfig, parse_overrides(overrides or [])) if config else \
        validate(IngestConfig, parse_overrides(overrides or []))
    source_cfgs = [load_yaml(path, SourceConfig) for path in sources]
    return ingest(source_cfgs, output, cfg, pseudonym=pseudonym, force=force)


def main(
    sources: Annotated[list[Path], typer.Argument(help="Source YAML files (name, format, path, ...)")],
    output: Annotated[str, typer.Option("--output", "-o", help="Dataset URI: a folder or s3://bucket/prefix")],
    config: Annotated[Optional[Path], typer.Option(help="Ingest settings YAML (rate, window, filters, catalog)")] = None,
    set_: Annotated[list[str], typer.Option("--set", help="Override an ingest setting: key=value")] = [],
    force: Annotated[bool, typer.Option("--force", help="Re-ingest every record of these sources, changed or not")] = False,
) -> None:
    """Read hospital ECG records and write canonical 12-lead windows and a manifest (Iceberg tables)."""
    with exit_2_on_config_error():
        try:
            summary = run(sources, output, config, set_, force=force)
        except IngestFailed as err:
            if err.summary is not None:
                print_summary(err.summary)
            console.print(f"[red]ingest failed:[/red] {err}")
            raise typer.Exit(EXIT_REJECTS)
        except Exception as err:
            if is_disk_full(err):
                console.print(f"[red]ingest failed: no space left on the device[/red] writing {output}; "
                              "nothing was committed, the dataset is as before (free space and run again)",
                              soft_wrap=True)
                raise typer.Exit(EXIT_DISK_FULL)
            raise
    print_summary(summary)


if __name__ == "__main__":
    typer.run(main)
