"""Frozen-encoder embeddings of windows: one pass, written to Parquet, then probed by as many heads as wanted.

:func:`embed_windows` is the computation on an in-memory table. :class:`WindowEmbedder` wraps it for
``Dataset.map_batches`` (one encoder per actor, loaded once), and :func:`embed_dataset` runs that actor
pool over a windows dataset and writes one row per window: the window's identity, labels and split, and
``embedding`` as fixed_size_list<float32>[D].
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from crema.config import EmbedSettings
from crema.dataset import decode_masks, decode_signals
from crema.engine import autocast, autocast_dtype
from crema.model import SiTEncoder
from crema.tasks import META_COLUMNS, encoder_from_bytes

EMBEDDING_COLUMN = "embedding"


def embedding_schema(dim: int) -> pa.Schema:
    return pa.schema([
        pa.field("source", pa.string()),
        pa.field("record_id", pa.string()),
        pa.field("patient_key", pa.string()),
        pa.field("split", pa.string()),
        pa.field("window_index", pa.int32()),
        pa.field("labels", pa.list_(pa.string())),
        pa.field(EMBEDDING_COLUMN, pa.list_(pa.float32(), dim)),
    ])


@torch.no_grad()
def embed_windows(encoder: SiTEncoder, windows: pa.Table, *, batch_size: int = 64,
                  device: torch.device | None = None, precision: str = "auto") -> np.ndarray:
    """(n, D) float32 pooled embeddings of a table holding `signal` and `lead_mask`, in row order."""
    device = device or next(encoder.parameters()).device
    dtype = autocast_dtype(precision, device)
    encoder.eval()
    out = []
    for start in range(0, windows.num_rows, batch_size):
        batch = windows.slice(start, batch_size)
        x = torch.from_numpy(decode_signals(batch).astype(np.float32)).to(device)
        lead_mask = torch.from_numpy(decode_masks(batch.column("lead_mask"))).to(device)
        with autocast(device, dtype):
            out.append(encoder.embed(x, lead_mask).float().cpu().numpy())
    if not out:
        return np.zeros((0, encoder.embed_dim), dtype=np.float32)
    return np.concatenate(out)


def embedding_table(windows: pa.Table, embeddings: np.ndarray) -> pa.Table:
    """The windows' identity columns with their embeddings, in embedding_schema."""
    n, dim = embeddings.shape
    schema = embedding_schema(dim)
    columns = [windows.column(name).cast(schema.field(name).type) for name in META_COLUMNS]
    flat = pa.array(np.ascontiguousarray(embeddings, dtype=np.float32).ravel(), type=pa.float32())
    return pa.Table.from_arrays([*columns, pa.FixedSizeListArray.from_arrays(flat, dim)], schema=schema)


def embedding_matrix(table: pa.Table) -> np.ndarray:
    """The `embedding` column as an (n, D) float32 array."""
    column = table.column(EMBEDDING_COLUMN).combine_chunks()
    dim = column.type.list_size
    return column.flatten().to_numpy().reshape(len(column), dim)


class WindowEmbedder:
    """``map_batches(WindowEmbedder, fn_constructor_kwargs=..., batch_format="pyarrow")``: one encoder per actor."""

    def __init__(self, encoder_blob: bytes, batch_size: int = 64, precision: str = "auto",
                 num_threads: int | None = None):
        if num_threads:
            torch.set_num_threads(num_threads)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.encoder = encoder_from_bytes(encoder_blob, self.device)
        self.batch_size = batch_size
        self.precision = precision

    def __call__(self, batch: pa.Table) -> pa.Table:
        embeddings = embed_windows(self.encoder, batch, batch_size=self.batch_size, device=self.device,
                                   precision=self.precision)
        return embedding_table(batch, embeddings)


def actor_pool_size(settings: EmbedSettings, cluster: dict[str, float]) -> tuple[int, float]:
    """(actors, GPUs per actor): one actor per GPU; on CPUs, all but one CPU (left for reading)."""
    gpus = int(cluster.get("GPU", 0))
    if settings.num_actors is not None:
        return settings.num_actors, 1.0 if gpus else 0.0
    if gpus:
        return gpus, 1.0
    return max(1, int((cluster.get("CPU", 1) - 1) // settings.cpus_per_actor)), 0.0


def embed_dataset(windows, encoder_blob: bytes, output_path: str, filesystem=None, *,
                  settings: EmbedSettings) -> None:
    """Embed a Ray Dataset of windows (META_COLUMNS + signal, lead_mask) into Parquet files under output_path."""
    import ray

    actors, gpus_per_actor = actor_pool_size(settings, ray.cluster_resources())
    threads = max(1, int(settings.cpus_per_actor))
    embedded = windows.map_batches(
        WindowEmbedder,
        fn_constructor_kwargs={"encoder_blob": encoder_blob, "batch_size": settings.batch_size,
                               "precision": settings.precision, "num_threads": threads},
        batch_size=settings.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=settings.cpus_per_actor,
        num_gpus=gpus_per_actor or None,
        udf_modifying_row_count=False,
    )
    embedded.write_parquet(output_path, filesystem=filesystem)
