"""Frozen-encoder embeddings of windows: one pass, written to Parquet, then probed by as many heads as wanted.

:func:`embed_windows` is the computation on an in-memory table; :func:`embedding_table` gives one row per
window: the window's identity, labels and split, and ``embedding`` as fixed_size_list<float32>[D]. The Ray
actor pool that runs it over a whole dataset is :mod:`crema.stages.embed`.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from crema.data.batches import iter_table_batches
from crema.evaluation.tasks import META_COLUMNS
from crema.model.network import SiTEncoder
from crema.train.precision import autocast, autocast_dtype

EMBEDDING_COLUMN = "embedding"


def embedding_schema(dim: int) -> pa.Schema:
    """The Parquet schema of embedded windows: META_COLUMNS and the (D,) embedding."""
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
    """(n, 2 x D) float32 representations (:meth:`SiTEncoder.embed`) of a table holding `signal`, `lead_mask`
    and `fs`, in row order, the windows conditioned as the encoder's pretraining conditioned them."""
    device = device or next(encoder.parameters()).device
    dtype = autocast_dtype(precision, device)
    encoder.eval()
    out = []
    for batch in iter_table_batches(windows, batch_size, encoder.cfg.input, drop_last=False, record_group=False):
        x, lead_mask = batch["x"].to(device), batch["lead_mask"].to(device)
        with autocast(device, dtype):
            out.append(encoder.embed(x, lead_mask).float().cpu().numpy())
    if not out:
        return np.zeros((0, encoder.representation_dim), dtype=np.float32)
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
