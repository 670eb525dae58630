"""A downstream task's encoders: a pretrained artifact (local or remote), or a seeded random init.

Encoders travel to Ray actors and Tune trials as bytes, in the format :func:`crema.train.artifacts.save_encoder`
writes.
"""

from __future__ import annotations

import fsspec
import torch

from crema.config import EncoderSpec, ModelConfig, TaskConfig
from crema.model.network import SiTEncoder
from crema.train import artifacts


def _open(path: str, storage_options: dict):
    """A binary file handle on a local path or a remote URI."""
    return fsspec.open(path, "rb", **storage_options)


def encoder_exists(path: str, storage_options: dict) -> bool:
    """Whether an encoder artifact is there (local path or URI)."""
    fs, inner = fsspec.core.url_to_fs(path, **storage_options)
    return fs.exists(inner)


def artifact_config(path: str, storage_options: dict) -> ModelConfig:
    """The ModelConfig stored in an encoder artifact."""
    with _open(path, storage_options) as f:
        return artifacts.read_encoder_config(f)


def build_task_encoder(spec: EncoderSpec, task: TaskConfig) -> SiTEncoder:
    """The spec's encoder in eval mode: its artifact's weights, or a seeded random init (a baseline)."""
    if spec.init == "pretrained":
        with _open(spec.path, task.storage_options) as f:
            return artifacts.encoder_from_bytes(f.read(), what=spec.path)
    if spec.like is not None:
        like = next(e for e in task.encoders if e.name == spec.like)
        cfg = artifact_config(like.path, task.storage_options)
    else:
        cfg = spec.model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        return SiTEncoder(cfg).eval()
