"""The synthetic demo corpus: real WFDB files, a label table that matches them, classes a feature can tell apart."""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import wfdb
from scipy import signal as sps

from crema.config import SourceConfig, load_yaml
from crema.data.labels import LabelIndex
from crema.data.signals import LEADS
from crema.data.readers import reader_for
from crema.data.synthetic import CLASSES, source_config, write_synthetic_corpus

REPO = Path(__file__).resolve().parents[2]
FS, SECONDS = 500, 10.0


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("synthetic")
    write_synthetic_corpus(dest, n_records=48, fs=FS, seconds=SECONDS, seed=7)
    return dest


def read_labels(dest: Path) -> list[dict[str, str]]:
    with open(dest / "labels.csv", newline="") as f:
        return list(csv.DictReader(f))


def all_files(dest: Path) -> dict[str, bytes]:
    return {str(p.relative_to(dest)): p.read_bytes() for p in sorted(dest.rglob("*")) if p.is_file()}


def test_same_seed_writes_byte_identical_files_and_another_seed_differs(tmp_path):
    first, second, other = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for dest, seed in ((first, 3), (second, 3), (other, 4)):
        write_synthetic_corpus(dest, n_records=6, fs=250, seconds=3.0, seed=seed)
    files_a, files_b, files_c = all_files(first), all_files(second), all_files(other)
    # source.yaml names its own folder; everything else must match byte for byte.
    assert files_a.pop("source.yaml").replace(b"/a/", b"/b/") == files_b.pop("source.yaml")
    assert files_a == files_b
    assert files_a.keys() == {k for k in files_c if k != "source.yaml"}
    assert all(files_a[k] != files_c[k] for k in files_a if k.endswith(".dat"))


def test_records_read_back_with_wfdb_as_12_canonical_leads(corpus):
    rows = read_labels(corpus)
    for row in rows:
        record = wfdb.rdrecord(str(corpus / "records" / row["record"]))
        assert record.fs == FS
        assert record.sig_name == list(LEADS)
        assert record.units == ["mV"] * 12
        assert record.fmt == ["16"] * 12
        assert record.p_signal.shape == (int(FS * SECONDS), 12)
        sig = record.p_signal
        assert 0.3 < np.ptp(sig[:, LEADS.index("II")]) < 5.0  # millivolts, not volts or microvolts
        # Limb leads come from I and II as an electrocardiograph derives them (to 1 µV rounding).
        lead_i, lead_ii = sig[:, LEADS.index("I")], sig[:, LEADS.index("II")]
        np.testing.assert_allclose(sig[:, LEADS.index("III")], lead_ii - lead_i, atol=0.0021)
        np.testing.assert_allclose(sig[:, LEADS.index("aVF")], lead_ii - lead_i / 2, atol=0.0021)


def test_other_rates_and_durations(tmp_path):
    write_synthetic_corpus(tmp_path, n_records=2, fs=100, seconds=4.0, seed=1)
    record = wfdb.rdrecord(str(tmp_path / "records" / read_labels(tmp_path)[0]["record"]))
    assert (record.fs, record.sig_len, record.n_sig) == (100, 400, 12)


def test_label_table_matches_the_files_and_groups_patients(corpus):
    rows = read_labels(corpus)
    stems = {p.stem for p in (corpus / "records").glob("*.hea")}
    assert {row["record"] for row in rows} == stems
    assert {p.stem for p in (corpus / "records").glob("*.dat")} == stems
    assert len(rows) == 48
    codes = [row["label"].split(";") for row in rows]
    assert all(set(c) <= set(CLASSES) for c in codes)
    assert {c[0] for c in codes} == set(CLASSES)
    by_patient = defaultdict(list)
    for row, c in zip(rows, codes):
        by_patient[row["patient_id"]].append(c[0])
    assert any(len(conditions) > 1 for conditions in by_patient.values())
    assert all(len(set(conditions)) == 1 for conditions in by_patient.values())  # a patient keeps a condition


def test_written_source_yaml_reads_the_corpus_through_the_ingest_contract(corpus):
    source = load_yaml(corpus / "source.yaml", SourceConfig)
    assert source == source_config(corpus)
    index = LabelIndex(source)
    reader = reader_for(source)
    record_ids = reader.discover()
    assert index.unmatched(record_ids) == []
    rows = {row["record"]: row for row in read_labels(corpus)}
    assert sorted(rows) == sorted(record_ids)
    for record_id in record_ids[:5]:
        info = index.lookup(record_id)
        assert set(info.labels) == set(rows[record_id]["label"].split(";"))
        assert info.patient_id == rows[record_id]["patient_id"]
        raw = reader.read(record_id)
        assert raw.channel_names == list(LEADS) and raw.fs == FS


def test_shipped_source_config_describes_the_same_corpus(corpus, monkeypatch):
    monkeypatch.setenv("CREMA_SYNTHETIC_ROOT", str(corpus))
    shipped = load_yaml(REPO / "configs" / "sources" / "synthetic.yaml", SourceConfig)
    written = source_config(corpus)
    assert shipped.labels == written.labels
    assert (shipped.name, shipped.format) == (written.name, written.format)
    assert Path(shipped.path).resolve() == Path(written.path)
    assert Path(shipped.resolve(shipped.labels.table)).resolve() == corpus / "labels.csv"


# ------------------------------------------------------------------ features a clinician would read


def r_peaks(lead_ii: np.ndarray, fs: int) -> np.ndarray:
    """QRS detection: band-passed (8-25 Hz) energy peaks at least 250 ms apart (Pan-Tompkins, simplified)."""
    b, a = sps.butter(2, [8, 25], btype="band", fs=fs)
    energy = sps.filtfilt(b, a, lead_ii) ** 2
    peaks, _ = sps.find_peaks(energy, height=0.2 * energy.max(), distance=int(0.25 * fs))
    return peaks


def median_beat(sig: np.ndarray, peaks: np.ndarray, fs: int, before_s: float, after_s: float,
                keep_st: bool = False) -> np.ndarray:
    """The median beat around the R peaks, without mains hum and (unless ST levels matter) baseline wander."""
    b, a = sps.butter(2, 40, btype="low", fs=fs) if keep_st else sps.butter(2, [1, 40], btype="band", fs=fs)
    clean = sps.filtfilt(b, a, sig, axis=0)
    before, after = int(before_s * fs), int(after_s * fs)
    beats = [clean[p - before:p + after] for p in peaks if p >= before and p + after <= len(clean)]
    return np.median(np.stack(beats), axis=0)


def features(record: wfdb.Record) -> dict[str, float]:
    sig, fs = record.p_signal, int(record.fs)
    peaks = r_peaks(sig[:, LEADS.index("II")], fs)
    rr = np.diff(peaks) / fs
    # QRS duration: where the 12-lead summed slope of the median beat exceeds 15% of its peak.
    qrs = median_beat(sig, peaks, fs, 0.10, 0.12)
    slope = np.abs(np.diff(qrs, axis=0)).sum(axis=1)
    steep = np.flatnonzero(slope > 0.15 * slope.max())
    # ST deviation: 100 ms after R against the PR segment 60 ms before it, in the most deviated lead.
    beat = median_beat(sig, peaks, fs, 0.25, 0.45, keep_st=True)
    r_at = int(0.25 * fs)
    st = beat[r_at + int(0.10 * fs)] - beat[r_at - int(0.06 * fs)]
    return {
        "heart_rate": 60.0 / rr.mean(),
        "rr_cv": rr.std() / rr.mean(),
        "qrs_s": (steep[-1] - steep[0]) / fs,
        "st_mv": float(np.abs(st).max()),
    }


@pytest.fixture(scope="module")
def measured(corpus) -> list[tuple[set[str], dict[str, float]]]:
    return [(set(row["label"].split(";")), features(wfdb.rdrecord(str(corpus / "records" / row["record"]))))
            for row in read_labels(corpus)]


def test_rhythm_classes_are_separated_by_rate_and_rr_irregularity(measured):
    for labels, f in measured:
        assert (f["rr_cv"] > 0.08) == ("AFIB" in labels), (labels, f)
        if "AFIB" in labels:
            continue
        assert (f["heart_rate"] < 58) == ("BRADY" in labels), (labels, f)
        assert (f["heart_rate"] > 100) == ("TACHY" in labels), (labels, f)


def test_morphology_classes_are_separated_by_qrs_width_and_st_deviation(measured):
    for labels, f in measured:
        assert (f["qrs_s"] > 0.10) == ("CD" in labels), (labels, f)  # wide QRS: conduction delay
        assert (f["st_mv"] > 0.16) == ("MI" in labels), (labels, f)  # ST elevation (or reciprocal depression)
