"""The write, commit and recovery protocol of an ingest run (see the package's docstring)."""

from __future__ import annotations

import itertools
import json
import os
import socket
import time
import uuid
from dataclasses import dataclass, field
from functools import reduce

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec.core import url_to_fs
from pyiceberg.expressions import And, BooleanExpression, EqualTo, In, Or
from pyiceberg.io.pyarrow import _dataframe_to_data_files
from pyiceberg.table import Table

from crema.config import CatalogConfig
from crema.data.catalog.tables import Dataset, FOREIGN_RUN_TIMEOUT_S, MANIFEST, REPLACE_KEY, RUN_KEY, SOURCES_KEY, UNITS_COLUMN, WINDOWS, _RUN_FILE, _retry, _strip_scheme, ensure_tables, open_for_ingest
from crema.data.catalog.reads import _manifest_arrow_schema, _manifest_of, _pyarrow_dataset, _snapshot_id, windows_arrow_schema


# ------------------------------------------------------------------------------------------ writing

def write_data_files(metadata, io, table: pa.Table, write_uuid: uuid.UUID, task_index: int) -> list:
    """Write rows as Parquet data files of a table (nothing committed); their pyiceberg DataFiles.

    File names carry the run's uuid, so that the next run can tell a killed run's files from a live one's.
    """
    if not len(table):
        return []
    arrow = metadata.schema().as_arrow()
    table = table.select(arrow.names).cast(arrow)
    return list(_dataframe_to_data_files(table_metadata=metadata, df=table, io=io, write_uuid=write_uuid,
                                         counter=itertools.count(task_index * 1_000_000)))


Replace = dict  # source -> record ids whose rows a commit replaces, or None for all of the source's rows


def replace_filter(replace: Replace) -> BooleanExpression | None:
    """The rows a commit deletes: whole sources (partition drops), or some records of a source."""
    terms = []
    for source, records in sorted(replace.items()):
        if records is None:
            terms.append(EqualTo("source", source))
        elif records:
            terms.append(And(EqualTo("source", source), In("record_id", records) if len(records) > 1
                             else EqualTo("record_id", records[0])))
    return reduce(Or, terms) if terms else None


def rewrite_records(written: list, metadata, io, write_uuid: uuid.UUID, dropped: set | frozenset = frozenset(),
                    rekeyed: dict | None = None) -> list:
    """The DataFiles to commit, from [(DataFile, its records' keys)], after what the driver decided once
    every task had written (duplicates are only known then): files holding windows of a `dropped` (source,
    record_id) record are rewritten without them, and files holding a `rekeyed` record ({(source,
    record_id): (patient_key, split)}, a kept copy's patient joined to its twin's) with that patient key and
    split (a new split is a new partition: the rewrite places the rows there). Untouched files stay as written."""
    rekeyed = rekeyed or {}
    touched = set(dropped) | set(rekeyed)
    kept = []
    for k, (data_file, keys) in enumerate(written):
        if not keys & touched:
            kept.append(data_file)
            continue
        with io.new_input(data_file.file_path).open() as f:
            rows = pq.read_table(f)
        ids = list(zip(rows["source"].to_pylist(), rows["record_id"].to_pylist()))
        rows = rows.filter(pa.array([i not in dropped for i in ids], pa.bool_()))
        ids = [i for i in ids if i not in dropped]
        if rekeyed and any(i in rekeyed for i in ids):
            for column, at in (("patient_key", 0), ("split", 1)):
                values = [rekeyed[i][at] if i in rekeyed else v for i, v in zip(ids, rows[column].to_pylist())]
                rows = rows.set_column(rows.schema.get_field_index(column), rows.schema.field(column),
                                       pa.array(values, rows.schema.field(column).type))
        kept += write_data_files(metadata, io, rows, write_uuid, 900_000 + k)
        io.delete(data_file.file_path)
    return kept


def record_identities(dataset: Dataset, records: list[tuple[str, str]]) -> dict[tuple[str, str], tuple[str, str]]:
    """{(source, record_id): (patient_key, split)} of committed records, from their first window in the
    current `windows` snapshot (records without windows are left out)."""
    by_source: dict[str, list[str]] = {}
    for source, record_id in records:
        by_source.setdefault(source, []).append(record_id)
    row_filter = replace_filter({s: sorted(set(r)) for s, r in by_source.items()})
    if row_filter is None:
        return {}
    table = dataset.windows()
    rows = _pyarrow_dataset(dataset, table, row_filter, _snapshot_id(table, None), windows_arrow_schema(table)) \
        .to_table(columns=["source", "record_id", "patient_key", "split"], filter=pc.field("window_index") == 0)
    wanted = set(records)
    return {(s, r): (p, sp) for s, r, p, sp in zip(*(rows[c].to_pylist() for c in rows.column_names))
            if (s, r) in wanted}


def _replace(load, replace: Replace, data_files: list, properties: dict[str, str]) -> Table:
    """One transaction: delete the replaced rows and add `data_files`; retried on a lost race."""
    delete = replace_filter(replace)

    def attempt() -> Table:
        table = load()
        with table.transaction() as tx:
            if delete is not None and table.current_snapshot() is not None:
                tx.delete(delete, snapshot_properties=properties)
            if data_files:
                with tx.update_snapshot(snapshot_properties=properties).fast_append() as append:
                    for data_file in data_files:
                        append.append_data_file(data_file)
        return table
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Delete operation did not match any records")
        return _retry(attempt, f"commit {sorted(replace)}")


@dataclass
class Run:
    """One ingest run: its id (the uuid in its files' names) and where its marker lies."""

    dataset: Dataset
    id: uuid.UUID = field(default_factory=uuid.uuid4)
    committed: bool = False

    @property
    def marker(self) -> str:
        return f"_runs/{self.id}.json"

    @property
    def pending(self) -> str:
        return f"_pending/{self.id}.parquet"


def begin_run(dataset: Dataset) -> Run:
    """Register a run (so that a concurrent run leaves its files alone), after recovering killed ones."""
    recover(dataset)
    run = Run(dataset)
    fs, marker = dataset.path(run.marker)
    fs.makedirs(marker.rsplit("/", 1)[0], exist_ok=True)
    fs.pipe(marker, json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}).encode())
    return run


def end_run(run: Run) -> None:
    """Unregister a run; a run that did not commit removes the data files it wrote."""
    if not run.committed:
        _remove_files_of(run.dataset, {str(run.id)})
    fs, marker = run.dataset.path(run.marker)
    fs.rm(marker) if fs.exists(marker) else None


def commit_run(run: Run, replace: Replace, data_files: list, manifest_rows: pa.Table) -> Table:
    """Commit one run: its windows (one atomic snapshot), then its manifest rows. Returns the windows table."""
    dataset = run.dataset
    fs, pending = dataset.path(run.pending)
    fs.makedirs(pending.rsplit("/", 1)[0], exist_ok=True)
    schema = _manifest_arrow_schema()
    for f in schema:  # optional statistics a caller (tests, imports) may leave out
        if f.name not in manifest_rows.column_names and f.nullable:
            manifest_rows = manifest_rows.append_column(f.name, pa.nulls(len(manifest_rows), f.type))
    rows = manifest_rows.select(schema.names).cast(schema)
    with fs.open(pending, "wb") as f:
        pq.write_table(rows.replace_schema_metadata({REPLACE_KEY: json.dumps(replace)}), f)
    properties = {RUN_KEY: str(run.id), SOURCES_KEY: json.dumps(sorted(replace))}
    windows = _replace(dataset.windows, replace, data_files, properties)  # the commit point
    run.committed = True
    _apply_pending(dataset, run.id, replace, rows)
    return windows


def _apply_pending(dataset: Dataset, run_id: uuid.UUID, replace: Replace, rows: pa.Table) -> None:
    """Replace the run's manifest rows; then drop its pending file."""
    manifest = dataset.manifest()
    files = write_data_files(manifest.metadata, manifest.io, rows, run_id, 0)
    _replace(dataset.manifest, replace, files, {RUN_KEY: str(run_id), SOURCES_KEY: json.dumps(sorted(replace))})
    fs, pending = dataset.path(f"_pending/{run_id}.parquet")
    if fs.exists(pending):
        fs.rm(pending)


def write_windows(uri: str, windows: pa.Table, window_samples: int, dtype: str = "float16",
                  catalog: CatalogConfig | None = None, storage_options: dict | None = None) -> str:
    """Commit ready-made window rows (tests, benchmarks, imports from elsewhere) as their sources' new
    content, with an `ok` manifest row per record. Returns the dataset version."""
    dataset = open_for_ingest(uri, catalog, storage_options)
    table, _ = ensure_tables(dataset, window_samples, dtype, 1024)
    sources = sorted(set(windows["source"].to_pylist()))
    counts = windows.group_by(["source", "record_id"]).aggregate([("window_index", "count")])
    rows = pa.table({
        "source": counts["source"], "record_id": counts["record_id"],
        "status": pa.array(["ok"] * len(counts), pa.string()), "reason": pa.nulls(len(counts), pa.string()),
        "detail": pa.nulls(len(counts), pa.string()), "n_windows": counts["window_index_count"].cast(pa.int32()),
        "content_hash": pa.nulls(len(counts), pa.string()), "fingerprint": pa.nulls(len(counts), pa.string()),
        "flags": pa.nulls(len(counts), pa.string()), "config_hash": pa.nulls(len(counts), pa.string()),
    })

    if UNITS_COLUMN not in windows.column_names:  # rows from before the column, or an import without it: mV
        windows = windows.append_column(UNITS_COLUMN, pa.array(["mV"] * len(windows), pa.string()))
    else:
        windows = windows.set_column(windows.schema.get_field_index(UNITS_COLUMN), UNITS_COLUMN,
                                     pc.fill_null(windows[UNITS_COLUMN].cast(pa.string()), "mV"))
    run = begin_run(dataset)
    try:
        files = write_data_files(table.metadata, table.io, windows, run.id, 0)
        committed = commit_run(run, {source: None for source in sources}, files, rows)
    finally:
        end_run(run)
    return str(committed.current_snapshot().snapshot_id)


def drop_source(dataset: Dataset, source: str) -> int:
    """Remove one source's windows and manifest rows (two commits, windows first). Returns its records."""
    manifest = dataset.manifest()
    records = _manifest_of(dataset, manifest).filter(pc.equal(pc.field("source"), source)).num_rows
    properties = {RUN_KEY: f"drop-{uuid.uuid4()}", SOURCES_KEY: json.dumps([source])}
    _replace(dataset.windows, {source: None}, [], properties)
    _replace(dataset.manifest, {source: None}, [], properties)
    return records


# ----------------------------------------------------------------------------------------- recovery

def _run_alive(info: dict) -> bool:
    if info.get("host") == socket.gethostname():
        try:
            os.kill(int(info["pid"]), 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return time.time() - float(info.get("started", 0)) < FOREIGN_RUN_TIMEOUT_S


def _committed_runs(table: Table) -> dict[str, list[str]]:
    """run id -> sources, of every snapshot of a table (newest first)."""
    runs: dict[str, list[str]] = {}
    for snapshot in sorted(table.metadata.snapshots, key=lambda s: s.sequence_number, reverse=True):
        summary = snapshot.summary
        run_id = summary.get(RUN_KEY) if summary else None
        if run_id and run_id not in runs:
            runs[run_id] = json.loads(summary.get(SOURCES_KEY, "[]"))
    return runs


def recover(dataset: Dataset) -> list[str]:
    """Finish or undo the runs that were killed: roll a committed one's manifest forward, remove the data
    files of one that never committed. Live (concurrent) runs are left alone. Returns what it did."""
    windows, manifest = dataset.table(WINDOWS), dataset.table(MANIFEST)
    fs, runs_dir = dataset.path("_runs")
    markers = fs.glob(f"{runs_dir}/*.json") if fs.exists(runs_dir) else []
    dead = []
    for marker in markers:
        try:
            info = json.loads(fs.cat_file(marker))
        except (OSError, ValueError):
            info = {}
        if not _run_alive(info):
            dead.append(marker.rsplit("/", 1)[-1][:-len(".json")])
    if not dead:
        return []
    done = []
    windows_runs = _committed_runs(windows) if windows is not None else {}
    manifest_runs = _committed_runs(manifest) if manifest is not None else {}
    # Sources rewritten since (by a later run): a killed run's manifest rows for them are stale.
    order = list(windows_runs)
    for run_id in dead:
        _, pending = dataset.path(f"_pending/{run_id}.parquet")
        if run_id in windows_runs and run_id not in manifest_runs and fs.exists(pending):
            newer = {s for r in order[:order.index(run_id)] for s in windows_runs[r]}
            sources = [s for s in windows_runs[run_id] if s not in newer]
            with fs.open(pending, "rb") as f:
                rows = pq.read_table(f)
            replace = json.loads((rows.schema.metadata or {}).get(REPLACE_KEY, b"{}"))
            replace = {s: r for s, r in replace.items() if s in sources}
            rows = rows.filter(pc.is_in(rows["source"], pa.array(sources, rows.schema.field("source").type)))
            if replace:
                _apply_pending(dataset, uuid.UUID(run_id), replace, rows.replace_schema_metadata(None))
            done.append(f"rolled forward run {run_id} ({', '.join(sources) or 'superseded'})")
        elif run_id not in windows_runs:
            removed = _remove_files_of(dataset, {run_id})
            done.append(f"removed {removed} data files of killed run {run_id}")
        if fs.exists(pending):
            fs.rm(pending)
        _, marker = dataset.path(f"_runs/{run_id}.json")
        if fs.exists(marker):
            fs.rm(marker)
    return done


def _referenced(table: Table) -> set[str]:
    """Every data file any snapshot of the table refers to (old snapshots stay readable)."""
    paths = set()
    for snapshot in table.metadata.snapshots:
        for manifest_file in snapshot.manifests(table.io):
            for entry in manifest_file.fetch_manifest_entry(table.io, discard_deleted=False):
                paths.add(_strip_scheme(entry.data_file.file_path))
    return paths


def _remove_files_of(dataset: Dataset, run_ids: set[str]) -> int:
    """Delete the data files written by `run_ids` that no snapshot refers to. Returns how many."""
    removed = 0
    for name in (WINDOWS, MANIFEST):
        table = dataset.table(name)
        if table is None:
            continue
        fs, data_root = url_to_fs(f"{table.location().rstrip('/')}/data", **dataset.storage_options)
        if not fs.exists(data_root):
            continue
        candidates = [p for p in fs.find(data_root) if (m := _RUN_FILE.search(p)) and m.group(1) in run_ids]
        if not candidates:
            continue
        referenced = _referenced(table)
        for path in candidates:
            if _strip_scheme(path) not in referenced:
                fs.rm(path)
                removed += 1
    return removed
