"""The per-record ingest steps: plan, fingerprint, decide duplicates, window, write, commit.

The Ray stage (:func:`crema.stages.ingest.ingest`) runs these, in this file's order: it plans every
source in the driver, maps :func:`fingerprint_batch` and :func:`window_batch` over record batches in Ray
tasks, and has its Datasink write each task's windows with :func:`write_window_files`. Nothing here
imports Ray: each step is a function of Arrow tables, testable on its own.

1. **plan** (driver): discover record ids, attach labels, pseudonymous patient keys and splits;
2. **fingerprint** (tasks): hash each record's signal bytes, so byte-identical copies become
   ``duplicate`` before any window is written, and an unchanged source can be skipped;
3. **window** (tasks): read, normalise and window each record, written into a staging folder that is
   swapped in only after every write task succeeded (:func:`commit`).

The manifest (one row per discovered record: ``ok`` / ``rejected`` / ``duplicate``) is written last
and is the commit record. Reject reasons are short stable codes; nothing escapes as a crash.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from crema.config import IngestConfig, SourceConfig
from crema.data.labels import LabelIndex, pseudonymise
from crema.data.readers import Reader, reader_for
from crema.data.schema import MANIFEST_SCHEMA, file_schema, window_schema
from crema.data.signals import N_LEADS, RecordRejected, to_canonical, windows

WORK_SCHEMA = pa.schema([
    ("source", pa.string()),
    ("record_id", pa.string()),
    ("patient_key", pa.string()),
    ("labels", pa.list_(pa.string())),
    ("split", pa.string()),
])
MANIFEST_SOURCES_KEY = b"crema.sources"


class IngestFailed(RuntimeError):
    """The job ran to the end but rejected more records than the config allows."""


@dataclass
class SourceSummary:
    """What became of one source's records."""

    name: str
    discovered: int = 0
    ok: int = 0
    rejected: int = 0
    duplicate: int = 0
    windows: int = 0
    skipped_unchanged: bool = False
    unmatched_label_rows: int = 0
    reasons: Counter = field(default_factory=Counter)


@dataclass
class IngestSummary:
    """What became of every source, and how long it took."""

    output: str
    sources: list[SourceSummary]
    seconds: float

    @property
    def discovered(self) -> int:
        return sum(s.discovered for s in self.sources)

    @property
    def rejected(self) -> int:
        return sum(s.rejected for s in self.sources)

    @property
    def records_per_second(self) -> float:
        return self.discovered / self.seconds if self.seconds else 0.0


# ---------------------------------------------------------------------------------- previous run

def read_manifest(output: str, storage_options: dict) -> pa.Table | None:
    """The committed manifest of an ingest output, or None before the first commit."""
    fs, root = url_to_fs(output, **storage_options)
    path = f"{root.rstrip('/')}/manifest.parquet"
    if not fs.exists(path):
        return None
    return pq.read_table(path, filesystem=fs)


def manifest_sources(manifest: pa.Table | None) -> dict[str, str]:
    """Source name -> config fingerprint, as the manifest recorded them."""
    if manifest is None or not manifest.schema.metadata:
        return {}
    return json.loads(manifest.schema.metadata.get(MANIFEST_SOURCES_KEY, b"{}"))


# ------------------------------------------------------------------------------------------ plan

def plan(sources: list[SourceConfig], key: bytes) -> tuple[pa.Table, dict[str, SourceSummary]]:
    """Every record of every source (WORK_SCHEMA), and a summary per source with its counts so far."""
    plans, summaries = [], {}
    for source in sources:
        table, unmatched = plan_source(source, key)
        summaries[source.name] = SourceSummary(source.name, discovered=len(table), unmatched_label_rows=unmatched)
        plans.append(table)
    return pa.concat_tables(plans), summaries


def plan_source(source: SourceConfig, key: bytes) -> tuple[pa.Table, int]:
    """Every record of the source with its labels, patient key and split; and unmatched label rows."""
    reader = reader_for(source)
    record_ids = reader.discover()
    index = LabelIndex(source)
    infos = [index.lookup(r) for r in record_ids]
    table = pa.table({
        "source": [source.name] * len(record_ids),
        "record_id": record_ids,
        "patient_key": [pseudonymise(i.patient_id, source.name, key) for i in infos],
        "labels": [list(i.labels) for i in infos],
        "split": [i.split for i in infos],
    }, schema=WORK_SCHEMA)
    return table, len(index.unmatched(record_ids)) if source.labels else 0


# ----------------------------------------------------------------------------------- fingerprint

_READERS: dict[str, Reader] = {}


def _reader(source: SourceConfig, max_record_seconds: float | None = None) -> Reader:
    """One reader per source per worker process: filesystems and S3 sessions are costly to open."""
    key = f"{source.model_dump_json()}|{max_record_seconds}"
    if key not in _READERS:
        reader = reader_for(source)
        if max_record_seconds is not None:
            reader.max_record_seconds = max_record_seconds  # refuse absurd headers before allocating
        _READERS[key] = reader
    return _READERS[key]


def fingerprint_batch(batch: pa.Table, sources: dict[str, SourceConfig]) -> pa.Table:
    """The batch with content_hash (or a reject reason and detail) of each record appended."""
    readers = {name: _reader(source) for name, source in sources.items()}  # once per batch, not per record
    hashes, reasons, details = [], [], []
    for source, record_id in zip(batch["source"].to_pylist(), batch["record_id"].to_pylist()):
        try:
            hashes.append(readers[source].fingerprint(record_id))
            reasons.append(None)
            details.append(None)
        except RecordRejected as err:
            hashes.append(None)
            reasons.append(err.reason)
            details.append(err.detail)
        except Exception as err:  # a reader bug must cost one record, not the job
            hashes.append(None)
            reasons.append("reader_error")
            details.append(f"{type(err).__name__}: {err}")
    return batch.append_column("content_hash", pa.array(hashes, pa.string())) \
        .append_column("reason", pa.array(reasons, pa.string())) \
        .append_column("detail", pa.array(details, pa.string()))


# ---------------------------------------------------------------------------------------- decide

def committed_hashes(previous: pa.Table | None, rewritten: list[str]) -> dict[str, str]:
    """Content hash → record of the ok records of sources kept from earlier runs: already seen."""
    if previous is None:
        return {}
    kept = previous.filter(pc.and_(pc.invert(pc.is_in(previous["source"], pa.array(rewritten, pa.string()))),
                                   pc.equal(previous["status"], "ok")))
    return {h: f"{s}/{r}" for s, r, h in zip(*(kept[c].to_pylist() for c in ("source", "record_id", "content_hash")))}


def mark_duplicates(fingerprinted: pa.Table, known: dict[str, str], drop: bool) -> pa.Table:
    """First record with a given content hash wins (sources in order, records sorted); later copies are
    duplicates, or, with `drop` off, kept with their twin named in `detail`."""
    seen = dict(known)
    status, reason, detail = [], [], []
    for source, record_id, content, why, what in zip(*(fingerprinted[c].to_pylist() for c in
                                                       ("source", "record_id", "content_hash", "reason", "detail"))):
        if why is not None:
            status.append("rejected"), reason.append(why), detail.append(what)
        elif content in seen:
            status.append("duplicate" if drop else "pending")
            reason.append("duplicate_content" if drop else None)
            detail.append(f"same bytes as {seen[content]}")
        else:
            seen[content] = f"{source}/{record_id}"
            status.append("pending"), reason.append(None), detail.append(None)
    return fingerprinted.drop_columns(["reason", "detail"]).append_column("status", pa.array(status, pa.string())) \
        .append_column("reason", pa.array(reason, pa.string())).append_column("detail", pa.array(detail, pa.string()))


def config_fingerprint(source: SourceConfig, cfg: IngestConfig) -> str:
    """What the windows of a source depend on, besides its bytes: changing any re-ingests it."""
    relevant = cfg.model_dump(exclude={"max_reject_fraction", "records_per_task", "storage_options"})
    blob = json.dumps([source.model_dump(exclude={"storage_options"}), relevant], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def unchanged_sources(previous: pa.Table | None, previous_sources: dict[str, str], decided: pa.Table,
                      config_hashes: dict[str, str]) -> set[str]:
    """Sources whose records, bytes and config equal the committed ones: re-ingesting them is a no-op."""
    if previous is None:
        return set()
    unchanged = set()
    for name, config_hash in config_hashes.items():
        if previous_sources.get(name) != config_hash:
            continue
        before = previous.filter(pc.equal(previous["source"], name))
        now = decided.filter(pc.equal(decided["source"], name))
        if sorted(zip(before["record_id"].to_pylist(), before["content_hash"].to_pylist())) == \
                sorted(zip(now["record_id"].to_pylist(), now["content_hash"].to_pylist())):
            unchanged.add(name)
    return unchanged


# ---------------------------------------------------------------------------------------- window

def window_batch(batch: pa.Table, sources: dict[str, SourceConfig], cfg: IngestConfig) -> pa.Table:
    """Read, normalise and window a batch of records: one row per window, one row per rejected record."""
    length = cfg.window_samples
    dtype = np.float16 if cfg.dtype == "float16" else np.float32
    columns: dict[str, list] = {name: [] for name in _staging_schema(cfg).names}
    signals: list[np.ndarray] = []

    def add_row(rec: dict, *, status: str, reason=None, detail=None, n_windows=0, window=None, masks=None):
        for name in ("source", "record_id", "patient_key", "labels", "split", "content_hash"):
            columns[name].append(rec[name])
        columns["status"].append(status)
        columns["reason"].append(reason)
        columns["detail"].append(detail)
        columns["n_windows"].append(n_windows)
        columns["window_index"].append(window.index if window else None)
        columns["window_start"].append(window.start if window else None)
        columns["valid_samples"].append(window.valid_samples if window else None)
        columns["fs"].append(cfg.target_fs if window else None)
        columns["lead_mask"].append(masks[0] if window else None)
        columns["derived_mask"].append(masks[1] if window else None)
        signals.append(window.signal.astype("<" + np.dtype(dtype).str[1:]).reshape(-1) if window
                       else np.zeros(N_LEADS * length, dtype))

    readers = {name: _reader(source, cfg.max_record_seconds) for name, source in sources.items()}
    for rec in batch.to_pylist():
        source = sources[rec["source"]]
        try:
            raw = readers[rec["source"]].read(rec["record_id"])
            canonical = to_canonical(raw, cfg.normalise_options(source))
            cut = windows(canonical, cfg.window_s, cfg.stride_s, cfg.pad_short)
        except RecordRejected as err:
            add_row(rec, status="rejected", reason=err.reason, detail=err.detail)
            continue
        except Exception as err:  # corrupt input can break a library in ways nobody listed
            add_row(rec, status="rejected", reason="unreadable", detail=f"{type(err).__name__}: {err}")
            continue
        masks = (canonical.lead_mask.tolist(), canonical.derived_mask.tolist())
        for w in cut:
            add_row(rec, status="ok", detail=rec["detail"], n_windows=len(cut), window=w, masks=masks)

    schema = _staging_schema(cfg)
    flat = np.concatenate(signals) if signals else np.zeros(0, dtype)
    arrays = []
    for f in schema:
        if f.name == "signal":
            valid = np.array([s == "ok" for s in columns["status"]], dtype=bool)
            arrays.append(pa.FixedSizeBinaryArray.from_buffers(
                f.type, len(valid), [pa.py_buffer(np.packbits(valid, bitorder="little")), pa.py_buffer(flat)]))
        else:
            arrays.append(pa.array(columns[f.name], f.type))
    return pa.Table.from_arrays(arrays, schema=schema)


def _staging_schema(cfg: IngestConfig) -> pa.Schema:
    """Window columns (null for a record with no windows) plus the record's manifest fields."""
    windows_part = [f.with_nullable(True) for f in window_schema(cfg.window_samples, cfg.dtype)]
    return pa.schema(windows_part + [
        pa.field("status", pa.string()), pa.field("reason", pa.string()), pa.field("detail", pa.string()),
        pa.field("n_windows", pa.int32()), pa.field("content_hash", pa.string()),
    ])


def write_window_files(table: pa.Table, staging: str, cfg: IngestConfig, task_index: int) -> pa.Table:
    """Write a window-pass table's ok windows as Parquet under `staging`; return its records' manifest rows."""
    fs, root = url_to_fs(staging, **cfg.storage_options)
    schema = file_schema(cfg.window_samples, cfg.dtype)
    ok = table.filter(pc.equal(table["status"], "ok"))
    row_bytes = N_LEADS * cfg.window_samples * (2 if cfg.dtype == "float16" else 4)
    rows_per_group = max(1, cfg.row_group_bytes // row_bytes)
    for source, split in set(zip(ok["source"].to_pylist(), ok["split"].to_pylist())):
        part = ok.filter(pc.and_(pc.equal(ok["source"], source), pc.equal(ok["split"], split)))
        part = part.select(schema.names).cast(schema)
        folder = f"{root}/source={source}/split={split}"
        fs.makedirs(folder, exist_ok=True)
        path = f"{folder}/part-{task_index:05d}-{uuid.uuid4().hex[:12]}.parquet"
        pq.write_table(part, path, filesystem=fs, row_group_size=rows_per_group, compression="zstd")
    # Kleene "or": a rejected record's null window_index must count as true, not as null.
    first_row = pc.or_kleene(pc.is_null(table["window_index"]), pc.equal(table["window_index"], 0))
    return table.filter(first_row).select(MANIFEST_SCHEMA.names)


def account_for_lost(pending: pa.Table, written: pa.Table) -> pa.Table:
    """Every record sent to the window pass must come back in the manifest; one that did not (a worker
    killed and not retried, say) is recorded as rejected rather than silently missing."""
    done = set(zip(written["source"].to_pylist(), written["record_id"].to_pylist()))
    lost = [row for row in pending.select(["source", "record_id", "content_hash"]).to_pylist()
            if (row["source"], row["record_id"]) not in done]
    if not lost:
        return written
    rows = [{**row, "status": "rejected", "reason": "not_processed",
             "detail": "no result came back from the window pass", "n_windows": 0} for row in lost]
    return pa.concat_tables([written, pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)])


# ---------------------------------------------------------------------------------------- commit

def commit(fs, root: str, staging: str, previous: pa.Table | None, manifest_new: pa.Table,
           rewritten: list[str], config_hashes: dict[str, str]) -> pa.Table:
    """Swap the rewritten sources' windows in, then write the manifest (the commit record). Returns it."""
    for name in rewritten:
        _swap_in(fs, root, staging, name)
    kept_rows = MANIFEST_SCHEMA.empty_table() if previous is None else \
        previous.filter(pc.invert(pc.is_in(previous["source"], pa.array(rewritten, pa.string())))).cast(MANIFEST_SCHEMA)
    manifest = pa.concat_tables([kept_rows, manifest_new]).sort_by([("source", "ascending"), ("record_id", "ascending")])
    _write_manifest(fs, root, manifest, {**manifest_sources(previous), **config_hashes})
    if fs.exists(staging):
        fs.rm(staging, recursive=True)
    return manifest


def _swap_in(fs, root: str, staging: str, source: str) -> None:
    """Replace one source's windows by its freshly staged ones; other sources are not touched."""
    live = f"{root}/windows/source={source}"
    staged = f"{staging}/source={source}"
    if fs.exists(live):
        fs.rm(live, recursive=True)
    if not fs.exists(staged):
        return
    if isinstance(fs, LocalFileSystem):
        fs.mv(staged, live, recursive=True)  # one rename
    else:  # object stores have no rename: copy each object, then drop the staged ones
        for path in fs.find(staged):
            fs.copy(path, live + path[len(staged):])
        fs.rm(staged, recursive=True)


def _write_manifest(fs, root: str, table: pa.Table, sources: dict[str, str]) -> None:
    """Write the manifest beside the windows, atomically (a temporary file moved into place)."""
    table = table.replace_schema_metadata({MANIFEST_SOURCES_KEY: json.dumps(sources, sort_keys=True).encode()})
    tmp = f"{root}/_manifest-{uuid.uuid4().hex[:8]}.parquet"
    pq.write_table(table, tmp, filesystem=fs)
    fs.mv(tmp, f"{root}/manifest.parquet")


def summarise(output: str, summaries: dict[str, SourceSummary], manifest: pa.Table, unchanged: set[str],
              seconds: float) -> IngestSummary:
    """Count the committed manifest's rows of this run's sources into their summaries."""
    for name in unchanged:
        summaries[name].skipped_unchanged = True
    names = list(summaries)
    for row in manifest.filter(pc.is_in(manifest["source"], pa.array(names, pa.string()))).to_pylist():
        counts = summaries[row["source"]]
        setattr(counts, row["status"], getattr(counts, row["status"]) + 1)
        counts.windows += row["n_windows"]
        if row["status"] == "rejected":
            counts.reasons[row["reason"]] += 1
    return IngestSummary(output, list(summaries.values()), seconds)
