"""The encoder artifact: the SiT encoder alone, as plain tensors and its config, loadable anywhere."""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

import torch
from torch import nn

from crema.config import ModelConfig
from crema.model.network import CREMA, SiTEncoder


def _unwrap(model: nn.Module) -> nn.Module:
    """The module under DDP (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while True:
        inner = next((getattr(model, attr) for attr in ("module", "_orig_mod")
                      if isinstance(getattr(model, attr, None), nn.Module)), None)
        if inner is None:
            return model
        model = inner


def save_encoder(model: nn.Module, path: str | Path | BinaryIO) -> None:
    """Write the encoder alone: {"config", "state_dict"} of plain types, loadable with weights_only=True."""
    model = _unwrap(model)
    encoder = model.encoder if isinstance(model, CREMA) else model
    if not isinstance(encoder, SiTEncoder):
        raise TypeError(f"expected a CREMA model or a SiTEncoder; got {type(model).__name__}")
    state = {name: t.detach().cpu() for name, t in encoder.state_dict().items()}
    torch.save({"config": encoder.cfg.model_dump(), "state_dict": state}, path)


def load_encoder(path: str | Path | BinaryIO, map_location: str | torch.device = "cpu") -> SiTEncoder:
    """The encoder `save_encoder` wrote, in eval mode (embeddings are deterministic); .train() to fine-tune."""
    blob = torch.load(path, map_location=map_location, weights_only=True)
    encoder = SiTEncoder(ModelConfig.model_validate(blob["config"]))
    encoder.load_state_dict(blob["state_dict"])
    return encoder.to(map_location).eval()
