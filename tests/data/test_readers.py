"""Record readers: the fast WFDB path against wfdb.rdrecord, the wfdb fallback, hostile files, NumPy records."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import wfdb

from crema.config import SourceConfig
from crema.data.signals import LEADS, RecordRejected
from crema.data.readers import reader_for
from crema.data.readers.numpy_reader import NumpyReader
from crema.data.readers.wfdb_reader import WfdbReader


def wfdb_source(folder, **kw) -> SourceConfig:
    return SourceConfig(name="t", format="wfdb", path=str(folder), **kw)


def assert_same_as_wfdb(raw, record_path):
    ref = wfdb.rdrecord(str(record_path))
    assert raw.signal.shape == ref.p_signal.T.shape
    assert np.allclose(raw.signal, ref.p_signal.T, equal_nan=True, rtol=0, atol=1e-12)
    assert np.array_equal(np.isnan(raw.signal), np.isnan(ref.p_signal.T))
    assert raw.fs == ref.fs
    assert raw.channel_names == ref.sig_name
    assert raw.units == ref.units


def rejected(reader, record_id) -> RecordRejected:
    with pytest.raises(RecordRejected) as info:
        reader.read(record_id)
    return info.value


# ------------------------------------------------------------------------- fast path on the real records

@pytest.mark.parametrize("folder, count", [
    ("ptbxl/records500", 500),
    ("ptbxl/records100", 1999),
    ("formats/wfdb", 2),  # s0010_re: 15 signals in .dat + .xyz, lower-case names; 100: format 212, 30 min
])
def test_fast_path_equals_wfdb_on_every_shared_record(shared_data, folder, count):
    reader = reader_for(wfdb_source(shared_data / folder))
    ids = reader.discover()
    assert len(ids) == count and ids == sorted(ids)
    for record_id in ids:
        raw = reader.read(record_id)
        assert raw.meta["decoder"] == "numpy", f"{record_id} went to the wfdb fallback"
        assert raw.record_id == record_id
        assert "comments" not in raw.meta
        assert_same_as_wfdb(raw, shared_data / folder / record_id)


def test_multi_file_record_keeps_header_order(shared_data):
    reader = reader_for(wfdb_source(shared_data / "formats" / "wfdb"))
    raw = reader.read("s0010_re")
    assert raw.channel_names[:3] == ["i", "ii", "iii"] and raw.channel_names[-3:] == ["vx", "vy", "vz"]
    assert [p.rsplit("/", 1)[-1] for p in reader.record_files("s0010_re")] == ["s0010_re.dat", "s0010_re.xyz"]
    assert reader.read("100").meta["fmt"] == "212"


# -------------------------------------------------------------------- formats written here, fast and fallback

@pytest.fixture
def signals():
    rng = np.random.default_rng(0)
    # 1001 samples x 3 channels: an odd number of 212 samples, so the last byte triplet is half used.
    return rng.normal(0, 0.5, (1001, 3)).cumsum(axis=0) / 10


@pytest.mark.parametrize("fmt", ["16", "212", "80", "24", "32"])
def test_fast_path_equals_wfdb_on_written_formats(tmp_path, signals, fmt):
    wfdb.wrsamp("rec", fs=360, units=["mV", "uV", "mV"], sig_name=["I", "II", "V1"], p_signal=signals,
                fmt=[fmt] * 3, write_dir=str(tmp_path))
    raw = reader_for(wfdb_source(tmp_path)).read("rec")
    assert raw.meta["decoder"] == "numpy"
    assert_same_as_wfdb(raw, tmp_path / "rec")


@pytest.mark.parametrize("fmt, dtype, shift", [("61", ">i2", 0), ("160", "<u2", 32768)])
def test_fast_path_decodes_big_endian_and_offset_binary(tmp_path, fmt, dtype, shift):
    digital = np.random.default_rng(1).integers(-3000, 3000, (500, 2))
    digital[7, 1] = -32768  # the invalid-sample marker of both formats
    (tmp_path / "rec.dat").write_bytes((digital + shift).astype(dtype).tobytes())
    (tmp_path / "rec.hea").write_text(
        f"rec 2 500 500\nrec.dat {fmt} 400(10)/mV 16 0 0 0 0 I\nrec.dat {fmt} 200/uV 16 5 0 0 0 II\n")
    raw = reader_for(wfdb_source(tmp_path)).read("rec")
    assert raw.meta["decoder"] == "numpy"
    assert np.isnan(raw.signal[1, 7]) and np.isfinite(raw.signal[0]).all()
    assert np.allclose(raw.signal[0], (digital[:, 0] - 10) / 400)
    assert_same_as_wfdb(raw, tmp_path / "rec")


def test_header_defaults_follow_wfdb(tmp_path):
    # No length (inferred from the file), no units, gain 0 (means 200), baseline from adc_zero, no name.
    digital = np.arange(-600, 600, dtype="<i2").reshape(600, 2)
    (tmp_path / "rec.dat").write_bytes(digital.tobytes())
    (tmp_path / "rec.hea").write_text("rec 2 100\nrec.dat 16 0 16 -4\nrec.dat 16 50 12 7 0 0 0 lead II\n")
    raw = reader_for(wfdb_source(tmp_path)).read("rec")
    assert raw.meta["decoder"] == "numpy"
    assert raw.signal.shape == (2, 600)
    assert raw.units == ["mV", "mV"]
    assert raw.channel_names == ["", "lead II"]
    assert np.allclose(raw.signal[0], (digital[:, 0] + 4) / 200)
    assert np.allclose(raw.signal[1], (digital[:, 1] - 7) / 50)


def test_challenge_mat_record_with_byte_offset(tmp_path, signals, monkeypatch):
    """PhysioNet Challenge records: format 16 samples behind a MATLAB header (a byte offset)."""
    from wfdb.io.convert.matlab import wfdb_to_mat

    wfdb.wrsamp("rec", fs=500, units=["mV"] * 3, sig_name=["I", "II", "V1"], p_signal=signals,
                fmt=["16"] * 3, write_dir=str(tmp_path))
    monkeypatch.chdir(tmp_path)
    wfdb_to_mat("rec")  # writes recm.mat + recm.hea
    assert "+" in (tmp_path / "recm.hea").read_text().splitlines()[1].split()[1]
    reader = reader_for(wfdb_source(tmp_path))
    assert reader.discover() == ["rec", "recm"]
    raw = reader.read("recm")
    assert raw.meta["decoder"] == "numpy"
    assert_same_as_wfdb(raw, tmp_path / "recm")
    assert np.allclose(raw.signal, reader.read("rec").signal)


def test_fallback_reads_samples_per_frame(tmp_path):
    rng = np.random.default_rng(2)
    expanded = [rng.integers(-500, 500, 2000).astype(np.int32), rng.integers(-500, 500, 1000).astype(np.int32)]
    wfdb.wrsamp("spf", fs=250, units=["mV", "mV"], sig_name=["I", "II"], e_d_signal=expanded,
                samps_per_frame=[2, 1], fmt=["16", "16"], adc_gain=[100.0, 100.0], baseline=[0, 0],
                write_dir=str(tmp_path))
    raw = reader_for(wfdb_source(tmp_path)).read("spf")
    assert raw.meta["decoder"] == "wfdb"
    assert raw.signal.shape == (2, 1000)
    assert_same_as_wfdb(raw, tmp_path / "spf")


def test_fallback_reads_flac_and_wraps_its_errors(tmp_path, signals):
    pytest.importorskip("soundfile")
    wfdb.wrsamp("flac", fs=500, units=["mV"] * 3, sig_name=["I", "II", "V1"], p_signal=signals,
                fmt=["516"] * 3, write_dir=str(tmp_path))
    reader = reader_for(wfdb_source(tmp_path))
    raw = reader.read("flac")
    assert raw.meta["decoder"] == "wfdb"
    assert_same_as_wfdb(raw, tmp_path / "flac")

    dat = tmp_path / "flac.dat"
    dat.write_bytes(b"\x5a" * dat.stat().st_size)
    assert rejected(reader, "flac").reason == "unreadable"


def test_fallback_reads_multi_segment_records(tmp_path):
    rng = np.random.default_rng(6)
    for segment in ("seg1", "seg2"):
        wfdb.wrsamp(segment, fs=250, units=["mV", "mV"], sig_name=["I", "II"], p_signal=rng.normal(size=(1000, 2)),
                    fmt=["16", "16"], write_dir=str(tmp_path))
    (tmp_path / "multi.hea").write_text("multi/2 2 250 2000\nseg1 1000\nseg2 1000\n")
    reader = reader_for(wfdb_source(tmp_path))
    raw = reader.read("multi")
    assert raw.meta["decoder"] == "wfdb" and raw.signal.shape == (2, 2000)
    assert_same_as_wfdb(raw, tmp_path / "multi")
    assert [p.rsplit("/", 1)[-1] for p in reader.record_files("multi")] == ["seg1.dat", "seg2.dat"]

    (tmp_path / "multi.hea").write_text("multi/2 2 250 2000\nseg1 1000\n../../etc/passwd 1000\n")
    assert rejected(reader, "multi").reason == "path_outside_source"


def test_units_override_and_missing_rate_from_source(tmp_path):
    (tmp_path / "rec.dat").write_bytes(np.zeros((100, 1), "<i2").tobytes())
    (tmp_path / "rec.hea").write_text("rec 1\nrec.dat 16 1000/mV 16 0 0 0 0 I\n")
    assert reader_for(wfdb_source(tmp_path)).read("rec").fs == 250.0  # the WFDB default
    raw = reader_for(wfdb_source(tmp_path, fs=400, units="uV")).read("rec")
    assert raw.fs == 400 and raw.units == ["uV"]
    (tmp_path / "rec.hea").write_text("rec 1 1000 100\nrec.dat 16 1000/mV 16 0 0 0 0 I\n")
    assert reader_for(wfdb_source(tmp_path, fs=400)).read("rec").fs == 1000  # the file's own rate wins


# ---------------------------------------------------------------------------------------- hostile files

@pytest.fixture
def good_record(tmp_path):
    (tmp_path / "rec.dat").write_bytes(np.arange(2000, dtype="<i2").tobytes())
    return tmp_path


def write_header(folder, text: str | bytes):
    path = folder / "rec.hea"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())


@pytest.mark.parametrize("header, reason", [
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe", "bad_header"),
    ("hello world\n", "bad_header"),
    ("", "bad_header"),
    ("rec 3 500 1000\nrec.dat 16 200 16 0 0 0 0 I\n", "bad_header"),  # 3 declared, 1 given
    ("rec 1 500 1000\nrec.dat 16 abc 16 0 0 0 0 I\n", "bad_header"),  # non-numeric gain
    ("rec 1 500 1000\nrec.dat 16 1e999 16 0 0 0 0 I\n", "bad_header"),
    ("rec 1 500 1000\nrec.dat 16 200 16 zero 0 0 0 I\n", "bad_header"),
    ("rec 1 fast 1000\nrec.dat 16 200 16 0 0 0 0 I\n", "bad_header"),
    ("rec 1 500 1000\nrec.dat sixteen 200 16 0 0 0 0 I\n", "bad_header"),
    ("rec 1 500 1000\n../../etc/passwd 16 200 16 0 0 0 0 I\n", "path_outside_source"),
    ("rec 1 500 1000\n/etc/passwd 16 200 16 0 0 0 0 I\n", "path_outside_source"),
    ("rec 1 500 1000\nmissing.dat 16 200 16 0 0 0 0 I\n", "missing_file"),
    ("rec 1 500 5000\nrec.dat 16 200 16 0 0 0 0 I\n", "truncated_signal"),  # 4000 bytes hold 2000
    # one frame short of two signals:
    ("rec 2 500 1001\nrec.dat 16 200 16 0 0 0 0 I\nrec.dat 16 200 16 0 0 0 0 II\n", "truncated_signal"),
    ("rec 1 500 99999999999\nrec.dat 16 200 16 0 0 0 0 I\n", "absurd_length"),  # 6 years at 500 Hz
    ("rec 0 500 1000\n", "no_signals"),
    ("rec 1 0 1000\nrec.dat 16 200 16 0 0 0 0 I\n", "bad_sampling_rate"),
    ("rec 1 500 1000\nrec.dat 99 200 16 0 0 0 0 I\n", "unsupported_format"),
])
def test_hostile_headers_are_rejected_with_their_reason(good_record, header, reason):
    write_header(good_record, header)
    assert rejected(reader_for(wfdb_source(good_record)), "rec").reason == reason


def test_absurd_length_counts_bytes_too(good_record):
    # 200 M samples at 2 kHz is 28 hours: over both the time cap and the byte cap.
    write_header(good_record, "rec 12 2000 200000000\n" + "rec.dat 16 200 16 0 0 0 0 I\n" * 12)
    assert rejected(reader_for(wfdb_source(good_record)), "rec").reason == "absurd_length"
    write_header(good_record, "rec 12 1000 80000000\n" + "rec.dat 16 200 16 0 0 0 0 I\n" * 12)
    error = rejected(reader_for(wfdb_source(good_record)), "rec")
    assert error.reason == "absurd_length" and "bytes" in error.detail


def test_missing_header_and_record_ids_outside_the_source(good_record):
    reader = reader_for(wfdb_source(good_record))
    assert rejected(reader, "nothing").reason == "missing_file"
    assert rejected(reader, "../rec").reason == "path_outside_source"


def test_fallback_checks_sizes_before_wfdb(tmp_path):
    # Two samples per frame sends the record to wfdb; its truncation must still be caught first.
    (tmp_path / "rec.dat").write_bytes(np.zeros(100, "<i2").tobytes())
    write_header(tmp_path, "rec 1 500 1000\nrec.dat 16x2 200 16 0 0 0 0 I\n")
    assert rejected(reader_for(wfdb_source(tmp_path)), "rec").reason == "truncated_signal"
    write_header(tmp_path, "rec 1 500 1000\nother.dat 16x2 200 16 0 0 0 0 I\n")
    assert rejected(reader_for(wfdb_source(tmp_path)), "rec").reason == "missing_file"


# ----------------------------------------------------------------------------- discovery and fingerprints

def test_discover_walks_folders_and_honours_a_records_file(tmp_path, shared_data):
    source = shared_data / "ptbxl" / "records100"
    for folder, name in [("00000", "00001_lr"), ("01000", "01001_lr"), ("01000", "01002_lr")]:
        (tmp_path / folder).mkdir(exist_ok=True)
        for ext in (".hea", ".dat"):
            shutil.copy(source / folder / (name + ext), tmp_path / folder / (name + ext))
    (tmp_path / "00000" / "._00001_lr.hea").write_bytes(b"\x00\x05\x16\x07")  # macOS resource fork
    reader = reader_for(wfdb_source(tmp_path))
    assert reader.discover() == ["00000/00001_lr", "01000/01001_lr", "01000/01002_lr"]
    (tmp_path / "RECORDS").write_text("01000/01002_lr\n00000/00001_lr\n")
    assert reader_for(wfdb_source(tmp_path, records="RECORDS")).discover() == ["00000/00001_lr", "01000/01002_lr"]


def test_fingerprint_covers_the_header_and_the_signal_bytes(tmp_path, shared_data):
    source = shared_data / "ptbxl" / "records500" / "00000"
    shutil.copy(source / "00001_hr.dat", tmp_path / "copy.dat")
    header = (source / "00001_hr.hea").read_text().replace("00001_hr", "copy")
    (tmp_path / "copy.hea").write_text(header)
    original = reader_for(wfdb_source(source.parent))
    copy = reader_for(wfdb_source(tmp_path))
    assert np.array_equal(copy.read("copy").signal, original.read("00000/00001_hr").signal)
    before = copy.fingerprint("copy")
    assert original.fingerprint("00000/00002_hr") != original.fingerprint("00000/00001_hr")
    # Any header edit (a gain, a lead name) changes what the record means, so its fingerprint.
    for edited in (header.replace("1000.0(0)/mV", "500.0(0)/mV", 1), header.replace(" I\n", " II\n", 1)):
        assert edited != header
        (tmp_path / "copy.hea").write_text(edited)
        assert copy.fingerprint("copy") != before
    (tmp_path / "copy.hea").write_text(header)
    assert copy.fingerprint("copy") == before


def test_s3_source_reads_fast_and_through_the_fallback(tmp_path, shared_data, s3_server):
    import s3fs

    local = tmp_path / "local"
    local.mkdir()
    for ext in (".hea", ".dat"):
        shutil.copy(shared_data / "ptbxl" / "records100" / "00000" / ("00001_lr" + ext), local / ("00001_lr" + ext))
    rng = np.random.default_rng(3)
    wfdb.wrsamp("spf", fs=250, units=["mV"], sig_name=["I"], e_d_signal=[rng.integers(-99, 99, 800).astype(np.int32)],
                samps_per_frame=[2], fmt=["16"], adc_gain=[100.0], baseline=[0], write_dir=str(local))
    options = {"client_kwargs": {"endpoint_url": s3_server}}
    fs = s3fs.S3FileSystem(**options)
    fs.mkdir("ecg-readers")
    fs.put(str(local) + "/", "ecg-readers/site/", recursive=True)

    reader = reader_for(SourceConfig(name="t", format="wfdb", path="s3://ecg-readers/site", storage_options=options))
    assert reader.discover() == ["00001_lr", "spf"]
    local_reader = reader_for(wfdb_source(local))
    for record_id, decoder in [("00001_lr", "numpy"), ("spf", "wfdb")]:
        raw = reader.read(record_id)
        assert raw.meta["decoder"] == decoder
        assert np.array_equal(raw.signal, local_reader.read(record_id).signal)
        assert reader.fingerprint(record_id) == local_reader.fingerprint(record_id)


# ------------------------------------------------------------------------------------------- NumPy records

def numpy_source(folder, **kw) -> SourceConfig:
    return SourceConfig(name="t", format="numpy", path=str(folder), **kw)


def test_npy_round_trip_either_orientation(tmp_path):
    signal = np.random.default_rng(4).normal(size=(12, 700)).astype(np.float32)
    np.save(tmp_path / "leads_first.npy", signal)
    (tmp_path / "site").mkdir()
    np.save(tmp_path / "site" / "samples_first.npy", signal.T)
    reader = reader_for(numpy_source(tmp_path, fs=250))
    assert isinstance(reader, NumpyReader)
    assert reader.discover() == ["leads_first", "site/samples_first"]
    for record_id in reader.discover():
        raw = reader.read(record_id)
        assert raw.signal.shape == (12, 700) and raw.signal.dtype == np.float64
        assert np.array_equal(raw.signal, signal)
        assert raw.channel_names == list(LEADS) and raw.units == ["mV"] * 12 and raw.fs == 250


def test_npz_carries_names_and_rate(tmp_path):
    signal = np.random.default_rng(5).normal(size=(900, 3))
    np.savez_compressed(tmp_path / "rec.npz", signal=signal, leads=np.array(["I", "II", "V2"]), fs=np.float64(360))
    raw = reader_for(numpy_source(tmp_path, fs=100, units="uV")).read("rec")
    assert raw.fs == 360  # the file's rate wins over the source's
    assert raw.channel_names == ["I", "II", "V2"] and raw.units == ["uV"] * 3
    assert np.array_equal(raw.signal, signal.T)


def corrupt_npz(path):
    np.savez_compressed(path, signal=np.random.default_rng(7).normal(size=(12, 5000)), fs=500)
    data = bytearray(path.read_bytes())
    data[200:260] = bytes(60)  # inside the deflated signal: a CRC or inflate error, never an escaped zlib.error
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("make, reason", [
    (lambda p: np.save(p / "rec.npy", np.zeros((12, 500))), "missing_sampling_rate"),
    (lambda p: np.save(p / "rec.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True), "pickled_object"),
    (lambda p: np.savez(p / "rec.npz", signal=np.zeros((3, 500)), leads=np.array([{"I": 1}], dtype=object),
                        fs=500), "pickled_object"),
    (lambda p: np.save(p / "rec.npy", np.zeros((8, 500))), "missing_lead_names"),
    (lambda p: np.save(p / "rec.npy", np.zeros((40, 500))), "ambiguous_layout"),
    (lambda p: np.save(p / "rec.npy", np.zeros(500)), "inconsistent_shape"),
    (lambda p: np.save(p / "rec.npy", np.array([["a"] * 500] * 12)), "bad_signal_dtype"),
    (lambda p: np.savez(p / "rec.npz", samples=np.zeros((12, 500)), fs=500), "missing_signal"),
    (lambda p: (p / "rec.npy").write_bytes(b"not a numpy file at all"), "unreadable"),
    (lambda p: (p / "rec.npz").write_bytes(b"PK\x03\x04 broken zip"), "unreadable"),
    (lambda p: corrupt_npz(p / "rec.npz"), "unreadable"),
])
def test_numpy_reader_rejects_bad_files(tmp_path, make, reason):
    make(tmp_path)
    fs_from_source = reason != "missing_sampling_rate"
    reader = reader_for(numpy_source(tmp_path, fs=500) if fs_from_source else numpy_source(tmp_path))
    assert rejected(reader, "rec").reason == reason


def test_reader_registry_knows_both_formats(tmp_path):
    assert isinstance(reader_for(wfdb_source(tmp_path)), WfdbReader)
    assert isinstance(reader_for(numpy_source(tmp_path)), NumpyReader)
