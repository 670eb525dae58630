"""The canonical windows dataset: its columns, and how to read it back.

The dataset is two Apache Iceberg tables, `windows` (one row per window) and `manifest` (one row per
input record), in one catalog: :mod:`crema.data.catalog` holds the tables, their commits and versions.
This module holds the Arrow side: the window row's columns and the decoding of the signal column.
"""

from __future__ import annotations

import re

import numpy as np
import pyarrow as pa

from crema.data.signals import N_LEADS

SPLITS = ("train", "val", "test")
RECORD_STATUSES = ("ok", "rejected", "duplicate")


SIGNAL_DTYPE_KEY = b"crema.dtype"


def window_schema(window_samples: int, dtype: str = "float16") -> pa.Schema:
    """One row per window.

    `signal` holds the 12 x L matrix, lead by lead, as little-endian float16/float32 bytes in one
    fixed-size binary value (its dtype is in the field metadata). A list<float16> column would store
    a repetition level per sample: measured 7x slower to write and 2.5x slower to read.
    """
    itemsize = np.dtype(dtype).itemsize
    return pa.schema([
        pa.field("source", pa.string(), nullable=False),
        pa.field("record_id", pa.string(), nullable=False),
        pa.field("patient_key", pa.string(), nullable=False),
        pa.field("window_index", pa.int32(), nullable=False),
        pa.field("window_start", pa.int64(), nullable=False),  # first sample, at `fs`
        pa.field("fs", pa.int32(), nullable=False),
        pa.field("valid_samples", pa.int32(), nullable=False),  # < L only for a padded short record
        pa.field("signal", pa.binary(N_LEADS * window_samples * itemsize), nullable=False,
                 metadata={SIGNAL_DTYPE_KEY: dtype.encode()}),
        pa.field("lead_mask", pa.list_(pa.bool_(), N_LEADS), nullable=False),
        pa.field("derived_mask", pa.list_(pa.bool_(), N_LEADS), nullable=False),
        pa.field("labels", pa.list_(pa.string()), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        # per lead: ok / derived / missing / flat / saturated / duplicate (only ok and derived are in lead_mask)
        pa.field("lead_quality", pa.list_(pa.string(), N_LEADS), nullable=False),
        # "mV", or "normalized" for a source declaring `units: normalized` (amplitudes z-scored, not mV);
        # null in rows written before the column existed (they are mV).
        pa.field("units", pa.string()),
    ], metadata={"crema.window_samples": str(window_samples), "crema.leads": "I,II,III,aVR,aVL,aVF,V1-V6"})


def with_signal_dtype(schema: pa.Schema, dtype: str, column: str = "signal") -> pa.Schema:
    """`schema` with the signal column's dtype in its field metadata (what :func:`decode_signals` reads)."""
    index = schema.get_field_index(column)
    if index < 0:
        return schema
    field = schema.field(index)
    return schema.set(index, field.with_metadata({**(field.metadata or {}), SIGNAL_DTYPE_KEY: dtype.encode()}))


def _contract_type(t: pa.DataType) -> pa.DataType:
    if pa.types.is_large_string(t):
        return pa.string()
    if pa.types.is_large_binary(t):
        return pa.binary()
    if pa.types.is_large_list(t) or pa.types.is_list(t):
        return pa.list_(t.value_field.with_type(_contract_type(t.value_type)))
    return t


def to_contract_types(batch: pa.Table) -> pa.Table:
    """A batch read through Iceberg (pyiceberg and Ray hand on large_string / large_list) with the
    dataset's own Arrow types (string, list), field metadata kept: what the rest of crema expects."""
    schema = pa.schema([f.with_type(_contract_type(f.type)) for f in batch.schema], metadata=batch.schema.metadata)
    return batch if schema.equals(batch.schema) else batch.cast(schema)


MANIFEST_SCHEMA = pa.schema([
    pa.field("source", pa.string(), nullable=False),
    pa.field("record_id", pa.string(), nullable=False),
    pa.field("status", pa.string(), nullable=False),
    pa.field("reason", pa.string()),
    pa.field("detail", pa.string()),
    pa.field("n_windows", pa.int32(), nullable=False),
    pa.field("content_hash", pa.string()),  # the canonical signal's hash (valid records): duplicates
    pa.field("fingerprint", pa.string()),  # header + signal bytes + label row + settings: changes re-ingest
    pa.field("flags", pa.string()),  # record-level notes, comma-separated: normalised_amplitude
    # Data-quality statistics of a valid record (null otherwise), for the per-source report.
    pa.field("source_fs", pa.float32()),  # the file's sampling rate, Hz
    pa.field("duration_s", pa.float32()),
    pa.field("lead_quality", pa.list_(pa.string())),  # per lead: ok / derived / missing / flat / saturated / duplicate
    pa.field("lead_amplitude_mv", pa.list_(pa.float32())),  # per lead: 1st-99th percentile range
    pa.field("lead_noise_mv", pa.list_(pa.float32())),  # per lead: high-frequency noise (std of the sample diff / √2)
])


# A valid record whose canonical signal equals an earlier one's: its manifest `detail` names the twin as
# "same signal as <source>/<record_id>" (status `duplicate`, or `ok` when copies are kept). A kept copy's
# patient is joined to its twin's: those records' detail says "patient key and split joined with <twin>".
DUPLICATE_DETAIL = "same signal as "
JOINED_DETAIL = "patient key and split joined with "


def twin_of(detail: str | None) -> str | None:
    """The `<source>/<record_id>` a duplicate's manifest detail names, or None for a record that is no copy."""
    if not detail or not detail.startswith(DUPLICATE_DETAIL):
        return None
    return detail[len(DUPLICATE_DETAIL):].split(";", 1)[0].strip()


def signal_dtype_of(field: pa.Field) -> str:
    """The dtype of a signal column: its `crema.dtype` metadata, or the Iceberg field doc
    (``crema.dtype=float16; ...``) that pyiceberg and Ray hand on as the Arrow field's `doc` metadata."""
    metadata = field.metadata or {}
    if SIGNAL_DTYPE_KEY in metadata:
        return metadata[SIGNAL_DTYPE_KEY].decode()
    found = re.search(rb"crema\.dtype=(float16|float32)", metadata.get(b"doc", b""))
    if found is None:
        raise ValueError(f"column {field.name!r} carries no {SIGNAL_DTYPE_KEY.decode()} metadata: not a CREMA signal column")
    return found.group(1).decode()


def decode_signals(batch: pa.Table | pa.RecordBatch, column: str = "signal") -> np.ndarray:
    """The signals of a batch as an (n, 12, L) array: a zero-copy view of one-chunk Arrow data."""
    field = batch.schema.field(column)
    dtype = np.dtype(signal_dtype_of(field)).newbyteorder("<")
    values = batch.column(column)
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks() if values.num_chunks != 1 else values.chunk(0)
    width = field.type.byte_width
    data = np.frombuffer(values.buffers()[1], dtype=np.uint8, count=len(values) * width, offset=values.offset * width)
    return data.view(dtype).reshape(len(values), N_LEADS, -1)


def decode_masks(column: pa.ChunkedArray | pa.Array | np.ndarray) -> np.ndarray:
    """A `lead_mask` / `derived_mask` column as an (n, 12) bool array."""
    if isinstance(column, np.ndarray):
        return (np.stack(column) if column.dtype == object else column).astype(bool).reshape(-1, N_LEADS)
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    return column.flatten().to_numpy(zero_copy_only=False).astype(bool).reshape(len(column), N_LEADS)
