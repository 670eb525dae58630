"""The dataset as Iceberg tables: atomic commits, killed runs, concurrent ingests, missing sources, drop-source,
disk full — on a local warehouse and on an S3 API server (moto)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import boto3
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import yaml
from fsspec.core import url_to_fs

from crema.config import CatalogConfig, ConfigError, IngestConfig, SourceConfig
from crema.data import catalog
from crema.data.catalog import commits
from crema.data.catalog import (begin_run, commit_run, dataset_version, open_dataset, open_for_ingest, read_manifest,
                                read_windows, write_data_files, write_windows)
from crema.data.schema import decode_signals, window_schema
from tests.conftest import REPO

KEY = b"test-pseudonym-key"
L = 50


def make_windows(source: str, n_records: int, value: float = 1.0, windows_per_record: int = 2) -> pa.Table:
    rows = []
    for r in range(n_records):
        for w in range(windows_per_record):
            rows.append({"source": source, "record_id": f"r{r:03d}", "patient_key": f"p{r}", "window_index": w,
                         "window_start": w * L, "fs": 500, "valid_samples": L,
                         "signal": np.full((12, L), value, "<f2").tobytes(), "lead_mask": [True] * 12,
                         "derived_mask": [False] * 12, "labels": ["NORM"], "split": ("train", "val", "test")[r % 3],
                         "lead_quality": ["ok"] * 12})
    return pa.Table.from_pylist(rows, schema=window_schema(L))


def manifest_rows(windows: pa.Table) -> pa.Table:
    counts = windows.group_by(["source", "record_id"]).aggregate([("window_index", "count")])
    n = len(counts)
    return pa.table({"source": counts["source"], "record_id": counts["record_id"], "status": ["ok"] * n,
                     "reason": pa.nulls(n, pa.string()), "detail": pa.nulls(n, pa.string()),
                     "n_windows": counts["window_index_count"].cast(pa.int32()),
                     "content_hash": pa.nulls(n, pa.string()), "fingerprint": pa.nulls(n, pa.string()),
                     "flags": pa.nulls(n, pa.string()), "config_hash": pa.nulls(n, pa.string())})


# The S3 case starts a server (asked for by name below, so conftest cannot see it): it is in the slow tier.
@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.slow)])
def warehouse(request, tmp_path):
    """(dataset URI, catalog config, storage options) on a local folder or on the S3 API server."""
    if request.param == "local":
        return str(tmp_path / "ds"), None, {}
    endpoint = request.getfixturevalue("s3_server")
    options = {"key": "testing", "secret": "testing",
               "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}
    bucket = f"ds-{os.urandom(4).hex()}"
    boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                 region_name="us-east-1").create_bucket(Bucket=bucket)
    cat = CatalogConfig(type="sql", uri=f"sqlite:///{tmp_path}/catalog.db", warehouse=f"s3://{bucket}/ds/warehouse")
    return f"s3://{bucket}/ds", cat, options


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def kill(run: catalog.Run) -> None:
    """Leave `run` as a SIGKILL would: marker of a dead process in place, nothing cleaned up."""
    fs, marker = run.dataset.path(run.marker)
    fs.pipe(marker, f'{{"host": "{socket.gethostname()}", "pid": {dead_pid()}, "started": 0}}'.encode())


def data_files(uri: str, options: dict) -> set[str]:
    dataset = open_dataset(uri, options)
    fs, root = url_to_fs(dataset.windows().location() + "/data", **options)
    return set(fs.find(root))


def test_killed_before_the_commit_leaves_the_last_version_and_its_files_are_removed(warehouse):
    uri, cat, options = warehouse
    version = write_windows(uri, make_windows("a", 6), L, catalog=cat, storage_options=options)
    before = read_windows(uri, storage_options=options).sort_by([("record_id", "ascending"), ("window_index", "ascending")])
    committed_files = data_files(uri, options)

    dataset = open_for_ingest(uri, cat, options)
    run = begin_run(dataset)
    windows = dataset.windows()
    write_data_files(windows.metadata, windows.io, make_windows("a", 9, value=2.0), run.id, 0)
    kill(run)
    assert data_files(uri, options) > committed_files  # orphans on disk, invisible to readers
    after = read_windows(uri, storage_options=options).sort_by([("record_id", "ascending"), ("window_index", "ascending")])
    assert after.equals(before) and dataset_version(uri, options) == version

    next_run = begin_run(open_for_ingest(uri, cat, options))  # what the next ingest does first
    catalog.end_run(next_run)
    assert data_files(uri, options) == committed_files
    assert read_manifest(uri, options).num_rows == 6 and dataset_version(uri, options) == version


def test_killed_between_windows_and_manifest_commits_is_rolled_forward(warehouse, monkeypatch):
    uri, cat, options = warehouse
    write_windows(uri, make_windows("a", 6), L, catalog=cat, storage_options=options)
    write_windows(uri, make_windows("b", 3), L, catalog=cat, storage_options=options)

    dataset = open_for_ingest(uri, cat, options)
    run = begin_run(dataset)
    new = make_windows("a", 9, value=2.0, windows_per_record=1)
    windows = dataset.windows()
    files = write_data_files(windows.metadata, windows.io, new, run.id, 0)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("SIGKILL between the two commits")

    monkeypatch.setattr(commits, "_apply_pending", killed)
    with pytest.raises(KeyboardInterrupt):
        commit_run(run, {"a": None}, files, manifest_rows(new))
    monkeypatch.undo()
    kill(run)
    # The windows committed (readers see the new version); the manifest is behind until the next run.
    assert read_windows(uri, storage_options=options, filter=pc.field("source") == "a").num_rows == 9
    assert Counter(read_manifest(uri, options)["source"].to_pylist()) == {"a": 6, "b": 3}

    catalog.end_run(begin_run(open_for_ingest(uri, cat, options)))
    manifest = read_manifest(uri, options)
    assert Counter(manifest["source"].to_pylist()) == {"a": 9, "b": 3}
    windows = read_windows(uri, storage_options=options)
    assert sum(manifest["n_windows"].to_pylist()) == windows.num_rows == 9 + 6  # counts equal the windows
    assert (decode_signals(windows.filter(pc.field("source") == "a")) == 2.0).all()


def test_concurrent_commits_of_different_sources_all_land(warehouse):
    uri, cat, options = warehouse
    write_windows(uri, make_windows("seed", 1), L, catalog=cat, storage_options=options)  # tables exist
    errors = []

    def one(name: str) -> None:
        try:
            write_windows(uri, make_windows(name, 4), L, catalog=cat, storage_options=options)
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=one, args=(f"s{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    windows = read_windows(uri, columns=["source"], storage_options=options)
    assert Counter(windows["source"].to_pylist()) == {"seed": 2, **{f"s{i}": 8 for i in range(4)}}
    assert Counter(read_manifest(uri, options)["source"].to_pylist()) == {"seed": 1, **{f"s{i}": 4 for i in range(4)}}


def test_drop_source_is_the_only_removal(tmp_path):
    uri = str(tmp_path / "ds")
    write_windows(uri, make_windows("a", 3), L)
    write_windows(uri, make_windows("b", 2), L)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "crema.stages.cli", "dataset"]
    missing = subprocess.run([*command, "drop-source", uri, "nope"], capture_output=True, text=True, env=env, cwd=REPO)
    assert missing.returncode == 2 and "no source 'nope'" in missing.stdout
    dropped = subprocess.run([*command, "drop-source", uri, "a"], capture_output=True, text=True, env=env, cwd=REPO)
    assert dropped.returncode == 0, dropped.stdout + dropped.stderr
    assert "dropped a (3 records)" in dropped.stdout
    assert set(read_windows(uri, columns=["source"])["source"].to_pylist()) == {"b"}
    assert set(read_manifest(uri)["source"].to_pylist()) == {"b"}
    shown = subprocess.run([*command, "version", uri], capture_output=True, text=True, env=env, cwd=REPO)
    assert shown.stdout.split() == [dataset_version(uri), "b"]


# ------------------------------------------------------------------------------- with the ingest stage

def wfdb_subset(ptbxl_root: Path, folder: Path, ids) -> Path:
    folder.mkdir(parents=True)
    for i in ids:
        for ext in ("hea", "dat"):
            shutil.copy(ptbxl_root / "records500/00000" / f"{i:05d}_hr.{ext}", folder / f"{i:05d}_hr.{ext}")
    return folder


def test_a_source_missing_from_a_rerun_is_kept(ptbxl_root, ray_local, tmp_path, warehouse):
    from crema.stages.ingest import ingest

    out, cat, options = warehouse
    cfg = IngestConfig(catalog=cat, storage_options=options)
    a = SourceConfig(name="a", format="wfdb", path=str(wfdb_subset(ptbxl_root, tmp_path / "a", range(1, 6))))
    b = SourceConfig(name="b", format="wfdb", path=str(wfdb_subset(ptbxl_root, tmp_path / "b", range(6, 9))))
    ingest([a, b], out, cfg, pseudonym=KEY)
    version = dataset_version(out, options)

    ingest([a], out, cfg, pseudonym=KEY)  # b not named: kept
    assert Counter(read_manifest(out, options)["source"].to_pylist()) == {"a": 5, "b": 3}

    shutil.rmtree(tmp_path / "b")  # b's folder gone: a config error before Ray starts, nothing committed
    with pytest.raises(ConfigError, match="source b: path .* does not exist"):
        ingest([a, b], out, cfg, pseudonym=KEY)
    (tmp_path / "b").mkdir()  # an empty folder is no better
    with pytest.raises(ConfigError, match="source b: no wfdb records"):
        ingest([a, b], out, cfg, pseudonym=KEY)
    assert dataset_version(out, options) == version
    assert Counter(read_windows(out, columns=["source"], storage_options=options)["source"].to_pylist()) == \
        {"a": 5, "b": 3}


@pytest.mark.slow
def test_two_ingest_processes_into_one_dataset_both_land(ptbxl_root, tmp_path, warehouse):
    out, cat, options = warehouse
    config = tmp_path / "ingest.yaml"  # the catalog and warehouse both processes commit to
    config.write_text(yaml.safe_dump({"catalog": cat.model_dump() if cat else None, "storage_options": options}))
    env = {**os.environ, "CREMA_PSEUDONYM_KEY": KEY.decode(), "PYTHONPATH": str(REPO)}
    jobs = []
    for name, ids in (("a", range(1, 9)), ("b", range(9, 15))):
        folder = wfdb_subset(ptbxl_root, tmp_path / name, ids)
        source = tmp_path / f"{name}.yaml"
        source.write_text(f"name: {name}\nformat: wfdb\npath: {folder}\n")
        jobs.append(subprocess.Popen([sys.executable, "-m", "crema.stages.ingest", str(source), "--output", out,
                                      "--config", str(config)],
                                     env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for job in jobs:
        output, _ = job.communicate(timeout=600)
        assert job.returncode == 0, output[-3000:]
    assert Counter(read_manifest(out, options)["source"].to_pylist()) == {"a": 8, "b": 6}
    assert Counter(read_windows(out, columns=["source"], storage_options=options)["source"].to_pylist()) == \
        {"a": 8, "b": 6}


@pytest.mark.slow
def test_disk_full_is_one_line_and_its_own_exit_code(ptbxl_root, tmp_path):
    full = tmp_path / "full"
    full.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1500k", "tmpfs", str(full)],
                      capture_output=True).returncode != 0:
        pytest.skip("a small filesystem cannot be mounted here (needs root)")
    try:
        env = {**os.environ, "CREMA_PSEUDONYM_KEY": KEY.decode(), "PYTHONPATH": str(REPO)}
        small = tmp_path / "small.yaml"
        small.write_text(f"name: a\nformat: wfdb\npath: {wfdb_subset(ptbxl_root, tmp_path / 'a', range(1, 3))}\n")
        big = tmp_path / "big.yaml"
        big.write_text(f"name: b\nformat: wfdb\npath: {wfdb_subset(ptbxl_root, tmp_path / 'b', range(3, 60))}\n")
        out = full / "ds"
        command = [sys.executable, "-m", "crema.stages.ingest", "--output", str(out)]
        first = subprocess.run([*command, str(small)], env=env, cwd=REPO, capture_output=True, text=True)
        assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
        version = dataset_version(str(out))

        result = subprocess.run([*command, str(big)], env=env, cwd=REPO, capture_output=True, text=True)
        assert result.returncode == 3, result.stdout[-3000:] + result.stderr[-3000:]
        lines = [line for line in result.stdout.splitlines() if "no space left" in line]
        assert len(lines) == 1 and str(out) in lines[0]
        assert "Traceback" not in result.stdout
        assert dataset_version(str(out)) == version and read_manifest(str(out)).num_rows == 2
    finally:
        subprocess.run(["umount", "-l", str(full)], capture_output=True)
