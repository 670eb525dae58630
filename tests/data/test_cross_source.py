"""Cross-source duplicates: one recording in two sources is reported, dropped or kept per `drop_duplicates`,
and a kept copy's patient is joined to its twin's so that the recording never sits in two splits."""

from __future__ import annotations

import shutil

import pyarrow.compute as pc
from pyiceberg.expressions import And, EqualTo

from crema.config import IngestConfig, LabelTable, SourceConfig
from crema.data.catalog import read_manifest, read_windows
from crema.data.labels import pseudonymise
from crema.data.ingest import run_ingest

KEY = b"test-pseudonym-key"
SPLITS = {"train": ["train"], "val": ["val"], "test": ["test"]}


def labelled_source(ptbxl_root, folder, name: str, records: dict[str, tuple[str, str, str]]) -> SourceConfig:
    """A WFDB source of PTB-XL records500 recordings under new names: {name: (PTB-XL record, patient, split)},
    with a label table giving each its patient and split."""
    folder.mkdir()
    rows = ["record,label,patient,split"]
    for as_name, (record, patient, split) in records.items():
        shutil.copy(ptbxl_root / "records500/00000" / f"{record}.dat", folder / f"{as_name}.dat")
        header = (ptbxl_root / "records500/00000" / f"{record}.hea").read_text().replace(record, as_name)
        (folder / f"{as_name}.hea").write_text(header)
        rows.append(f"{as_name},NORM,{patient},{split}")
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    return SourceConfig(name=name, format="wfdb", path=str(folder), pseudonymise_record_ids=False,
                        labels=LabelTable(table="labels.csv", record_column="record", label_column="label",
                                          label_format="single", patient_column="patient", split_column="split",
                                          split_values=SPLITS))


def identities(out: str, source: str) -> dict[str, tuple[str, str]]:
    rows = read_windows(out, columns=["record_id", "patient_key", "split"], filter=pc.field("source") == source)
    return {r: (p, s) for r, p, s in zip(*(rows[c].to_pylist() for c in ("record_id", "patient_key", "split")))}


def test_a_recording_in_two_sources_is_one_patients_in_one_split(ptbxl_root, tmp_path):
    a = labelled_source(ptbxl_root, tmp_path / "a", "a", {"00001_hr": ("00001_hr", "pa1", "train"),
                                                          "00002_hr": ("00002_hr", "pa2", "train")})
    # b holds 00001_hr again (another name, another patient id, the test split), another record of that
    # patient, and a record of an unrelated patient.
    b = labelled_source(ptbxl_root, tmp_path / "b", "b", {"copy_of_1": ("00001_hr", "pb1", "test"),
                                                          "00003_hr": ("00003_hr", "pb1", "test"),
                                                          "00004_hr": ("00004_hr", "pb2", "test")})
    first_copy = (pseudonymise("pa1", "a", KEY), "train")

    kept = str(tmp_path / "kept")
    summary = run_ingest([a, b], kept, IngestConfig(drop_duplicates=False), pseudonym=KEY)
    by_name = {s.name: s for s in summary.sources}
    assert (by_name["b"].ok, by_name["b"].duplicate, by_name["b"].duplicate_kept) == (3, 0, 1)
    assert by_name["b"].cross_source_duplicates == 1 and by_name["a"].cross_source_duplicates == 0
    assert by_name["b"].patients_joined == 2  # the copy and the other record of its patient
    windows = identities(kept, "b")
    assert windows["copy_of_1"] == first_copy  # the kept copy carries the first copy's patient key and split
    assert windows["00003_hr"] == first_copy  # so does every record of the joined patient
    assert windows["00004_hr"] == (pseudonymise("pb2", "b", KEY), "test")  # an unrelated patient is untouched
    assert identities(kept, "a")["00001_hr"] == first_copy
    # The re-keyed rows were rewritten into the train partition: pruning by partition finds them there.
    train = read_windows(kept, columns=["record_id"], filter=And(EqualTo("source", "b"), EqualTo("split", "train")))
    assert sorted(train["record_id"].to_pylist()) == ["00003_hr", "copy_of_1"]
    rows = {(r["source"], r["record_id"]): r for r in read_manifest(kept).to_pylist()}
    assert rows[("b", "copy_of_1")]["status"] == "ok"
    assert rows[("b", "copy_of_1")]["detail"].startswith("same signal as a/00001_hr")
    assert "patient key and split joined with a/00001_hr" in rows[("b", "00003_hr")]["detail"]
    report = (tmp_path / "kept" / "reports" / "b.md").read_text()
    assert "## Duplicates" in report and "1 of another source's" in report

    # Source b again on its own (forced): its twin is now a committed record of a, found in the windows table.
    again = run_ingest([b], kept, IngestConfig(drop_duplicates=False), pseudonym=KEY, force=True)
    assert again.sources[0].cross_source_duplicates == 1 and again.sources[0].duplicate_kept == 1
    assert identities(kept, "b") == windows

    dropped = str(tmp_path / "dropped")
    summary = run_ingest([a, b], dropped, IngestConfig(drop_duplicates=True), pseudonym=KEY)
    b_summary = {s.name: s for s in summary.sources}["b"]
    assert (b_summary.ok, b_summary.duplicate, b_summary.duplicate_kept, b_summary.cross_source_duplicates) == (2, 1, 0, 1)
    rows = {(r["source"], r["record_id"]): r for r in read_manifest(dropped).to_pylist()}
    assert rows[("b", "copy_of_1")]["status"] == "duplicate" and rows[("b", "copy_of_1")]["n_windows"] == 0
    windows = identities(dropped, "b")
    assert "copy_of_1" not in windows  # no windows for the dropped copy
    assert windows["00003_hr"] == (pseudonymise("pb1", "b", KEY), "test")  # nothing joined: the copy is gone
