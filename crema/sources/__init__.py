"""Readers: one small class per file format, looked up by the source's `format` key.

A new format is one module here that subclasses :class:`Reader` and decorates it with
:func:`register`; a new hospital with a known format is only a YAML file.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from typing import ClassVar

import fsspec
from fsspec.core import url_to_fs

from crema.config import SourceConfig
from crema.signals import RawRecord, RecordRejected

READERS: dict[str, type["Reader"]] = {}

# Files larger than this are refused before they are read: no ECG record needs more, and a hostile
# header must not make a worker allocate without bound.
MAX_RECORD_BYTES = 512 * 2**20


def register(cls: type["Reader"]) -> type["Reader"]:
    READERS[cls.format] = cls
    return cls


def reader_for(source: SourceConfig) -> "Reader":
    _load_builtin_readers()
    try:
        cls = READERS[source.format]
    except KeyError:
        raise KeyError(f"source {source.name!r}: unknown format {source.format!r}; known: {sorted(READERS)}") from None
    return cls(source)


class Reader(ABC):
    """Finds the records of one source and reads each into a :class:`RawRecord`.

    Record ids are paths relative to the source root without extension (``00000/00001_hr``), so they
    are stable across machines and storage (local or s3://). Every method that touches one record
    raises :class:`RecordRejected` with a specific reason for bad input, never anything else on purpose.
    """

    format: ClassVar[str]
    extensions: ClassVar[tuple[str, ...]]  # files that mark a record when walking the folder
    # A record declaring more than this is hostile or broken; ingest sets it from IngestConfig.
    max_record_seconds: float = 24 * 3600

    def __init__(self, source: SourceConfig):
        self.source = source
        self.fs, self.root = url_to_fs(source.path, **source.storage_options)
        self.root = self.root.rstrip("/")

    def discover(self) -> list[str]:
        """Every record id of the source, sorted: the `records` file's, or every file with one of
        `extensions` found in one recursive listing (a paginated LIST on s3, not a walk per folder)."""
        listed = self.listed_records()
        if listed is not None:
            return listed
        prefix = self.root + "/"
        ids = set()
        for path in self.fs.find(self.root):
            name = path.rsplit("/", 1)[-1]
            if name.endswith(self.extensions) and not name.startswith("."):
                relative = path[len(prefix):] if path.startswith(prefix) else path
                ids.add(relative.rsplit(".", 1)[0])
        return sorted(ids)

    @abstractmethod
    def record_files(self, record_id: str) -> list[str]:
        """The files whose bytes make up the record (fingerprinted for duplicate detection)."""

    @abstractmethod
    def read(self, record_id: str) -> RawRecord:
        """The record's channels as found, or RecordRejected."""

    def path_of(self, relative: str) -> str:
        """A path under the source root; refuses anything that escapes it (hostile headers)."""
        parts = []
        for part in relative.replace("\\", "/").split("/"):
            if part in ("", "."):
                continue
            if part == ".." or ":" in part:
                raise RecordRejected("path_outside_source", f"{relative!r} points outside the source folder")
            parts.append(part)
        if not parts:
            raise RecordRejected("path_outside_source", f"{relative!r} is not a file under the source")
        return "/".join([self.root, *parts])

    def read_bytes(self, path: str) -> bytes:
        try:
            size = self.fs.size(path)
        except FileNotFoundError:
            raise RecordRejected("missing_file", path.rsplit("/", 1)[-1]) from None
        if size is not None and size > MAX_RECORD_BYTES:
            raise RecordRejected("file_too_large", f"{path.rsplit('/', 1)[-1]} is {size} bytes")
        try:
            with self.fs.open(path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise RecordRejected("missing_file", path.rsplit("/", 1)[-1]) from None

    def fingerprint(self, record_id: str) -> str:
        """SHA-256 of the record's signal bytes: equal for byte-identical copies under other names."""
        digest = hashlib.sha256()
        for path in self.record_files(record_id):
            digest.update(self.read_bytes(path))
        return digest.hexdigest()

    def listed_records(self) -> list[str] | None:
        """Record ids from the source's `records` file (RECORDS or a CSV with a `record` column)."""
        if not self.source.records:
            return None
        path = self.path_of(self.source.records) if "://" not in self.source.records else self.source.records
        with fsspec.open(path, "rt", **self.source.storage_options) as f:
            lines = [ln.strip() for ln in f if ln.strip()]
        if self.source.records.endswith(".csv"):
            header = [h.strip() for h in lines[0].split(",")]
            col = header.index("record")
            lines = [ln.split(",")[col].strip() for ln in lines[1:]]
        return sorted(dict.fromkeys(lines))


def _load_builtin_readers() -> None:
    # Imported for their @register side effect.
    from crema.sources import numpy_reader, wfdb_reader  # noqa: F401
