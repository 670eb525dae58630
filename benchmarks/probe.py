"""Downstream throughput: the Ray Data embedding pass and the Ray Tune probe sweep, against plain loops.

    python -m benchmarks.probe [--data ../shared/data] [--folder records500] [--size tiny] [--epochs 20]

(a) Embedding windows/s: a torch DataLoader loop over the same windows with the same encoder (Parquet
    read into memory, decoded per window, batched by the DataLoader), against the probe stage's pass
    (Ray Data read, actor pool, Parquet write) on a local Ray instance with every CPU. Outputs compared.
(b) Probe sweep wall time: ``crema.stages.probe.run`` (Tune trials in parallel, ASHA, nested MLflow runs in
    SQLite; embeddings already cached) against the same hyperparameters trained one after another to
    the full epoch count in this process, with no Tune and no MLflow.
Data: PTB-XL from the shared folder, ingested into a temporary directory first (not timed).
"""

from __future__ import annotations

import argparse
import itertools
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import ray
import torch
from torch.utils.data import DataLoader, Dataset

from crema.config import IngestConfig, ModelConfig, SourceConfig, load_yaml
from crema.data.catalog import read_windows
from crema.data.schema import decode_masks, decode_signals
from crema.evaluation.embeddings import embedding_matrix
from crema.model.network import SiTEncoder
from crema.stages.ingest import ingest
from crema.train.artifacts import encoder_to_bytes, save_encoder
from crema.evaluation.probe import predict_probe, train_probe
from crema.evaluation.tasks import SIGNAL_COLUMNS, LabelledWindows, load_task, split_roles, with_absolute_paths

REPO = Path(__file__).resolve().parents[1]
TASK_FILE = REPO / "configs/tasks/ptbxl_superdiagnostic.yaml"
LRS = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2]
WEIGHT_DECAYS = [0.0, 1e-4]


class WindowRows(Dataset):
    """One window per item, decoded from the in-memory table: what a user's plain PyTorch loader does."""

    def __init__(self, table):
        self.signals = decode_signals(table)
        self.masks = decode_masks(table.column("lead_mask"))

    def __len__(self) -> int:
        return len(self.signals)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(self.signals[i].astype(np.float32)), torch.from_numpy(self.masks[i])


def dataloader_embeddings(dataset: Path, encoder: SiTEncoder, batch_size: int) -> tuple[np.ndarray, float]:
    started = time.perf_counter()
    table = read_windows(str(dataset), columns=[*SIGNAL_COLUMNS, "source", "record_id", "window_index"])
    out = []
    with torch.no_grad():
        for x, lead_mask in DataLoader(WindowRows(table), batch_size=batch_size):
            out.append(encoder.embed(x, lead_mask).numpy())
    seconds = time.perf_counter() - started
    keys = [f"{s}/{r}#{w}" for s, r, w in zip(*(table[c].to_pylist() for c in ("source", "record_id", "window_index")))]
    order = np.argsort(keys)
    return np.concatenate(out)[order], seconds


def ray_embeddings(task, blob: bytes) -> tuple[np.ndarray, float]:
    """The probe stage's own embedding pass (it caches the result, which the timed sweep then reuses)."""
    from crema.tracking import dataset_tags
    from crema.stages.probe import task_embeddings

    started = time.perf_counter()
    table = task_embeddings(task, task.encoders[0], blob, ["ptbxl"], dataset_tags(task.dataset))
    seconds = time.perf_counter() - started
    keys = [f"{s}/{r}#{w}" for s, r, w in zip(*(table[c].to_pylist() for c in ("source", "record_id", "window_index")))]
    return embedding_matrix(table)[np.argsort(keys)], seconds


def sequential_probe(dataset: Path, embeddings: Path, epochs: int, batch_size: int) -> float:
    """The sweep's trials one after another, every epoch evaluated on validation as a trial does."""
    task = load_task(TASK_FILE, {"dataset": str(dataset), "output": "unused",
                                 "encoders": [{"name": "r", "init": "random", "model": {"size": "tiny"}}]})
    table = pads.dataset(embeddings, format="parquet").to_table()
    started = time.perf_counter()
    roles = split_roles(table, task)
    train = LabelledWindows.from_table(roles["train"], task.classes)
    val = LabelledWindows.from_table(roles["val"], task.classes)
    z_train, z_val = embedding_matrix(roles["train"]), embedding_matrix(roles["val"])
    for lr, weight_decay in itertools.product(LRS, WEIGHT_DECAYS):
        for step in train_probe(z_train, train.y, lr=lr, weight_decay=weight_decay, epochs=epochs,
                                batch_size=batch_size):
            val.macro_auroc(predict_probe(step.model, z_val))
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path,
                        default=Path(os.environ.get("CREMA_SHARED_DATA", REPO.parent / "shared" / "data")))
    parser.add_argument("--folder", default="records500", help="records500 (500 records) or records100 (1999)")
    parser.add_argument("--size", default="tiny", choices=["tiny", "small", "base"])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=20)
    args = parser.parse_args()
    ptbxl = args.data / "ptbxl"
    if not (ptbxl / "ptbxl_database.csv").exists():
        raise SystemExit(f"PTB-XL not found under {args.data} (set --data or CREMA_SHARED_DATA)")

    cpus = os.cpu_count() or 1
    torch.set_num_threads(cpus)
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ["PTBXL_ROOT"] = str(ptbxl)
        source = load_yaml(REPO / "configs/sources/ptbxl.yaml", SourceConfig).model_copy(
            update={"path": str(ptbxl / args.folder)})
        if args.folder == "records100":
            source = source.model_copy(update={"labels": source.labels.model_copy(
                update={"record_column": "filename_lr"})})
        dataset = tmp / "dataset"
        ingest([source], str(dataset), IngestConfig(), pseudonym=b"benchmark")
        n_windows = read_windows(str(dataset), columns=["record_id"]).num_rows

        torch.manual_seed(0)
        encoder = SiTEncoder(ModelConfig(size=args.size)).eval()
        save_encoder(encoder, tmp / "encoder.pt")
        overrides = {"dataset": str(dataset), "output": str(tmp / "downstream"), "n_boot": 200,
                     "tracking.tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}",
                     "encoders": [{"name": "crema", "path": str(tmp / "encoder.pt")}],
                     "embed.batch_size": args.batch_size,
                     "probe.epochs": args.epochs, "probe.grace_period": 2, "probe.num_samples": 1,
                     "probe.lr": LRS, "probe.weight_decay": WEIGHT_DECAYS, "probe.batch_size": 512}
        task = with_absolute_paths(load_task(TASK_FILE, overrides))

        loop, loop_s = dataloader_embeddings(dataset, encoder, args.batch_size)
        ray_out, ray_s = ray_embeddings(task, encoder_to_bytes(encoder))
        assert np.allclose(loop, ray_out, rtol=1e-3, atol=1e-4), "the two embedding paths disagree"
        print(f"\nembedding {n_windows} windows, {args.size} encoder, {cpus} CPUs")
        print(f"  torch DataLoader loop : {n_windows / loop_s:8.1f} windows/s ({loop_s:.1f} s)")
        print(f"  Ray Data actor pool   : {n_windows / ray_s:8.1f} windows/s ({ray_s:.1f} s)")
        print(f"  ratio Ray / loop      : {loop_s / ray_s:8.2f}x")

        from crema.stages import probe

        started = time.perf_counter()
        (result,) = probe.run(TASK_FILE, overrides)
        sweep_s = time.perf_counter() - started
        embeddings = next((tmp / "downstream/ptbxl_superdiagnostic/embeddings").glob("crema-*"))
        sequential_s = sequential_probe(dataset, embeddings, args.epochs, 512)
        trials = len(LRS) * len(WEIGHT_DECAYS)
        print(f"\nprobe sweep, {trials} trials x up to {args.epochs} epochs, {cpus} CPUs")
        print(f"  sequential, no Tune/MLflow, every trial to the end : {sequential_s:6.1f} s")
        print(f"  Ray Tune + ASHA + MLflow (incl. test evaluation)   : {sweep_s:6.1f} s "
              f"(best {result.best_config}, val AUROC {result.val_macro_auroc:.3f})")
        print(f"  ratio sequential / sweep                           : {sequential_s / sweep_s:6.2f}x")
    ray.shutdown()


if __name__ == "__main__":
    main()
