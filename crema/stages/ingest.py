"""The ingest stage: `python -m crema.stages.ingest SOURCE.yaml [...] --output URI` (also `crema ingest`).

Hospital records → canonical windows in Parquet, every record accounted for. Three passes over each
source, all streaming: plan (driver), fingerprint (Ray tasks), window (Ray tasks, written by
:class:`WindowsDatasink` into a staging folder swapped in only after every write task succeeded). The
per-record steps are :mod:`crema.data.ingest`; this module runs them on Ray.

Exit codes: 0 done; 1 more records rejected than `max_reject_fraction` allows (the dataset and its
manifest are still written, for inspection); 2 invalid configuration.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Annotated, Iterable, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import typer
from fsspec.core import url_to_fs
from ray.data import Datasink
from ray.data.block import BlockAccessor
from rich.console import Console
from rich.table import Table

from crema.config import IngestConfig, SourceConfig, load_yaml, parse_overrides, validate
from crema.data.ingest import (WORK_SCHEMA, IngestFailed, IngestSummary, account_for_lost, commit, committed_hashes,
                               config_fingerprint, fingerprint_batch, manifest_sources, mark_duplicates, plan,
                               read_manifest, summarise, unchanged_sources, window_batch, write_window_files)
from crema.data.labels import pseudonym_key
from crema.data.schema import MANIFEST_SCHEMA
from crema.stages.common import exit_2_on_config_error, init_ray

console = Console()


def ingest(sources: list[SourceConfig], output: str, cfg: IngestConfig | None = None,
           pseudonym: bytes | None = None) -> IngestSummary:
    """Run the whole stage. Raises IngestFailed (after committing) when rejects exceed the allowed fraction."""
    cfg = cfg or IngestConfig()
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise ValueError(f"source names must be unique, got {names}")
    key = pseudonym if pseudonym is not None else pseudonym_key()
    started = time.perf_counter()
    fs, root = url_to_fs(output, **cfg.storage_options)
    root = root.rstrip("/")
    fs.makedirs(root, exist_ok=True)
    previous = read_manifest(output, cfg.storage_options)
    by_name = {s.name: s for s in sources}

    work, summaries = plan(sources, key)
    decided = mark_duplicates(_fingerprint(work, by_name, cfg), committed_hashes(previous, names),
                              cfg.drop_duplicates)
    config_hashes = {s.name: config_fingerprint(s, cfg) for s in sources}
    unchanged = unchanged_sources(previous, manifest_sources(previous), decided, config_hashes)
    decided = decided.filter(pc.invert(pc.is_in(decided["source"], pa.array(sorted(unchanged), pa.string()))))

    run_id = uuid.uuid4().hex[:12]
    manifest_new = _window_pass(decided, by_name, cfg, f"{output.rstrip('/')}/_staging/{run_id}")
    manifest = commit(fs, root, f"{root}/_staging/{run_id}", previous, manifest_new,
                      sorted(set(names) - unchanged), config_hashes)

    summary = summarise(output, summaries, manifest, unchanged, time.perf_counter() - started)
    if summary.discovered and summary.rejected / summary.discovered > cfg.max_reject_fraction:
        raise IngestFailed(f"{summary.rejected} of {summary.discovered} records rejected "
                           f"(> max_reject_fraction={cfg.max_reject_fraction}); see {output}/manifest.parquet")
    return summary


def _fingerprint(work: pa.Table, sources: dict[str, SourceConfig], cfg: IngestConfig) -> pa.Table:
    """Content hashes (or reject reasons) of every planned record, sorted by source and record id."""
    if len(work):
        refs = _as_dataset(work, cfg.records_per_task * 4).map_batches(
            fingerprint_batch, fn_kwargs={"sources": sources}, batch_format="pyarrow", batch_size=None,
        ).to_arrow_refs()
        work = pa.concat_tables(ray.get(refs))
    return work.sort_by([("source", "ascending"), ("record_id", "ascending")])


def _window_pass(decided: pa.Table, sources: dict[str, SourceConfig], cfg: IngestConfig, staging_uri: str) -> pa.Table:
    """Window the pending records into `staging_uri`; the manifest rows of every decided record."""
    pending = decided.filter(pc.equal(decided["status"], "pending")).select(WORK_SCHEMA.names + ["content_hash", "detail"])
    sink = WindowsDatasink(staging_uri, cfg)
    if len(pending):
        _as_dataset(pending, cfg.records_per_task).map_batches(
            window_batch, fn_kwargs={"sources": sources, "cfg": cfg}, batch_format="pyarrow", batch_size=None,
        ).write_datasink(sink)
    written = pa.concat_tables(sink.manifest_parts).cast(MANIFEST_SCHEMA) if sink.manifest_parts \
        else MANIFEST_SCHEMA.empty_table()
    written = account_for_lost(pending, written)
    settled = decided.filter(pc.not_equal(decided["status"], "pending"))
    settled = settled.append_column("n_windows", pa.array(np.zeros(len(settled), np.int32)))
    return pa.concat_tables([written, settled.select(MANIFEST_SCHEMA.names).cast(MANIFEST_SCHEMA)])


class WindowsDatasink(Datasink[pa.Table]):
    """Writes ok windows as Parquet under a staging folder; returns each task's manifest rows."""

    def __init__(self, staging: str, cfg: IngestConfig):
        self.staging = staging
        self.cfg = cfg
        self.manifest_parts: list[pa.Table] = []

    def write(self, blocks: Iterable, ctx) -> pa.Table:
        table = pa.concat_tables([BlockAccessor.for_block(b).to_arrow() for b in blocks])
        return write_window_files(table, self.staging, self.cfg, ctx.task_idx)

    def on_write_complete(self, write_result) -> None:
        self.manifest_parts = [t for t in write_result.write_returns if t is not None]


def _as_dataset(table: pa.Table, rows_per_block: int) -> ray.data.Dataset:
    """One block per task-sized slice: a single block would run as a single task."""
    return ray.data.from_arrow([table.slice(i, rows_per_block) for i in range(0, len(table), rows_per_block)])


# ---------------------------------------------------------------------------------------- command

def print_summary(summary: IngestSummary) -> None:
    """The per-source table of what became of the records, and the reject reasons."""
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
    with exit_2_on_config_error():
        try:
            summary = run(sources, output, config, set_)
        except IngestFailed as err:
            console.print(f"[red]ingest failed:[/red] {err}")
            raise typer.Exit(1)
    print_summary(summary)


if __name__ == "__main__":
    typer.run(main)
