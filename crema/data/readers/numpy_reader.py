"""NumPy records: one ``.npy`` array or one ``.npz`` archive per record.

``.npy``: a 2-D array of samples. ``.npz``: key ``signal`` (the array), optionally ``leads`` (channel
names, a string array) and ``fs`` (a scalar, Hz).

Which axis holds the channels: the axis as long as ``leads`` when names are given; otherwise the
axis of length 12 or less (the first axis when both are), so ``(12, 5000)`` and ``(5000, 12)`` both
read as 12 leads of 5000 samples. An array with both axes longer than 12 and no names is refused.
Without names, an array of 12 channels is taken to be in the canonical order :data:`LEADS`.

The sampling rate is the file's ``fs``, else the source's ``fs``; units are mV unless the source
says otherwise. Files are loaded with ``allow_pickle=False``: a pickled object is refused, not run.
Record ids are file paths relative to the source root without extension; when both ``x.npy`` and
``x.npz`` exist, ``x.npy`` is read.
"""

from __future__ import annotations

import io
import zipfile
import zlib

import numpy as np

from crema.data.signals import LEADS, N_LEADS, RawRecord, RecordRejected
from crema.data.readers import MAX_RECORD_BYTES, Reader

EXTENSIONS = (".npy", ".npz")


class NumpyReader(Reader):
    """.npy / .npz arrays: `signal`, optional `leads` and `fs`."""

    extensions = EXTENSIONS

    def record_files(self, record_id: str) -> list[str]:
        return [self._path(record_id)]

    def read(self, record_id: str) -> RawRecord:
        """The record of one .npy / .npz file."""
        path = self._path(record_id)
        data = self.read_bytes(path)
        if path.endswith(".npz"):
            signal, names, fs = self._load_npz(data)
        else:
            signal, names, fs = self._load_array(data, "signal"), None, None
        stored_shape = list(signal.shape)
        signal = self._channels_first(signal, names)
        if names is None:
            if signal.shape[0] != N_LEADS:
                raise RecordRejected(
                    "missing_lead_names",
                    f"{signal.shape[0]} channels and no `leads` names (only 12 channels default to {LEADS})")
            names = list(LEADS)
        fs = fs if fs is not None else self.source.fs
        if fs is None:
            raise RecordRejected("missing_sampling_rate", "no `fs` in the file and none in the source config")
        if not np.isfinite(fs) or fs <= 0:
            raise RecordRejected("bad_sampling_rate", f"fs={fs}")
        return RawRecord(
            record_id=record_id,
            signal=signal,
            fs=float(fs),
            channel_names=names,
            units=[self.source.units or "mV"] * len(names),
            meta={"stored_shape": stored_shape},
        )

    def _path(self, record_id: str) -> str:
        for ext in EXTENSIONS:
            path = self.path_of(record_id + ext)
            if self.fs.exists(path):
                return path
        raise RecordRejected("missing_file", f"{record_id} with none of {EXTENSIONS}")

    @staticmethod
    def _load_array(data: bytes, what: str) -> np.ndarray:
        """A .npy file's array, its header checked before any allocation."""
        if not data.startswith(np.lib.format.MAGIC_PREFIX):
            raise RecordRejected("unreadable", f"{what} is not a .npy array")
        try:
            array = np.load(io.BytesIO(data), allow_pickle=False)
        except ValueError as err:
            # Only a pickled (object) array needs pickle, and unpickling runs code from the file.
            reason = "pickled_object" if "allow_pickle" in str(err) else "unreadable"
            raise RecordRejected(reason, f"{what}: {err}") from None
        except (OSError, EOFError) as err:
            raise RecordRejected("unreadable", f"{what}: {err}") from None
        return array

    def _load_npz(self, data: bytes) -> tuple[np.ndarray, list[str] | None, float | None]:
        """An .npz file's signal, lead names and rate."""
        try:
            archive = zipfile.ZipFile(io.BytesIO(data))
        except zipfile.BadZipFile as err:
            raise RecordRejected("unreadable", f"not an .npz archive: {err}") from None
        with archive:
            members = {info.filename: info for info in archive.infolist()}
            # A compressed member can declare a huge size (a zip bomb): check before inflating.
            total = sum(info.file_size for info in members.values())
            if total > MAX_RECORD_BYTES:
                raise RecordRejected("file_too_large", f"archive inflates to {total} bytes")
            if "signal.npy" not in members:
                raise RecordRejected("missing_signal", f"no `signal` array among {sorted(members)}")

            def load(key: str) -> np.ndarray:
                try:
                    with archive.open(key + ".npy") as f:
                        return self._load_array(f.read(), key)
                except (zipfile.BadZipFile, zlib.error, OSError, EOFError) as err:
                    raise RecordRejected("unreadable", f"{key}: {err}") from None

            signal = load("signal")
            names = None
            if "leads.npy" in members:
                leads = load("leads")
                if leads.dtype.kind not in "US" or leads.ndim != 1:
                    raise RecordRejected("bad_lead_names", f"`leads` must be a 1-D string array, not {leads.dtype}")
                names = [str(n.decode() if isinstance(n, bytes) else n).strip() for n in leads]
            fs = None
            if "fs.npy" in members:
                fs_array = load("fs")
                if fs_array.size != 1 or fs_array.dtype.kind not in "iuf":
                    raise RecordRejected("bad_sampling_rate", f"`fs` must be one number, not {fs_array!r}")
                fs = float(fs_array.reshape(()))
        return signal, names, fs

    @staticmethod
    def _channels_first(signal: np.ndarray, names: list[str] | None) -> np.ndarray:
        """The signal as (channels, samples), whichever way the file stored it."""
        if signal.dtype.kind not in "iuf":
            raise RecordRejected("bad_signal_dtype", f"signal dtype {signal.dtype} is not numeric")
        if signal.ndim != 2:
            raise RecordRejected("inconsistent_shape", f"signal has shape {signal.shape}, expected 2-D")
        rows, cols = signal.shape
        if names is not None:
            if len(names) not in (rows, cols):
                raise RecordRejected("inconsistent_shape", f"{len(names)} lead names for a {signal.shape} signal")
            channels_first = rows == len(names)
        elif rows <= N_LEADS:
            channels_first = True
        elif cols <= N_LEADS:
            channels_first = False
        else:
            raise RecordRejected(
                "ambiguous_layout", f"signal {signal.shape}: neither axis has 12 or fewer channels and no `leads`")
        signal = signal if channels_first else signal.T
        return np.ascontiguousarray(signal, dtype=np.float64)
