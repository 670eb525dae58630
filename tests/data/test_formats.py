"""Hospital ECG formats on the real shared files: what each reader finds against what the file declares,
the same recording read from two formats, hostile XML, the plug-in registry and the canonical contract.

The shared files are read in place from ``$CREMA_SHARED_DATA/formats`` (default ``../shared/data``);
without them these tests skip. The DICOM file ships inside pydicom itself.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from crema.config import ConfigError, SourceConfig, validate
from crema.data.signals import LEADS, NormaliseOptions, RecordRejected, to_canonical
from crema.data.readers import installed_readers, reader_class, reader_for
from tests.conftest import shared_data_root

FORMATS = shared_data_root() / "formats"
LIMB = ["I", "II", "III", "aVR", "aVL", "aVF"]
MUSE_STORED = ["I", "II", "V1", "V2", "V3", "V4", "V5", "V6"]
HL7_ORDER = ["I", "II", "V1", "V2", "V3", "V4", "V5", "V6", "III", "aVR", "aVL", "aVF"]
# The CSV holds the EDF's digital values; the EDF's physical range is ±1000 mV over the int16 range.
CONTEC_MV_PER_COUNT = 2000 / 65535
CSV_YAML = {"fs": 800, "units": "mV", "scale": CONTEC_MV_PER_COUNT, "columns": list(LEADS)}


@pytest.fixture(scope="module")
def formats() -> Path:
    if not (FORMATS / "scp_ecg" / "Example.scp").exists():
        pytest.skip(f"shared format samples not found at {FORMATS} (set CREMA_SHARED_DATA)")
    return FORMATS


def read_one(fmt: str, folder: Path, record_id: str | None = None, **yaml):
    reader = reader_for(SourceConfig(name="t", format=fmt, path=str(folder), **yaml))
    ids = reader.discover()
    assert ids, f"{fmt}: nothing discovered in {folder}"
    return reader.read(record_id or ids[0])


def dicom_file() -> Path:
    from pydicom.data import get_testdata_file

    return Path(get_testdata_file("waveform_ecg.dcm"))


# ------------------------------------------------------------------------ each file vs. its own header

def test_muse_reads_8_stored_leads_as_declared(formats):
    raw = read_one("muse", formats / "ge_muse_xml")
    # Declared: Rhythm waveform, SampleBase 500, 5000 samples per lead, 4.88 µV per bit.
    assert raw.channel_names == MUSE_STORED and raw.fs == 500 and raw.signal.shape == (8, 5000)
    assert set(raw.units) == {"uV"}
    assert np.allclose(raw.signal / 4.88, np.round(raw.signal / 4.88))  # whole counts of 4.88 µV
    assert 0.3 < np.ptp(raw.signal[1]) / 1000 < 5  # lead II spans a physiological range in mV
    # The diagnosis as labels; the statement naming the confirming physician is left out.
    assert raw.meta["statements"][0] == "Sinus bradycardia"
    assert not any("Confirmed by" in s for s in raw.meta["statements"])


def test_hl7_aecg_reads_12_leads_as_declared(formats):
    raw = read_one("hl7_aecg", formats / "hl7_aecg")
    # Declared: increment 0.002 s, scale 2.5 µV, origin 0, 5000 digits per lead.
    assert raw.channel_names == HL7_ORDER and raw.fs == 500 and raw.signal.shape == (12, 5000)
    assert set(raw.units) == {"uV"}
    assert np.allclose(raw.signal / 2.5, np.round(raw.signal / 2.5))
    assert 0.3 < np.ptp(raw.signal[1]) / 1000 < 5


def test_scp_ecg_decodes_12_leads_as_declared(formats):
    raw = read_one("scp_ecg", formats / "scp_ecg")
    # Section 3: 12 leads, samples 1..5000; section 6: 2000 µs, 2500 nV per count, second differences.
    assert raw.channel_names == HL7_ORDER and raw.fs == 500 and raw.signal.shape == (12, 5000)
    assert raw.meta["difference_coding"] == 2
    leads = dict(zip(raw.channel_names, raw.signal))
    # A wrong bit anywhere in a lead would break Einthoven's law from there on: III = II - I exactly.
    assert np.array_equal(leads["III"], leads["II"] - leads["I"])
    assert 0.3 < np.ptp(leads["II"]) / 1000 < 5


def test_philips_xml_reads_12_leads_and_matches_sierraecg(formats):
    import sierraecg

    files = sorted((formats / "philips_sierra_xml").glob("*.xml"))
    assert len(files) == 2
    for path in files:
        raw = read_one("philips_xml", path.parent, path.stem)
        # Declared: 12 leads labelled I .. V6, 500 Hz, 11000 ms per channel, resolution 5 µV.
        assert raw.channel_names == list(LEADS) and raw.fs == 500 and raw.signal.shape == (12, 5500)
        assert set(raw.units) == {"uV"}
        reference = sierraecg.read_file(str(path))  # the maintained decoder, limb leads in pure Python
        expected = np.vstack([lead.samples for lead in reference.leads]).astype(np.float64) * 5
        assert np.array_equal(raw.signal, expected)


def test_edf_reads_the_recorded_leads_and_drops_the_blank_ones(formats):
    raw = read_one("edf", formats / "edf")
    # Declared: 12 signals at 800 Hz, 47.31875 s, in mV; V1-V6 hold one constant (not recorded).
    assert raw.channel_names == LIMB and raw.fs == 800 and raw.signal.shape == (6, 37855)
    assert raw.signal.shape[1] / raw.fs == pytest.approx(47.31875)
    assert raw.meta["dropped"] == ["V1", "V2", "V3", "V4", "V5", "V6"]
    assert set(raw.units) == {"mV"} and np.abs(raw.signal).max() < 10


def test_dicom_reads_the_rhythm_group_of_pydicoms_ecg():
    raw = read_one("dicom", dicom_file().parent, "waveform_ecg")
    # Declared: 12-lead ECG Waveform Storage, group 0 ORIGINAL, 12 x 10000 at 1000 Hz, 1.25 µV sensitivity.
    assert raw.channel_names == list(LEADS) and raw.fs == 1000 and raw.signal.shape == (12, 10000)
    assert set(raw.units) == {"uV"}
    assert np.allclose(raw.signal / 1.25, np.round(raw.signal / 1.25))
    assert raw.meta["sop_class"] == "12-lead ECG Waveform Storage"


def test_dicom_without_an_ecg_waveform_is_rejected(tmp_path):
    import pydicom

    ds = pydicom.dcmread(dicom_file())
    hemodynamic = "1.2.840.10008.5.1.4.1.1.9.2.1"
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = hemodynamic
    ds.save_as(tmp_path / "pressure.dcm")
    (tmp_path / "garbage.dcm").write_bytes(b"not a dicom file")
    reader = reader_for(SourceConfig(name="t", format="dicom", path=str(tmp_path)))
    with pytest.raises(RecordRejected) as info:
        reader.read("pressure")
    assert info.value.reason == "not_ecg_waveform" and "Hemodynamic" in info.value.detail
    with pytest.raises(RecordRejected) as info:
        reader.read("garbage")
    assert info.value.reason == "unreadable"


# ----------------------------------------------------------------------------- cross-format agreement

def test_edf_and_csv_of_one_recording_agree_sample_by_sample(formats):
    """The Contec CSV holds the EDF's digital values, no header, V1-V6 empty. Read with the EDF's scale
    from the YAML, both give the same 37,855 samples per limb lead with no lag. Tolerance: one EDF
    count (2000/65535 mV = 30.5 µV); in fact they differ by exactly half a count, the EDF's offset (its
    digital range -32768..32767 is asymmetric about physical 0), and by < 1e-9 mV once it is removed."""
    edf = read_one("edf", formats / "edf")
    csv = read_one("csv", formats / "csv", **CSV_YAML)
    assert csv.channel_names == edf.channel_names == LIMB
    assert csv.fs == edf.fs and csv.signal.shape == edf.signal.shape
    difference = edf.signal - csv.signal
    assert np.abs(difference).max() <= CONTEC_MV_PER_COUNT
    assert np.abs(difference - CONTEC_MV_PER_COUNT / 2).max() < 1e-9


def test_scp_ecg_and_hl7_aecg_of_one_recording_agree_exactly(formats):
    """The SCP-ECG example and the HL7 aECG example are one recording (12 leads, 500 Hz, 2.5 µV):
    the hand-written Huffman/second-difference decoder gives the XML's values, tolerance 0."""
    scp = read_one("scp_ecg", formats / "scp_ecg")
    hl7 = read_one("hl7_aecg", formats / "hl7_aecg")
    assert scp.channel_names == hl7.channel_names and scp.fs == hl7.fs
    assert np.array_equal(scp.signal, hl7.signal)


# ---------------------------------------------------------------------------------------- hostile XML

BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">]>
<RestingECG><Waveform><WaveformType>&lol3;</WaveformType></Waveform></RestingECG>"""
EXTERNAL_ENTITY = b"""<?xml version="1.0"?>
<!DOCTYPE r [<!ENTITY secret SYSTEM "file:///etc/passwd">]>
<AnnotatedECG xmlns="urn:hl7-org:v3"><id>&secret;</id></AnnotatedECG>"""


@pytest.mark.parametrize("fmt", ["muse", "hl7_aecg", "philips_xml"])
@pytest.mark.parametrize("content", [BILLION_LAUGHS, EXTERNAL_ENTITY], ids=["billion_laughs", "external_entity"])
def test_hostile_xml_is_rejected_with_a_reason(tmp_path, fmt, content):
    (tmp_path / "evil.xml").write_bytes(content)
    (tmp_path / "broken.xml").write_bytes(b"<RestingECG><unclosed>")
    reader = reader_for(SourceConfig(name="t", format=fmt, path=str(tmp_path)))
    with pytest.raises(RecordRejected) as info:
        reader.read("evil")
    assert info.value.reason == "unsafe_xml"
    with pytest.raises(RecordRejected) as info:
        reader.read("broken")
    assert info.value.reason == "bad_xml"


def test_an_xml_file_of_another_vendor_is_rejected_not_misread(formats, tmp_path):
    shutil.copy(formats / "hl7_aecg" / "ecg_hl7.xml", tmp_path / "x.xml")
    for fmt, reason in [("muse", "not_muse_xml"), ("philips_xml", "not_philips_xml")]:
        with pytest.raises(RecordRejected) as info:
            reader_for(SourceConfig(name="t", format=fmt, path=str(tmp_path))).read("x")
        assert info.value.reason == reason


def test_truncated_scp_ecg_is_rejected(formats, tmp_path):
    data = (formats / "scp_ecg" / "Example.scp").read_bytes()
    (tmp_path / "cut.scp").write_bytes(data[: len(data) // 2])
    with pytest.raises(RecordRejected) as info:
        reader_for(SourceConfig(name="t", format="scp_ecg", path=str(tmp_path))).read("cut")
    assert info.value.reason == "truncated_signal"


# ------------------------------------------------------------------------------------------ CSV / TSV

def test_csv_with_header_tsv_and_missing_config(tmp_path):
    rng = np.random.default_rng(0)
    signal = rng.normal(0, 0.3, (500, 3))
    (tmp_path / "with_header.csv").write_text(
        "time,II,I,V1\n" + "\n".join(f"{k},{a},{b},{c}" for k, (a, b, c) in enumerate(signal)))
    (tmp_path / "plain.tsv").write_text("\n".join("\t".join(map(str, row)) for row in signal))

    raw = read_one("csv", tmp_path, "with_header", fs=250, columns=["", "II", "I", "V1"])
    assert raw.channel_names == ["II", "I", "V1"] and raw.fs == 250
    assert np.allclose(raw.signal, signal.T)
    assert read_one("csv", tmp_path, "with_header", fs=250).channel_names == ["time", "II", "I", "V1"]
    raw = read_one("csv", tmp_path, "plain", fs=250, units="uV", columns=["I", "II", "V2"])
    assert raw.units == ["uV"] * 3 and np.allclose(raw.signal, signal.T)

    reader = reader_for(SourceConfig(name="t", format="csv", path=str(tmp_path)))
    with pytest.raises(RecordRejected) as info:
        reader.read("plain")
    assert info.value.reason == "missing_sampling_rate"
    with pytest.raises(RecordRejected) as info:
        reader_for(SourceConfig(name="t", format="csv", path=str(tmp_path), fs=250)).read("plain")
    assert info.value.reason == "missing_lead_names"


# ------------------------------------------------------------------------------ registry and contract

def test_readers_come_from_entry_points_case_insensitively():
    assert {"wfdb", "numpy", "muse", "hl7_aecg", "dicom", "philips_xml", "scp_ecg", "edf", "csv"} <= set(
        installed_readers())
    assert reader_class("MUSE") is reader_class("muse")
    assert SourceConfig(name="t", format="Philips_XML", path="/x").format == "philips_xml"
    with pytest.raises(KeyError, match="installed readers: .*'scp_ecg'"):
        reader_class("aecg-v2")
    with pytest.raises(ConfigError, match="unknown format 'mfer'.*installed readers"):
        validate(SourceConfig, {"name": "t", "format": "mfer", "path": "/x"})


def test_a_plugin_reader_is_found_through_its_entry_point(monkeypatch, tmp_path):
    """What a hospital's own package does: declare `crema.readers` = `module:Class` and nothing else."""
    from importlib.metadata import EntryPoint

    import crema.data.readers as sources

    plugin = EntryPoint(name="Acme", value="crema.data.readers.csv_reader:CsvReader", group=sources.ENTRY_POINT_GROUP)
    real = sources.entry_points
    monkeypatch.setattr(sources, "entry_points", lambda group: [*real(group=group), plugin])
    sources.installed_readers.cache_clear()
    try:
        assert reader_class("acme").__name__ == "CsvReader"
    finally:
        monkeypatch.undo()
        sources.installed_readers.cache_clear()
    assert "acme" not in installed_readers()


CANONICAL_CASES = [
    # format, folder, yaml, min_leads, leads stored in the file
    ("muse", "ge_muse_xml", {}, 8, MUSE_STORED),
    ("hl7_aecg", "hl7_aecg", {}, 8, LEADS),
    ("scp_ecg", "scp_ecg", {}, 8, LEADS),
    ("philips_xml", "philips_sierra_xml", {}, 8, LEADS),
    ("edf", "edf", {}, 6, LIMB),
    ("csv", "csv", CSV_YAML, 6, LIMB),
]


@pytest.mark.parametrize("fmt, folder, yaml, min_leads, stored", CANONICAL_CASES, ids=[c[0] for c in CANONICAL_CASES])
def test_every_format_becomes_a_canonical_12_lead_record(formats, fmt, folder, yaml, min_leads, stored):
    raw = read_one(fmt, formats / folder, **yaml)
    rec = to_canonical(raw, NormaliseOptions(target_fs=500, min_leads=min_leads))
    check_canonical(rec, raw, stored)


def test_dicom_becomes_a_canonical_12_lead_record():
    raw = read_one("dicom", dicom_file().parent, "waveform_ecg")
    check_canonical(to_canonical(raw, NormaliseOptions(target_fs=500)), raw, LEADS)


def check_canonical(rec, raw, stored) -> None:
    assert rec.signal.shape == (12, math.ceil(raw.signal.shape[1] * 500 / raw.fs))  # resample_poly rounds up
    assert rec.signal.dtype == np.float32 and rec.fs == 500
    expected_mask = [lead in stored or (lead in LIMB and "I" in stored and "II" in stored) for lead in LEADS]
    assert rec.lead_mask.tolist() == expected_mask
    # Only the limb leads a file lacks are derived (MUSE: III, aVR, aVL, aVF), never a stored one.
    assert rec.derived_mask.tolist() == [lead in LIMB and lead not in stored for lead in LEADS]
    peak = np.abs(rec.signal[rec.lead_mask]).max(axis=1)
    assert (peak > 0.05).all() and (peak < 20).all()  # mV: every present lead is a real ECG amplitude


def _scp_file(sections: dict[int, bytes]) -> bytes:
    """A minimal SCP-ECG file: section 0's pointers, then each section (16-byte header + data)."""
    import struct

    ids = sorted(sections)
    pointers_len = 16 + 10 * (len(ids) + 1)
    offset = 6 + pointers_len  # 0-based: after the file header and section 0
    pointers, body = [struct.pack("<HII", 0, pointers_len, 7)], b""
    for sid in ids:
        length = 16 + len(sections[sid])
        pointers.append(struct.pack("<HII", sid, length, offset + 1))
        body += struct.pack("<HHIBB6s", 0, sid, length, 20, 20, b"SCPECG") + sections[sid]
        offset += length
    section0 = struct.pack("<HHIBB6s", 0, 0, pointers_len, 20, 20, b"SCPECG") + b"".join(pointers)
    return struct.pack("<HI", 0, 6 + len(section0) + len(body)) + section0 + body


def test_scp_ecg_adds_the_reference_beat_back_into_each_subtraction_zone(tmp_path):
    """Sections 4 and 5 on a built file (no section 2: plain int16 values): rhythm = residual + the
    reference beat aligned on each QRS fiducial, residual stored as first differences."""
    import struct

    rng = np.random.default_rng(1)
    n, n_ref, fiducial = 100, 20, 10  # reference beat: 20 samples (40 ms at 500 Hz), fiducial at sample 10
    residual = rng.integers(-50, 50, (2, n))
    beat = rng.integers(-400, 400, (2, n_ref))
    start, fc, end = 41, 50, 60  # 1-based sample numbers of the subtraction zone and its fiducial
    expected = residual.copy()
    for s in range(start, end + 1):
        if 0 <= s - fc + fiducial < n_ref:
            expected[:, s - 1] += beat[:, s - fc + fiducial]
    first_diff = np.diff(residual, prepend=0).astype("<i2")  # d[0] = x[0], d[k] = x[k] - x[k-1]

    def lead_data(values: np.ndarray) -> bytes:
        return struct.pack("<2H", *[v.nbytes for v in values]) + b"".join(v.tobytes() for v in values)

    data = _scp_file({
        1: bytes([255, 0, 0]),
        3: struct.pack("<BB", 2, 0x01 | 2 << 3) + struct.pack("<IIB", 1, n, 1) + struct.pack("<IIB", 1, n, 2),
        4: struct.pack("<HHH", 40, fiducial, 1) + struct.pack("<HIII", 0, start, fc, end) + struct.pack("<II", 0, 0),
        5: struct.pack("<HHBB", 5000, 2000, 0, 0) + lead_data(beat.astype("<i2")),
        6: struct.pack("<HHBB", 5000, 2000, 1, 0) + lead_data(first_diff),
    })
    (tmp_path / "built.scp").write_bytes(data)
    raw = reader_for(SourceConfig(name="t", format="scp_ecg", path=str(tmp_path))).read("built")
    assert raw.channel_names == ["I", "II"] and raw.fs == 500 and raw.meta["reference_beat_subtraction"]
    assert np.array_equal(raw.signal, expected * 5.0)  # 5000 nV per count = 5 µV
