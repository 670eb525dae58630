"""Ingest throughput and memory, against the loop a user would write, in one run.

    python -m benchmarks.ingest [--data ../shared/data] [--replicas 4]

(a) baseline: for each record `wfdb.rdrecord` + `scipy.signal.resample_poly`, then one pyarrow write;
(b) `crema.ingest.ingest` on a local Ray instance with 1 CPU, then 2 CPUs.
Both read the same records (the shared PTB-XL records500, replicated by symlink to reach N x the corpus).
Peak memory is the proportional set size (PSS) of this process and every Ray process it started,
sampled while the pipeline runs, at 1x and at N x the corpus: streaming means it stays flat.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import wfdb
from scipy.signal import resample_poly

from crema.config import IngestConfig, SourceConfig
from crema.ingest import ingest

TARGETS = {"speedup_per_core": 20.0, "scaling_1_to_2": 1.8, "memory_growth_4x": 1.25}


def replicate(records500: Path, dest: Path, replicas: int) -> Path:
    """N copies of the corpus as symlinks (distinct record ids, the same bytes)."""
    for k in range(replicas):
        folder = dest / f"copy{k}"
        folder.mkdir(parents=True)
        for f in sorted(records500.glob("*/*_hr.*")):
            (folder / f.name).symlink_to(f)
    return dest


def baseline(corpus: Path, out: Path, target_fs: int = 500) -> float:
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


def pipeline(corpus: Path, out: Path, num_cpus: int) -> tuple[float, int]:
    """Records/s of the Ray Data ingest (cluster start excluded) and its peak memory in bytes."""
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    try:
        source = SourceConfig(name="bench", format="wfdb", path=str(corpus))
        # Replicas are byte-identical on purpose: keep them all so that every record is processed.
        cfg = IngestConfig(drop_duplicates=False)
        ingest([source], str(out / "warmup"), cfg, pseudonym=b"bench")  # worker start-up, imports
        with PeakMemory() as memory:
            started = time.perf_counter()
            summary = ingest([source], str(out / "run"), cfg, pseudonym=b"bench")
            seconds = time.perf_counter() - started
        assert summary.sources[0].ok == summary.sources[0].discovered, summary
        return summary.discovered / seconds, memory.peak
    finally:
        ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_data = os.environ.get("CREMA_SHARED_DATA", str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    parser.add_argument("--data", default=default_data)
    parser.add_argument("--replicas", type=int, default=4)
    args = parser.parse_args()
    records500 = Path(args.data) / "ptbxl" / "records500"
    if not records500.exists():
        raise SystemExit(f"no PTB-XL records at {records500} (set CREMA_SHARED_DATA)")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        one = replicate(records500, tmp / "corpus1x", 1)
        many = replicate(records500, tmp / f"corpus{args.replicas}x", args.replicas)
        n_many = sum(1 for _ in many.rglob("*.hea"))

        base = baseline(many, tmp / "baseline.parquet")
        rate1, mem_many_1cpu = pipeline(many, tmp / "p1", num_cpus=1)
        rate2, mem_many = pipeline(many, tmp / "p2", num_cpus=2)
        _, mem_one = pipeline(one, tmp / "p3", num_cpus=2)

    rows = [
        ("baseline loop (1 core), records/s", f"{base:,.0f}"),
        ("crema ingest, 1 CPU, records/s", f"{rate1:,.0f}"),
        ("crema ingest, 2 CPUs, records/s", f"{rate2:,.0f}"),
        ("speed-up per core (1 CPU vs baseline)", f"{rate1 / base:.1f}x  (target >= {TARGETS['speedup_per_core']:.0f}x)"),
        ("scaling 1 -> 2 CPUs", f"{rate2 / rate1:.2f}x  (target >= {TARGETS['scaling_1_to_2']}x)"),
        ("peak memory, 1x corpus, 2 CPUs", f"{mem_one / 2**20:,.0f} MiB"),
        (f"peak memory, {args.replicas}x corpus, 2 CPUs", f"{mem_many / 2**20:,.0f} MiB"),
        (f"memory growth 1x -> {args.replicas}x", f"{mem_many / mem_one:.2f}x  (flat: <= {TARGETS['memory_growth_4x']}x)"),
    ]
    print(f"\ningest benchmark: {n_many} PTB-XL records (500 Hz, 10 s), {os.cpu_count()} cores on this machine")
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")


if __name__ == "__main__":
    main()
