"""Fine-tuning the whole encoder with a multi-label head (MAE's engine_finetune, for ECG windows).

The recipe of MAE/BEiT fine-tuning: layer-wise learning-rate decay (the embeddings move least, the
last block most: :func:`crema.train.optim.param_groups_lrd`), stochastic depth in the encoder, AdamW under
linear warm-up and cosine decay, and a head initialised near zero so that it starts from chance
rather than from random logits. The loss is BCE with each class's positives weighted by its
negative/positive ratio in the training labels, so rare classes (HYP) weigh as much as common ones.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

from crema.model.network import Classifier, SiTEncoder
from crema.train.optim import param_groups_lrd
from crema.train.precision import autocast

def with_drop_path(encoder: SiTEncoder, rate: float) -> SiTEncoder:
    """The same weights in an encoder built with stochastic depth `rate` (drop-path is fixed at build time)."""
    rebuilt = SiTEncoder(encoder.cfg.model_copy(update={"drop_path": rate}))
    rebuilt.load_state_dict(encoder.state_dict())
    return rebuilt.to(next(encoder.parameters()).device)


def positive_weights(y_train: np.ndarray) -> torch.Tensor:
    """Per class: negatives / positives among the training labels (1 for a class without positives)."""
    y = np.asarray(y_train, dtype=np.float64)
    positives = y.sum(axis=0)
    negatives = len(y) - positives
    weights = np.where(positives > 0, negatives / np.maximum(positives, 1), 1.0)
    return torch.tensor(weights, dtype=torch.float32)


def multilabel_loss(y_train: np.ndarray) -> nn.BCEWithLogitsLoss:
    """BCE with each class's positives weighted by its negative/positive ratio (:func:`positive_weights`)."""
    return nn.BCEWithLogitsLoss(pos_weight=positive_weights(y_train))


def optimizer_groups(model: Classifier, weight_decay: float, layer_decay: float) -> list[dict]:
    """The encoder's layer-decayed groups, plus the head at the full rate (its bias not decayed)."""
    groups = param_groups_lrd(model.encoder, weight_decay, layer_decay)
    groups.append({"name": "head_decay", "params": [model.head.weight], "weight_decay": weight_decay,
                   "lr_scale": 1.0})
    groups.append({"name": "head_no_decay", "params": [model.head.bias], "weight_decay": 0.0, "lr_scale": 1.0})
    return groups


def build_optimizer(model: Classifier, *, lr: float, weight_decay: float, layer_decay: float,
                    betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.AdamW:
    """AdamW whose groups start at lr × lr_scale (a LambdaLR schedule then scales each group alike)."""
    groups = optimizer_groups(model, weight_decay, layer_decay)
    for group in groups:
        group["lr"] = lr * group["lr_scale"]
    return torch.optim.AdamW(groups, lr=lr, betas=betas)


def train_one_epoch(model: Classifier, batches: Iterable[dict[str, torch.Tensor]], optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, loss_fn: nn.Module, *, device: torch.device,
                    amp_dtype: torch.dtype | None = None, clip_grad: float | None = None) -> float:
    """One pass over `batches`, stepping the scheduler per optimiser step; returns the mean loss per window."""
    model.train()
    loss_fn = loss_fn.to(device)
    total, seen = 0.0, 0
    for batch in batches:
        x, lead_mask, y = (batch[k].to(device, non_blocking=True) for k in ("x", "lead_mask", "y"))
        with autocast(device, amp_dtype):
            logits = model(x, lead_mask)
        loss = loss_fn(logits.float(), y)
        value = loss.item()
        if not math.isfinite(value):
            raise FloatingPointError(f"fine-tuning loss is {value}; stopping before it corrupts the weights")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip_grad is not None:
            nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
        optimizer.step()
        scheduler.step()
        total += value * len(y)
        seen += len(y)
    return total / max(seen, 1)


@torch.no_grad()
def predict(model: Classifier, batches: Iterable[dict[str, torch.Tensor]], *, device: torch.device,
            amp_dtype: torch.dtype | None = None) -> np.ndarray:
    """(n, C) class probabilities, in batch order."""
    model.eval()
    out = []
    for batch in batches:
        with autocast(device, amp_dtype):
            logits = model(batch["x"].to(device), batch["lead_mask"].to(device))
        out.append(torch.sigmoid(logits.float()).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, model.head.out_features), dtype=np.float32)
