"""Per-lead quality: flat, saturated and duplicated channels are not leads; absurd rates and gains are
rejected; normalised amplitudes are flagged."""

from __future__ import annotations

import shutil

import numpy as np
import pyarrow.compute as pc
import pytest
import wfdb

from crema.config import IngestConfig, SourceConfig
from crema.data.catalog import read_manifest, read_windows
from crema.data.schema import decode_masks
from crema.data.signals import LEADS, NormaliseOptions, RawRecord, RecordRejected, to_canonical
from crema.data.ingest import run_ingest
from crema.data.report import with_section, write_report_section

KEY = b"test-pseudonym-key"
V2 = LEADS.index("V2")


@pytest.fixture(scope="module")
def ecg(shared_data):
    record = wfdb.rdrecord(str(shared_data / "ptbxl/records500/00000/00001_hr"))
    return record.p_signal.T.copy(), [n for n in record.sig_name]


def raw(signal, names, fs=500.0):
    return RawRecord("r", signal, fs, list(names), ["mV"] * len(names))


def test_flat_saturated_and_duplicated_leads_are_not_leads(ecg):
    signal, names = ecg
    signal = signal.copy()
    signal[V2] = 0.0  # a constant channel (CinC JS20004: V2, V4, V6 all zero)
    v4 = LEADS.index("V4")
    signal[v4] = np.clip(signal[v4], -0.05, 0.05)  # clipped at the converter's limits
    v6 = LEADS.index("V6")
    signal[v6] = signal[1]  # a copy of lead II taken for V6
    canonical = to_canonical(raw(signal, names), NormaliseOptions())
    quality = dict(zip(LEADS, canonical.lead_quality))
    assert quality["V2"] == "flat" and quality["V4"] == "saturated" and quality["V6"] == "duplicate"
    assert [q for lead, q in quality.items() if lead not in ("V2", "V4", "V6")] == ["ok"] * 9
    assert canonical.lead_mask.tolist() == [lead not in ("V2", "V4", "V6") for lead in LEADS]
    assert np.abs(canonical.signal[[V2, v4, v6]]).max() == 0


def test_absurd_rate_and_gain_are_rejected_and_normalised_amplitudes_flagged(ecg, tmp_path, shared_data):
    signal, names = ecg
    for fs in (1.0, 20_000.0):
        with pytest.raises(RecordRejected, match="outside 50-10000 Hz"):
            to_canonical(raw(signal, names, fs), NormaliseOptions())
    zscored = (signal - signal.mean(axis=1, keepdims=True)) / signal.std(axis=1, keepdims=True)
    assert to_canonical(raw(zscored, names), NormaliseOptions()).flags == ["normalised_amplitude"]
    assert to_canonical(raw(signal, names), NormaliseOptions()).flags == []

    from crema.data.readers import reader_for

    src = shared_data / "ptbxl/records500/00000"
    shutil.copy(src / "00001_hr.dat", tmp_path / "neg.dat")
    header = (src / "00001_hr.hea").read_text().replace("00001_hr", "neg").replace("1000.0(0)/mV", "-1000.0(0)/mV", 1)
    (tmp_path / "neg.hea").write_text(header)
    with pytest.raises(RecordRejected) as err:
        reader_for(SourceConfig(name="s", format="wfdb", path=str(tmp_path))).read("neg")
    assert err.value.reason == "bad_gain"


def test_lead_quality_and_flags_reach_the_dataset(ptbxl_root, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("00001_hr", "00002_hr"):
        for ext in ("hea", "dat"):
            shutil.copy(ptbxl_root / "records500/00000" / f"{name}.{ext}", src)
    record = wfdb.rdrecord(str(src / "00002_hr"))
    flat = record.p_signal.copy()
    flat[:, V2] = 0.0
    wfdb.wrsamp("flat_v2", fs=500, units=record.units, sig_name=record.sig_name, p_signal=flat, fmt=["16"] * 12,
                adc_gain=[1000.0] * 12, baseline=[0] * 12, write_dir=str(src))
    z = (record.p_signal - record.p_signal.mean(axis=0)) / record.p_signal.std(axis=0)
    wfdb.wrsamp("zscored", fs=500, units=["mV"] * 12, sig_name=record.sig_name, p_signal=z, fmt=["16"] * 12,
                adc_gain=[1000.0] * 12, baseline=[0] * 12, write_dir=str(src))
    summary = run_ingest([SourceConfig(name="h", format="wfdb", path=str(src), pseudonymise_record_ids=False)],
                     str(tmp_path / "ds"), IngestConfig(), pseudonym=KEY)
    assert summary.sources[0].normalised == 1
    table = read_windows(str(tmp_path / "ds"), filter=pc.field("record_id") == "flat_v2")
    assert table["lead_quality"].to_pylist()[0][V2] == "flat"
    assert decode_masks(table["lead_mask"])[0].tolist() == [lead != "V2" for lead in LEADS]
    flags = {r["record_id"]: r["flags"] for r in read_manifest(str(tmp_path / "ds")).to_pylist()}
    assert flags == {"00001_hr": None, "00002_hr": None, "flat_v2": None, "zscored": "normalised_amplitude"}


def test_report_per_source_and_sources_check(ptbxl_root, tmp_path):
    import subprocess
    import sys

    from tests.conftest import REPO

    src = tmp_path / "src"
    src.mkdir()
    for name in ("00001_hr", "00002_hr", "00003_hr"):
        for ext in ("hea", "dat"):
            shutil.copy(ptbxl_root / "records500/00000" / f"{name}.{ext}", src)
    (src / "broken.hea").write_text("garbage\n")
    out = tmp_path / "ds"
    run_ingest([SourceConfig(name="h", format="wfdb", path=str(src))], str(out), IngestConfig(max_reject_fraction=1.0),
           pseudonym=KEY)
    report = (out / "reports/h.md").read_text()
    assert (out / "reports/h.png").stat().st_size > 10_000
    manifest = read_manifest(str(out))
    for status in ("ok", "rejected", "duplicate"):
        assert f"| {status} | {manifest['status'].to_pylist().count(status)} |" in report
    assert "| bad_header | 1 |" in report and "| V6 | 3 | 0 | 0 | 0 | 0 | 0 |" in report

    yaml = tmp_path / "h.yaml"
    yaml.write_text(f"name: h\nformat: wfdb\npath: {src}\n")
    result = subprocess.run([sys.executable, "-m", "crema.stages.cli", "sources", "check", str(yaml), "-n", "4",
                             "--out", str(tmp_path / "check")], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "00001_hr" in result.stdout and "all leads ok" in result.stdout and "rejected  bad_header" in result.stdout
    assert len(list((tmp_path / "check").glob("*.png"))) == 3
    assert not (tmp_path / "check" / "ds").exists()


def test_a_later_measurement_joins_the_report_as_its_own_section_and_replaces_its_earlier_one(tmp_path):
    (tmp_path / "reports").mkdir()
    path = tmp_path / "reports/h.md"
    path.write_text("# Data quality: h\n\n## Labels\n\n3 records labelled.\n")
    assert write_report_section(str(tmp_path), "h", "drift a", "## Drift A\n\nfirst") == str(path)
    write_report_section(str(tmp_path), "h", "drift b", "## Drift B\n\nother")
    write_report_section(str(tmp_path), "h", "drift a", "## Drift A\n\nsecond")
    report = path.read_text()
    assert report.startswith("# Data quality: h\n\n## Labels\n\n3 records labelled.\n")
    assert "second" in report and "first" not in report and report.count("## Drift A") == 1
    assert report.index("## Drift A") < report.index("## Drift B")  # replaced in place, not moved to the end
    assert with_section(report, "drift a", "## Drift A\n\nsecond") == report  # a rerun changes nothing
    assert write_report_section(str(tmp_path), "nowhere", "drift a", "## Drift A") is None
    assert not (tmp_path / "reports/nowhere.md").exists()
