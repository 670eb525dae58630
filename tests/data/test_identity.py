"""Record identity: validate first, de-duplicate valid records on the canonical signal, re-ingest exactly
the records whose fingerprint (header, signal bytes, label row, settings) changed."""

from __future__ import annotations

import shutil

import numpy as np
import pyarrow.compute as pc
import pytest

from crema.config import IngestConfig, LabelTable, SourceConfig
from crema.data.catalog import read_manifest, read_windows
from crema.data.schema import decode_signals
from crema.data.ingest import run_ingest

KEY = b"test-pseudonym-key"


def copy_record(ptbxl_root, src, name: str, as_name: str | None = None, header_edit=lambda h: h) -> None:
    as_name = as_name or name
    shutil.copy(ptbxl_root / "records500/00000" / f"{name}.dat", src / f"{as_name}.dat")
    header = (ptbxl_root / "records500/00000" / f"{name}.hea").read_text().replace(name, as_name)
    (src / f"{as_name}.hea").write_text(header_edit(header))


def absurd_gain(header: str) -> str:
    return header.replace("1000.0(0)/mV", "0.001(0)/mV")


@pytest.mark.parametrize("twin", ["00000_twin", "zz_twin"])  # sorted before, and after, the good record
def test_a_broken_twin_is_rejected_and_never_takes_the_good_records_place(ptbxl_root, tmp_path, twin):
    src = tmp_path / "src"
    src.mkdir()
    copy_record(ptbxl_root, src, "00001_hr")
    copy_record(ptbxl_root, src, "00001_hr", twin, absurd_gain)  # same .dat, a header with gain 0.001/mV
    run_ingest([SourceConfig(name="h", format="wfdb", path=str(src), pseudonymise_record_ids=False)], str(tmp_path / "ds"),
           IngestConfig(max_reject_fraction=1.0), pseudonym=KEY)
    rows = {r["record_id"]: r for r in read_manifest(str(tmp_path / "ds")).to_pylist()}
    assert rows[twin]["status"] == "rejected" and rows[twin]["reason"] == "absurd_amplitude"
    assert rows["00001_hr"]["status"] == "ok" and rows["00001_hr"]["n_windows"] == 1
    assert read_windows(str(tmp_path / "ds"), columns=["record_id"])["record_id"].to_pylist() == ["00001_hr"]


def test_a_valid_copy_under_another_name_is_a_duplicate_of_the_first(ptbxl_root, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    copy_record(ptbxl_root, src, "00002_hr")
    copy_record(ptbxl_root, src, "00002_hr", "00000_copy")
    summary = run_ingest([SourceConfig(name="h", format="wfdb", path=str(src), pseudonymise_record_ids=False)], str(tmp_path / "ds"), IngestConfig(),
                     pseudonym=KEY)
    rows = {r["record_id"]: r for r in read_manifest(str(tmp_path / "ds")).to_pylist()}
    assert rows["00000_copy"]["status"] == "ok"
    assert rows["00002_hr"]["status"] == "duplicate" and "h/00000_copy" in rows["00002_hr"]["detail"]
    assert read_windows(str(tmp_path / "ds"), columns=["record_id"])["record_id"].to_pylist() == ["00000_copy"]
    assert summary.sources[0].duplicate == 1


def test_header_and_label_edits_reingest_exactly_that_record_and_force_all(ptbxl_root, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    names = ["00001_hr", "00002_hr", "00003_hr", "00004_hr"]
    for name in names:
        copy_record(ptbxl_root, src, name)
    (src / "labels.csv").write_text("record,label\n" + "".join(f"{n},NORM\n" for n in names))
    source = SourceConfig(name="h", format="wfdb", path=str(src),
                          labels=LabelTable(table="labels.csv", record_column="record", label_column="label",
                                            label_format="single"))
    out = str(tmp_path / "ds")
    run_ingest([source], out, IngestConfig(), pseudonym=KEY)
    before = read_windows(out).sort_by("record_id")

    def swap_first_two_leads(header: str) -> str:
        lines = header.splitlines()
        a, b = lines[1].rsplit(" ", 1), lines[2].rsplit(" ", 1)
        lines[1], lines[2] = f"{a[0]} {b[1]}", f"{b[0]} {a[1]}"
        return "\n".join(lines) + "\n"

    (src / "00002_hr.hea").write_text(swap_first_two_leads((src / "00002_hr.hea").read_text()))
    summary = run_ingest([source], out, IngestConfig(), pseudonym=KEY)
    assert summary.sources[0].reingested == 1 and not summary.sources[0].skipped_unchanged
    after = read_windows(out).sort_by("record_id")
    k = after["record_id"].to_pylist().index("00002_hr")
    old, new = decode_signals(before)[k], decode_signals(after)[k]
    np.testing.assert_array_equal(new[0], old[1])  # lead I now holds what the header calls I
    np.testing.assert_array_equal(new[1], old[0])
    others = [i for i in range(4) if i != k]
    assert after.take(others).equals(before.take(others))

    (src / "labels.csv").write_text((src / "labels.csv").read_text().replace("00003_hr,NORM", "00003_hr,MI"))
    summary = run_ingest([source], out, IngestConfig(), pseudonym=KEY)
    assert summary.sources[0].reingested == 1
    labels = dict(zip(*(read_windows(out, columns=["record_id", "labels"])[c].to_pylist() for c in ("record_id", "labels"))))
    assert labels == {"00001_hr": ["NORM"], "00002_hr": ["NORM"], "00003_hr": ["MI"], "00004_hr": ["NORM"]}

    (src / "00004_hr.hea").unlink()  # a record gone from the folder leaves the dataset
    summary = run_ingest([source], out, IngestConfig(), pseudonym=KEY)
    assert summary.sources[0].reingested == 1
    assert sorted(read_manifest(out)["record_id"].to_pylist()) == names[:3]
    assert sorted(read_windows(out, columns=["record_id"])["record_id"].to_pylist()) == names[:3]

    assert run_ingest([source], out, IngestConfig(), pseudonym=KEY).sources[0].skipped_unchanged
    forced = run_ingest([source], out, IngestConfig(), pseudonym=KEY, force=True).sources[0]
    assert not forced.skipped_unchanged and forced.reingested is None and forced.ok == 3
    assert read_windows(out, filter=pc.field("record_id") == "00001_hr").num_rows == 1


def test_config_mistakes_are_clear_errors_before_any_work(ptbxl_root, tmp_path, monkeypatch):
    from crema.config import ConfigError, load_yaml

    src = tmp_path / "src"
    src.mkdir()
    copy_record(ptbxl_root, src, "00001_hr")
    out = tmp_path / "never"

    (src / "labels.csv").write_text("record,label\nsomething_else,NORM\n")
    labelled = SourceConfig(name="h", format="wfdb", path=str(src),
                            labels=LabelTable(table="labels.csv", record_column="record", label_column="label",
                                              label_format="single"))
    with pytest.raises(ConfigError, match="matches none of its 1 records"):
        run_ingest([labelled], str(out), IngestConfig(), pseudonym=KEY)

    (src / "RECORDS").write_text("00001_hr\n../../etc/passwd\n")
    listed = SourceConfig(name="h", format="wfdb", path=str(src), records="RECORDS")
    with pytest.raises(ConfigError, match="point outside the source folder"):
        run_ingest([listed], str(out), IngestConfig(), pseudonym=KEY)

    monkeypatch.delenv("CREMA_TEST_ROOT", raising=False)
    yaml = tmp_path / "s.yaml"
    yaml.write_text("name: s\nformat: WFDB\npath: ${CREMA_TEST_ROOT:-/nonexistent/ecg}/records\n")
    with pytest.raises(ConfigError, match="variable CREMA_TEST_ROOT is not set, so its default /nonexistent/ecg"):
        load_yaml(yaml, SourceConfig)
    monkeypatch.setenv("CREMA_TEST_ROOT", str(tmp_path))
    assert load_yaml(yaml, SourceConfig).format == "wfdb"  # set: no complaint (and the format is case-insensitive)
    assert not out.exists()


def test_symlinks_are_not_followed_out_of_the_source(ptbxl_root, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    copy_record(ptbxl_root, src, "00001_hr")
    for ext in ("hea", "dat"):  # a record whose files are links to elsewhere
        (src / f"00002_hr.{ext}").symlink_to(ptbxl_root / "records500/00000" / f"00002_hr.{ext}")
    source = SourceConfig(name="h", format="wfdb", path=str(src), pseudonymise_record_ids=False)
    run_ingest([source], str(tmp_path / "ds"), IngestConfig(max_reject_fraction=1.0), pseudonym=KEY)
    rows = {r["record_id"]: r for r in read_manifest(str(tmp_path / "ds")).to_pylist()}
    assert rows["00001_hr"]["status"] == "ok"
    assert rows["00002_hr"]["status"] == "rejected" and rows["00002_hr"]["reason"] == "path_outside_source"

    trusted = source.model_copy(update={"follow_symlinks": True})
    run_ingest([trusted], str(tmp_path / "ds2"), IngestConfig(), pseudonym=KEY)
    assert {r["status"] for r in read_manifest(str(tmp_path / "ds2")).to_pylist()} == {"ok"}


def test_record_ids_are_keyed_hashes_without_a_label_table(ptbxl_root, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    copy_record(ptbxl_root, src, "00001_hr", "MRN-4711-2023")  # a file named by medical record number
    source = SourceConfig(name="h", format="wfdb", path=str(src))
    run_ingest([source], str(tmp_path / "ds"), IngestConfig(), pseudonym=KEY)
    (stored,) = read_manifest(str(tmp_path / "ds"))["record_id"].to_pylist()
    assert "4711" not in stored and stored.startswith("r-")
    assert read_windows(str(tmp_path / "ds"), columns=["record_id"])["record_id"].to_pylist() == [stored]
    assert run_ingest([source], str(tmp_path / "ds"), IngestConfig(), pseudonym=KEY).sources[0].skipped_unchanged
