"""DICOM ECG waveforms (12-lead, general and ambulatory ECG Waveform Storage): one ``.dcm`` per ECG.

Read with ``pydicom``: ``Dataset.waveform_array`` returns the samples with each channel's sensitivity,
correction factor and baseline applied, in the unit of the channel's sensitivity units (UCUM ``uV``,
``mV``). Lead names come from the channel source sequence: an SCP-ECG code (``5.6.3-9-61`` = III) or
an MDC code through its meaning, else the code meaning itself ("Lead I (Einthoven)" -> "I"). Of the
multiplex groups, the first ORIGINAL one is read (the rhythm; a DERIVED group is a median beat).

A DICOM of any other storage class (hemodynamic, respiratory, audio waveforms, images) is rejected
with `not_ecg_waveform`: its channels are no ECG leads, whatever they are called.
"""

from __future__ import annotations

import io
import re

import numpy as np

from crema.data.signals import RawRecord, RecordRejected
from crema.data.readers import SingleFileReader
from crema.data.readers.scp_ecg import SCP_LEADS

ECG_STORAGE = {
    "1.2.840.10008.5.1.4.1.1.9.1.1": "12-lead ECG Waveform Storage",
    "1.2.840.10008.5.1.4.1.1.9.1.2": "General ECG Waveform Storage",
    "1.2.840.10008.5.1.4.1.1.9.1.3": "Ambulatory ECG Waveform Storage",
}
SCP_CODE = re.compile(r"5\.6\.3-9-(\d+)")


def _lead_name(channel) -> str:
    """A waveform channel's lead name, from its source code sequence."""
    source = channel.get("ChannelSourceSequence")
    if not source:
        return channel.get("ChannelLabel", "") or ""
    item = source[0]
    m = SCP_CODE.fullmatch(str(item.get("CodeValue", "")))
    if m and int(m.group(1)) in SCP_LEADS:
        return SCP_LEADS[int(m.group(1))]
    # "Lead I (Einthoven)", "Lead aVR": drop the word "Lead" and what is in parentheses.
    meaning = re.sub(r"\(.*?\)", "", str(item.get("CodeMeaning", "")))
    return re.sub(r"^\s*lead\s+", "", meaning, flags=re.IGNORECASE).strip()


class DicomReader(SingleFileReader):
    """DICOM ECG Waveform Storage: the ORIGINAL multiplex group of a 12-lead, general or ambulatory ECG."""

    extensions = (".dcm", ".DCM")

    def parse(self, record_id: str, data: bytes, path: str) -> RawRecord:
        """One file's bytes -> its RawRecord (RecordRejected for bad input)."""
        import pydicom  # imported here: only DICOM sources need it
        from pydicom.errors import InvalidDicomError

        try:
            ds = pydicom.dcmread(io.BytesIO(data))
        except (InvalidDicomError, EOFError, ValueError, OSError) as err:
            raise RecordRejected("unreadable", f"not a DICOM file: {err}") from None
        sop_class = str(ds.get("SOPClassUID", ""))
        if sop_class not in ECG_STORAGE:
            name = getattr(ds.get("SOPClassUID"), "name", sop_class) or "no SOP class"
            raise RecordRejected("not_ecg_waveform", f"{name} is not an ECG waveform storage class")
        groups = ds.get("WaveformSequence") or []
        if not groups:
            raise RecordRejected("no_signals", "no WaveformSequence")
        index = next((k for k, g in enumerate(groups) if g.get("WaveformOriginality") == "ORIGINAL"), 0)
        group = groups[index]
        fs, channels = group.get("SamplingFrequency"), group.get("ChannelDefinitionSequence")
        if not fs or not channels:
            raise RecordRejected("bad_header", "waveform without SamplingFrequency or ChannelDefinitionSequence")
        try:
            samples = ds.waveform_array(index)  # (samples, channels), sensitivity applied
        except Exception as err:  # pydicom raises ValueError, KeyError, ... on inconsistent waveform data
            raise RecordRejected("bad_signal", f"{type(err).__name__}: {err}") from None
        names = [_lead_name(c) for c in channels]
        units = []
        for c in channels:
            unit_item = (c.get("ChannelSensitivityUnitsSequence") or [None])[0]
            units.append(self.source.units or (str(unit_item.get("CodeValue", "")) if unit_item else ""))
        return RawRecord(record_id=record_id, signal=np.ascontiguousarray(samples.T, dtype=np.float64),
                         fs=float(fs), channel_names=names, units=units,
                         meta={"sop_class": ECG_STORAGE[sop_class]})
