"""What the logged MLflow models run: raw mV windows in, embeddings or class probabilities out.

The pyfunc files of :mod:`crema.tracking` only load the safetensors artifact and call these, so that the
served model's behaviour is library code, tested like the rest. Inputs are conditioned (filters, scaling)
from the config stored in the artifact, as pretraining and fine-tuning did.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from crema.data.conditioning import condition
from crema.model.network import SiTEncoder

DEFAULT_FS = 500.0
DEFAULT_BATCH = 256


def model_inputs(model_input, params: Mapping | None, encoder: SiTEncoder) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, lead_mask) tensors from pyfunc input — a dict of arrays, or a DataFrame of one row per window —
    with x conditioned as the encoder's pretraining did, at the rate `params["fs"]`."""
    if hasattr(model_input, "columns"):
        model_input = {k: np.stack(model_input[k].to_numpy()) for k in ("x", "lead_mask")}
    x = np.asarray(model_input["x"], dtype=np.float32)
    mask = np.asarray(model_input["lead_mask"], dtype=bool)
    conditioning = getattr(encoder.cfg, "input", None)
    if conditioning is not None:
        x = condition(x, mask, float((params or {}).get("fs", DEFAULT_FS)), conditioning)
    return torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(mask)


def _in_batches(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor, mask: torch.Tensor,
                params: Mapping | None) -> list[torch.Tensor]:
    batch = int((params or {}).get("batch_size", DEFAULT_BATCH))
    with torch.no_grad():
        return [fn(x[i:i + batch], mask[i:i + batch]).float() for i in range(0, x.shape[0], batch)]


def embed(encoder: SiTEncoder, model_input, params: Mapping | None = None) -> np.ndarray:
    """(n, 2 x D) float32 representations: the SEP and patch means of :meth:`SiTEncoder.embed`."""
    x, mask = model_inputs(model_input, params, encoder)
    out = _in_batches(encoder.embed, x, mask, params)
    return torch.cat(out).numpy() if out else np.zeros((0, encoder.representation_dim), np.float32)


def classify(model: torch.nn.Module, classes: Sequence[str], model_input, params: Mapping | None = None) -> pd.DataFrame:
    """(n, C) class probabilities (sigmoid of the head's logits), one column per class."""
    x, mask = model_inputs(model_input, params, model.encoder)
    out = _in_batches(lambda xb, mb: torch.sigmoid(model(xb, mb).float()), x, mask, params)
    probabilities = torch.cat(out).numpy() if out else np.zeros((0, len(classes)), np.float32)
    return pd.DataFrame(probabilities, columns=list(classes))
