"""EDF and EDF+ (European Data Format): one ``.edf`` file per recording, read with ``edfio``.

Each signal has its own label, physical dimension (``uV``, ``mV``) and rate; ``edfio`` returns
physical values (digital values through each signal's physical/digital range). Labels are taken
as written, less an ``ECG`` prefix (``ECG I`` -> ``I``, ``ECG V1`` -> ``V1``). EDF+ annotations are
not signals and are ignored. A signal that is one constant value throughout is a lead the device did
not record (Contec exports write V1-V6 as zeros when only limb leads were taken): it is dropped, not
passed on as a flat "recorded" lead. When signals differ in rate (a polysomnography file: EEG, respiration,
ECG), the signals at the highest rate are kept (ECG is sampled fastest) and the others listed in
``meta["dropped"]``.
"""

from __future__ import annotations

import io
import re

import numpy as np

from crema.data.signals import RawRecord, RecordRejected
from crema.data.readers import SingleFileReader

ECG_PREFIX = re.compile(r"^\s*(ecg|ekg)[\s_-]+", re.IGNORECASE)


class EdfReader(SingleFileReader):
    """EDF / EDF+: ECG signals by label, constant (unrecorded) signals dropped."""

    extensions = (".edf", ".EDF")

    def parse(self, record_id: str, data: bytes, path: str) -> RawRecord:
        """One file's bytes -> its RawRecord (RecordRejected for bad input)."""
        import edfio  # imported here: only EDF sources need it

        try:
            edf = edfio.read_edf(io.BytesIO(data))
            signals = list(edf.signals)
        except Exception as err:  # edfio raises ValueError and others on malformed headers
            raise RecordRejected("unreadable", f"{type(err).__name__}: {err}") from None
        if not signals:
            raise RecordRejected("no_signals", "the EDF file holds no signals")
        fs = max(s.sampling_frequency for s in signals)
        kept, rows, dropped = [], [], []
        for s in signals:
            values = np.asarray(s.data, dtype=np.float64) if s.sampling_frequency == fs else None
            if values is None or values.size == 0 or values.min() == values.max():
                dropped.append(s.label)
            else:
                kept.append(s)
                rows.append(values)
        if not kept:
            raise RecordRejected("no_signals", f"every signal is empty or constant ({dropped})")
        n = min(row.size for row in rows)
        return RawRecord(
            record_id=record_id,
            signal=np.vstack([row[:n] for row in rows]),
            fs=float(fs),
            channel_names=[ECG_PREFIX.sub("", s.label).strip() for s in kept],
            units=[self.source.units or s.physical_dimension.strip() for s in kept],
            meta={"dropped": dropped},
        )
