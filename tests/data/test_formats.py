"""Hospital ECG formats on the real shared files: what each reader finds against what the file declares,
the same recording read from two formats, hostile XML, the plug-in registry and the canonical contract.

The shared files are read in place from ``$CREMA_SHARED_DATA/formats`` (default ``../shared/data``);
without them these tests skip. The DICOM file ships inside pydicom itself.
"""

from __future__ import annotations

import math
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from crema.config import ConfigError, SourceConfig, installed_readers, validate
from crema.data.signals import LEADS, NormaliseOptions, RecordRejected, to_canonical
from crema.data.readers import reader_class, reader_for
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


def philips_103_from_104(path: Path) -> bytes:
    """A Sierra XML 1.03 export of the recording in a 1.04 file, by the edits that tell the versions apart:
    document type and version, the resolution as <signalresolution>, and a <parsedwaveforms> that names
    no leads and no resolution, with 1.03's compression attributes."""
    import re

    text = path.read_bytes().decode("utf-16")  # the shared exports are UTF-16 with a byte-order mark
    edits = [("<documenttype>PhilipsECG</documenttype>", "<documenttype>SierraECG</documenttype>"),
             (re.search(r"<documentversion>1\.04[.0-9]*</documentversion>", text).group(0),
              "<documentversion>1.03</documentversion>"),
             ("<resolution>5</resolution>", "<signalresolution>5</signalresolution>"),
             (re.search(r"<parsedwaveforms [^>]*>", text).group(0), '<parsedwaveforms compressflag="True" '
              'compressmethod="XLI" dataencoding="Base64" durationperchannel="11000" nbitspersample="16">')]
    for old, new in edits:
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    return text.encode("utf-16")


def test_philips_xml_103_reads_as_the_104_export_it_was_made_from(formats, tmp_path):
    """1.03 states the resolution as <signalresolution> and names no leads: read to the same signal as the
    1.04 file, and as sierraecg reads the 1.03 file."""
    import sierraecg

    for path in sorted((formats / "philips_sierra_xml").glob("*.xml")):
        (tmp_path / f"{path.stem}.xml").write_bytes(philips_103_from_104(path))
        old = read_one("philips_xml", tmp_path, path.stem)
        assert old.meta["version"] == "1.03" and old.channel_names == list(LEADS)
        assert np.array_equal(old.signal, read_one("philips_xml", path.parent, path.stem).signal)
        reference = sierraecg.read_file(str(tmp_path / f"{path.stem}.xml"))
        assert reference.doc_ver == "1.03"
        assert np.array_equal(old.signal, np.vstack([lead.samples for lead in reference.leads]) * 5.0)


def test_philips_xml_without_any_resolution_is_rejected(formats, tmp_path):
    path = formats / "philips_sierra_xml" / "ad4d3d80-d165_1-04_orig.xml"
    text = philips_103_from_104(path).decode("utf-16").replace("<signalresolution>5</signalresolution>", "")
    (tmp_path / "x.xml").write_bytes(text.encode("utf-16"))
    with pytest.raises(RecordRejected) as info:
        read_one("philips_xml", tmp_path)
    assert info.value.reason == "bad_header" and "signalresolution" in info.value.detail


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


@pytest.mark.parametrize("file, fmt, reason, hint", [
    ("hl7_aecg/ecg_hl7.xml", "philips_xml", "not_philips_xml", "this is HL7 aECG: use format: hl7_aecg"),
    ("hl7_aecg/ecg_hl7.xml", "muse", "not_muse_xml", "this is HL7 aECG: use format: hl7_aecg"),
    ("philips_sierra_xml/ad4d3d80-d165_1-04_orig.xml", "muse", "not_muse_xml",
     "this is Philips Sierra XML: use format: philips_xml"),
    ("philips_sierra_xml/ad4d3d80-d165_1-04_orig.xml", "hl7_aecg", "not_hl7_aecg",
     "this is Philips Sierra XML: use format: philips_xml"),
    ("ge_muse_xml/*.xml", "philips_xml", "not_philips_xml", "this is GE MUSE XML: use format: muse"),
    ("ge_muse_xml/*.xml", "hl7_aecg", "not_hl7_aecg", "this is GE MUSE XML: use format: muse"),
])
def test_an_xml_file_of_another_vendor_is_rejected_naming_its_reader(formats, tmp_path, file, fmt, reason, hint):
    """A file in the wrong source folder is not misread: its rejection names the format that reads it."""
    shutil.copy(sorted(formats.glob(file))[0], tmp_path / "x.xml")
    with pytest.raises(RecordRejected) as info:
        reader_for(SourceConfig(name="t", format=fmt, path=str(tmp_path))).read("x")
    assert info.value.reason == reason and info.value.detail.endswith(hint), info.value.detail


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

    import crema.config as sources

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


# ---------------------------------------------------------------------- SCP-ECG: writers' quirks, cross-check

def scp_sections(data: bytes) -> dict[int, tuple[int, int]]:
    """Each section's (offset of its data, end), as section 0 points to them."""
    from crema.data.readers.scp_ecg import _File

    return _File(data).sections


def ecgdatakit_read(path: Path) -> tuple[list[str], np.ndarray]:
    """(lead labels, µV) of an SCP-ECG file decoded by ecgdatakit, a decoder written apart from crema's."""
    from ecgdatakit.parsing.parsers.scp_ecg import SCPECGParser

    record = SCPECGParser().parse(path)
    return [lead.label for lead in record.leads], np.vstack([lead.samples * lead.resolution for lead in record.leads])


def test_scp_ecg_agrees_with_an_independent_decoder(formats):
    pytest.importorskip("ecgdatakit")
    raw = read_one("scp_ecg", formats / "scp_ecg")
    names, signal = ecgdatakit_read(formats / "scp_ecg" / "Example.scp")
    assert raw.channel_names == names and np.array_equal(raw.signal, signal)


@pytest.mark.parametrize("ceiling", [65534, 65535])
def test_scp_ecg_lead_lengths_at_the_16_bit_ceiling_read_as_the_unedited_file(formats, tmp_path, ceiling):
    """Every lead's byte length in section 6 overwritten with the 16-bit ceiling (as writers of leads too
    long for 16 bits store it): each Huffman-coded lead is found where its samples' codes end, and the file
    reads to the same signal as the unedited one, and as the independent decoder reads that."""
    pytest.importorskip("ecgdatakit")
    original = formats / "scp_ecg" / "Example.scp"
    data = bytearray(original.read_bytes())
    rhythm, _ = scp_sections(bytes(data))[6]
    struct.pack_into("<12H", data, rhythm + 6, *[ceiling] * 12)  # after multiplier, interval, coding, bimodal
    (tmp_path / "ceiling.scp").write_bytes(data)
    raw = read_one("scp_ecg", tmp_path)
    assert np.array_equal(raw.signal, read_one("scp_ecg", original.parent).signal)
    assert np.array_equal(raw.signal, ecgdatakit_read(original)[1])


def test_scp_ecg_lead_table_counting_from_0_reads_as_the_unedited_file(formats, tmp_path):
    """Section 3 rewritten to count from 0 (samples 0..5000 for 5000 samples, as the rejected file's
    `0..10000`): read from the first sample, the same signal as the unedited file and the independent decoder's."""
    pytest.importorskip("ecgdatakit")
    original = formats / "scp_ecg" / "Example.scp"
    data = bytearray(original.read_bytes())
    leads, _ = scp_sections(bytes(data))[3]
    for k in range(data[leads]):
        start, end, _ = struct.unpack_from("<IIB", data, leads + 2 + 9 * k)
        assert (start, end) == (1, 5000)
        struct.pack_into("<I", data, leads + 2 + 9 * k, 0)
    (tmp_path / "from0.scp").write_bytes(data)
    raw = read_one("scp_ecg", tmp_path)
    assert raw.signal.shape == (12, 5000)
    assert np.array_equal(raw.signal, read_one("scp_ecg", original.parent).signal)
    assert np.array_equal(raw.signal, ecgdatakit_read(original)[1])


CONTEC_NV_PER_COUNT = 5000  # what the Contec recorder's SCP-ECG export states (5 µV per count)


def contec_scp(formats: Path, cut_at_ceiling: bool) -> tuple[bytes, np.ndarray]:
    """The Contec recording (the shared EDF's digital values, 6 limb leads x 37,855 samples at 800 Hz) as the
    recorder's SCP-ECG export writes it: uncompressed int16 leads of 75,710 bytes each, whose 16-bit length
    field says 65534. `cut_at_ceiling`: the lead data is cut there too (32,767 samples), else written whole.
    Returns the file's bytes and the counts it holds."""
    import edfio

    edf = edfio.read_edf(formats / "edf" / "0000050.ECG.edf")
    counts = np.vstack([s.digital for s in edf.signals if s.label in LIMB]).astype("<i2")
    assert counts.shape == (6, 37855)
    stored = counts[:, :65534 // 2] if cut_at_ceiling else counts
    codes = [1, 2, 61, 62, 63, 64]  # I, II, III, aVR, aVL, aVF
    data = _scp_file({
        1: bytes([255, 0, 0]),
        3: struct.pack("<BB", 6, 0x04 | 6 << 3) + b"".join(struct.pack("<IIB", 1, 37855, c) for c in codes),
        6: struct.pack("<HHBB", CONTEC_NV_PER_COUNT, 1250, 0, 0) + struct.pack("<6H", *[65534] * 6)
        + b"".join(lead.tobytes() for lead in stored),
    })
    return data, stored


def test_scp_ecg_uncompressed_leads_past_the_16_bit_length_are_read_whole(formats, tmp_path):
    """The rejected Contec export (`rhythm: 65534 bytes for 37855 samples`): the section holds every lead
    whole, so each is read to its 37,855th sample: the EDF export's counts of the same recording."""
    data, counts = contec_scp(formats, cut_at_ceiling=False)
    (tmp_path / "0000050.scp").write_bytes(data)
    raw = read_one("scp_ecg", tmp_path)
    assert raw.channel_names == LIMB and raw.fs == 800 and raw.signal.shape == (6, 37855)
    assert np.array_equal(raw.signal, counts * (CONTEC_NV_PER_COUNT / 1000))  # nV -> µV
    assert "samples_declared" not in raw.meta


def test_scp_ecg_leads_cut_at_the_16_bit_length_keep_the_samples_they_hold(formats, tmp_path):
    """A writer that cut each lead at 65534 bytes (the section holds exactly that): the 32,767 samples that
    are there, the record shortened to them (not padded with zeros) and the declared length kept in meta."""
    data, counts = contec_scp(formats, cut_at_ceiling=True)
    (tmp_path / "cut.scp").write_bytes(data)
    raw = read_one("scp_ecg", tmp_path)
    assert raw.signal.shape == (6, 32767) and raw.meta["samples_declared"] == 37855
    assert np.array_equal(raw.signal, counts * (CONTEC_NV_PER_COUNT / 1000))  # nV -> µV
    rec = to_canonical(raw, NormaliseOptions(target_fs=500, min_leads=6))
    assert rec.signal.shape[1] == math.ceil(32767 * 500 / 800)


def test_scp_ecg_short_lead_below_the_ceiling_is_still_truncated(formats, tmp_path):
    """Only the ceiling says "at least": a lead whose stated length is too short for its samples is rejected."""
    data, _ = contec_scp(formats, cut_at_ceiling=True)
    rhythm, _ = scp_sections(data)[6]
    edited = bytearray(data)
    struct.pack_into("<H", edited, rhythm + 6, 60000)
    (tmp_path / "short.scp").write_bytes(edited)
    with pytest.raises(RecordRejected) as info:
        read_one("scp_ecg", tmp_path)
    assert info.value.reason == "truncated_signal"


# ------------------------------------------------------------------------------ MATLAB files without .hea

@pytest.fixture(scope="module")
def ptbxl_record(shared_data):
    """A real 12-lead record (PTB-XL 00001_hr, 500 Hz) as wfdb reads it: digital counts and mV."""
    import wfdb

    return wfdb.rdrecord(str(shared_data / "ptbxl/records500/00000/00001_hr"), physical=False), \
        wfdb.rdrecord(str(shared_data / "ptbxl/records500/00000/00001_hr"))


def test_mat_val_array_round_trips_a_real_record(ptbxl_record, tmp_path):
    """A Challenge-style `val` (leads x samples, int16 counts at 1000 per mV, so µV) with no .hea beside it."""
    from scipy.io import savemat

    digital, physical = ptbxl_record
    assert digital.adc_gain == [1000.0] * 12
    savemat(tmp_path / "A0001.mat", {"val": digital.d_signal.T.astype(np.int16)})
    raw = read_one("mat", tmp_path, fs=500, units="uV")
    assert [name.lower() for name in physical.sig_name] == [lead.lower() for lead in LEADS]  # PTB-XL's order
    assert raw.channel_names == list(LEADS) and raw.fs == 500 and raw.units == ["uV"] * 12
    assert np.array_equal(raw.signal, digital.d_signal.T)
    assert np.allclose(raw.signal / 1000, physical.p_signal.T, rtol=0, atol=1e-12)
    rec = to_canonical(raw, NormaliseOptions(target_fs=500))
    assert np.allclose(rec.signal, physical.p_signal.T, rtol=0, atol=1e-6)  # float32 mV


def test_mat_struct_field_and_samples_by_leads_with_skipped_columns(ptbxl_record, tmp_path):
    """CPSC 2018's layout (a struct `ECG` whose `data` holds mV) and a samples x leads array whose lead
    order and skipped columns come from `columns`, with `scale`."""
    from scipy.io import savemat

    _, physical = ptbxl_record
    savemat(tmp_path / "cpsc.mat", {"ECG": {"sex": "Female", "age": 56, "data": physical.p_signal.T}})
    raw = read_one("mat", tmp_path, "cpsc", fs=500, variable="ECG.data")
    assert raw.channel_names == list(LEADS) and raw.units == ["mV"] * 12
    assert np.array_equal(raw.signal, physical.p_signal.T)

    counts = np.round(physical.p_signal[:, [1, 0, 6]] * 200).astype(np.int16)  # 5 µV per count: II, I, V1
    savemat(tmp_path / "export.mat", {"ecg": np.column_stack([np.arange(5000), counts])})
    raw = read_one("mat", tmp_path, "export", fs=500, variable="ecg", columns=["", "II", "I", "V1"], scale=0.005)
    assert raw.channel_names == ["II", "I", "V1"] and raw.signal.shape == (3, 5000)
    assert np.allclose(raw.signal, counts.T * 0.005, rtol=0, atol=1e-12)


def test_mat_files_that_cannot_be_read_are_rejected_with_reasons(ptbxl_record, shared_data, tmp_path):
    from scipy.io import savemat

    digital, _ = ptbxl_record
    savemat(tmp_path / "other_name.mat", {"signal": digital.d_signal.T})
    savemat(tmp_path / "wrong_shape.mat", {"val": digital.d_signal.T[:8]})
    savemat(tmp_path / "text.mat", {"val": "not numbers"})
    (tmp_path / "garbage.mat").write_bytes(b"this is not a MATLAB file at all" * 10)
    v73 = bytearray((tmp_path / "other_name.mat").read_bytes())
    v73[124:126] = b"\x00\x02"  # the header's version field of a v7.3 (HDF5) file
    (tmp_path / "hdf5.mat").write_bytes(v73)
    for ext in ("mat", "hea"):  # a PhysioNet Challenge record: .mat with its .hea
        shutil.copy(shared_data / f"ptbxl/records500/00000/00001_hr.{'hea' if ext == 'hea' else 'dat'}",
                    tmp_path / f"A0002.{ext}")

    reader = reader_for(SourceConfig(name="t", format="mat", path=str(tmp_path), fs=500))
    expected = {"other_name": ("no_signals", "it holds ['signal']"), "wrong_shape": ("inconsistent_shape", "8 x 5000"),
                "text": ("bad_signal", "not a 1-d or 2-d array of numbers"), "garbage": ("unreadable", ""),
                "hdf5": ("unsupported_version", "-v7"), "A0002": ("wfdb_record", "use format: wfdb")}
    assert sorted(reader.discover()) == sorted(expected)
    for record_id, (reason, detail) in expected.items():
        with pytest.raises(RecordRejected) as info:
            reader.read(record_id)
        assert info.value.reason == reason and detail in info.value.detail, (record_id, info.value)
    with pytest.raises(RecordRejected) as info:
        reader_for(SourceConfig(name="t", format="mat", path=str(tmp_path))).read("other_name")
    assert info.value.reason == "missing_sampling_rate"
