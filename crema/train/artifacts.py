"""The encoder artifact: the SiT encoder alone, as a safetensors file with its config as JSON metadata; and the
fine-tuned classifier artifact (encoder + head) the same way, with its class names in the metadata.

Loadable anywhere without pickle (:mod:`crema.train.safe_files`); a file that is not one (a pickled
``torch.save`` file from older versions, or a crafted one) is refused with
:class:`~crema.train.safe_files.UnsafeArtifactError`, never unpickled.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import torch
from torch import nn

from crema.config import ModelConfig
from crema.model.network import CREMA, Classifier, SiTEncoder, unwrap
from crema.train import safe_files
from crema.train.safe_files import UnsafeArtifactError

ENCODER_FILE = "encoder.safetensors"  # the name the stages give the artifact
FORMAT = "crema-encoder/1"
CLASSIFIER_FILE = "classifier.safetensors"
CLASSIFIER_FORMAT = "crema-classifier/1"

__all__ = ["CLASSIFIER_FILE", "ENCODER_FILE", "UnsafeArtifactError", "classifier_to_bytes", "encoder_to_bytes",
           "encoder_from_bytes", "load_classifier", "load_encoder", "read_encoder_config", "save_classifier",
           "save_encoder"]


def encoder_to_bytes(model: nn.Module) -> bytes:
    """The encoder alone (of a CREMA model or a SiTEncoder) as safetensors bytes, its config in the metadata."""
    model = unwrap(model)
    encoder = model.encoder if isinstance(model, CREMA) else model
    if not isinstance(encoder, SiTEncoder):
        raise TypeError(f"expected a CREMA model or a SiTEncoder; got {type(model).__name__}")
    return safe_files.write(encoder.state_dict(),
                            {"format": FORMAT, "config": json.dumps(encoder.cfg.model_dump(mode="json"))})


def _parse(data: bytes, what: str, fmt: str = FORMAT) -> tuple[ModelConfig, dict[str, torch.Tensor], dict[str, str]]:
    tensors, metadata = safe_files.read(data, what)
    if metadata.get("format") != fmt or "config" not in metadata:
        kind = "encoder" if fmt == FORMAT else "classifier"
        raise UnsafeArtifactError(f"{what} is a safetensors file but not a crema {kind} "
                                  f"(format {metadata.get('format')!r})")
    return ModelConfig.model_validate(json.loads(metadata["config"])), tensors, metadata


def encoder_from_bytes(data: bytes, map_location: str | torch.device = "cpu",
                       what: str = "encoder artifact") -> SiTEncoder:
    """The encoder of :func:`encoder_to_bytes`, in eval mode (embeddings are deterministic)."""
    cfg, tensors, _ = _parse(data, what)
    encoder = SiTEncoder(cfg)
    encoder.load_state_dict(tensors)
    return encoder.to(map_location).eval()


def _read_bytes(path: str | Path | BinaryIO) -> tuple[bytes, str]:
    if hasattr(path, "read"):
        return path.read(), str(getattr(path, "name", None) or getattr(path, "path", None) or "encoder artifact")
    with open(path, "rb") as f:
        return f.read(), str(path)


def save_encoder(model: nn.Module, path: str | Path | BinaryIO) -> None:
    """Write the encoder alone (safetensors + config metadata) to a local path or a binary file handle."""
    data = encoder_to_bytes(model)
    if hasattr(path, "write"):
        path.write(data)
        return
    with open(path, "wb") as f:
        f.write(data)


def load_encoder(path: str | Path | BinaryIO, map_location: str | torch.device = "cpu") -> SiTEncoder:
    """The encoder `save_encoder` wrote, in eval mode (embeddings are deterministic); .train() to fine-tune."""
    data, what = _read_bytes(path)
    return encoder_from_bytes(data, map_location, what)


def read_encoder_config(path: str | Path | BinaryIO) -> ModelConfig:
    """The ModelConfig stored in an encoder artifact."""
    data, what = _read_bytes(path)
    return _parse(data, what)[0]


# ------------------------------------------------------------------------------ the classifier

def classifier_to_bytes(model: nn.Module, classes: Sequence[str] | None = None) -> bytes:
    """A fine-tuned :class:`~crema.model.network.Classifier` (encoder + head) as safetensors bytes: its
    encoder's config and the class names (default class_0, class_1, ...) in the metadata."""
    model = unwrap(model)
    if not isinstance(model, Classifier):
        raise TypeError(f"expected a Classifier; got {type(model).__name__}")
    n = model.head.out_features
    names = [str(c) for c in classes] if classes is not None else [f"class_{i}" for i in range(n)]
    if len(names) != n:
        raise ValueError(f"{len(names)} class names for a head of {n} outputs")
    return safe_files.write(model.state_dict(),
                            {"format": CLASSIFIER_FORMAT, "config": json.dumps(model.encoder.cfg.model_dump(mode="json")),
                             "classes": json.dumps(names)})


def save_classifier(model: nn.Module, path: str | Path | BinaryIO, classes: Sequence[str] | None = None) -> None:
    """Write the classifier (safetensors + config and class names as metadata) to a local path or a file handle."""
    data = classifier_to_bytes(model, classes)
    if hasattr(path, "write"):
        path.write(data)
        return
    with open(path, "wb") as f:
        f.write(data)


def load_classifier(path: str | Path | BinaryIO, map_location: str | torch.device = "cpu") -> tuple[Classifier, list[str]]:
    """(the Classifier `save_classifier` wrote, in eval mode; its class names), without unpickling anything."""
    data, what = _read_bytes(path)
    cfg, tensors, metadata = _parse(data, what, CLASSIFIER_FORMAT)
    classes = json.loads(metadata.get("classes", "[]"))
    model = Classifier(SiTEncoder(cfg), len(classes))
    model.load_state_dict(tensors)
    return model.to(map_location).eval(), classes
