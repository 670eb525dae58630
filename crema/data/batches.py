"""Window rows → tensors: the one decoding of a windows table (or Ray batch) into what the model takes.

A batch of the windows dataset (:mod:`crema.data.schema`) becomes ``x`` (B, 12, L) float32,
``lead_mask`` (B, 12) bool and, for pretraining, ``record_group`` (B,) int64. Windows cut from the same
recording share a ``record_group``, which the contrastive loss treats as positives with ``positives: record``.

The ``signal`` column is fixed-size binary; viewing its buffer is zero-copy, so a
batch decodes with one vectorised conditioning pass and no per-row Python work besides hashing record ids.
Every consumer goes through :func:`decode_window_batch`: pretraining (in-memory via
:func:`iter_table_batches`, or Ray's prefetch threads via ``crema.stages.pretrain.WindowCollate``),
fine-tuning and embedding.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from crema.config import InputConditioning
from crema.data.conditioning import condition
from crema.data.schema import decode_masks, decode_signals

# What the model needs from a window row; `source` is a partition column (a folder name).
MODEL_COLUMNS = ["signal", "lead_mask", "fs", "source", "record_id"]


def group_ids(keys: Iterable[str]) -> torch.Tensor:
    """Stable int64 ids for string keys (e.g. record ids), equal on every process and every run.

    Python's hash() is salted per process, so ranks would disagree; a 64-bit digest makes a
    collision inside one global batch practically impossible.
    """
    ids = [int.from_bytes(hashlib.blake2b(k.encode(), digest_size=8).digest(), "little", signed=True)
           for k in keys]
    return torch.tensor(ids, dtype=torch.int64)


def decode_window_batch(batch: pa.Table, conditioning: InputConditioning, *,
                        record_group: bool = True) -> dict[str, torch.Tensor]:
    """Arrow rows → {"x", "lead_mask"[, "record_group"]} CPU tensors (record_group needs source, record_id).

    ``x`` is conditioned per the model's `conditioning` (:mod:`crema.data.conditioning`), at the rows' ``fs``.
    """
    lead_mask = decode_masks(batch.column("lead_mask"))
    fs = pc.unique(batch.column("fs")).to_pylist()
    if len(fs) > 1:
        raise ValueError(f"a batch mixes sampling rates {fs}: a dataset holds one rate (ingest target_fs)")
    x = condition(decode_signals(batch), lead_mask, fs[0], conditioning)
    out = {"x": torch.from_numpy(x), "lead_mask": torch.from_numpy(lead_mask)}
    if record_group:
        keys = [f"{s}/{r}" for s, r in zip(batch.column("source").to_pylist(), batch.column("record_id").to_pylist())]
        out["record_group"] = group_ids(keys)
    return out


def iter_table_batches(table: pa.Table, batch_size: int, conditioning: InputConditioning, *,
                       seed: int | None = None, drop_last: bool = True,
                       labels: np.ndarray | None = None,
                       record_group: bool = True) -> Iterator[dict[str, torch.Tensor]]:
    """Batches of an in-memory table, shuffled with `seed` (None keeps row order): the loop without Ray.

    `labels` (n, C), row-aligned with the table, adds each batch's rows as "y" float32 (fine-tuning).
    """
    order = np.arange(table.num_rows) if seed is None else np.random.default_rng(seed).permutation(table.num_rows)
    stop = len(order) - len(order) % batch_size if drop_last else len(order)
    for start in range(0, stop, batch_size):
        rows = order[start:start + batch_size]
        rows_table = table.slice(start, batch_size) if seed is None else table.take(rows)
        batch = decode_window_batch(rows_table, conditioning, record_group=record_group)
        if labels is not None:
            batch["y"] = torch.from_numpy(np.asarray(labels[rows], dtype=np.float32))
        yield batch
