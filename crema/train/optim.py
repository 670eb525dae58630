"""Optimiser parameter groups and the learning-rate schedule.

One weight-decay rule for every optimiser (:func:`decays`): biases, norm weights and the learned tokens
and embeddings are not decayed (decaying them only hurts, as in MAE). Pretraining takes two groups
(:func:`param_groups`); fine-tuning adds layer-wise learning-rate decay (:func:`param_groups_lrd`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from torch import nn

from crema.model.network import SiTEncoder, unwrap

NO_DECAY_NAMES = {"lead_embed", "sep_token", "mask_token", "pos_embed"}  # besides biases and norm weights


def decays(name: str, param: nn.Parameter) -> bool:
    """Whether weight decay applies to the parameter `name`: matrices only, tokens and embeddings excepted."""
    return param.ndim > 1 and name.rsplit(".", 1)[-1] not in NO_DECAY_NAMES


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups for AdamW: the decayed parameters, and the rest at weight decay 0."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if decays(name, p) else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def param_groups_lrd(encoder: SiTEncoder, weight_decay: float, layer_decay: float) -> list[dict]:
    """Optimizer parameter groups with layer-wise learning-rate decay (BEiT/MAE fine-tuning).

    Layer i's lr is scaled by ``layer_decay ** (depth + 1 - i)`` (key ``lr_scale``; the training loop
    multiplies its lr by it), so the embeddings change least and the last block most. Weight decay
    follows :func:`decays`. A task head added on top belongs at scale 1.
    """
    encoder = unwrap(encoder)
    top = len(encoder.blocks) + 1
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in encoder.named_parameters():
        if not param.requires_grad:
            continue
        layer = encoder.layer_id(name)
        decay = decays(name, param)
        group = groups.setdefault((layer, decay), {
            "name": f"layer_{layer}_{'decay' if decay else 'no_decay'}",
            "params": [],
            "weight_decay": weight_decay if decay else 0.0,
            "lr_scale": layer_decay ** (top - layer),
        })
        group["params"].append(param)
    return [groups[key] for key in sorted(groups)]


def warmup_cosine(warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0) -> Callable[[int], float]:
    """LR multiplier: linear warm-up from ~0 to 1, then half a cosine down to `min_lr_ratio`."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor
