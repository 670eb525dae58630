"""GE MUSE RestingECG XML: one ``.xml`` export per ECG.

The rhythm waveform (``<Waveform>`` with ``<WaveformType>Rhythm``) holds one ``<LeadData>`` per stored
lead: base64 little-endian int16 samples, scaled by ``LeadAmplitudeUnitsPerBit`` in
``LeadAmplitudeUnits``. MUSE stores 8 leads (I, II, V1-V6); III, aVR, aVL and aVF are derived from I and
II by :func:`crema.data.signals.to_canonical`, which flags them in `derived_mask`. The rate is
``SampleBase`` x 10^``SampleExponent``. The median beats (``WaveformType`` Median) are not read.

The confirmed diagnosis statements go to ``meta["statements"]``: header labels, which reach the dataset only
as the codes a source's label map gives them (``label_maps``; unmatched ones are counted, never stored).
Statements a user typed in (``StmtFlag`` USERINSERT, e.g. "Confirmed by <physician>") and all demographics
stay out.
"""

from __future__ import annotations

import base64
import binascii

import numpy as np

from crema.data.signals import RawRecord, RecordRejected
from crema.data.readers import SingleFileReader
from crema.data.readers._xml import number, parse_xml, text, wrong_root

UNITS = {"MICROVOLTS": "uV", "MILLIVOLTS": "mV", "VOLTS": "V"}
# GE's resolution, for old exports that leave LeadAmplitudeUnitsPerBit out.
DEFAULT_UV_PER_BIT = 4.88


class MuseReader(SingleFileReader):
    """GE MUSE RestingECG XML: the Rhythm waveform's stored leads."""

    extensions = (".xml", ".XML")

    def parse(self, record_id: str, data: bytes, path: str) -> RawRecord:
        """One file's bytes -> its RawRecord (RecordRejected for bad input)."""
        root = parse_xml(data)
        if root.tag != "RestingECG":
            raise wrong_root(root, "RestingECG", "not_muse_xml")
        rhythm = next((w for w in root.iter("Waveform") if text(w, "WaveformType", "").lower() == "rhythm"), None)
        if rhythm is None:
            raise RecordRejected("no_rhythm_waveform", "no <Waveform> of type Rhythm")
        fs = number(rhythm, "SampleBase", "SampleBase") * 10 ** number(rhythm, "SampleExponent", "SampleExponent", 0)
        if not np.isfinite(fs) or fs <= 0:
            raise RecordRejected("bad_sampling_rate", f"fs={fs}")

        names, units, leads = [], [], []
        for lead in rhythm.iter("LeadData"):
            name = text(lead, "LeadID")
            try:
                raw = base64.b64decode(text(lead, "WaveFormData", ""), validate=False)
            except binascii.Error as err:
                raise RecordRejected("bad_signal", f"lead {name}: {err}") from None
            samples = np.frombuffer(raw[: len(raw) // 2 * 2], "<i2")
            declared = int(number(lead, "LeadSampleCountTotal", "LeadSampleCountTotal", samples.size))
            if samples.size < declared:
                raise RecordRejected("truncated_signal", f"lead {name}: {samples.size} of {declared} samples")
            unit = text(lead, "LeadAmplitudeUnits", "MICROVOLTS").upper()
            if unit not in UNITS:
                raise RecordRejected("unknown_unit", f"lead {name}: {unit}")
            per_bit = number(lead, "LeadAmplitudeUnitsPerBit", "LeadAmplitudeUnitsPerBit", DEFAULT_UV_PER_BIT)
            names.append(name or f"lead{len(names)}")
            units.append(self.source.units or UNITS[unit])
            leads.append(samples[:declared] * per_bit)
        if not leads:
            raise RecordRejected("no_signals", "the rhythm waveform has no <LeadData>")
        if len({lead.size for lead in leads}) != 1:
            raise RecordRejected("inconsistent_shape", f"leads of {sorted({lead.size for lead in leads})} samples")

        statements = [text(s, "StmtText") for s in root.findall("Diagnosis/DiagnosisStatement")
                      if text(s, "StmtFlag", "") != "USERINSERT" and text(s, "StmtText")]
        return RawRecord(record_id=record_id, signal=np.vstack(leads), fs=float(fs), channel_names=names,
                         units=units, meta={"statements": statements})
