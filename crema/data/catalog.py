"""The dataset as two Apache Iceberg tables, `windows` and `manifest`, in one catalog (pyiceberg).

A dataset is addressed by one URI, the ingest OUTPUT (a local folder or ``s3://bucket/prefix``)::

    OUTPUT/catalog.db              the embedded default catalog (pyiceberg SqlCatalog on SQLite)
    OUTPUT/warehouse/<ns>/windows  the windows table: one row per window, partitioned by source and split
    OUTPUT/warehouse/<ns>/manifest the manifest table: one row per discovered record, partitioned by source
    OUTPUT/catalog.json            only for another catalog (REST, Glue, SQL elsewhere): its settings, no secrets
    OUTPUT/_runs/<run>.json        a running (or killed) ingest; OUTPUT/_pending/<run>.parquet its manifest rows

**Commits.** An ingest writes its windows' data files from Ray tasks (nothing a reader sees), then commits
them to the `windows` table in *one* Iceberg transaction that deletes the rewritten sources' rows and
adds the new files: readers see the previous snapshot or the new one, never a mix. That snapshot is the
commit point. The manifest rows of the run are written first to ``_pending/<run>.parquet`` and applied to
the `manifest` table right after; a run killed between the two commits is rolled forward by the next
ingest (its pending rows applied), one killed earlier is rolled back (its data files, never referenced
by any snapshot, are deleted: orphan-file cleanup). A commit that loses an optimistic-concurrency race
(another ingest committed first) is retried against the new snapshot: ingests of different sources
into one dataset all land. Only ``drop_source`` removes a source.

**Version.** The `windows` table's current snapshot id is the dataset version (:func:`dataset_version`),
which pretraining and evaluation log to MLflow; any Iceberg engine (DuckDB, Spark, Trino) reads the same
tables, and an older version stays readable by its snapshot id. Pretraining, embedding and fine-tuning
resolve it once at their start and pass it to every read (``version=``) and to the tags they log, so an
ingest committing meanwhile changes nothing they read.

**Units.** `units` (optional, added by schema evolution to a table made before it: null there, meaning mV)
is "mV", or "normalized" for a source declaring normalised amplitudes.

**Signal column.** `signal` is Iceberg ``fixed[L]`` (pyarrow ``fixed_size_binary``): no repetition levels,
written and read as one buffer. Its dtype travels in the field's doc (``crema.dtype=float16``), which
pyiceberg and Ray hand on as the Arrow field's ``doc`` metadata (:func:`crema.data.schema.decode_signals`).
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import random
import re
import socket
import time
import uuid
from dataclasses import dataclass, field
from functools import cached_property, reduce
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
from fsspec.core import url_to_fs
from pyiceberg.catalog import Catalog, load_catalog
from pyiceberg.exceptions import CommitFailedException, NoSuchTableError, ValidationException
from pyiceberg.expressions import AlwaysTrue, And, BooleanExpression, EqualTo, In, Or
from pyiceberg.io.pyarrow import _dataframe_to_data_files
from pyiceberg.partitioning import PartitionField, PartitionSpec
from pyiceberg.schema import Schema
from pyiceberg.table import Table
from pyiceberg.transforms import IdentityTransform
from pyiceberg.types import (BooleanType, FixedType, FloatType, IntegerType, ListType, LongType, NestedField,
                             StringType)

from crema.config import CatalogConfig, ConfigError
from crema.data.schema import MANIFEST_SCHEMA, SIGNAL_DTYPE_KEY, _contract_type, with_signal_dtype
from crema.data.signals import N_LEADS

WINDOWS, MANIFEST = "windows", "manifest"
POINTER = "catalog.json"
EMBEDDED_DB = "catalog.db"
CATALOG_NAME = "crema"
RUN_KEY = "crema.run"
SOURCES_KEY = "crema.sources"
REPLACE_KEY = b"crema.replace"
WINDOW_SAMPLES_KEY = "crema.window_samples"
DTYPE_KEY = "crema.dtype"
COMMIT_ATTEMPTS = 20
# A killed run on another host cannot be asked whether it lives: its files are taken for orphans after this.
FOREIGN_RUN_TIMEOUT_S = 24 * 3600
_SECRET = re.compile(r"secret|token|credential|password|access-key|session", re.I)
_RUN_FILE = re.compile(r"-([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})\.parquet$")


class DiskFull(OSError):
    """No space left where the dataset is written."""


class DatasetNotFound(ConfigError):
    """The URI holds no CREMA dataset (no catalog, or no tables in it)."""


# ------------------------------------------------------------------------------------------ schemas

UNITS_COLUMN = "units"
UNITS_DOC = "mV, or normalized (a source declaring normalised amplitudes); null: written before the column existed, mV"


def windows_iceberg_schema(window_samples: int, dtype: str) -> Schema:
    """The `windows` table: field ids fixed here, so every writer and engine agrees on them."""
    itemsize = 2 if dtype == "float16" else 4
    return Schema(
        NestedField(1, "source", StringType(), required=True),
        NestedField(2, "record_id", StringType(), required=True),
        NestedField(3, "patient_key", StringType(), required=True),
        NestedField(4, "window_index", IntegerType(), required=True),
        NestedField(5, "window_start", LongType(), required=True, doc="first sample, at fs"),
        NestedField(6, "fs", IntegerType(), required=True),
        NestedField(7, "valid_samples", IntegerType(), required=True),
        NestedField(8, "signal", FixedType(N_LEADS * window_samples * itemsize), required=True,
                    doc=f"{SIGNAL_DTYPE_KEY.decode()}={dtype}; 12 x {window_samples} little-endian, lead by lead, "
                        "leads I,II,III,aVR,aVL,aVF,V1-V6"),
        NestedField(9, "lead_mask", ListType(13, BooleanType(), element_required=True), required=True),
        NestedField(10, "derived_mask", ListType(14, BooleanType(), element_required=True), required=True),
        NestedField(11, "labels", ListType(15, StringType(), element_required=True), required=True),
        NestedField(12, "split", StringType(), required=True),
        NestedField(16, "lead_quality", ListType(17, StringType(), element_required=True), required=True,
                    doc="per lead: ok / derived / missing / flat / saturated / duplicate"),
        NestedField(18, UNITS_COLUMN, StringType(), required=False, doc=UNITS_DOC),
    )


WINDOWS_SPEC = PartitionSpec(PartitionField(1, 1000, IdentityTransform(), "source"),
                             PartitionField(12, 1001, IdentityTransform(), "split"))

MANIFEST_ICEBERG_SCHEMA = Schema(
    NestedField(1, "source", StringType(), required=True),
    NestedField(2, "record_id", StringType(), required=True),
    NestedField(3, "status", StringType(), required=True),
    NestedField(4, "reason", StringType(), required=False),
    NestedField(5, "detail", StringType(), required=False),
    NestedField(6, "n_windows", IntegerType(), required=True),
    NestedField(7, "content_hash", StringType(), required=False),
    NestedField(8, "config_hash", StringType(), required=False, doc="the source settings its windows depend on"),
    NestedField(9, "fingerprint", StringType(), required=False,
                doc="header + signal bytes + label row + settings: a change re-ingests the record"),
    NestedField(10, "flags", StringType(), required=False, doc="record-level notes, e.g. normalised_amplitude"),
    NestedField(11, "source_fs", FloatType(), required=False, doc="the file's sampling rate, Hz"),
    NestedField(12, "duration_s", FloatType(), required=False),
    NestedField(13, "lead_quality", ListType(16, StringType(), element_required=False), required=False),
    NestedField(14, "lead_amplitude_mv", ListType(17, FloatType(), element_required=False), required=False,
                doc="per lead: 1st-99th percentile range"),
    NestedField(15, "lead_noise_mv", ListType(18, FloatType(), element_required=False), required=False,
                doc="per lead: std of the sample-to-sample difference / sqrt 2"),
)
MANIFEST_SPEC = PartitionSpec(PartitionField(1, 1000, IdentityTransform(), "source"))


# ------------------------------------------------------------------------------------------ catalog

def _strip_scheme(path: str) -> str:
    return path.split("://", 1)[-1].lstrip("/")


def _is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def _local_path(uri: str) -> Path:
    return Path(uri[len("file://"):] if uri.startswith("file://") else uri).resolve()


def fileio_properties(storage_options: dict | None) -> dict[str, str]:
    """pyiceberg FileIO properties from fsspec storage options (an S3-compatible endpoint, keys, region)."""
    options = storage_options or {}
    client = options.get("client_kwargs", {}) or {}
    props = {}
    endpoint = client.get("endpoint_url") or options.get("endpoint_url")
    if endpoint:
        props["s3.endpoint"] = endpoint
    if options.get("key"):
        props["s3.access-key-id"] = options["key"]
    if options.get("secret"):
        props["s3.secret-access-key"] = options["secret"]
    if options.get("token"):
        props["s3.session-token"] = options["token"]
    region = client.get("region_name") or options.get("region_name")
    if region:
        props["s3.region"] = region
    return props


@dataclass
class Dataset:
    """One dataset: its URI, the catalog holding its tables, and how to reach its files."""

    uri: str
    properties: dict  # pyiceberg catalog properties, FileIO settings included
    namespace: str = "crema"
    storage_options: dict = field(default_factory=dict)

    @cached_property
    def catalog(self) -> Catalog:
        # A SQL catalog creates its own tables on first load: two processes opening a new catalog at once
        # race there too (the loser's "table iceberg_tables already exists"), and the retry finds them made.
        return _retry(lambda: load_catalog(CATALOG_NAME, **self.properties), "open the catalog")

    def identifier(self, table: str) -> str:
        return f"{self.namespace}.{table}"

    def table(self, name: str) -> Table | None:
        try:
            return self.catalog.load_table(self.identifier(name))
        except NoSuchTableError:
            return None

    def windows(self) -> Table:
        table = self.table(WINDOWS)
        if table is None:
            raise DatasetNotFound(f"no CREMA dataset at {self.uri} (no {self.identifier(WINDOWS)} table)")
        return table

    def manifest(self) -> Table:
        table = self.table(MANIFEST)
        if table is None:
            raise DatasetNotFound(f"no CREMA dataset at {self.uri} (no {self.identifier(MANIFEST)} table)")
        return table

    def ray_catalog_kwargs(self) -> dict:
        """`catalog_kwargs` for ray.data.read_iceberg."""
        return {"name": CATALOG_NAME, **self.properties}

    def path(self, relative: str) -> tuple[object, str]:
        """(fsspec filesystem, path) of a file beside the tables (run markers, pending manifests)."""
        fs, root = url_to_fs(self.uri, **self.storage_options)
        return fs, f"{root.rstrip('/')}/{relative}"


def _embedded_properties(uri: str) -> dict:
    root = _local_path(uri)
    return {"type": "sql", "uri": f"sqlite:///{root / EMBEDDED_DB}", "warehouse": (root / "warehouse").as_uri()}


def _configured_properties(uri: str, catalog: CatalogConfig) -> dict:
    props = {"type": catalog.type, **catalog.properties}
    if catalog.uri:
        props["uri"] = catalog.uri
    warehouse = catalog.warehouse or f"{uri.rstrip('/')}/warehouse"
    props["warehouse"] = warehouse if "://" in warehouse else Path(warehouse).resolve().as_uri()
    return props


def open_for_ingest(uri: str, catalog: CatalogConfig | None, storage_options: dict | None = None) -> Dataset:
    """The dataset an ingest writes: the configured catalog, or the embedded one in a local OUTPUT."""
    options = dict(storage_options or {})
    if catalog is None:
        if _is_remote(uri):
            raise ConfigError(f"the output {uri} is remote: the embedded SQLite catalog needs a local folder. "
                              "Set `catalog:` in the ingest config (a REST, Glue or SQL catalog and an s3:// warehouse)")
        root = _local_path(uri)
        root.mkdir(parents=True, exist_ok=True)
        return Dataset(uri, _embedded_properties(uri), storage_options=options)
    props = {**_configured_properties(uri, catalog), **fileio_properties(options)}
    dataset = Dataset(uri, props, catalog.namespace, options)
    fs, pointer = dataset.path(POINTER)
    fs.makedirs(pointer.rsplit("/", 1)[0], exist_ok=True)
    public = {k: v for k, v in _configured_properties(uri, catalog).items() if not _SECRET.search(k)}
    fs.pipe(pointer, json.dumps({"namespace": catalog.namespace, "properties": public}, indent=1).encode())
    return dataset


def open_dataset(uri: str, storage_options: dict | None = None) -> Dataset:
    """The dataset at `uri` for reading: found through OUTPUT/catalog.json, or the embedded catalog."""
    options = dict(storage_options or {})
    fs, root = url_to_fs(uri, **options)
    pointer = f"{root.rstrip('/')}/{POINTER}"
    if fs.exists(pointer):
        spec = json.loads(fs.cat_file(pointer))
        return Dataset(uri, {**spec["properties"], **fileio_properties(options)}, spec.get("namespace", "crema"),
                       options)
    if _is_remote(uri) or not (_local_path(uri) / EMBEDDED_DB).exists():
        raise DatasetNotFound(f"no CREMA dataset at {uri}: neither {POINTER} nor {EMBEDDED_DB} there "
                              "(run `crema ingest ... --output` first)")
    return Dataset(uri, _embedded_properties(uri), storage_options=options)


# float16 ECG samples barely compress: on 1,000 PTB-XL windows zstd saved 9 % of the bytes at half snappy's
# write speed (650 vs 1,373 MB/s) and a third of its read speed (1,219 vs 3,881 MB/s); snappy is within
# noise of no compression in size and still packs the string columns.
SIGNAL_CODEC = "snappy"


def ensure_tables(dataset: Dataset, window_samples: int, dtype: str, row_group_rows: int) -> tuple[Table, Table]:
    """Create the two tables if new; refuse a window length or dtype other than the dataset's (a ConfigError)."""
    catalog = dataset.catalog
    _retry(lambda: catalog.create_namespace_if_not_exists(dataset.namespace), "create the namespace")
    windows = dataset.table(WINDOWS)
    if windows is None:
        windows = _retry(lambda: catalog.create_table_if_not_exists(
            dataset.identifier(WINDOWS), windows_iceberg_schema(window_samples, dtype), partition_spec=WINDOWS_SPEC,
            properties={WINDOW_SAMPLES_KEY: str(window_samples), DTYPE_KEY: dtype,
                        "write.parquet.row-group-limit": str(row_group_rows),
                        "write.parquet.compression-codec": SIGNAL_CODEC,
                        "commit.retry.num-retries": "10"}), "create the windows table")
    if UNITS_COLUMN not in windows.schema().column_names:
        windows = _add_units_column(dataset)
    stored = (int(windows.properties.get(WINDOW_SAMPLES_KEY, window_samples)), windows.properties.get(DTYPE_KEY, dtype))
    if stored != (window_samples, dtype):
        raise ConfigError(f"the dataset {dataset.uri} holds windows of {stored[0]} samples as {stored[1]}; these "
                          f"settings make {window_samples} samples as {dtype}. One dataset has one window length "
                          "and dtype: write to a new output, or change target_fs / window_s / dtype")
    manifest = dataset.table(MANIFEST)
    if manifest is None:
        manifest = _retry(lambda: catalog.create_table_if_not_exists(
            dataset.identifier(MANIFEST), MANIFEST_ICEBERG_SCHEMA, partition_spec=MANIFEST_SPEC,
            properties={"commit.retry.num-retries": "10"}), "create the manifest table")
    return windows, manifest


def _add_units_column(dataset: Dataset) -> Table:
    """Schema evolution of a windows table made before the `units` column: add it (optional, so the
    existing files need no rewrite: readers see null there, which means mV). No new snapshot: the dataset
    version stays. Returns the table as it now is."""
    def evolve() -> Table:
        table = dataset.windows()
        if UNITS_COLUMN not in table.schema().column_names:
            with table.update_schema() as update:
                update.add_column(UNITS_COLUMN, StringType(), doc=UNITS_DOC)
        return dataset.windows()
    return _retry(evolve, "add the units column to the windows table")


def _retry(action, what: str, attempts: int = COMMIT_ATTEMPTS):
    """Run a catalog action, retrying lost optimistic-concurrency races and a busy SQLite database. Two
    processes that both find a namespace or table missing race to insert it: the loser's UNIQUE constraint
    error (or, for the catalog's own tables, "already exists") is a lost race too, and its retry finds the
    winner's row."""
    for attempt in range(attempts):
        try:
            return action()
        except (CommitFailedException, ValidationException) as err:
            last = err
        except Exception as err:  # sqlalchemy's OperationalError ("database is locked") and IntegrityError
            if not any(sign in str(err).lower() for sign in ("locked", "busy", "unique constraint", "already exists")):
                raise
            last = err
        time.sleep(min(2.0, 0.05 * 2 ** attempt) * (1 + random.random()))
    raise RuntimeError(f"could not {what} after {attempts} attempts: {last}") from last


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


def is_disk_full(err: BaseException) -> bool:
    """Whether an error (or what caused it, also inside a Ray task error) is a full disk."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(err) or "ENOSPC" in str(err):
            return True
        err = err.__cause__ or err.__context__
    return False
