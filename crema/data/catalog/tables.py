"""The two tables' schemas and names, and opening a dataset's catalog (embedded SQLite or a configured one)."""

from __future__ import annotations

import json
import random
import re
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from fsspec.core import url_to_fs
from pyiceberg.catalog import Catalog, load_catalog
from pyiceberg.exceptions import CommitFailedException, NoSuchTableError, ValidationException
from pyiceberg.partitioning import PartitionField, PartitionSpec
from pyiceberg.schema import Schema
from pyiceberg.table import Table
from pyiceberg.transforms import IdentityTransform
from pyiceberg.types import (BooleanType, FixedType, FloatType, IntegerType, ListType, LongType, NestedField,
                             StringType)

from crema.config import CatalogConfig, ConfigError
from crema.data.schema import SIGNAL_DTYPE_KEY
from crema.data.signals import N_LEADS

from crema.data.catalog.errors import DatasetNotFound

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
