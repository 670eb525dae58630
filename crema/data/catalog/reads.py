"""Versions and reads: the dataset version, the windows and the manifest as Arrow tables or datasets."""

from __future__ import annotations


import pyarrow as pa
import pyarrow.dataset as pads
from fsspec.core import url_to_fs
from pyiceberg.expressions import AlwaysTrue, BooleanExpression
from pyiceberg.table import Table

from crema.data.schema import MANIFEST_SCHEMA, _contract_type, with_signal_dtype
from crema.data.catalog.tables import DTYPE_KEY, Dataset, MANIFEST, WINDOW_SAMPLES_KEY, open_dataset
from crema.data.catalog.errors import DatasetNotFound


# ------------------------------------------------------------------------------------------ version

def dataset_version(uri: str, storage_options: dict | None = None) -> str | None:
    """The dataset version: the `windows` table's current snapshot id (None for an empty table)."""
    snapshot = open_dataset(uri, storage_options).windows().current_snapshot()
    return str(snapshot.snapshot_id) if snapshot else None


def _snapshot_id(table: Table, version: str | int | None) -> int | None:
    if version is not None:
        return int(version)
    snapshot = table.current_snapshot()
    return snapshot.snapshot_id if snapshot else None


# ------------------------------------------------------------------------------------------ reading

def window_samples(table: Table) -> int:
    return int(table.properties[WINDOW_SAMPLES_KEY])


def signal_dtype(table: Table) -> str:
    return table.properties.get(DTYPE_KEY, "float16")


def _data_files(table: Table, row_filter: BooleanExpression, snapshot_id: int | None) -> list[str]:
    """The data files of a snapshot that may hold rows matching `row_filter` (partition pruning).

    Rows are deleted by dropping whole files (a source's partitions) or by pyiceberg's copy-on-write
    rewrite of the files holding them (a re-ingest of some records), never with delete files, so a
    snapshot's data files hold exactly its rows: reading them is reading the snapshot.
    """
    if snapshot_id is None:
        return []
    tasks = list(table.scan(row_filter=row_filter, snapshot_id=snapshot_id).plan_files())
    if any(t.delete_files for t in tasks):
        raise RuntimeError(f"{table.name()} has row-level delete files: read it with table.scan().to_arrow()")
    return [t.file.file_path for t in tasks]


def _pyarrow_dataset(dataset: Dataset, table: Table, row_filter: BooleanExpression,
                     snapshot_id: int | None, schema: pa.Schema) -> pads.Dataset:
    files = _data_files(table, row_filter, snapshot_id)
    if not files:
        return pads.dataset(pa.Table.from_batches([], schema=schema))
    fs, _ = url_to_fs(files[0], **dataset.storage_options)
    paths = [url_to_fs(f, **dataset.storage_options)[1] if "://" in f else f for f in files]
    return pads.dataset(paths, filesystem=fs, format="parquet", schema=schema)  # read as the contract's types


def windows_arrow_schema(table: Table) -> pa.Schema:
    """The windows' Arrow schema with CREMA's metadata (window length, signal dtype) attached."""
    schema = table.schema().as_arrow()
    schema = pa.schema([f.with_type(_contract_type(f.type)) for f in schema])  # string, not large_string
    schema = with_signal_dtype(schema, signal_dtype(table))
    return schema.with_metadata({"crema.window_samples": str(window_samples(table)),
                                 "crema.leads": "I,II,III,aVR,aVL,aVF,V1-V6"})


def windows_dataset(uri: str, storage_options: dict | None = None, version: str | int | None = None,
                    row_filter: BooleanExpression = AlwaysTrue()) -> pads.Dataset:
    """The windows of one dataset version as a pyarrow Dataset (counts, heads and small reads in a driver)."""
    dataset = open_dataset(uri, storage_options)
    table = dataset.windows()
    return _pyarrow_dataset(dataset, table, row_filter, _snapshot_id(table, version), windows_arrow_schema(table))


def read_windows(uri: str, columns: list[str] | None = None, filter=None, storage_options: dict | None = None,
                 version: str | int | None = None) -> pa.Table:
    """The windows as one table (tests, notebooks, small data; training streams them with Ray).

    `filter` is a pyarrow expression (``pc.field("split") == "train"``) or a pyiceberg one; a pyiceberg
    expression also prunes partitions before any file is opened.
    """
    row_filter = filter if isinstance(filter, BooleanExpression) else AlwaysTrue()
    data = windows_dataset(uri, storage_options, version, row_filter)
    return data.to_table(columns=columns, filter=None if isinstance(filter, BooleanExpression) else filter)


def read_manifest(uri: str, storage_options: dict | None = None) -> pa.Table | None:
    """The committed manifest (one row per discovered record), or None where there is no dataset yet."""
    try:
        dataset = open_dataset(uri, storage_options)
    except DatasetNotFound:
        return None
    table = dataset.table(MANIFEST)
    if table is None:
        return None
    return _manifest_of(dataset, table)


def committed_manifest(dataset: Dataset) -> pa.Table | None:
    """The manifest table's current rows (None before the first commit)."""
    table = dataset.table(MANIFEST)
    if table is None or table.current_snapshot() is None:
        return None
    return _manifest_of(dataset, table)


def _manifest_of(dataset: Dataset, table: Table) -> pa.Table:
    schema = pa.schema([f.with_type(_contract_type(f.type)) for f in table.schema().as_arrow()])
    data = _pyarrow_dataset(dataset, table, AlwaysTrue(), _snapshot_id(table, None), schema).to_table()
    schema = _manifest_arrow_schema()
    return data.select(schema.names).cast(schema).sort_by([("source", "ascending"), ("record_id", "ascending")])


def _manifest_arrow_schema() -> pa.Schema:
    return MANIFEST_SCHEMA.append(pa.field("config_hash", pa.string()))


def dataset_sources(uri: str, storage_options: dict | None = None) -> list[str]:
    """The sources in the dataset's manifest."""
    manifest = read_manifest(uri, storage_options)
    return [] if manifest is None else sorted(set(manifest["source"].to_pylist()))
