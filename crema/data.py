"""Torch-side decoding of window batches: Arrow rows → the tensors the model takes.

A batch of the windows dataset (:mod:`crema.dataset`) becomes ``x`` (B, 12, L) float32,
``lead_mask`` (B, 12) bool and ``record_group`` (B,) int64. Windows cut from the same recording
share a ``record_group``, which the contrastive loss treats as positives with ``positives: record``.

The ``signal`` column is fixed-size binary; viewing its buffer is zero-copy, so a
batch decodes with one float16→float32 cast and no per-row Python work besides hashing record ids.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import torch
from ray.data.collate_fn import ArrowBatchCollateFn

from crema.dataset import decode_masks, decode_signals
from crema.losses import group_ids

# What the model needs from a window row; `source` is a partition column (a folder name).
MODEL_COLUMNS = ["signal", "lead_mask", "source", "record_id"]


def decode_window_batch(batch: pa.Table) -> dict[str, torch.Tensor]:
    """Arrow rows with MODEL_COLUMNS → {"x", "lead_mask", "record_group"} CPU tensors."""
    signals = decode_signals(batch)
    x = torch.from_numpy(signals.astype(np.float32))  # a copy: Arrow buffers are read-only
    lead_mask = torch.from_numpy(decode_masks(batch.column("lead_mask")))
    keys = [f"{s}/{r}" for s, r in zip(batch.column("source").to_pylist(), batch.column("record_id").to_pylist())]
    return {"x": x, "lead_mask": lead_mask, "record_group": group_ids(keys)}


class WindowCollate(ArrowBatchCollateFn):
    """For ``iter_torch_batches(collate_fn=WindowCollate())``: Ray runs it in its prefetch threads."""

    def __call__(self, batch: pa.Table) -> dict[str, torch.Tensor]:
        return decode_window_batch(batch)


def iter_table_batches(table: pa.Table, batch_size: int, *, seed: int | None = None,
                       drop_last: bool = True) -> Iterator[dict[str, torch.Tensor]]:
    """Batches of an in-memory table, shuffled with `seed` (None keeps row order): the loop without Ray."""
    order = np.arange(table.num_rows) if seed is None else np.random.default_rng(seed).permutation(table.num_rows)
    stop = len(order) - len(order) % batch_size if drop_last else len(order)
    for start in range(0, stop, batch_size):
        yield decode_window_batch(table.take(order[start:start + batch_size]))
