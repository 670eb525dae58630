"""Ingest throughput and memory, against the loop a user would write, in one run.

    python -m benchmarks.ingest [--data ../shared/data] [--replicas 5]

The corpus is the issue's: PTB-XL records100 (1,999 records, 100 Hz) replicated N times (N = 5: ~10,000
records; see `replicate`), made into 500 Hz windows.
(a) baseline: for each record `wfdb.rdrecord` + `scipy.signal.resample_poly` to 500 Hz, then one pyarrow
    write: the loop a user would write, on one core;
(b) `crema.stages.ingest.ingest` on a local Ray instance with 1 CPU, then 2 CPUs, each timed twice: end to
    end with Ray's start (a fresh `ray.init`, the workers' imports) and again on the warm instance.
    Peak memory is the proportional set size (PSS) of this process and every Ray process it started,
    sampled while the pipeline runs, at 1x and at N x the corpus: streaming means it stays flat;
(c) the windows table's fixed-size binary signal column (Iceberg `fixed[L]`), written and read through the
    catalog, against the same Arrow table written and read as one plain Parquet file;
(d) per hospital format, read + `to_canonical` of the shared sample files (`formats/`, pydicom's ECG)
    in one process, each file replicated by symlink: records/s and ms per record, with the library that
    decodes it. `--formats-only` runs this part alone (seconds, no Ray).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import wfdb
from scipy.signal import resample_poly

from crema.config import IngestConfig, SourceConfig
from crema.data.catalog import open_dataset, read_windows, write_data_files
from crema.stages.ingest import ingest
from crema.data.readers import reader_for

TARGETS = {"speedup_per_core": 20.0, "scaling_1_to_2": 1.8, "memory_growth": 1.25}
TARGET_FS = 500


def replicate(records: Path, dest: Path, replicas: int) -> Path:
    """N copies of the corpus with distinct record ids. Copy 0 links the shared files; every further copy
    has its own signal file with one sample changed (the first, by k ADC units), so that the copies are
    distinct recordings to the ingest, as a real corpus is, and not duplicates to de-duplicate. Headers
    and label files are links."""
    for k in range(replicas):
        folder = dest / f"copy{k}"
        folder.mkdir(parents=True)
        for f in sorted(records.glob("*/*.*")):
            if k and f.suffix == ".dat":  # WFDB format 16: little-endian int16 samples
                data = bytearray(f.read_bytes())
                data[0:2] = ((int.from_bytes(data[0:2], "little", signed=True) + k) % 2**16).to_bytes(2, "little")
                (folder / f.name).write_bytes(bytes(data))
            else:
                (folder / f.name).symlink_to(f)
    return dest


def baseline(corpus: Path, out: Path, target_fs: int = TARGET_FS) -> float:
    """The naive loop: read with wfdb, resample, and write everything at the end. Returns records/s."""
    started = time.perf_counter()
    ids, signals = [], []
    for header in sorted(corpus.rglob("*.hea")):
        record = wfdb.rdrecord(str(header.with_suffix("")))
        signal = resample_poly(record.p_signal.T, target_fs, int(record.fs), axis=-1).astype(np.float16)
        ids.append(str(header.relative_to(corpus).with_suffix("")))
        signals.append(signal.reshape(-1))
    table = pa.table({"record_id": ids, "signal": pa.FixedSizeListArray.from_arrays(
        pa.array(np.concatenate(signals)), signals[0].size)})
    pq.write_table(table, out)
    return len(ids) / (time.perf_counter() - started)


class PeakMemory:
    """Samples the PSS of this process and its descendants (the Ray workers) in a thread."""

    def __init__(self, interval_s: float = 0.2):
        self.interval_s = interval_s
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for proc in [me, *me.children(recursive=True)]:
                try:
                    total += proc.memory_full_info().pss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def floor(corpus: Path, n: int = 1000, target_fs: int = TARGET_FS) -> float:
    """Records/s of what no ingest can skip, in one process: read and decode a record (crema's WFDB reader),
    resample it (crema's resampler) and cast it to float16; no validation, no hashing, no writing.
    The speed-up target is only reachable when this floor is well above it."""
    from crema.data.ingest import as_stored
    from crema.data.signals import resample

    reader = reader_for(SourceConfig(name="floor", format="wfdb", path=str(corpus), follow_symlinks=True))
    ids = reader.discover()[:n]
    started = time.perf_counter()
    for record_id in ids:
        raw = reader.read(record_id)
        as_stored(resample(raw.signal.astype(np.float32), raw.fs, target_fs), np.dtype(np.float16))
    return len(ids) / (time.perf_counter() - started)


def pipeline(corpus: Path, out: Path, num_cpus: int) -> tuple[float, float, int]:
    """Records/s of the Ray Data ingest end to end (Ray's start included) and warm (a second ingest on the
    same instance), and the peak memory in bytes of the warm run."""
    source = SourceConfig(name="bench", format="wfdb", path=str(corpus), follow_symlinks=True)  # linked files
    cfg = IngestConfig(target_fs=TARGET_FS)
    started = time.perf_counter()
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    try:
        summary = ingest([source], str(out / "cold"), cfg, pseudonym=b"bench")
        cold = summary.discovered / (time.perf_counter() - started)
        with PeakMemory() as memory:
            started = time.perf_counter()
            summary = ingest([source], str(out / "warm"), cfg, pseudonym=b"bench")
            warm = summary.discovered / (time.perf_counter() - started)
        counts = summary.sources[0]  # PTB-XL itself holds two recordings twice: a few duplicates are real
        assert counts.ok + counts.duplicate == counts.discovered and counts.duplicate < 0.01 * counts.discovered, counts
        return cold, warm, memory.peak
    finally:
        ray.shutdown()


def signal_column_io(dataset: Path, tmp: Path, repeats: int = 5) -> dict[str, float]:
    """MB/s of writing a windows table's rows as data files of its Iceberg table (the signal as `fixed[L]`;
    the per-commit catalog work is not per byte, so it is left out) and of reading the table back through
    the catalog, against the same Arrow table as one plain Parquet file: best of `repeats` each (this
    machine's disk is noisy)."""
    table = read_windows(str(dataset))
    windows = open_dataset(str(dataset)).windows()
    megabytes = table["signal"].nbytes / 2**20
    timings: dict[str, list[float]] = {"iceberg write": [], "parquet write": [], "iceberg read": [], "parquet read": []}
    tmp.mkdir(parents=True, exist_ok=True)
    for _ in range(repeats):
        started = time.perf_counter()
        write_data_files(windows.metadata, windows.io, table, uuid.uuid4(), 0)  # uncommitted: no reader sees them
        timings["iceberg write"].append(time.perf_counter() - started)
        started = time.perf_counter()
        pq.write_table(table, tmp / "plain.parquet")
        timings["parquet write"].append(time.perf_counter() - started)
        started = time.perf_counter()
        read_windows(str(dataset))
        timings["iceberg read"].append(time.perf_counter() - started)
        started = time.perf_counter()
        pq.read_table(tmp / "plain.parquet")
        timings["parquet read"].append(time.perf_counter() - started)
    return {name: megabytes / min(seconds) for name, seconds in timings.items()}


# format -> (folder under formats/, extra source keys, what decodes it). DICOM comes from pydicom's wheel.
FORMAT_SAMPLES = {
    "wfdb": ("wfdb", {}, "numpy fast path (format 16/212)"),
    "muse": ("ge_muse_xml", {}, "defusedxml + numpy"),
    "hl7_aecg": ("hl7_aecg", {}, "defusedxml + numpy"),
    "philips_xml": ("philips_sierra_xml", {}, "sierraecg XLI (pure-Python LZW)"),
    "scp_ecg": ("scp_ecg", {}, "crema (Python Huffman)"),
    "edf": ("edf", {}, "edfio"),
    "csv": ("csv", {"fs": 800, "scale": 2000 / 65535}, "pandas.read_csv"),
    "dicom": (None, {}, "pydicom"),
}
# A format slower than this per 10 s of ECG gets a note: it holds a worker under 20 resting ECGs/s.
SLOW_MS_PER_10S = 50.0


def format_throughput(formats_root: Path, tmp: Path, replicas: int, target_fs: int = 500) -> list[tuple]:
    """(format, files, records, records/s, ms/record, ms per 10 s of ECG, decoder) per format with a sample.

    Records differ in length (MIT-BIH 100 is 30 min, a resting ECG 10 s), so the cost is also given per
    10 s of signal: that is what compares the decoders."""
    from pydicom.data import get_testdata_file

    from crema.data.signals import NormaliseOptions, to_canonical

    rows = []
    for fmt, (folder, keys, decoder) in FORMAT_SAMPLES.items():
        sources = [Path(get_testdata_file("waveform_ecg.dcm"))] if folder is None else [
            f for f in sorted((formats_root / folder).iterdir()) if f.is_file()]
        if not sources:
            continue
        corpus = tmp / f"fmt-{fmt}"
        for k in range(replicas):
            (corpus / f"copy{k}").mkdir(parents=True)
            for f in sources:
                (corpus / f"copy{k}" / f.name).symlink_to(f)
        reader = reader_for(SourceConfig(name="bench", format=fmt, path=str(corpus), follow_symlinks=True, **keys))
        ids = reader.discover()
        opts = NormaliseOptions(target_fs=target_fs, min_leads=1)  # every file counts, whatever its leads
        to_canonical(reader.read(ids[0]), opts)  # imports and first-call costs out of the timing
        started, signal_s = time.perf_counter(), 0.0
        for record_id in ids:
            raw = reader.read(record_id)
            to_canonical(raw, opts)
            signal_s += raw.signal.shape[1] / raw.fs
        seconds = time.perf_counter() - started
        rows.append((fmt, len(ids) // replicas, len(ids), len(ids) / seconds, 1000 * seconds / len(ids),
                     1000 * seconds / signal_s * 10, decoder))
    return rows


def print_format_table(rows: list[tuple]) -> None:
    print("\nper-format read + to_canonical, one process (shared sample files replicated)")
    print(f"  {'format':<12} {'files':>5} {'records':>7} {'records/s':>10} {'ms/record':>10} {'ms/10 s ECG':>12}  decoder")
    for fmt, files, n, rate, ms, ms_10s, decoder in rows:
        note = f"  <- slow: > {SLOW_MS_PER_10S:.0f} ms per 10 s of ECG" if ms_10s > SLOW_MS_PER_10S else ""
        print(f"  {fmt:<12} {files:>5} {n:>7} {rate:>10,.0f} {ms:>10.1f} {ms_10s:>12.1f}  {decoder}{note}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_data = os.environ.get("CREMA_SHARED_DATA", str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    parser.add_argument("--data", default=default_data)
    parser.add_argument("--replicas", type=int, default=5)
    parser.add_argument("--format-replicas", type=int, default=20, help="copies of each format's sample files")
    parser.add_argument("--formats-only", action="store_true", help="only the per-format table (no Ray)")
    args = parser.parse_args()
    formats_root = Path(args.data) / "formats"
    if args.formats_only:
        if not formats_root.exists():
            raise SystemExit(f"no format samples at {formats_root} (set CREMA_SHARED_DATA)")
        with tempfile.TemporaryDirectory() as tmp:
            print_format_table(format_throughput(formats_root, Path(tmp), args.format_replicas))
        return
    records100 = Path(args.data) / "ptbxl" / "records100"
    if not records100.exists():
        raise SystemExit(f"no PTB-XL records at {records100} (set CREMA_SHARED_DATA)")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        one = replicate(records100, tmp / "corpus1x", 1)
        many = replicate(records100, tmp / f"corpus{args.replicas}x", args.replicas)
        n_many = sum(1 for _ in many.rglob("*.hea"))

        base = baseline(many, tmp / "baseline.parquet")
        floor_rate = floor(one)
        cold1, warm1, mem_many_1cpu = pipeline(many, tmp / "p1", num_cpus=1)
        cold2, warm2, mem_many = pipeline(many, tmp / "p2", num_cpus=2)
        _, _, mem_one = pipeline(one, tmp / "p3", num_cpus=2)
        io = signal_column_io(tmp / "p3" / "warm", tmp / "io")
        format_rows = format_throughput(formats_root, tmp, args.format_replicas) if formats_root.exists() else []

    rows = [
        ("baseline loop (1 core), records/s", f"{base:,.0f}"),
        ("floor: read + resample + cast only (1 core), records/s",
         f"{floor_rate:,.0f}  ({floor_rate / base:.1f}x the baseline: no ingest can beat this per core)"),
        ("crema ingest, 1 CPU, end to end (Ray start included), records/s", f"{cold1:,.0f}"),
        ("crema ingest, 2 CPUs, end to end (Ray start included), records/s", f"{cold2:,.0f}"),
        ("crema ingest, 1 CPU, warm, records/s", f"{warm1:,.0f}"),
        ("crema ingest, 2 CPUs, warm, records/s", f"{warm2:,.0f}"),
        ("speed-up per core, end to end (1 CPU vs baseline)",
         f"{cold1 / base:.1f}x  (target >= {TARGETS['speedup_per_core']:.0f}x)"),
        ("speed-up per core, warm", f"{warm1 / base:.1f}x"),
        ("scaling 1 -> 2 CPUs, end to end", f"{cold2 / cold1:.2f}x  (target >= {TARGETS['scaling_1_to_2']}x)"),
        ("scaling 1 -> 2 CPUs, warm", f"{warm2 / warm1:.2f}x"),
        ("peak memory, 1x corpus, 2 CPUs", f"{mem_one / 2**20:,.0f} MiB"),
        (f"peak memory, {args.replicas}x corpus, 2 CPUs", f"{mem_many / 2**20:,.0f} MiB"),
        (f"memory growth 1x -> {args.replicas}x", f"{mem_many / mem_one:.2f}x  (flat: <= {TARGETS['memory_growth']}x)"),
        ("signal column write, Iceberg fixed[L] / plain Parquet",
         f"{io['iceberg write'] / io['parquet write']:.2f}x  ({io['iceberg write']:,.0f} vs {io['parquet write']:,.0f} MB/s)"),
        ("signal column read, Iceberg fixed[L] / plain Parquet",
         f"{io['iceberg read'] / io['parquet read']:.2f}x  ({io['iceberg read']:,.0f} vs {io['parquet read']:,.0f} MB/s)"),
    ]
    print(f"\ningest benchmark: {n_many} PTB-XL records100 (100 Hz, 10 s) -> {TARGET_FS} Hz windows, "
          f"{os.cpu_count()} cores on this machine")
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
    if format_rows:
        print_format_table(format_rows)


if __name__ == "__main__":
    main()
