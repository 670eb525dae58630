"""The ingest stage on real PTB-XL and clinical-format records: contract, labels, splits, accounting."""

from __future__ import annotations

import shutil
from collections import Counter

import numpy as np
import pyarrow.compute as pc
import pytest
import wfdb
from scipy.signal import resample_poly

from crema.config import ConfigError, HashSplit, IngestConfig, SourceConfig, load_yaml
from crema.data.catalog import dataset_version, read_manifest, read_windows
from crema.data.schema import decode_masks, decode_signals
from crema.data.ingest import IngestFailed, run_ingest
from crema.data.signals import LEADS
from crema.stages.ingest import ingest

KEY = b"test-pseudonym-key"
SUPERCLASSES = ("NORM", "STTC", "CD", "MI", "HYP")


def ptbxl_source(root, folder="records500", name="ptbxl", **changes) -> SourceConfig:
    import os
    os.environ["PTBXL_ROOT"] = str(root)
    source = load_yaml(__import__("pathlib").Path(__file__).parents[2] / "configs/sources/ptbxl.yaml", SourceConfig)
    data = source.model_dump()
    data.update(name=name, path=str(root / folder))
    if folder == "records100":
        data["labels"]["record_column"] = "filename_lr"
    data.update(changes)
    return SourceConfig.model_validate(data)


def superclass_counts(table) -> dict[str, int]:
    firsts = table.filter(pc.equal(table["window_index"], 0))
    return dict(Counter(code for labels in firsts["labels"].to_pylist() for code in labels if code in SUPERCLASSES))


@pytest.fixture(scope="module")
def records500(ptbxl_root, ray_local, tmp_path_factory):
    """The 500 records500 on the Ray path (the stage's `ingest`); the other ingest tests run in-process."""
    out = tmp_path_factory.mktemp("ingest500") / "dataset"
    # PTB-XL holds byte-identical recordings under different ids; keep them all here so that every
    # record's labels count (test_duplicate_recordings_dropped_by_default covers the default policy).
    summary = ingest([ptbxl_source(ptbxl_root)], str(out), IngestConfig(drop_duplicates=False), pseudonym=KEY)
    return out, summary


def test_the_in_process_run_commits_what_the_ray_run_commits(records500, ptbxl_root, tmp_path):
    """run_ingest on its in-process passes and the stage on Ray Data: the same windows, byte for byte, and
    the same manifest, on the same 500 records."""
    ray_out, ray_summary = records500
    out = tmp_path / "dataset"
    summary = run_ingest([ptbxl_source(ptbxl_root)], str(out), IngestConfig(drop_duplicates=False), pseudonym=KEY)
    assert summary.sources == ray_summary.sources
    columns = ["source", "record_id", "window_index", "signal", "lead_mask", "labels", "split", "patient_key"]
    order = [("source", "ascending"), ("record_id", "ascending"), ("window_index", "ascending")]
    assert read_windows(str(out), columns=columns).sort_by(order).equals(
        read_windows(str(ray_out), columns=columns).sort_by(order))
    by_record = [("source", "ascending"), ("record_id", "ascending")]
    assert read_manifest(str(out), {}).sort_by(by_record).equals(read_manifest(str(ray_out), {}).sort_by(by_record))


def test_every_record500_ingested_with_label_and_fold_counts(records500):
    out, summary = records500
    (s,) = summary.sources
    assert (s.discovered, s.ok, s.rejected, s.duplicate, s.windows) == (500, 500, 0, 0, 500)
    assert s.unmatched_label_rows == 21837 - 500  # reported, not errors
    table = read_windows(str(out), columns=["record_id", "window_index", "labels", "split", "patient_key"])
    assert superclass_counts(table) == {"NORM": 297, "STTC": 96, "CD": 78, "MI": 73, "HYP": 40}
    assert Counter(table["split"].to_pylist()) == {"train": 353, "val": 81, "test": 66}
    manifest = read_manifest(str(out), {})
    assert manifest.num_rows == 500 and set(manifest["status"].to_pylist()) == {"ok"}


def test_duplicate_recordings_dropped_by_default(ptbxl_root, tmp_path):
    import hashlib

    folder = ptbxl_root / "records500/00000"
    by_hash: dict[str, list[str]] = {}
    for dat in sorted(folder.glob("*.dat")):
        by_hash.setdefault(hashlib.sha256(dat.read_bytes()).hexdigest(), []).append(f"00000/{dat.stem}")
    expected_duplicates = sorted(r for group in by_hash.values() for r in group[1:])
    assert expected_duplicates, "the shared records500 is known to hold byte-identical pairs"

    summary = run_ingest([ptbxl_source(ptbxl_root)], str(tmp_path / "ds"), IngestConfig(), pseudonym=KEY)
    manifest = read_manifest(str(tmp_path / "ds"), {})
    duplicates = manifest.filter(pc.equal(manifest["status"], "duplicate"))
    assert sorted(duplicates["record_id"].to_pylist()) == expected_duplicates
    assert summary.sources[0].ok == 500 - len(expected_duplicates)
    windows = read_windows(str(tmp_path / "ds"), columns=["record_id"])
    assert set(windows["record_id"].to_pylist()).isdisjoint(expected_duplicates)


def test_windows_match_wfdb_in_float16(records500, ptbxl_root):
    out, _ = records500
    table = read_windows(str(out))
    by_id = {r: i for i, r in enumerate(table["record_id"].to_pylist())}
    signals = decode_signals(table)
    masks = decode_masks(table["lead_mask"])
    assert signals.shape == (500, 12, 5000) and signals.dtype == np.float16 and masks.all()
    for record_id in table["record_id"].to_pylist()[::7]:
        ref = wfdb.rdrecord(str(ptbxl_root / "records500" / record_id))
        assert [n.lower() for n in ref.sig_name] == [n.lower() for n in LEADS]
        got = signals[by_id[record_id]].astype(np.float32)
        np.testing.assert_allclose(got, ref.p_signal.T, atol=2e-3, rtol=1e-3)


def test_folds_map_to_splits_and_no_patient_in_two_splits(records500, ptbxl_root):
    import pandas as pd

    out, _ = records500
    table = read_windows(str(out), columns=["record_id", "split", "patient_key"])
    db = pd.read_csv(ptbxl_root / "ptbxl_database.csv", index_col="ecg_id")
    fold_split = {**{f: "train" for f in range(1, 9)}, 9: "val", 10: "test"}
    for record_id, split in zip(table["record_id"].to_pylist(), table["split"].to_pylist()):
        ecg_id = int(record_id.split("/")[-1].split("_")[0])
        assert split == fold_split[int(db.loc[ecg_id, "strat_fold"])]
    per_patient = table.group_by("patient_key").aggregate([("split", "count_distinct")])
    assert max(per_patient["split_count_distinct"].to_pylist()) == 1


def test_records100_resampled_labels_and_hash_split(ptbxl_root, tmp_path):
    labels = ptbxl_source(ptbxl_root, "records100").labels.model_dump()
    labels["split_column"] = None  # force the patient-hash split
    source = ptbxl_source(ptbxl_root, "records100", name="ptbxl100", labels=labels,
                          hash_split=HashSplit(val=0.1, test=0.1).model_dump())
    summary = run_ingest([source], str(tmp_path / "ds"), IngestConfig(target_fs=500, dtype="float32", drop_duplicates=False),
                     pseudonym=KEY)
    assert summary.sources[0].ok == 1999
    table = read_windows(str(tmp_path / "ds"))
    assert superclass_counts(table) == {"NORM": 1055, "STTC": 470, "CD": 412, "MI": 372, "HYP": 217}
    per_patient = table.group_by("patient_key").aggregate([("split", "count_distinct")])
    assert per_patient.num_rows == 1857 and max(per_patient["split_count_distinct"].to_pylist()) == 1
    counts = Counter(table["split"].to_pylist())
    assert 0.7 < counts["train"] / 1999 < 0.9 and counts["val"] > 100 and counts["test"] > 100
    signals = decode_signals(table)
    ids = table["record_id"].to_pylist()
    for k in range(0, 1999, 97):
        ref = wfdb.rdrecord(str(ptbxl_root / "records100" / ids[k])).p_signal.T
        np.testing.assert_allclose(signals[k], resample_poly(ref, 5, 1, axis=-1), atol=1e-5)


def test_ptb_15_channel_record_and_non_12_lead_record(shared_data, tmp_path):
    folder = tmp_path / "src"
    folder.mkdir()
    for f in (shared_data / "formats" / "wfdb").iterdir():
        shutil.copy(f, folder / f.name)
    source = SourceConfig(name="formats", format="wfdb", path=str(folder), pseudonymise_record_ids=False)
    summary = run_ingest([source], str(tmp_path / "ds"), IngestConfig(max_reject_fraction=1.0), pseudonym=KEY)
    manifest = {r["record_id"]: r for r in read_manifest(str(tmp_path / "ds"), {}).to_pylist()}
    # s0010_re: 12 standard leads (lower-case names) + Frank vx/vy/vz dropped, 1000 Hz -> 500 Hz, 38.4 s -> 3 windows
    assert manifest["s0010_re"]["status"] == "ok" and manifest["s0010_re"]["n_windows"] == 3
    # 100 (MIT-BIH): MLII is not lead II (documented rule), V5 alone is too few leads
    assert manifest["100"]["status"] == "rejected" and manifest["100"]["reason"] == "too_few_leads"
    table = read_windows(str(tmp_path / "ds"))
    ref = wfdb.rdrecord(str(shared_data / "formats/wfdb/s0010_re"))
    expected = resample_poly(ref.p_signal[:, :12].T, 1, 2, axis=-1)[:, :5000]
    first = table.filter(pc.equal(table["window_index"], 0))
    np.testing.assert_allclose(decode_signals(first)[0].astype(np.float32), expected, atol=5e-3, rtol=2e-3)
    assert summary.sources[0].windows == 3

    # With MLII mapped to II explicitly and a lower lead minimum, record 100 is kept and masked.
    mapped = SourceConfig(name="mitdb", format="wfdb", path=str(folder), lead_aliases={"MLII": "II"}, pseudonymise_record_ids=False)
    run_ingest([mapped], str(tmp_path / "ds2"), IngestConfig(min_leads=2), pseudonym=KEY)
    table = read_windows(str(tmp_path / "ds2"), filter=pc.equal(pc.field("record_id"), "100"))
    masks = decode_masks(table["lead_mask"])
    assert table.num_rows == 180  # 30 min 5.6 s at 10 s windows
    assert masks[0].tolist() == [lead in ("II", "V5") for lead in LEADS]
    assert np.abs(decode_signals(table)[:, ~masks[0]]).max() == 0


def test_broken_inputs_rejected_with_reasons_good_records_untouched(ptbxl_root, tmp_path):
    src = tmp_path / "hospital"
    src.mkdir()
    good = ["00001_hr", "00002_hr", "00003_hr"]
    for name in good:
        for ext in ("hea", "dat"):
            shutil.copy(ptbxl_root / "records500/00000" / f"{name}.{ext}", src / f"{name}.{ext}")
    header = (src / "00001_hr.hea").read_text()
    dat = (src / "00001_hr.dat").read_bytes()
    other_dat = (ptbxl_root / "records500/00000/00004_hr.dat").read_bytes()  # not a duplicate of a good record
    broken = {
        "garbled": ("this is not a header\n\x00\x01", None),
        "truncated": (header.replace("00001_hr", "truncated"), dat[: len(dat) // 3]),
        "missing_dat": (header.replace("00001_hr", "missing_dat"), None),
        "escape": (header.replace("00001_hr.dat", "../../../etc/passwd").replace("00001_hr", "escape"), None),
        "absurd_length": (header.replace("00001_hr 12 500 5000", "absurd_length 12 500 999999999999")
                          .replace("00001_hr", "absurd_length"), other_dat),
        "absurd_amplitude": (header.replace("1000.0(0)/mV", "0.001(0)/mV").replace("00001_hr", "absurd_amplitude"),
                             other_dat[:-2] + b"\x01\x00"),
        "flat": (header.replace("00001_hr", "flat"), bytes(len(dat))),
    }
    for name, (text, data) in broken.items():
        (src / f"{name}.hea").write_text(text)
        if data is not None:
            (src / f"{name}.dat").write_bytes(data)
    shutil.copy(src / "00002_hr.dat", src / "copy_of_2.dat")
    (src / "copy_of_2.hea").write_text((src / "00002_hr.hea").read_text().replace("00002_hr", "copy_of_2"))

    source = SourceConfig(name="hospital", format="wfdb", path=str(src), pseudonymise_record_ids=False)
    summary = run_ingest([source], str(tmp_path / "ds"), IngestConfig(max_reject_fraction=1.0), pseudonym=KEY)
    rows = {r["record_id"]: r for r in read_manifest(str(tmp_path / "ds"), {}).to_pylist()}
    assert len(rows) == len(good) + len(broken) + 1  # every discovered record is accounted for
    assert [rows[g]["status"] for g in good] == ["ok"] * 3
    assert rows["copy_of_2"]["status"] == "duplicate"
    for name in broken:
        assert rows[name]["status"] == "rejected" and rows[name]["reason"], (name, rows[name])
    assert rows["escape"]["reason"] == "path_outside_source"
    assert rows["missing_dat"]["reason"] == "missing_file"
    assert rows["truncated"]["reason"] == "truncated_signal"
    assert rows["absurd_amplitude"]["reason"] == "absurd_amplitude"
    assert rows["flat"]["reason"] == "flat_signal"
    s = summary.sources[0]
    assert s.ok + s.rejected + s.duplicate == s.discovered == len(rows)
    table = read_windows(str(tmp_path / "ds"))
    assert sorted(table["record_id"].to_pylist()) == good
    ref = wfdb.rdrecord(str(ptbxl_root / "records500/00000/00003_hr")).p_signal.T
    got = decode_signals(table.filter(pc.equal(table["record_id"], "00003_hr")))[0]
    np.testing.assert_allclose(got.astype(np.float32), ref, atol=2e-3, rtol=1e-3)

    with pytest.raises(IngestFailed, match="rejected"):
        run_ingest([source], str(tmp_path / "ds3"), IngestConfig(max_reject_fraction=0.2), pseudonym=KEY)
    assert read_manifest(str(tmp_path / "ds3"), {}).num_rows == len(rows)  # still written, for inspection


def test_rerun_is_idempotent_and_second_source_leaves_first_alone(ptbxl_root, tmp_path):
    def subset(name, ids):
        folder = tmp_path / name
        folder.mkdir()
        for i in ids:
            for ext in ("hea", "dat"):
                shutil.copy(ptbxl_root / "records500/00000" / f"{i:05d}_hr.{ext}", folder / f"{i:05d}_hr.{ext}")
        return SourceConfig(name=name, format="wfdb", path=str(folder))

    a, b = subset("a", range(1, 21)), subset("b", range(21, 41))
    out = str(tmp_path / "ds")
    run_ingest([a], out, IngestConfig(), pseudonym=KEY)
    first = read_windows(out).sort_by("record_id")
    version = dataset_version(out)

    summary = run_ingest([a], out, IngestConfig(), pseudonym=KEY)
    assert summary.sources[0].skipped_unchanged
    assert read_windows(out).sort_by("record_id").equals(first)
    assert dataset_version(out) == version  # nothing committed

    run_ingest([b], out, IngestConfig(), pseudonym=KEY)
    assert read_windows(out, filter=pc.field("source") == "a").sort_by("record_id").equals(first)
    both = read_windows(out)
    assert both.num_rows == 40 and Counter(both["source"].to_pylist()) == {"a": 20, "b": 20}
    assert read_manifest(out, {}).num_rows == 40
    assert read_windows(out, version=version).num_rows == 20  # the earlier version stays readable

    # A changed setting re-ingests the source (replacing, not appending, its windows).
    run_ingest([a], out, IngestConfig(target_fs=1000, window_s=5), pseudonym=KEY)
    rows = read_windows(out, filter=pc.equal(pc.field("source"), "a"))
    assert rows.num_rows == 40 and set(rows["fs"].to_pylist()) == {1000}
    # One dataset has one window length: another is refused before any work.
    with pytest.raises(ConfigError, match="5000 samples"):
        run_ingest([a], out, IngestConfig(target_fs=250), pseudonym=KEY)
    assert not list((tmp_path / "ds" / "_runs").iterdir()) and not list((tmp_path / "ds" / "_pending").iterdir())


@pytest.mark.slow
def test_killed_run_leaves_the_committed_dataset_intact(ptbxl_root, tmp_path):
    """SIGKILL the ingest job while its tasks write: readers still see the last committed version, and the
    next run removes the killed run's data files and commits every record."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    out = tmp_path / "ds"
    # 768 records: three tasks of 256 on two cores, so the third is still running when the first has written.
    records = sorted(p.relative_to(ptbxl_root / "records100").with_suffix("").as_posix()
                     for p in (ptbxl_root / "records100").rglob("*.hea"))[:768]
    (tmp_path / "RECORDS").write_text("\n".join(records) + "\n")
    source = tmp_path / "ptbxl100.yaml"
    source.write_text(f"name: ptbxl100\nformat: wfdb\npath: {ptbxl_root / 'records100'}\nrecords: {tmp_path / 'RECORDS'}\n")
    env = {**os.environ, "CREMA_PSEUDONYM_KEY": KEY.decode()}
    command = [sys.executable, "-m", "crema.stages.ingest", str(source), "--output", str(out)]
    repo = Path(__file__).parents[2]
    # 250 Hz and 20 s windows: 5000 samples, as at 500 Hz and 10 s (one dataset, one window length).
    first = subprocess.run([*command, "--set", "target_fs=250", "--set", "window_s=20", "--set", "pad_short=true"],
                           env=env, cwd=repo, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-2000:]
    before = read_windows(str(out)).sort_by([("record_id", "ascending"), ("window_index", "ascending")])
    manifest_before = read_manifest(str(out), {})
    version = dataset_version(str(out))
    data = out / "warehouse/crema/windows/data"
    files_before = set(data.rglob("*.parquet"))

    job = subprocess.Popen([*command, "--set", "target_fs=500"], env=env, cwd=repo, start_new_session=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not set(data.rglob("*.parquet")) - files_before and time.time() < deadline:
        assert job.poll() is None, "the job finished before it could be interrupted"
        time.sleep(0.05)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    killed_files = set(data.rglob("*.parquet")) - files_before
    assert killed_files  # written by the killed run, never committed

    after = read_windows(str(out)).sort_by([("record_id", "ascending"), ("window_index", "ascending")])
    assert after.equals(before) and set(after["fs"].to_pylist()) == {250}
    assert read_manifest(str(out), {}).equals(manifest_before) and dataset_version(str(out)) == version

    again = subprocess.run([*command, "--set", "target_fs=500"], env=env, cwd=repo, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    windows = read_windows(str(out), columns=["record_id", "fs"])
    assert set(windows["fs"].to_pylist()) == {500}
    manifest = read_manifest(str(out), {})
    assert manifest.num_rows == manifest_before.num_rows == len(records)  # no record missing
    assert sum(manifest["n_windows"].to_pylist()) == windows.num_rows
    # The killed run's files are gone (orphan cleanup); the committed ones, old versions' included, are kept.
    files_now = set(data.rglob("*.parquet"))
    assert files_before <= files_now and not killed_files & files_now
