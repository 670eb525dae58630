"""WFDB records (PhysioNet): a ``.hea`` text header plus the signal files it names.

Why a reader of our own in front of ``wfdb.rdrecord``: a measured benchmark on PTB-XL showed that
rdrecord spends about 90% of its ~3-4 ms per record parsing the header through pandas tables, while
reading the signal bytes takes about 0.03 ms. Ingest reads every record of every source, so the
header is parsed here with plain string operations and the common sample formats (16, 61, 80, 160,
212, 24, 32, with or without a byte offset, so PhysioNet Challenge ``.mat`` records too) are decoded
with numpy. Everything else (difference-coded 8, 310/311, FLAC 508/516/524, skew, several samples per
frame, multi-segment records) goes to ``wfdb.rdrecord``, so any record wfdb reads is read.
tests/data/test_readers.py checks the fast path against ``wfdb.rdrecord`` on every shared record.

Record ids are header paths relative to the source root without ``.hea`` (``00000/00001_hr``).
"""

from __future__ import annotations

import functools
import math
import os
import re
import tempfile
from dataclasses import dataclass

import numpy as np
from fsspec.implementations.local import LocalFileSystem

from crema.data.signals import RawRecord, RecordRejected
from crema.data.readers import MAX_RECORD_BYTES, Reader

# A header is a few lines per signal; anything larger is not a WFDB header.
MAX_HEADER_BYTES = 1 * 2**20

# The WFDB default when the record line gives no sampling frequency.
WFDB_DEFAULT_FS = 250.0
WFDB_DEFAULT_GAIN = 200.0
WFDB_DEFAULT_UNITS = "mV"

# Bytes per stored sample of the uncompressed formats wfdb knows (for length and truncation checks).
BYTES_PER_SAMPLE = {"8": 1, "16": 2, "24": 3, "32": 4, "61": 2, "80": 1, "160": 2,
                    "212": 1.5, "310": 4 / 3, "311": 4 / 3}
COMPRESSED_FORMATS = {"508", "516", "524"}
KNOWN_FORMATS = set(BYTES_PER_SAMPLE) | COMPRESSED_FORMATS

# The digital value that stands for a missing sample, as wfdb's dac() reads it.
INVALID_SAMPLE = {"16": -(2**15), "61": -(2**15), "160": -(2**15), "80": -(2**7),
                  "212": -(2**11), "24": -(2**23), "32": -(2**31)}
FAST_FORMATS = set(INVALID_SAMPLE)

_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_RX_FS = re.compile(r"(?P<fs>\d+\.?\d*|\.\d+)(?:/(?P<counter>-?\d*\.?\d*))?(?:\((?P<base>-?\d*\.?\d*)\))?")
_RX_FORMAT = re.compile(r"(?P<fmt>\d+)(?:x(?P<spf>\d+))?(?::(?P<skew>\d+))?(?:\+(?P<offset>\d+))?")
_RX_DX = re.compile(r"#\s*Dx\s*:\s*(.*)$", re.IGNORECASE)
_RX_GAIN = re.compile(rf"(?P<gain>{_NUMBER})?(?:\((?P<baseline>-?\d+)\))?(?:/(?P<units>\S*))?")


@dataclass(frozen=True)
class _Signal:
    """One signal line of a WFDB header."""

    file_name: str
    fmt: str
    samples_per_frame: int
    skew: int
    byte_offset: int | None
    adc_gain: float
    baseline: int
    units: str
    name: str


@dataclass(frozen=True)
class _Header:
    n_signals: int
    fs: float | None  # None: the record line gives none
    n_samples: int | None  # None: the record line gives none (then inferred from the first signal file)
    signals: tuple[_Signal, ...]
    segments: tuple[str, ...]  # segment header names of a multi-segment record; empty otherwise
    dx: tuple[str, ...] = ()  # PhysioNet-Challenge diagnoses: the SNOMED CT codes of a `#Dx:` comment line


def _int_field(token: str, what: str) -> int:
    try:
        return int(token)
    except ValueError:
        raise RecordRejected("bad_header", f"{what} {token!r} is not an integer") from None


@functools.lru_cache(maxsize=1024)
def parse_header(text: str) -> _Header:
    """The fields of a WFDB header (record line, signal or segment lines); comments are skipped. Cached by
    text (the result is immutable): fingerprinting and reading a record both need it."""
    lines = [ln.strip() for ln in text.splitlines()]
    dx = tuple(code.strip() for ln in lines if (m := _RX_DX.match(ln)) for code in m.group(1).split(",")
               if code.strip())
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    if not lines:
        raise RecordRejected("bad_header", "no record line")
    record = lines[0].split()
    if len(record) < 2:
        raise RecordRejected("bad_header", "record line has no signal count")
    n_segments = record[0].partition("/")[2]
    n_signals = _int_field(record[1], "number of signals")
    fs = None
    if len(record) > 2:
        m = _RX_FS.fullmatch(record[2])
        if m is None:
            raise RecordRejected("bad_header", f"sampling frequency {record[2]!r} is not a number")
        fs = float(m["fs"])
    n_samples = _int_field(record[3], "number of samples") if len(record) > 3 else None
    if n_samples is not None and n_samples < 0:
        raise RecordRejected("bad_header", f"negative number of samples {n_samples}")
    body = lines[1:]

    if n_segments:
        count = _int_field(n_segments, "number of segments")
        if count != len(body) or count == 0:
            raise RecordRejected("bad_header", f"{count} segments declared, {len(body)} segment lines")
        segments = []
        for line in body:
            fields = line.split()
            if len(fields) != 2:
                raise RecordRejected("bad_header", f"segment line {line[:80]!r}")
            _int_field(fields[1], "segment length")
            segments.append(fields[0])
        return _Header(n_signals, fs, n_samples, (), tuple(segments), dx)

    if n_signals != len(body):
        raise RecordRejected("bad_header", f"{n_signals} signals declared, {len(body)} signal lines")
    return _Header(n_signals, fs, n_samples, tuple(_parse_signal_line(line) for line in body), (), dx)


def _parse_signal_line(line: str) -> _Signal:
    # file format[xspf][:skew][+offset] gain[(baseline)][/units] adc_res adc_zero init checksum block description
    """A WFDB header signal line as a _Signal (file, format, gain, baseline, units, name)."""
    fields = line.split(maxsplit=8)
    if len(fields) < 2:
        raise RecordRejected("bad_header", f"signal line {line[:80]!r} has no format")
    file_name = fields[0]
    fmt = _RX_FORMAT.fullmatch(fields[1])
    if fmt is None:
        raise RecordRejected("bad_header", f"signal format {fields[1]!r}")
    gain, baseline, units = WFDB_DEFAULT_GAIN, None, WFDB_DEFAULT_UNITS
    if len(fields) > 2:
        g = _RX_GAIN.fullmatch(fields[2])
        if g is None or not fields[2]:
            raise RecordRejected("bad_header", f"ADC gain {fields[2]!r} is not a number")
        if g["gain"] is not None:
            gain = float(g["gain"]) or WFDB_DEFAULT_GAIN  # WFDB: a gain of 0 means the default
            if not math.isfinite(gain):
                raise RecordRejected("bad_header", f"ADC gain {fields[2]!r} is not finite")
            if gain < 0:
                raise RecordRejected("bad_gain", f"ADC gain {fields[2]!r} is negative")
        if g["baseline"] is not None:
            baseline = int(g["baseline"])
        units = g["units"] or WFDB_DEFAULT_UNITS
    integers = [_int_field(tok, "signal field") for tok in fields[3:8]]  # adc_res adc_zero init checksum block
    if baseline is None:
        baseline = integers[1] if len(integers) > 1 else 0  # WFDB: the baseline defaults to adc_zero
    return _Signal(
        file_name=file_name,
        fmt=fmt["fmt"],
        samples_per_frame=int(fmt["spf"] or 1),
        skew=int(fmt["skew"] or 0),
        byte_offset=int(fmt["offset"]) if fmt["offset"] else None,
        adc_gain=gain,
        baseline=baseline,
        units=units,
        name=fields[8].strip() if len(fields) > 8 else "",
    )


@dataclass(frozen=True)
class _SignalFile:
    path: str
    fmt: str
    byte_offset: int
    channels: tuple[int, ...]  # rows of the record, in the file's frame order
    samples_per_frame: int  # summed over the file's signals


def _group_by_file(header: _Header, path_of) -> list[_SignalFile]:
    """The header's signals grouped by the file that holds them, in header order."""
    groups: dict[str, list[int]] = {}
    for i, sig in enumerate(header.signals):
        if sig.file_name == "~":  # WFDB: a signal with no stored samples
            continue
        groups.setdefault(sig.file_name, []).append(i)
    files = []
    for file_name, channels in groups.items():
        first = header.signals[channels[0]]
        files.append(_SignalFile(
            path=path_of(file_name),
            fmt=first.fmt,
            byte_offset=first.byte_offset or 0,
            channels=tuple(channels),
            samples_per_frame=sum(header.signals[c].samples_per_frame for c in channels),
        ))
    return files


def _needed_bytes(fmt: str, n_values: int) -> int:
    if fmt == "212":
        return math.ceil(n_values * 1.5)
    if fmt in ("310", "311"):
        return math.ceil(n_values * 4 / 3)
    return int(n_values * BYTES_PER_SAMPLE[fmt])


def _decode(data: bytes, fmt: str, offset: int, n_values: int) -> np.ndarray:
    """Digital samples of one signal file, interleaved frame by frame, as integers."""
    if fmt == "16":
        return np.frombuffer(data, "<i2", n_values, offset)
    if fmt == "61":
        return np.frombuffer(data, ">i2", n_values, offset)
    if fmt == "32":
        return np.frombuffer(data, "<i4", n_values, offset)
    if fmt == "80":
        return np.frombuffer(data, "u1", n_values, offset).astype(np.int16) - 128
    if fmt == "160":
        return np.frombuffer(data, "<u2", n_values, offset).astype(np.int32) - 32768
    if fmt == "24":
        b = np.frombuffer(data, "u1", 3 * n_values, offset).reshape(-1, 3).astype(np.int32)
        return b[:, 0] | (b[:, 1] << 8) | (b[:, 2].astype(np.int8).astype(np.int32) << 16)
    if fmt == "212":
        # Two 12-bit samples in three bytes: low byte of each, high nibbles shared in the middle byte.
        n_pairs = (n_values + 1) // 2
        raw = np.frombuffer(data, "u1", _needed_bytes(fmt, n_values), offset)
        b = np.zeros(3 * n_pairs, np.int16)
        b[:raw.size] = raw
        b = b.reshape(-1, 3)
        out = np.empty((n_pairs, 2), np.int16)
        out[:, 0] = b[:, 0] | ((b[:, 1] & 0x0F) << 8)
        out[:, 1] = b[:, 2] | ((b[:, 1] & 0xF0) << 4)
        out = out.reshape(-1)[:n_values]
        out[out > 2047] -= 4096
        return out
    raise AssertionError(f"format {fmt} is not on the fast path")


class WfdbReader(Reader):
    """PhysioNet WFDB records (and Challenge .mat): a header and the signal files it names."""

    extensions = (".hea",)

    def record_files(self, record_id: str) -> list[str]:
        """The signal files, not the header: the header names the record, so a renamed copy of the
        same recording would fingerprint differently if it were included."""
        return self._named_files(record_id, self._header(record_id))[1]

    def identity_files(self, record_id: str) -> list[str]:
        """The header (gains, units, lead names, rate, Challenge labels) and every file it names."""
        segment_headers, signal_files = self._named_files(record_id, self._header(record_id))
        return [self.path_of(record_id + ".hea"), *segment_headers, *signal_files]

    def read(self, record_id: str) -> RawRecord:
        """The record of one header and its signal files."""
        header = self._header(record_id)
        fs = header.fs if header.fs is not None else (self.source.fs or WFDB_DEFAULT_FS)
        if fs <= 0:
            raise RecordRejected("bad_sampling_rate", f"fs={fs}")
        if header.n_samples is not None and header.n_samples > self.max_record_seconds * fs:
            raise RecordRejected(
                "absurd_length",
                f"{header.n_samples} samples at {fs} Hz is more than {self.max_record_seconds:.0f} s")
        if header.segments:
            self._named_files(record_id, header)  # the segment names' guards, before wfdb opens them
            return self._read_with_wfdb(record_id, header, fs)
        if header.n_signals == 0:
            raise RecordRejected("no_signals", "the header declares no signals")
        for sig in header.signals:
            if sig.fmt not in KNOWN_FORMATS:
                raise RecordRejected("unsupported_format", f"WFDB format {sig.fmt}")
        files = self._signal_files(record_id, header)
        if self._fast_path_handles(header, files):
            return self._read_fast(record_id, header, files, fs)
        self._check_sizes(header, files)
        return self._read_with_wfdb(record_id, header, fs)

    # ------------------------------------------------------------------------------------ header

    def _header(self, record_id: str) -> _Header:
        """The record's parsed header, its signal files confined to the source."""
        raw = self.read_bytes(self.path_of(record_id + ".hea"))
        if len(raw) > MAX_HEADER_BYTES:
            raise RecordRejected("bad_header", f"header larger than {MAX_HEADER_BYTES} bytes")
        if b"\x00" in raw:
            raise RecordRejected("bad_header", "binary data in the header")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.decode("latin-1")
        return parse_header(text)

    def _sibling(self, record_id: str, name: str) -> str:
        """A file named in a header, relative to the source root (headers name files beside them)."""
        if name.startswith(("/", "~")):
            raise RecordRejected("path_outside_source", f"{name!r} is not a file beside the header")
        folder = record_id.rpartition("/")[0]
        return f"{folder}/{name}" if folder else name

    def _signal_files(self, record_id: str, header: _Header) -> list[_SignalFile]:
        return _group_by_file(header, lambda name: self.path_of(self._sibling(record_id, name)))

    def _n_samples(self, header: _Header, files: list[_SignalFile], first_file_size) -> int:
        """Samples per signal, from the header or else the file size."""
        if header.n_samples is not None:
            return header.n_samples
        # As wfdb does: the length is what the first signal file holds.
        if not files:
            raise RecordRejected("bad_header", "no signal length and no signal file")
        first = files[0]
        if first.fmt in COMPRESSED_FORMATS:
            raise RecordRejected("bad_header", "no signal length for a compressed signal file")
        return int((first_file_size() - first.byte_offset)
                   / (BYTES_PER_SAMPLE[first.fmt] * first.samples_per_frame))

    def _check_length(self, file: _SignalFile, n_samples: int, size: int) -> None:
        """Reject a record whose header implies more than MAX_RECORD_BYTES, before anything is allocated."""
        if file.fmt in COMPRESSED_FORMATS:
            return
        needed = file.byte_offset + _needed_bytes(file.fmt, n_samples * file.samples_per_frame)
        if needed > MAX_RECORD_BYTES:
            raise RecordRejected("absurd_length", f"{n_samples} samples need {needed} bytes")
        if size < needed:
            raise RecordRejected(
                "truncated_signal",
                f"{file.path.rsplit('/', 1)[-1]} has {size} bytes, the header declares {needed}")

    # --------------------------------------------------------------------------------- fast path

    @staticmethod
    def _fast_path_handles(header: _Header, files: list[_SignalFile]) -> bool:
        """Whether the numpy fast path reads this header's formats."""
        if sum(len(f.channels) for f in files) != header.n_signals:
            return False
        for file in files:
            signals = [header.signals[c] for c in file.channels]
            if file.fmt not in FAST_FORMATS or any(s.fmt != file.fmt for s in signals):
                return False
            if any(s.samples_per_frame != 1 or s.skew for s in signals):
                return False
            if any(s.byte_offset not in (None, file.byte_offset) for s in signals[1:]):
                return False
        return True

    def _read_fast(self, record_id: str, header: _Header, files: list[_SignalFile], fs: float) -> RawRecord:
        """Decode the signal files with numpy (FAST_FORMATS), without the wfdb library."""
        contents = {}
        n_samples = None
        for file in files:
            contents[file.path] = data = self.read_bytes(file.path)
            if n_samples is None:
                n_samples = self._n_samples(header, files, lambda: len(data))
            self._check_length(file, n_samples, len(data))

        signal = np.empty((header.n_signals, n_samples), np.float64)
        for file in files:
            channels = list(file.channels)
            digital = _decode(contents[file.path], file.fmt, file.byte_offset, n_samples * len(channels))
            digital = digital.reshape(n_samples, len(channels)).T
            contiguous = channels == list(range(channels[0], channels[0] + len(channels)))
            rows = signal[channels[0]:channels[0] + len(channels)] if contiguous else np.empty(digital.shape)
            # In place and in wfdb's order (subtract, then divide), so the values are bit-identical.
            rows[:] = digital
            rows -= np.array([header.signals[c].baseline for c in channels], np.float64)[:, None]
            rows /= np.array([header.signals[c].adc_gain for c in channels], np.float64)[:, None]
            invalid = digital == INVALID_SAMPLE[file.fmt]
            if invalid.any():
                rows[invalid] = np.nan
            if not contiguous:
                signal[channels] = rows
        return self._record(record_id, header, signal, fs,
                            [s.name for s in header.signals], [s.units for s in header.signals], "numpy")

    def _record(self, record_id, header, signal, fs, names, units, decoder) -> RawRecord:
        """The decoded samples as a RawRecord in physical units."""
        if self.source.units:
            units = [self.source.units] * len(names)
        fmts = sorted({s.fmt for s in header.signals})
        return RawRecord(
            record_id=record_id,
            signal=signal,
            fs=float(fs),
            channel_names=names,
            units=units,
            # Header comments stay out (they hold ages, dates and sometimes names), except the Challenge's
            # `#Dx:` diagnosis codes (SNOMED CT).
            meta={"fmt": ",".join(fmts), "n_samples_declared": header.n_samples, "decoder": decoder,
                  **({"labels": list(header.dx)} if header.dx else {})},
        )

    # ------------------------------------------------------------------------------ wfdb fallback

    def _check_sizes(self, header: _Header, files: list[_SignalFile]) -> None:
        """The guards of the fast path, from file sizes alone, before wfdb reads anything."""
        sizes = {}
        for file in files:
            try:
                sizes[file.path] = size = self.fs.size(file.path)
            except FileNotFoundError:
                raise RecordRejected("missing_file", file.path.rsplit("/", 1)[-1]) from None
            if size > MAX_RECORD_BYTES:
                raise RecordRejected("file_too_large", f"{file.path.rsplit('/', 1)[-1]} is {size} bytes")
        n_samples = self._n_samples(header, files, lambda: sizes[files[0].path])
        for file in files:
            self._check_length(file, n_samples, sizes[file.path])

    def _read_with_wfdb(self, record_id: str, header: _Header, fs: float) -> RawRecord:
        """The wfdb library's reader, for the formats the fast path does not handle."""
        import wfdb  # imported here: pandas and matplotlib are slow to import and most records never need it

        try:
            if isinstance(self.fs, LocalFileSystem):
                record = wfdb.rdrecord(self.path_of(record_id))
            else:
                # wfdb reads local paths only: copy the header and the files it names beside each other.
                with tempfile.TemporaryDirectory(prefix="crema-wfdb-") as tmp:
                    segment_headers, signal_files = self._named_files(record_id, header)
                    for path in [self.path_of(record_id + ".hea"), *segment_headers, *signal_files]:
                        self.fs.get(path, os.path.join(tmp, path.rsplit("/", 1)[-1]))
                    record = wfdb.rdrecord(os.path.join(tmp, record_id.rsplit("/", 1)[-1]))
        except RecordRejected:
            raise
        except Exception as err:  # wfdb raises anything from ValueError to IndexError on broken files
            raise RecordRejected("unreadable", f"{type(err).__name__}: {err}") from err
        if record.p_signal is None or record.n_sig == 0:
            raise RecordRejected("no_signals", "wfdb read no signals")
        signal = np.ascontiguousarray(record.p_signal.T, dtype=np.float64)
        names = [(name or "").strip() for name in record.sig_name]
        units = [unit or WFDB_DEFAULT_UNITS for unit in record.units]
        return self._record(record_id, header, signal, fs, names, units, "wfdb")

    def _named_files(self, record_id: str, header: _Header) -> tuple[list[str], list[str]]:
        """(segment headers, signal files) named by a header and, for a multi-segment record, its segments."""
        segment_headers = []
        signal_files = [f.path for f in self._signal_files(record_id, header)]
        for segment in header.segments:
            if segment != "~":  # an empty segment (a gap)
                seg_id = self._sibling(record_id, segment)
                segment_headers.append(self.path_of(seg_id + ".hea"))
                signal_files += [f.path for f in self._signal_files(seg_id, self._header(seg_id))]
        return list(dict.fromkeys(segment_headers)), list(dict.fromkeys(signal_files))
