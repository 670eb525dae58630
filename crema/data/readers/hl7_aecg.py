"""HL7 annotated ECG (FDA aECG, HL7 v3 XML): one ``.xml`` file per ECG.

The rhythm ``<series>`` (code RHYTHM; else the first series) holds a ``<sequenceSet>`` of sequences:
one time sequence (``TIME_ABSOLUTE`` or ``TIME_RELATIVE``) whose ``<increment>`` gives the sampling
interval, and one sequence per lead, coded by MDC (``MDC_ECG_LEAD_II``), whose value is
``origin + scale x digits`` in the unit of ``<scale>``. Representative beats (``<derivedSeries>``) and
annotations are not read.
"""

from __future__ import annotations

import numpy as np

from crema.data.signals import UNIT_TO_MV, RawRecord, RecordRejected
from crema.data.readers import SingleFileReader
from crema.data.readers._xml import parse_xml, wrong_root

NS = {"hl7": "urn:hl7-org:v3"}
HL7_ROOT = "{urn:hl7-org:v3}AnnotatedECG"
TIME_UNITS_S = {"s": 1.0, "ms": 1e-3, "us": 1e-6}
# MDC lead codes whose suffix is not already the canonical spelling.
MDC_LEADS = {"AVR": "aVR", "AVL": "aVL", "AVF": "aVF", "-AVR": "-aVR"}


def _quantity(element, what: str) -> tuple[float, str]:
    if element is None or element.get("value") is None:
        raise RecordRejected("bad_header", f"no {what}")
    try:
        return float(element.get("value")), (element.get("unit") or "").strip()
    except ValueError:
        raise RecordRejected("bad_header", f"{what} {element.get('value')!r} is not a number") from None


class Hl7AecgReader(SingleFileReader):
    """HL7 aECG XML: the RHYTHM series, leads by MDC code."""

    extensions = (".xml", ".XML")

    def parse(self, record_id: str, data: bytes, path: str) -> RawRecord:
        """One file's bytes -> its RawRecord (RecordRejected for bad input)."""
        root = parse_xml(data)
        if root.tag != HL7_ROOT:
            if root.tag.rpartition("}")[2] == "AnnotatedECG":  # the right element outside HL7's namespace
                raise RecordRejected("not_hl7_aecg", f"root element {root.tag}, expected AnnotatedECG in urn:hl7-org:v3")
            raise wrong_root(root, "AnnotatedECG", "not_hl7_aecg")
        series = root.findall(".//hl7:series", NS)
        rhythm = next((s for s in series if s.find("hl7:code", NS) is not None
                       and s.find("hl7:code", NS).get("code") == "RHYTHM"), series[0] if series else None)
        if rhythm is None:
            raise RecordRejected("no_rhythm_waveform", "no <series>")

        fs, names, units, leads = None, [], [], []
        for sequence in rhythm.findall("hl7:component/hl7:sequenceSet/hl7:component/hl7:sequence", NS):
            code_element = sequence.find("hl7:code", NS)
            code = code_element.get("code", "") if code_element is not None else ""
            value = sequence.find("hl7:value", NS)
            if value is None and code.startswith(("TIME_", "MDC_ECG_LEAD_")):
                raise RecordRejected("bad_header", f"sequence {code} has no <value>")
            if code.startswith("TIME_"):
                step, unit = _quantity(value.find("hl7:increment", NS), "time increment")
                if unit not in TIME_UNITS_S or step <= 0:
                    raise RecordRejected("bad_sampling_rate", f"time increment {step} {unit!r}")
                fs = 1.0 / (step * TIME_UNITS_S[unit])
            elif code.startswith("MDC_ECG_LEAD_"):
                origin, origin_unit = _quantity(value.find("hl7:origin", NS), f"{code} origin")
                scale, unit = _quantity(value.find("hl7:scale", NS), f"{code} scale")
                try:
                    digits = np.array((value.findtext("hl7:digits", "", NS)).split(), dtype=np.float64)
                except ValueError:
                    raise RecordRejected("bad_signal", f"{code}: digits are not numbers") from None
                if origin and origin_unit.lower() != unit.lower():  # express the origin in the scale's unit
                    origin *= UNIT_TO_MV.get(origin_unit.lower(), np.nan) / UNIT_TO_MV.get(unit.lower(), np.nan)
                suffix = code.removeprefix("MDC_ECG_LEAD_")
                names.append(MDC_LEADS.get(suffix, suffix))
                units.append(self.source.units or unit)
                leads.append(origin + scale * digits)
        if fs is None:
            raise RecordRejected("missing_sampling_rate", "no TIME_ sequence with an increment")
        if not leads:
            raise RecordRejected("no_signals", "no MDC_ECG_LEAD_ sequences in the rhythm series")
        n = min(lead.size for lead in leads)
        if n == 0 or max(lead.size for lead in leads) != n:
            raise RecordRejected("inconsistent_shape", f"leads of {sorted({lead.size for lead in leads})} samples")
        return RawRecord(record_id=record_id, signal=np.vstack(leads), fs=fs, channel_names=names, units=units)
