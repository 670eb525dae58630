"""The embedding pass on Ray: an actor pool (one encoder per actor, loaded once) over a windows dataset.

:class:`WindowEmbedder` wraps :func:`crema.evaluation.embeddings.embed_windows` for ``Dataset.map_batches``,
and :func:`embedded` runs that actor pool (or, for the feature floor, plain tasks): one row per window (:func:`crema.evaluation.embeddings.embedding_table`).
"""

from __future__ import annotations

import pyarrow as pa
import ray
import torch

from crema.config import EmbedSettings
from crema.evaluation.embeddings import embed_windows, embedding_table
from crema.train.artifacts import encoder_from_bytes
from crema.evaluation.features import window_features


class WindowEmbedder:
    """``map_batches(WindowEmbedder, fn_constructor_kwargs=..., batch_format="pyarrow")``: one encoder per actor."""

    def __init__(self, encoder_blob: bytes, batch_size: int = 64, precision: str = "auto",
                 num_threads: int | None = None):
        if num_threads:
            torch.set_num_threads(num_threads)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.encoder = encoder_from_bytes(encoder_blob, map_location=self.device)
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


def features_table(batch: pa.Table) -> pa.Table:
    """``map_batches(features_table, batch_format="pyarrow")``: the feature floor's "embeddings", no model."""
    return embedding_table(batch, window_features(batch))


def embedded(windows: ray.data.Dataset, encoder_blob: bytes | None, *, settings: EmbedSettings) -> ray.data.Dataset:
    """A Ray Dataset of windows (META_COLUMNS + signal, lead_mask, fs) embedded, lazily, in embedding_schema: by
    the encoder of `encoder_blob` on an actor pool, or (None) as the feature floor's hand-made features."""
    if encoder_blob is None:
        return windows.map_batches(features_table, batch_size=settings.batch_size, batch_format="pyarrow",
                                   udf_modifying_row_count=False)
    actors, gpus_per_actor = actor_pool_size(settings, ray.cluster_resources())
    threads = max(1, int(settings.cpus_per_actor))
    return windows.map_batches(
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


def embed_dataset(windows: ray.data.Dataset, encoder_blob: bytes | None, output_path: str, filesystem=None, *,
                  settings: EmbedSettings) -> None:
    """Embed a Ray Dataset of windows (see :func:`embedded`) into Parquet files under output_path."""
    embedded(windows, encoder_blob, settings=settings).write_parquet(output_path, filesystem=filesystem)
