"""Bare MATLAB ``.mat`` files (no WFDB header beside them): one array of samples per file, via scipy.

CPSC 2018's original release and exports from MATLAB tools are such files; ``scipy.io.loadmat`` reads them.

A bare ``.mat`` carries no rate, lead names or units, so the source YAML gives them, with the keys a CSV
source uses: ``fs`` (required), ``columns`` (lead names in the array's lead order; "" skips a lead),
``units`` (default mV) and ``scale`` (stored value x scale = a value in `units`). ``variable`` names the
array: ``val`` by default (PhysioNet's name), or a struct field as ``ECG.data`` (CPSC 2018). Without
``columns``, an array with 12 leads is read in the canonical order :data:`crema.data.signals.LEADS`.

The lead axis is the one as long as the lead list (rows when both are, as PhysioNet stores leads x
samples). A ``.mat`` with a ``.hea`` beside it is a WFDB record (PhysioNet Challenge data): its gains and
lead names are in the header, so it is rejected here with a reason that says to use ``format: wfdb``.
MATLAB v7.3 files are HDF5, which loadmat does not read: rejected as ``unsupported_version``.
"""

from __future__ import annotations

import io

import numpy as np

from crema.data.signals import LEADS, RawRecord, RecordRejected
from crema.data.readers import SingleFileReader

DEFAULT_VARIABLE = "val"


class MatReader(SingleFileReader):
    """Bare MATLAB files: one array of samples; lead order, rate and units come from the source YAML."""

    extensions = (".mat", ".MAT")

    def parse(self, record_id: str, data: bytes, path: str) -> RawRecord:
        """One file's bytes -> its RawRecord (RecordRejected for bad input)."""
        cfg = self.source
        header = path.rsplit(".", 1)[0] + ".hea"
        if self.fs.exists(header):
            raise RecordRejected("wfdb_record", f"{header.rsplit('/', 1)[-1]} lies beside it: a WFDB (PhysioNet "
                                                "Challenge) record, whose header gives its gains and leads: "
                                                "use format: wfdb")
        if cfg.fs is None:
            raise RecordRejected("missing_sampling_rate", "a mat source needs `fs` in its YAML")
        samples = self._array(data, cfg.variable or DEFAULT_VARIABLE)
        names = list(cfg.columns) if cfg.columns is not None else list(LEADS)
        if samples.ndim == 1:
            samples = samples[np.newaxis, :]
        if samples.shape[0] != len(names) and samples.shape[1] == len(names):
            samples = samples.T  # stored samples x leads
        if samples.shape[0] != len(names):
            raise RecordRejected("inconsistent_shape", f"an array of {samples.shape[0]} x {samples.shape[1]} for "
                                 f"{len(names)} leads ({'`columns`' if cfg.columns is not None else 'the 12 leads'})")
        keep = [k for k, name in enumerate(names) if name]
        if not keep or samples.shape[1] == 0:
            raise RecordRejected("no_signals", "no samples, or every lead skipped")
        signal = samples[keep].astype(np.float64)
        if cfg.scale is not None:
            signal *= cfg.scale
        return RawRecord(record_id=record_id, signal=signal, fs=float(cfg.fs), channel_names=[names[k] for k in keep],
                         units=[cfg.units or "mV"] * len(keep), meta={"variable": cfg.variable or DEFAULT_VARIABLE})

    @staticmethod
    def _array(data: bytes, variable: str) -> np.ndarray:
        """The numeric array at `variable` ("val", or "ECG.data" for a field of a struct)."""
        from scipy.io import loadmat  # imported here: only mat sources need it

        try:
            contents = loadmat(io.BytesIO(data), squeeze_me=True, struct_as_record=False)
        except NotImplementedError as err:  # scipy's message for v7.3 (HDF5) files
            raise RecordRejected("unsupported_version", f"{err}; save it with -v7") from None
        except Exception as err:  # not a MATLAB file, or a corrupt one: loadmat raises whatever it meets
            raise RecordRejected("unreadable", f"{type(err).__name__}: {str(err)[:200]}") from None
        first, *fields = variable.split(".")
        found: object = contents.get(first)
        for name in fields:  # struct_as_record=False: a struct's fields are attributes
            found = getattr(found, name, None)
        if found is None:
            stored = sorted(k for k in contents if not k.startswith("__"))
            raise RecordRejected("no_signals", f"no variable {variable!r} in the file (it holds {stored}); "
                                               "set `variable` in the source")
        if not isinstance(found, np.ndarray) or found.dtype.kind not in "iuf" or found.ndim not in (1, 2):
            kind = f"a {found.ndim}-d {found.dtype} array" if isinstance(found, np.ndarray) else type(found).__name__
            raise RecordRejected("bad_signal", f"{variable!r} is {kind}, not a 1-d or 2-d array of numbers")
        return found
