"""Pretraining throughput: what Ray Train costs, whether the loader keeps up, and (on a GPU) MFU.

    python -m benchmarks.pretrain [--dataset OUTPUT] [--data ../shared/data] [--replicas 4]

Without --dataset, the shared PTB-XL records500 are ingested first (10 s windows at 500 Hz), as
`--replicas` symlinked copies so that an epoch is long enough for per-epoch costs to amortise.

(a) Ray overhead: the `tiny` preset as a real Ray Train job (1 worker, 1 CPU, checkpoints and
    MLflow logging on) against a plain single-process loop (the same engine, model, data and batch
    size, one thread like the Ray worker, the split already in memory). Compared twice: the wall
    clock of a whole epoch (the job's second), and the median step (steady state, without the
    data pipeline's restart at each epoch).
    Both read against the machine's own ceiling: the model's analytic training FLOP/s as a share of a
    large fp32 matmul's FLOP/s on the same one thread, timed in the same run.
(b) Loader headroom: iterating the train split's Ray Data shard with batch decoding and no model,
    against what the model consumes in (a).
(c) With CUDA: the `base` preset's step time, samples/s, tokens/s and MFU in bf16, and how much of
    the wall clock the GPU spent waiting for the loader.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import pyarrow.compute as pc
import ray
import torch
from mlflow.tracking import MlflowClient

from benchmarks.ingest import replicate
from crema.config import IngestConfig, PretrainConfig, SourceConfig, load_yaml
from crema.data.batches import MODEL_COLUMNS, iter_table_batches
from crema.data.catalog import read_windows
from crema.model.network import CREMA
from crema.stages.ingest import ingest
from crema.train.engine_pretrain import train_one_epoch
from crema.train.flops import model_flops_per_sample
from crema.train.optim import param_groups, warmup_cosine
from crema.train.precision import autocast_dtype
from crema.data.signals import N_LEADS
from crema.stages.pretrain import WindowCollate, read_split, run

REPO = Path(__file__).resolve().parents[1]
TARGETS = {"ray_overhead": 0.05, "loader_headroom": 3.0}
# Dense bf16 tensor-core peaks (FLOP/s), by the name torch reports.
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def ingest_ptbxl(records500: Path, workdir: Path, replicas: int) -> Path:
    corpus = replicate(records500, workdir / "corpus", replicas)
    source = SourceConfig(name="ptbxl", format="wfdb", path=str(corpus), follow_symlinks=True)  # replicas
    # The copies are byte-identical on purpose: keep them all (distinct record ids).
    ingest([source], str(workdir / "dataset"), IngestConfig(drop_duplicates=False), pseudonym=b"benchmark")
    return workdir / "dataset"


def preset(preset_name: str, dataset: Path, workdir: Path, **changes) -> PretrainConfig:
    overrides = {"data.dataset": str(dataset), "storage_path": str(workdir / "runs"),
                 "tracking.tracking_uri": f"sqlite:///{workdir}/mlflow.db", **changes}
    return load_yaml(REPO / f"configs/pretrain/{preset_name}.yaml", PretrainConfig, overrides)


def plain_loop(cfg: PretrainConfig) -> tuple[float, float]:
    """(samples/s of one epoch, median samples/s of a step) of a single-process loop, split in memory."""
    torch.set_num_threads(1)
    torch.manual_seed(cfg.seed)
    train = read_windows(cfg.data.dataset, columns=MODEL_COLUMNS, filter=pc.field("split") == "train")
    steps = train.num_rows // cfg.data.batch_size
    model = CREMA(cfg.model)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr,
                                  betas=cfg.optim.betas)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(cfg.optim.warmup_steps, steps))
    step_rates = []
    started = time.perf_counter()
    train_one_epoch(model, iter_table_batches(train, cfg.data.batch_size, cfg.model.input, seed=cfg.seed), optimizer, scheduler,
                    num_steps=steps, start_step=0, device=torch.device("cpu"), clip_grad=cfg.optim.clip_grad,
                    on_step=lambda stats: step_rates.append(stats.samples_per_s))
    return steps * cfg.data.batch_size / (time.perf_counter() - started), statistics.median(step_rates)


def cpu_matmul_peak(threads: int, n: int = 1024, repeats: int = 20) -> float:
    """FLOP/s of a square fp32 matmul on `threads` threads: what this CPU's BLAS reaches at best."""
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - started)


def ray_job(cfg: PretrainConfig) -> tuple[float, float]:
    """(samples/s of the job's last epoch, median samples/s of a step in it), as the job logged them."""
    result = run(cfg)
    history = MlflowClient(cfg.tracking.tracking_uri).get_metric_history(result.mlflow_run_id, "samples_per_s")
    last_epoch = result.metrics["step"] // cfg.epochs * (cfg.epochs - 1)
    return result.metrics["epoch_samples_per_s"], statistics.median(m.value for m in history if m.step > last_epoch)


def loader_only(cfg: PretrainConfig, epochs: int = 3) -> float:
    """Samples/s of a worker's view of the train split (a streaming split shard), decoded, no model."""
    shard = read_split(cfg, "train").streaming_split(1, equal=True)[0]
    rows, seconds = 0, 0.0
    for epoch in range(epochs):
        started = time.perf_counter()
        n = sum(len(b["x"]) for b in shard.iter_torch_batches(
            batch_size=cfg.data.batch_size, drop_last=True, collate_fn=WindowCollate(cfg.model.input),
            local_shuffle_buffer_size=cfg.data.shuffle_buffer or None, prefetch_batches=cfg.data.prefetch_batches))
        if epoch > 0:  # the first pass pays for starting the read tasks
            rows += n
            seconds += time.perf_counter() - started
    return rows / seconds


class TimedBatches:
    """Batches, with the time the consumer spent blocked waiting for each one."""

    def __init__(self, batches: Iterable):
        self.batches = batches
        self.waited_s = 0.0

    def __iter__(self) -> Iterator:
        iterator = iter(self.batches)
        while True:
            started = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                return
            self.waited_s += time.perf_counter() - started
            yield batch


def accelerator_run(cfg: PretrainConfig, device: torch.device, steps: int = 40, warmup: int = 5) -> dict:
    """Step time, throughput and MFU of `cfg` on `device`, fed by Ray Data as in training."""
    model = CREMA(cfg.model).to(device)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr,
                                  betas=cfg.optim.betas)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(cfg.optim.warmup_steps, steps))
    dataset = read_split(cfg, "train")

    def endless() -> Iterator:
        while True:
            yield from dataset.iter_torch_batches(
                batch_size=cfg.data.batch_size, drop_last=True, collate_fn=WindowCollate(cfg.model.input),
                local_shuffle_buffer_size=cfg.data.shuffle_buffer or None,
                prefetch_batches=cfg.data.prefetch_batches, pin_memory=device.type == "cuda")

    batches = iter(endless())
    amp = autocast_dtype(cfg.precision, device)
    step = train_one_epoch(model, batches, optimizer, scheduler, num_steps=warmup, start_step=0, device=device,
                           amp_dtype=amp, clip_grad=cfg.optim.clip_grad)
    timed = TimedBatches(batches)
    started = time.perf_counter()
    train_one_epoch(model, timed, optimizer, scheduler, num_steps=steps, start_step=step, device=device,
                    amp_dtype=amp, clip_grad=cfg.optim.clip_grad)  # each step ends in a host sync (.tolist())
    seconds = time.perf_counter() - started
    samples_per_s = steps * cfg.data.batch_size / seconds
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = next((flops for key, flops in PEAK_BF16.items() if key in name), None)
    flops = samples_per_s * model_flops_per_sample(cfg.model)
    return {
        "device": name,
        "step_s": seconds / steps,
        "samples_per_s": samples_per_s,
        "tokens_per_s": samples_per_s * N_LEADS * cfg.model.num_patches,
        "model_tflops": flops / 1e12,
        "mfu": flops / peak if peak else None,
        "data_wait_fraction": timed.waited_s / seconds,
    }


def print_table(title: str, rows: list[tuple[str, str]]) -> None:
    print(f"\n{title}")
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", help="an ingest OUTPUT with 10 s windows at 500 Hz (default: ingest PTB-XL)")
    parser.add_argument("--data", default=os.environ.get("CREMA_SHARED_DATA", str(REPO.parent / "shared" / "data")))
    parser.add_argument("--replicas", type=int, default=4, help="copies of records500 to ingest")
    args = parser.parse_args()

    ray.init(num_cpus=min(os.cpu_count() or 2, 4), include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        if args.dataset:
            dataset = Path(args.dataset)
        else:
            records = Path(args.data) / "ptbxl" / "records500"
            if not records.exists():
                raise SystemExit(f"no PTB-XL records at {records} (set CREMA_SHARED_DATA, or pass --dataset)")
            dataset = ingest_ptbxl(records, workdir, args.replicas)

        # The job's first epoch pays for starting Ray Data and the worker; its second is timed.
        tiny = preset("tiny", dataset, workdir, name="benchmark-tiny", epochs=2,
                      **{"scaling.num_workers": 1, "scaling.cpus_per_worker": 1})
        plain_epoch, plain_step = plain_loop(tiny)
        ray_epoch, ray_step = ray_job(tiny)
        loader = loader_only(tiny)
        peak = cpu_matmul_peak(threads=1)
        flops_per_sample = model_flops_per_sample(tiny.model)
        train_rows = read_windows(str(dataset), columns=["record_id"], filter=pc.field("split") == "train").num_rows
        target = f"(target <= {TARGETS['ray_overhead']:.0%})"
        print_table(f"pretraining benchmark: tiny CREMA, batch {tiny.data.batch_size}, "
                    f"{train_rows // tiny.data.batch_size} steps/epoch, {os.cpu_count()} cores on this machine", [
                        ("plain PyTorch loop, samples/s: epoch | median step",
                         f"{plain_epoch:,.1f} | {plain_step:,.1f}"),
                        ("Ray Train job (1 worker), samples/s: epoch | median step",
                         f"{ray_epoch:,.1f} | {ray_step:,.1f}"),
                        ("Ray overhead, whole epoch", f"{1 - ray_epoch / plain_epoch:+.1%}  {target}"),
                        ("Ray overhead, steady-state step", f"{1 - ray_step / plain_step:+.1%}  {target}"),
                        ("model GFLOP/s (training, analytic): plain | Ray job",
                         f"{plain_step * flops_per_sample / 1e9:,.2f} | {ray_step * flops_per_sample / 1e9:,.2f}"),
                        (f"share of the 1-thread fp32 matmul peak ({peak / 1e9:,.1f} GFLOP/s)",
                         f"{plain_step * flops_per_sample / peak:.1%} | {ray_step * flops_per_sample / peak:.1%}"),
                        ("Ray Data loader alone, samples/s", f"{loader:,.1f}"),
                        ("loader headroom over the model", f"{loader / ray_epoch:.1f}x  "
                                                           f"(target >= {TARGETS['loader_headroom']:.0f}x)"),
                    ])

        if torch.cuda.is_available():
            base = preset("base", dataset, workdir, name="benchmark-base")
            stats = accelerator_run(base, torch.device("cuda"))
            mfu = f"{stats['mfu']:.1%}" if stats["mfu"] is not None else "n/a (unknown peak for this GPU)"
            print_table(f"base CREMA, bf16, batch {base.data.batch_size}, on {stats['device']}", [
                ("step time", f"{stats['step_s'] * 1e3:,.1f} ms"),
                ("samples/s", f"{stats['samples_per_s']:,.0f}"),
                ("tokens/s (12 leads x patches)", f"{stats['tokens_per_s']:,.0f}"),
                ("model TFLOP/s", f"{stats['model_tflops']:,.1f}"),
                ("MFU (dense bf16 peak)", mfu),
                ("time blocked on the loader", f"{stats['data_wait_fraction']:.1%} of the wall clock"),
            ])
        else:
            print("\nno CUDA device: the base-preset GPU figures (MFU, data wait) were skipped")
    ray.shutdown()


if __name__ == "__main__":
    main()
