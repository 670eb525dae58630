"""Philips (Sierra) ECG XML 1.03 / 1.04: one ``.xml`` export per ECG.

The two versions differ where it matters here: 1.04 states the resolution as ``<resolution>`` (and as an
attribute of ``<parsedwaveforms>``) and names the leads in ``leadlabels``; 1.03 calls it
``<signalresolution>`` and names no leads (they are the acquisition's standard 12, in order).

``<parsedwaveforms>`` holds all leads base64-encoded, either uncompressed int16 or XLI-compressed
(LZW + second differences, per lead). XLI is decoded by the maintained ``sierraecg`` package
(``sierraecg.xli.xli_decode``); the XML itself is parsed here with defusedxml, so the lead labels, the
rate and the resolution (µV per count) come from the file. The reconstruction of the limb leads follows
``sierraecg.read_file`` (Philips stores III, aVR, aVL, aVF as residuals of I and II), vectorised:
sierraecg loops over samples in Python. tests/data/test_formats.py checks the two agree exactly.
"""

from __future__ import annotations

import base64
import binascii

import numpy as np

from crema.data.signals import RawRecord, RecordRejected
from crema.data.readers import SingleFileReader
from crema.data.readers._xml import number, parse_xml, text, wrong_root

SUPPORTED_VERSIONS = ("1.03", "1.04", "1.04.01", "1.04.02")
# Lead order of an acquisition with no `leadlabels` attribute (1.03 files), as sierraecg names them.
STANDARD_12 = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")


def reconstruct_limb_leads(leads: list[np.ndarray]) -> None:
    """III, aVR, aVL, aVF (leads 2-5) from their stored residuals and I, II, in place (sierraecg's formulas)."""
    i, ii, iii, avr, avl, avf = leads[:6]
    iii[:] = ii - i - iii
    avr[:] = -avr - np.floor_divide(i + ii, 2)
    avl[:] = np.floor_divide(i - iii, 2) - avl
    avf[:] = np.floor_divide(ii + iii, 2) - avf


class PhilipsXmlReader(SingleFileReader):
    """Philips Sierra XML 1.03/1.04: leads decoded (XLI), limb-lead residuals reconstructed."""

    extensions = (".xml", ".XML")

    def parse(self, record_id: str, data: bytes, path: str) -> RawRecord:
        """One file's bytes -> its RawRecord (RecordRejected for bad input)."""
        from sierraecg.xli import xli_decode  # imported here: only Philips sources need it

        root = parse_xml(data, strip_namespaces=True)
        if root.tag != "restingecgdata":
            raise wrong_root(root, "restingecgdata", "not_philips_xml")
        version = text(root, "documentinfo/documentversion", "")
        if version not in SUPPORTED_VERSIONS:
            raise RecordRejected("unsupported_version", f"Philips XML {version!r}; read: {SUPPORTED_VERSIONS}")
        signal = root.find("dataacquisition/signalcharacteristics")
        waves = root.find("waveforms/parsedwaveforms")
        if waves is None:
            raise RecordRejected("no_signals", "no <parsedwaveforms>")
        fs = number(signal, "samplingrate", "samplingrate")
        resolution_uv = self._resolution(signal, waves)
        labels = (waves.get("leadlabels") or "").split()
        try:
            if labels:
                labels = labels[: int(waves.get("numberofleads", len(labels)))]
            else:
                labels = list(STANDARD_12[: int(number(signal, "numberchannelsallocated", "numberchannelsallocated"))])
            n_samples = int(round(float(waves.get("durationperchannel", "0")) * fs / 1000))
        except ValueError as err:
            raise RecordRejected("bad_header", f"<parsedwaveforms>: {err}") from None
        if len(labels) < 6:
            raise RecordRejected("too_few_leads", f"{len(labels)} leads; the limb leads need 6")
        try:
            payload = base64.b64decode(waves.text or "")
        except binascii.Error as err:
            raise RecordRejected("bad_signal", str(err)) from None

        compression = waves.get("compressmethod") or waves.get("compression") or "Uncompressed"
        if compression == "XLI":
            try:
                # The stream may hold more channels than leads (16 in 1.04 exports): the labels say which.
                leads = [lead.astype(np.int32) for lead in xli_decode(payload, labels)][: len(labels)]
            except Exception as err:  # sierraecg raises whatever a corrupt stream triggers (IndexError, ...)
                raise RecordRejected("bad_signal", f"XLI: {type(err).__name__}: {err}") from None
        elif compression == "Uncompressed":
            counts = np.frombuffer(payload[: len(payload) // 2 * 2], "<i2").astype(np.int32)
            leads = [counts[k * n_samples:(k + 1) * n_samples] for k in range(len(labels))]
        else:
            raise RecordRejected("unsupported_compression", compression)
        if len(leads) != len(labels) or len({lead.size for lead in leads}) != 1 or leads[0].size == 0:
            raise RecordRejected("inconsistent_shape",
                                 f"{len(leads)} decoded leads of {sorted({lead.size for lead in leads})} samples "
                                 f"for {len(labels)} labels")
        reconstruct_limb_leads(leads)
        # The declared duration wins: XLI pads the last chunk.
        samples = np.vstack(leads)[:, : n_samples or None].astype(np.float64) * resolution_uv
        return RawRecord(record_id=record_id, signal=samples, fs=fs, channel_names=labels,
                         units=[self.source.units or "uV"] * len(labels), meta={"version": version})

    @staticmethod
    def _resolution(signal, waves) -> float:
        """µV per count: <resolution> in 1.04's <signalcharacteristics>, <signalresolution> in 1.03's, else
        the `resolution` attribute of <parsedwaveforms> (1.04 states it there too)."""
        for path in ("resolution", "signalresolution"):
            if text(signal, path) is not None:
                return number(signal, path, path)
        attribute = waves.get("resolution")
        if attribute is None:
            raise RecordRejected("bad_header", "no resolution (<resolution> or <signalresolution> in "
                                               "<signalcharacteristics>, or a resolution attribute of <parsedwaveforms>)")
        try:
            return float(attribute)
        except ValueError:
            raise RecordRejected("bad_header", f"resolution {attribute!r} is not a number") from None
