"""Readers: one small class per file format, looked up by the source's `format` key.

Readers are found through the Python entry-point group ``crema.readers`` (name = format, value =
``module:Class``), the built-in ones included (see pyproject.toml). So a hospital's own reader can live
in its own package: it subclasses :class:`Reader` and declares an entry point, and no file here changes.
A new hospital with a known format is only a YAML file.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
from abc import ABC, abstractmethod
from typing import ClassVar

import fsspec
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from crema.config import SourceConfig, installed_readers
from crema.data.signals import RawRecord, RecordRejected

# Files larger than this are refused before they are read: no ECG record needs more, and a hostile
# header must not make a worker allocate without bound.
MAX_RECORD_BYTES = 512 * 2**20


def reader_class(format: str) -> type["Reader"]:
    """The reader class of a format name (case-insensitive); KeyError naming the installed ones."""
    readers = installed_readers()
    try:
        entry_point = readers[format.strip().lower()]
    except KeyError:
        raise KeyError(f"unknown format {format!r}; installed readers: {sorted(readers)}") from None
    cls = entry_point.load()
    if not (isinstance(cls, type) and issubclass(cls, Reader)):
        raise TypeError(f"entry point {entry_point.value!r} of format {entry_point.name!r} is not a Reader subclass")
    return cls


def reader_for(source: SourceConfig) -> "Reader":
    return reader_class(source.format)(source)


class Reader(ABC):
    """Finds the records of one source and reads each into a :class:`RawRecord`.

    Record ids are paths relative to the source root without extension (``00000/00001_hr``), so they
    are stable across machines and storage (local or s3://). Every method that touches one record
    raises :class:`RecordRejected` with a specific reason for bad input, never anything else on purpose.
    """

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
        path = "/".join([self.root, *parts])
        if isinstance(self.fs, LocalFileSystem) and not self.source.follow_symlinks:
            real = self._real_path(path)  # a symlink (file or folder) is not followed out of the source
            if real != self._real_root and not real.startswith(self._real_root + os.sep):
                raise RecordRejected("path_outside_source",
                                     f"{relative!r} is a symlink to {real}, outside the source folder")
        return path

    def _real_path(self, path: str) -> str:
        """os.path.realpath(path), with each folder resolved once: a record's files share their folder."""
        folder, _, name = path.rpartition("/")
        return os.path.realpath(path) if os.path.islink(path) else os.path.join(self._real_folder(folder), name)

    @functools.lru_cache(maxsize=4096)
    def _real_folder(self, folder: str) -> str:
        return os.path.realpath(folder)

    @functools.cached_property
    def _real_root(self) -> str:
        return os.path.realpath(self.root)

    @contextlib.contextmanager
    def files_read_once(self):
        """Within this block every file is read from storage at most once: the first ingest of a source
        fingerprints and reads each record in one go, and the fingerprint's bytes are the decoder's."""
        self._read_once = {}
        try:
            yield
        finally:
            self._read_once = None

    _read_once: dict[str, bytes] | None = None

    def read_bytes(self, path: str) -> bytes:
        """A record file's bytes, refused above MAX_RECORD_BYTES and rejected when missing."""
        if self._read_once is not None:
            if path not in self._read_once:
                self._read_once[path] = self._read_from_storage(path)
            return self._read_once[path]
        return self._read_from_storage(path)

    def _read_from_storage(self, path: str) -> bytes:
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
        """SHA-256 of every file the record is read from (header, map and signal files): any edit to what
        the record means (a gain, a lead name, the rate, the samples) changes it."""
        digest = hashlib.sha256()
        for path in self.identity_files(record_id):
            digest.update(path.rsplit("/", 1)[-1].encode() + b"\x00")
            digest.update(self.read_bytes(path))
        return digest.hexdigest()

    def identity_files(self, record_id: str) -> list[str]:
        """The files whose bytes make up what the record means: by default its `record_files`."""
        return self.record_files(record_id)

    def listed_records(self) -> list[str] | None:
        """Record ids from the source's `records` file (RECORDS or a CSV with a `record` column)."""
        if not self.source.records:
            return None
        # The source's config is trusted, unlike a header's file names: the list may lie outside the source
        # folder (an absolute path or a URI), relative paths resolve against it.
        path = self.source.resolve(self.source.records)
        with fsspec.open(path, "rt", **self.source.storage_options) as f:
            lines = [ln.strip() for ln in f if ln.strip()]
        if self.source.records.endswith(".csv"):
            header = [h.strip() for h in lines[0].split(",")]
            col = header.index("record")
            lines = [ln.split(",")[col].strip() for ln in lines[1:]]
        return sorted(dict.fromkeys(lines))


class SingleFileReader(Reader):
    """A format whose record is one file: the id is its path without extension.

    `extensions` are tried in order to find the file back from the id, so list the spellings hospital
    exports use (``.xml`` and ``.XML``). Subclasses implement :meth:`parse`, from the file's bytes.
    """

    def record_files(self, record_id: str) -> list[str]:
        return [self.file_of(record_id)]

    def read(self, record_id: str) -> RawRecord:
        path = self.file_of(record_id)
        return self.parse(record_id, self.read_bytes(path), path)

    @abstractmethod
    def parse(self, record_id: str, data: bytes, path: str) -> RawRecord:
        """The record in `data` (the bytes of `path`), or RecordRejected."""

    def file_of(self, record_id: str) -> str:
        """The one file of a record id: its path under the source, with the format's extension."""
        if len(self.extensions) == 1:
            return self.path_of(record_id + self.extensions[0])  # no lookup needed (one stat less on s3)
        for ext in self.extensions:
            path = self.path_of(record_id + ext)
            if self.fs.exists(path):
                return path
        raise RecordRejected("missing_file", f"{record_id} with none of {self.extensions}")
