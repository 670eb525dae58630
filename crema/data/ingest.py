"""The per-record ingest steps: plan, fingerprint, decide changes, window, de-duplicate, write.

:func:`run_ingest` runs these, in this file's order: it plans every source, maps :func:`fingerprint_batch`
and :func:`window_batch` over record batches (in this process, or on Ray Data tasks when the ingest stage
hands it its passes: :func:`crema.stages.ingest.ingest`), each batch's windows written with
:func:`write_window_files`, and commits once. Nothing here imports Ray: each step is a function of Arrow
tables, testable on its own, and so is the whole run.

1. **plan** (driver): discover record ids, attach labels, pseudonymous patient keys and splits; a source
   without records, or with a label table matching none, is a ConfigError before any work;
2. **fingerprint** (tasks): hash what each record means (header and signal bytes, label row, settings);
3. **decide** (driver, :func:`plan_changes`): re-ingest exactly the records whose fingerprint changed;
4. **window** (tasks): read, validate, normalise and window each changed record, written as data files
   of the Iceberg `windows` table (:func:`write_window_files`) that only the driver's one commit makes
   visible (:func:`crema.data.catalog.commit_run`);
5. **de-duplicate** (driver, :func:`mark_duplicates`): among valid records only, on the canonical signal,
   across sources too; copies are dropped, or (``drop_duplicates: false``) kept with their patients joined
   to their twins' (:func:`join_patients`), the written files rewritten accordingly
   (:func:`crema.data.catalog.rewrite_records`).

The manifest (one row per discovered record: ``ok`` / ``rejected`` / ``duplicate``) is committed with
the windows. Reject reasons are short stable codes; nothing escapes as a crash.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import logging
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pyiceberg.expressions import In

from crema.config import ConfigError, IngestConfig, SourceConfig
from crema.data.catalog import (Dataset, Run, begin_run, commit_run, committed_manifest, dataset_version, end_run,
                                ensure_tables, open_for_ingest, read_windows, record_identities, rewrite_records,
                                write_data_files)
from crema.data.labels import LabelIndex, LabelMapper, pseudonym_key, pseudonymise
from crema.data.readers import Reader, reader_for
from crema.data.schema import DUPLICATE_DETAIL, JOINED_DETAIL, MANIFEST_SCHEMA, twin_of, window_schema
from crema.data.signals import (N_LEADS, UNITS_MV, UNITS_NORMALIZED, RecordRejected, is_normalized_unit, to_canonical,
                                windows)

log = logging.getLogger(__name__)

WORK_SCHEMA = pa.schema([
    ("source", pa.string()),
    ("record_id", pa.string()),
    ("patient_key", pa.string()),
    ("labels", pa.list_(pa.string())),
    ("split", pa.string()),
    ("path_id", pa.string()),  # the record's path under the source, for its reader; `record_id` is what is stored
])


class IngestFailed(RuntimeError):
    """The job ran to the end but rejected more records than the config allows."""

    def __init__(self, message: str, summary: "IngestSummary | None" = None):
        super().__init__(message)
        self.summary = summary


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
    reingested: int | None = None  # records re-read because their fingerprint changed (None: the whole source)
    normalised: int = 0  # ok records whose amplitudes look normalised (z-scored, 1 mV per lead), not mV
    duplicate_kept: int = 0  # copies of an earlier record kept as ok (drop_duplicates off), their twin in `detail`
    cross_source_duplicates: int = 0  # copies (dropped or kept) of a record of another source
    patients_joined: int = 0  # records that took a twin's patient key and split (a kept copy's patient)
    unmatched_label_rows: int = 0
    has_label_table: bool = False
    records_without_labels: int = 0  # by the label table (header labels come on top)
    # Label-table statements that no label map of the source matches: statement -> records holding it.
    unmapped_labels: Counter = field(default_factory=Counter)
    # Records whose own (header) statements no map fully matches (manifest flag UNMAPPED_LABELS_FLAG).
    records_with_unmapped_header_labels: int = 0
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

# ------------------------------------------------------------------------------------------ plan

def plan(sources: list[SourceConfig], key: bytes) -> tuple[pa.Table, dict[str, SourceSummary]]:
    """Every record of every source (WORK_SCHEMA), and a summary per source with its counts so far."""
    plans, summaries = [], {}
    for source in sources:
        table, unmatched, unmapped = plan_source(source, key)
        without = sum(1 for labels in table["labels"].to_pylist() if not labels)
        summaries[source.name] = SourceSummary(source.name, discovered=len(table), unmatched_label_rows=unmatched,
                                               has_label_table=source.labels is not None,
                                               records_without_labels=without, unmapped_labels=unmapped)
        plans.append(table)
    return pa.concat_tables(plans), summaries


def pseudonymous_record_id(record_id: str, source: str, key: bytes) -> str:
    """A record id that does not show the file name (hospital exports often name files by medical record
    number): a keyed hash of the path under the source, stable across runs with the same key."""
    return "r-" + hmac.new(key, f"record\x1f{source}\x1f{record_id}".encode(), hashlib.sha256).hexdigest()[:24]


def plan_source(source: SourceConfig, key: bytes) -> tuple[pa.Table, int, Counter]:
    """Every record of the source with its labels, patient key and split; the label rows matching no record;
    and the label-table statements no label map matches (statement -> records)."""
    reader = reader_for(source)
    if source.records is None and not reader.fs.exists(reader.root):
        raise ConfigError(f"source {source.name}: path {source.path} does not exist")
    record_ids = reader.discover()
    outside = [r for r in record_ids if r.startswith(("/", "\\")) or "://" in r or ".." in r.replace("\\", "/").split("/")]
    if outside:
        raise ConfigError(f"source {source.name}: {len(outside)} entries of {source.records} point outside the "
                          f"source folder {source.path}: {outside[:5]}")
    if not record_ids:
        raise ConfigError(f"source {source.name}: no {source.format} records under {source.path} "
                          f"(files ending {', '.join(reader.extensions)}{' listed in ' + source.records if source.records else ''})")
    index = LabelIndex(source)
    if source.labels and index.rows and len(index.unmatched(record_ids)) == len(index.rows):
        raise ConfigError(f"source {source.name}: the label table {source.labels.table} matches none of its "
                          f"{len(record_ids)} records (its {source.labels.record_column!r} values look like "
                          f"{sorted(index.rows)[:3]}, the record ids like {record_ids[:3]})")
    infos = [index.lookup(r) for r in record_ids]
    hide = source.pseudonymise_record_ids if source.pseudonymise_record_ids is not None else source.labels is None
    table = pa.table({
        "source": [source.name] * len(record_ids),
        "record_id": [pseudonymous_record_id(r, source.name, key) for r in record_ids] if hide else record_ids,
        "patient_key": [pseudonymise(i.patient_id, source.name, key) for i in infos],
        "labels": [list(i.labels) for i in infos],
        "split": [i.split for i in infos],
        "path_id": record_ids,
    }, schema=WORK_SCHEMA)
    unmapped = Counter(statement for info in infos for statement in info.unmapped)
    return table, len(index.unmatched(record_ids)) if source.labels else 0, unmapped


# ----------------------------------------------------------------------------------- fingerprint

_READERS: dict[str, Reader] = {}
_LABEL_MAPPERS: dict[str, LabelMapper] = {}
# Manifest flag of a record whose own statements (header labels) hold some that no label map matches.
UNMAPPED_LABELS_FLAG = "unmapped_labels"


def _reader(source: SourceConfig, max_record_seconds: float | None = None) -> Reader:
    """One reader per source per worker process: filesystems and S3 sessions are costly to open."""
    key = f"{source.model_dump_json()}|{max_record_seconds}"
    if key not in _READERS:
        reader = reader_for(source)
        if max_record_seconds is not None:
            reader.max_record_seconds = max_record_seconds  # refuse absurd headers before allocating
        _READERS[key] = reader
    return _READERS[key]


def _label_mapper(source: SourceConfig) -> LabelMapper:
    """One label mapper per source per worker process: a table map reads its CSV once."""
    key = source.model_dump_json()
    if key not in _LABEL_MAPPERS:
        _LABEL_MAPPERS[key] = LabelMapper(source)
    return _LABEL_MAPPERS[key]


def fingerprint_batch(batch: pa.Table, sources: dict[str, SourceConfig], config_hashes: dict[str, str]) -> pa.Table:
    """The batch with each record's fingerprint (:func:`record_fingerprint`) and, where its files cannot be
    read, its reject reason and detail appended."""
    readers = {name: _reader(source) for name, source in sources.items()}  # once per batch, not per record
    found = [record_fingerprint(readers[rec["source"]], rec, config_hashes[rec["source"]]) for rec in batch.to_pylist()]
    prints, reasons, details = zip(*found) if found else ((), (), ())
    return batch.append_column("fingerprint", pa.array(prints, pa.string())) \
        .append_column("reason", pa.array(reasons, pa.string())) \
        .append_column("detail", pa.array(details, pa.string()))


def record_fingerprint(reader: Reader, rec: dict, config_hash: str) -> tuple[str, str | None, str | None]:
    """(fingerprint, reject reason, detail) of a planned record: what it means, not only its samples — the
    bytes of its header and signal files, its label-table row (labels, patient, split) and the source
    settings its windows depend on. A record whose fingerprint changed is re-ingested; a record whose
    files cannot be read gets a reject reason (and a fingerprint of it, so that mending the file counts
    as a change)."""
    reason = detail = None
    try:
        files = reader.fingerprint(rec["path_id"])
    except RecordRejected as err:
        reason, detail = err.reason, err.detail
    except Exception as err:  # a reader bug must cost one record, not the job
        reason, detail = "reader_error", f"{type(err).__name__}: {err}"
    if reason is not None:
        files = f"rejected:{reason}:{detail}"
    blob = json.dumps([files, rec["patient_key"], sorted(rec["labels"] or []), rec["split"], config_hash])
    return hashlib.sha256(blob.encode()).hexdigest()[:32], reason, detail


# ---------------------------------------------------------------------------------------- decide

@dataclass
class Changes:
    """What a run does to the dataset: the records to window, which committed rows it replaces."""

    pending: pa.Table  # records to read and window (WORK_SCHEMA + fingerprint)
    settled: pa.Table  # new manifest rows of records rejected before reading (unreadable files)
    replace: dict[str, list[str] | None]  # source -> record ids whose rows are replaced (None: all of them)
    unchanged: set[str]  # sources whose every record kept its fingerprint
    kept: pa.Table | None  # committed manifest rows that stay (other sources, unchanged records)


def plan_changes(fingerprinted: pa.Table, previous: pa.Table | None, force: set[str] | frozenset = frozenset()) -> Changes:
    """Compare fingerprints with the committed manifest: re-ingest exactly the records whose fingerprint
    changed (a header, a label row, a map table, a setting), drop those no longer found, keep the rest.
    Sources in `force` are re-ingested whole."""
    names = list(dict.fromkeys(fingerprinted["source"].to_pylist()))
    before: dict[str, dict[str, str]] = {name: {} for name in names}
    if previous is not None:
        mine = previous.filter(pc.is_in(previous["source"], pa.array(names, pa.string())))
        for source, record_id, fp in zip(*(mine[c].to_pylist() for c in ("source", "record_id", "fingerprint"))):
            before[source][record_id] = fp
    replace: dict[str, list[str] | None] = {}
    unchanged: set[str] = set()
    changed_keys = set()
    for name in names:
        rows = fingerprinted.filter(pc.equal(fingerprinted["source"], name))
        now = dict(zip(rows["record_id"].to_pylist(), rows["fingerprint"].to_pylist()))
        old = before[name]
        if name in force or not old:
            replace[name] = None
            changed_keys.update((name, r) for r in now)
            continue
        changed = {r for r, fp in now.items() if old.get(r) != fp}
        removed = set(old) - set(now)
        if not changed and not removed:
            unchanged.add(name)
            continue
        replace[name] = None if set(old) <= changed | removed else sorted(changed | removed)
        changed_keys.update((name, r) for r in changed)
    is_changed = pa.array([(s, r) in changed_keys for s, r in zip(fingerprinted["source"].to_pylist(),
                                                                   fingerprinted["record_id"].to_pylist())])
    todo = fingerprinted.filter(is_changed)
    readable = pc.is_null(todo["reason"])
    pending = todo.filter(readable).select(WORK_SCHEMA.names + ["fingerprint"])
    rejected = todo.filter(pc.invert(readable))
    settled = pa.table({
        "source": rejected["source"], "record_id": rejected["record_id"],
        "status": pa.array(["rejected"] * len(rejected), pa.string()), "reason": rejected["reason"],
        "detail": rejected["detail"], "n_windows": pa.array(np.zeros(len(rejected), np.int32)),
        "content_hash": pa.nulls(len(rejected), pa.string()), "fingerprint": rejected["fingerprint"],
        **{f.name: pa.nulls(len(rejected), f.type) for f in MANIFEST_SCHEMA if f.name not in (
            "source", "record_id", "status", "reason", "detail", "n_windows", "content_hash", "fingerprint")},
    }, schema=MANIFEST_SCHEMA)
    kept = None
    if previous is not None:
        stays = [not (s in replace and (replace[s] is None or r in set(replace[s])))
                 for s, r in zip(previous["source"].to_pylist(), previous["record_id"].to_pylist())]
        kept = previous.filter(pa.array(stays, pa.bool_()))
    return Changes(pending, settled, replace, unchanged, kept)


def mark_duplicates(windowed: pa.Table, kept: pa.Table | None, source_order: list[str],
                    drop: bool) -> tuple[pa.Table, set, list]:
    """De-duplicate among *valid* records only, on the canonical signal (after units and resampling): a
    broken copy is rejected with its reason whatever its name, and can never take a good record's place.
    Committed records that stay win, then the first in source order and record id; later copies are
    `duplicate` (or, with `drop` off, kept with their twin named in `detail`). Returns the manifest rows,
    the (source, record_id) keys whose windows must not be committed, and the kept copies as
    [(twin key, copy key)], whose patients :func:`join_patients` joins."""
    seen: dict[str, tuple[str, str]] = {}
    if kept is not None:
        ok = kept.filter(pc.equal(kept["status"], "ok"))
        for s, r, h in zip(*(ok[c].to_pylist() for c in ("source", "record_id", "content_hash"))):
            if h:
                seen.setdefault(h, (s, r))
    rank = {name: i for i, name in enumerate(source_order)}
    rows = windowed.to_pylist()
    dropped, pairs = set(), []
    for row in sorted(rows, key=lambda r: (rank.get(r["source"], len(rank)), r["record_id"])):
        if row["status"] != "ok" or not row["content_hash"]:
            continue
        twin = seen.get(row["content_hash"])
        if twin is None:
            seen[row["content_hash"]] = (row["source"], row["record_id"])
        elif drop:
            row.update(status="duplicate", reason="duplicate_content", detail=f"{DUPLICATE_DETAIL}{twin[0]}/{twin[1]}",
                       n_windows=0)
            dropped.add((row["source"], row["record_id"]))
        else:
            row["detail"] = f"{DUPLICATE_DETAIL}{twin[0]}/{twin[1]}"
            pairs.append((twin, (row["source"], row["record_id"])))
    return pa.Table.from_pylist(rows, schema=windowed.schema), dropped, pairs


def join_patients(manifest: pa.Table, pairs: list, records: pa.Table, committed: dict,
                  source_order: list[str]) -> tuple[pa.Table, dict]:
    """Join the patients of kept copies (union of patient keys over the duplicate pairs): one recording is
    one patient's, so every record of this run whose patient key is joined takes the patient key and split
    of the group's first copy (committed records first, then source order and record id), and no recording,
    nor any other record of its patients, sits in two splits.

    `records`: this run's records (source, record_id, patient_key, split); `committed`: {(source,
    record_id): (patient_key, split)} of committed twins. Returns the manifest rows (a joined record's
    `detail` says so) and {(source, record_id): (patient_key, split)} of the records to re-key."""
    if not pairs:
        return manifest, {}
    mine = {(s, r): (p, sp) for s, r, p, sp in
            zip(*(records[c].to_pylist() for c in ("source", "record_id", "patient_key", "split")))}
    identity = {**committed, **mine}
    rank = {name: i for i, name in enumerate(source_order)}

    def order(key: tuple[str, str]) -> tuple:
        return (key in mine, rank.get(key[0], len(rank)), key[1])

    parent: dict[str, str] = {}

    def root(patient: str) -> str:
        while parent.setdefault(patient, patient) != patient:
            parent[patient] = parent[parent[patient]]
            patient = parent[patient]
        return patient

    first: dict[str, tuple[str, str]] = {}  # patient key -> its earliest record among the pairs
    for twin, copy in pairs:
        if twin not in identity or copy not in identity:
            continue  # a committed twin whose windows are gone: nothing to join to
        for key in (twin, copy):
            patient = identity[key][0]
            if patient not in first or order(key) < order(first[patient]):
                first[patient] = key
        a, b = root(identity[twin][0]), root(identity[copy][0])
        if a != b:
            parent[b] = a
    earliest: dict[str, tuple[str, str]] = {}
    for patient, key in first.items():
        group = root(patient)
        if group not in earliest or order(key) < order(earliest[group]):
            earliest[group] = key
    rekeyed = {}
    for key, (patient, split) in mine.items():
        if patient not in first:
            continue
        lead = earliest[root(patient)]
        if identity[lead][0] != patient:
            rekeyed[key] = identity[lead]
    if not rekeyed:
        return manifest, {}
    rows = manifest.to_pylist()
    for row in rows:
        key = (row["source"], row["record_id"])
        if key in rekeyed and row["status"] == "ok":
            lead = earliest[root(mine[key][0])]
            note = f"{JOINED_DETAIL}{lead[0]}/{lead[1]}"
            row["detail"] = f"{row['detail']}; {note}" if row["detail"] else note
    return pa.Table.from_pylist(rows, schema=manifest.schema), rekeyed


# Source keys added after datasets were committed with this fingerprint: left unset, they stay out of it,
# so that a new optional key does not re-ingest every source of every dataset.
SOURCE_KEYS_ADDED_LATER = ("variable", "label_maps")


def config_fingerprint(source: SourceConfig, cfg: IngestConfig) -> str:
    """What the windows of a source depend on, besides its bytes: changing any re-ingests it."""
    relevant = cfg.model_dump(exclude={"max_reject_fraction", "records_per_task", "storage_options", "catalog"})
    unset = {key for key in SOURCE_KEYS_ADDED_LATER if getattr(source, key) in (None, [])}
    blob = json.dumps([source.model_dump(exclude={"storage_options", "max_reject_fraction", *unset}), relevant],
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------- window

def window_batch(batch: pa.Table, sources: dict[str, SourceConfig], cfg: IngestConfig,
                 config_hashes: dict[str, str]) -> pa.Table:
    """Read, normalise and window a batch of records: one row per window, one row per rejected record.
    A record without a fingerprint yet (a new or forced source skips the fingerprint pass: every record
    is read anyway) is fingerprinted here from the same bytes its decoder reads."""
    length = cfg.window_samples
    storage_dtype = np.dtype("<f2" if cfg.dtype == "float16" else "<f4")  # little-endian, as the column is read
    columns: dict[str, list] = {name: [] for name in _pass_schema(cfg).names}
    signals: list[np.ndarray] = []

    def add_row(rec: dict, *, status: str, reason=None, detail=None, n_windows=0, window=None, masks=None,
                content=None, flags=None, stats=None):
        stats = stats or {}
        for name in ("source", "record_id", "patient_key", "labels", "split", "fingerprint"):
            columns[name].append(rec[name])
        columns["content_hash"].append(content)
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
        columns["lead_quality"].append(masks[2] if window else None)
        columns["flags"].append(flags)
        for name in ("source_fs", "duration_s", "lead_amplitude_mv", "lead_noise_mv"):
            columns[name].append(stats.get(name))
        signals.append(window.signal.reshape(-1) if window else np.zeros(N_LEADS * length, storage_dtype))

    readers = {name: _reader(source, cfg.max_record_seconds) for name, source in sources.items()}
    for rec in batch.to_pylist():
        source, reader = sources[rec["source"]], readers[rec["source"]]
        try:
            with reader.files_read_once():
                if rec["fingerprint"] is None:
                    rec["fingerprint"], reason, detail = record_fingerprint(reader, rec, config_hashes[rec["source"]])
                    if reason is not None:
                        raise RecordRejected(reason, detail or "")
                raw = reader.read(rec["path_id"])
            from_header = _label_mapper(source).header_labels(raw.meta)
            rec["labels"] = sorted(set(rec["labels"] or ()) | set(from_header.labels))
            canonical = to_canonical(raw, cfg.normalise_options(source))
            stored = as_stored(canonical.signal, storage_dtype)  # once per record, not per window
            cut = windows(dataclasses.replace(canonical, signal=stored), cfg.window_s, cfg.stride_s, cfg.pad_short)
        except RecordRejected as err:
            add_row(rec, status="rejected", reason=err.reason, detail=err.detail)
            continue
        except Exception as err:  # corrupt input can break a library in ways nobody listed
            add_row(rec, status="rejected", reason="unreadable", detail=f"{type(err).__name__}: {err}")
            continue
        masks = (canonical.lead_mask.tolist(), canonical.derived_mask.tolist(), list(canonical.lead_quality))
        content = canonical_hash(stored, canonical.lead_mask)
        flags = ",".join([*canonical.flags, *([UNMAPPED_LABELS_FLAG] if from_header.unmapped else [])]) or None
        stats = record_stats(raw, canonical)
        for w in cut:
            add_row(rec, status="ok", n_windows=len(cut), window=w, masks=masks, content=content, flags=flags,
                    stats=stats)

    schema = _pass_schema(cfg)
    flat = np.concatenate(signals) if signals else np.zeros(0, storage_dtype)
    arrays = []
    for f in schema:
        if f.name == "signal":
            valid = np.array([s == "ok" for s in columns["status"]], dtype=bool)
            arrays.append(pa.FixedSizeBinaryArray.from_buffers(
                f.type, len(valid), [pa.py_buffer(np.packbits(valid, bitorder="little")), pa.py_buffer(flat)]))
        else:
            arrays.append(pa.array(columns[f.name], f.type))
    return pa.Table.from_arrays(arrays, schema=schema)


def as_stored(signal: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """The canonical float32 signal in the column's dtype. float16: numpy converts element by element (0.44 ms
    of a 12 x 5000 record, an eighth of the window pass), torch with the CPU's conversion instructions
    (0.02 ms); both round to nearest, ties to even (tests/data/test_signals.py checks bit equality with
    numpy's cast on every shared record and on the edge cases: ties, overflow, subnormals, NaN)."""
    if dtype == np.float16:
        import torch  # imported here: only the window pass needs it

        return torch.from_numpy(np.ascontiguousarray(signal, np.float32)).to(torch.float16).numpy()
    return signal.astype(dtype)


STATS_FS = 100


def record_stats(raw, canonical) -> dict:
    """What the per-source data-quality report shows of a valid record: rate, duration, and per lead its
    amplitude (1st-99th percentile range, mV) and high-frequency noise (std of the sample diff / √2, mV)."""
    sig = canonical.signal
    # Percentiles of a 100 Hz subsample: an ECG's amplitude range needs no finer grid, and the full-rate
    # sort was a fifth of the window pass.
    sub = sig[:, ::max(1, canonical.fs // STATS_FS)]
    ranks = [int(0.01 * (sub.shape[1] - 1)), int(0.99 * (sub.shape[1] - 1))]  # nearest-rank percentiles
    ordered = np.partition(sub, ranks, axis=1)
    amplitude = ordered[:, ranks[1]] - ordered[:, ranks[0]]
    noise = np.diff(sig, axis=1).std(axis=1) / np.sqrt(2) if sig.shape[1] > 1 else np.zeros(N_LEADS)
    off = ~np.asarray(canonical.lead_mask, bool)
    amplitude[off], noise[off] = np.nan, np.nan
    return {"source_fs": float(raw.fs), "duration_s": sig.shape[1] / canonical.fs,
            "lead_amplitude_mv": [None if np.isnan(v) else float(v) for v in amplitude],
            "lead_noise_mv": [None if np.isnan(v) else float(v) for v in noise]}


def canonical_hash(stored: np.ndarray, lead_mask: np.ndarray) -> str:
    """Identity of a valid record's signal as stored: the canonical 12 leads (after units, lead mapping and
    resampling, in the column's dtype) and their mask. Copies in other files, formats or sources hash alike."""
    digest = hashlib.sha256(np.ascontiguousarray(stored).tobytes())
    digest.update(np.asarray(lead_mask, bool).tobytes())
    return digest.hexdigest()[:32]


def _pass_schema(cfg: IngestConfig) -> pa.Schema:
    """Window columns (null for a record with no windows) plus the record's manifest fields."""
    # `units` is the source's, added by :func:`write_window_files`, not read from each record.
    windows_part = [f.with_nullable(True) for f in window_schema(cfg.window_samples, cfg.dtype) if f.name != "units"]
    return pa.schema(windows_part + [
        pa.field("status", pa.string()), pa.field("reason", pa.string()), pa.field("detail", pa.string()),
        pa.field("n_windows", pa.int32()), pa.field("content_hash", pa.string()), pa.field("fingerprint", pa.string()),
        pa.field("flags", pa.string()), pa.field("source_fs", pa.float32()), pa.field("duration_s", pa.float32()),
        pa.field("lead_amplitude_mv", pa.list_(pa.float32())), pa.field("lead_noise_mv", pa.list_(pa.float32())),
    ])


def source_units(sources: dict[str, SourceConfig] | list[SourceConfig]) -> dict[str, str]:
    """The `units` column of each source's windows: "normalized" where the source declares `units:
    normalized` (amplitudes stored as they are), "mV" otherwise (every other unit is converted to mV)."""
    configs = sources.values() if isinstance(sources, dict) else sources
    return {s.name: UNITS_NORMALIZED if is_normalized_unit(s.units) else UNITS_MV for s in configs}


def write_window_files(table: pa.Table, metadata, io, write_uuid: uuid.UUID, task_index: int,
                       units: dict[str, str] | None = None) -> tuple[list, pa.Table]:
    """Write a window-pass table's ok windows as data files of the `windows` table (`metadata`, `io`: the
    table's, as the driver loaded it), committing nothing; `units`: each source's (:func:`source_units`,
    default mV). Returns ([(DataFile, its records' (source, record_id) keys)], the records' manifest rows):
    the driver may still drop a duplicate's windows or re-key a kept copy's."""
    ok = table.filter(pc.equal(table["status"], "ok"))
    ok = ok.append_column("units", pa.array([(units or {}).get(s, UNITS_MV) for s in ok["source"].to_pylist()],
                                            pa.string()))
    written = []
    groups = sorted(set(zip(ok["source"].to_pylist(), ok["split"].to_pylist())))
    for k, (source, split) in enumerate(groups):
        part = ok.filter(pc.and_(pc.equal(ok["source"], source), pc.equal(ok["split"], split)))
        keys = set(zip(part["source"].to_pylist(), part["record_id"].to_pylist()))
        for data_file in write_data_files(metadata, io, part, write_uuid, task_index * 1000 + k):
            written.append((data_file, keys))
    # Kleene "or": a rejected record's null window_index must count as true, not as null.
    first_row = pc.or_kleene(pc.is_null(table["window_index"]), pc.equal(table["window_index"], 0))
    return written, table.filter(first_row).select(MANIFEST_SCHEMA.names)


def account_for_lost(pending: pa.Table, written: pa.Table) -> pa.Table:
    """Every record sent to the window pass must come back in the manifest; one that did not (a worker
    killed and not retried, say) is recorded as rejected rather than silently missing."""
    done = set(zip(written["source"].to_pylist(), written["record_id"].to_pylist()))
    lost = [row for row in pending.select(["source", "record_id", "fingerprint"]).to_pylist()
            if (row["source"], row["record_id"]) not in done]
    if not lost:
        return written
    rows = [{**row, "status": "rejected", "reason": "not_processed", "content_hash": None, "flags": None,
             "detail": "no result came back from the window pass", "n_windows": 0} for row in lost]
    return pa.concat_tables([written, pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)])


def summarise(output: str, summaries: dict[str, SourceSummary], manifest: pa.Table, unchanged: set[str],
              seconds: float, replaced: dict | None = None) -> IngestSummary:
    """Count the committed manifest's rows of this run's sources into their summaries."""
    for name in unchanged:
        summaries[name].skipped_unchanged = True
    for name, records in (replaced or {}).items():
        summaries[name].reingested = None if records is None else len(records)
    names = list(summaries)
    for row in manifest.filter(pc.is_in(manifest["source"], pa.array(names, pa.string()))).to_pylist():
        counts = summaries[row["source"]]
        setattr(counts, row["status"], getattr(counts, row["status"]) + 1)
        counts.windows += row["n_windows"]
        if row["status"] == "rejected":
            counts.reasons[row["reason"]] += 1
        if "normalised_amplitude" in (row.get("flags") or ""):
            counts.normalised += 1
        if UNMAPPED_LABELS_FLAG in (row.get("flags") or ""):
            counts.records_with_unmapped_header_labels += 1
        twin = twin_of(row.get("detail"))
        if twin is not None:
            counts.duplicate_kept += row["status"] == "ok"
            counts.cross_source_duplicates += twin.split("/", 1)[0] != row["source"]
        if JOINED_DETAIL in (row.get("detail") or ""):
            counts.patients_joined += 1
    return IngestSummary(output, list(summaries.values()), seconds)


# ------------------------------------------------------------------------------------------- run

class Passes(Protocol):
    """Where the two per-record passes run: :class:`InProcess` loops over task-sized chunks here; the ingest
    stage's ``RayPasses`` maps the same functions over Ray Data tasks. Everything else is the same run."""

    def fingerprint(self, work: pa.Table, sources: dict[str, SourceConfig], config_hashes: dict[str, str],
                    cfg: IngestConfig) -> list[pa.Table]:
        """:func:`fingerprint_batch` over `work`: the fingerprinted (or rejected) records, in any order."""
        ...

    def window(self, pending: pa.Table, sources: dict[str, SourceConfig], cfg: IngestConfig,
               config_hashes: dict[str, str], windows, run) -> tuple[list, list[pa.Table]]:
        """:func:`window_batch` then :func:`write_window_files` over `pending`, writing into the `windows`
        table as `run` (committing nothing): ([(DataFile, its records)], manifest rows per task)."""
        ...


def task_chunks(table: pa.Table, rows: int) -> list[pa.Table]:
    """The table in slices of `rows` (the last shorter): what one task of a pass is handed."""
    return [table.slice(i, rows) for i in range(0, len(table), rows)]


class InProcess:
    """The passes in this process, one chunk after another: a small ingest, a test, a notebook."""

    def fingerprint(self, work, sources, config_hashes, cfg):
        return [fingerprint_batch(chunk, sources, config_hashes)
                for chunk in task_chunks(work, cfg.records_per_task * 4)]

    def window(self, pending, sources, cfg, config_hashes, windows, run):
        data_files, manifest_parts = [], []
        for index, chunk in enumerate(task_chunks(pending, cfg.records_per_task)):
            files, rows = write_window_files(window_batch(chunk, sources, cfg, config_hashes), windows.metadata,
                                             windows.io, run.id, index, source_units(sources))
            data_files.extend(files)
            manifest_parts.append(rows)
        return data_files, manifest_parts


def run_ingest(sources: list[SourceConfig], output: str, cfg: IngestConfig | None = None,
               pseudonym: bytes | None = None, force: bool = False, *, passes: Passes | None = None,
               on_planned: Callable[[str], None] | None = None) -> IngestSummary:
    """One ingest run: plan → fingerprint → decide → window → de-duplicate → join patients → commit → end
    the run, then the data-quality reports and the summary. The passes run on `passes` (default in this
    process); `on_planned(output)` is called once the plan holds (a source without records is a ConfigError
    before anything is written or started). Raises IngestFailed, after committing, when a source's rejects
    exceed its allowed fraction. Re-ingests exactly the records whose fingerprint changed; `force`: all."""
    cfg = cfg or IngestConfig()
    passes = passes or InProcess()
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise ValueError(f"source names must be unique, got {names}")
    key = pseudonym if pseudonym is not None else pseudonym_key()
    started = time.perf_counter()
    output = output if "://" in output else str(Path(output).resolve())  # once: every path printed is usable
    by_name = {s.name: s for s in sources}
    work, summaries = plan(sources, key)
    if on_planned is not None:
        on_planned(output)
    log.info("planned %d records of %d sources (%s)", len(work), len(sources), ", ".join(names))
    dataset = open_for_ingest(output, cfg.catalog, cfg.storage_options)
    row_bytes = N_LEADS * cfg.window_samples * (2 if cfg.dtype == "float16" else 4)
    ensure_tables(dataset, cfg.window_samples, cfg.dtype, max(1, cfg.row_group_bytes // row_bytes))

    run = begin_run(dataset)  # after finishing or undoing killed runs
    try:
        previous = committed_manifest(dataset)
        config_hashes = {s.name: config_fingerprint(s, cfg) for s in sources}
        fingerprinted = _fingerprint(passes, work, by_name, config_hashes, cfg, previous, force)
        changes = plan_changes(fingerprinted, previous, set(names) if force else set())
        log.info("%d records to read and window; unchanged sources kept: %s", len(changes.pending),
                 ", ".join(sorted(changes.unchanged)) or "none")
        if changes.replace:
            written, windowed = _window_pass(passes, changes.pending, by_name, cfg, config_hashes, dataset, run)
            windowed, dropped, pairs = mark_duplicates(windowed, changes.kept, names, cfg.drop_duplicates)
            # Kept copies: their patients joined to their twins' (a committed twin's identity from its windows).
            windowed, rekeyed = join_patients(windowed, pairs, changes.pending,
                                              record_identities(dataset, [twin for twin, _ in pairs]), names)
            windows = dataset.windows()
            data_files = rewrite_records(written, windows.metadata, windows.io, run.id, dropped, rekeyed)
            manifest_new = pa.concat_tables([windowed, changes.settled.cast(windowed.schema)])
            hashes = pa.array([config_hashes[s] for s in manifest_new["source"].to_pylist()], pa.string())
            committed = commit_run(run, changes.replace, data_files, manifest_new.append_column("config_hash", hashes))
            snapshot = committed.current_snapshot()  # None while no run has committed a window (all rejected)
            log.info("committed %d data files of %d records: dataset version %s", len(data_files), len(manifest_new),
                     snapshot.snapshot_id if snapshot else "none (no windows yet)")
        manifest = committed_manifest(dataset)
    finally:
        end_run(run)

    if changes.replace:
        _reports(output, sorted(changes.replace), manifest, cfg)
    summary = summarise(output, summaries, manifest, changes.unchanged, time.perf_counter() - started, changes.replace)
    failed = [s for s in summary.sources if s.discovered and s.rejected / s.discovered > _max_rejects(by_name[s.name], cfg)]
    if failed:
        raise IngestFailed("; ".join(f"{s.name}: {s.rejected} of {s.discovered} records rejected "
                                     f"(> max_reject_fraction={_max_rejects(by_name[s.name], cfg)})" for s in failed)
                           + f"; see the manifest table of {output}", summary)
    return summary


def _reports(output: str, sources: list[str], manifest: pa.Table, cfg: IngestConfig) -> None:
    """OUTPUT/reports/<source>.md and .png of the sources this run changed (a report failure is only a warning)."""
    from crema.data.report import write_reports  # matplotlib: only when a report is written

    try:
        windows = read_windows(output, columns=["source", "window_index", "labels"],
                               filter=In("source", sources), storage_options=cfg.storage_options)
        write_reports(output, sources, manifest, windows, dataset_version(output, cfg.storage_options),
                      cfg.storage_options)
    except Exception as err:  # the dataset is committed; the report is a view of it
        log.warning("data-quality report not written: %s: %s", type(err).__name__, err)


def _max_rejects(source: SourceConfig, cfg: IngestConfig) -> float:
    return cfg.max_reject_fraction if source.max_reject_fraction is None else source.max_reject_fraction


def _fingerprint(passes: Passes, work: pa.Table, sources: dict[str, SourceConfig], config_hashes: dict[str, str],
                 cfg: IngestConfig, previous: pa.Table | None, force: bool) -> pa.Table:
    """Fingerprints (or reject reasons) of the planned records of sources with committed records, sorted by
    source and record id. A new or forced source's records are all re-read anyway: they skip this pass
    (null fingerprint) and the window pass fingerprints them from the bytes it reads."""
    known = set() if force or previous is None else set(previous["source"].to_pylist())
    decide = pc.is_in(work["source"], pa.array(sorted(known), pa.string()))
    fresh = work.filter(pc.invert(decide))
    parts = [fresh.append_column("fingerprint", pa.nulls(len(fresh), pa.string()))
                  .append_column("reason", pa.nulls(len(fresh), pa.string()))
                  .append_column("detail", pa.nulls(len(fresh), pa.string()))]
    work = work.filter(decide)
    if len(work):
        parts.extend(passes.fingerprint(work, sources, config_hashes, cfg))
    return pa.concat_tables(parts).sort_by([("source", "ascending"), ("record_id", "ascending")])


def _window_pass(passes: Passes, pending: pa.Table, sources: dict[str, SourceConfig], cfg: IngestConfig,
                 config_hashes: dict[str, str], dataset: Dataset, run: Run) -> tuple[list, pa.Table]:
    """Window the pending records into uncommitted data files; ([(DataFile, its records)], their manifest rows)."""
    data_files, parts = passes.window(pending, sources, cfg, config_hashes, dataset.windows(), run) \
        if len(pending) else ([], [])
    written = pa.concat_tables(parts).cast(MANIFEST_SCHEMA) if parts else MANIFEST_SCHEMA.empty_table()
    return data_files, account_for_lost(pending, written)
