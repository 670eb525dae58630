"""Which patches the encoder sees: random masking with K visible patches per present lead.

A batch needs one sequence length, so every lead keeps the same number K of visible patches
(``round(num_patches * (1 - mask_ratio))``): each present lead has exactly K visible patches, chosen per
lead (``independent``) or shared by all leads (``time``). Missing leads (``lead_mask`` False) are entirely
masked. :func:`visible_index` turns a keep mask into gather indices, and :func:`key_padding_mask` into the
attention mask that hides missing leads' tokens as keys.
"""

from __future__ import annotations

import torch

from crema.config import ModelConfig
from crema.data.signals import N_LEADS


def num_visible_patches(cfg: ModelConfig) -> int:
    """Visible patches per lead under masking; round() so that 40 patches at 0.9 keep 4, not 3."""
    n = cfg.num_patches
    return min(n - 1, max(1, round(n * (1 - cfg.mask_ratio))))


def random_draw(shape: tuple[int, ...], device: torch.device, generator: torch.Generator | None,
                normal: bool = False) -> torch.Tensor:
    """Uniform (or normal) noise from `generator`, wherever the generator lives, moved to `device`."""
    source = generator.device if generator is not None else device
    draw = torch.randn if normal else torch.rand
    return draw(shape, generator=generator, device=source).to(device)


def random_masking(cfg: ModelConfig, lead_mask: torch.Tensor,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, 12, N) bool, True = hidden. Each present lead shows exactly K patches; missing leads none."""
    b, n = lead_mask.shape[0], cfg.num_patches
    shape = (b, 1, n) if cfg.mask_mode == "time" else (b, N_LEADS, n)
    noise = random_draw(shape, lead_mask.device, generator)                    # (B, 1 or 12, N)
    rank = noise.argsort(dim=-1).argsort(dim=-1)                               # each patch's rank in its lead
    visible = (rank < num_visible_patches(cfg)).expand(b, N_LEADS, n) & lead_mask[:, :, None]
    return ~visible


def crop_masking(cfg: ModelConfig, lead_mask: torch.Tensor,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Like :func:`random_masking`, but the K visible patches of a window all lie in one random crop in time
    of ``crop_fraction`` of it (the same crop for every lead): a view of another stretch of the recording,
    as CLOCS / CMSC pair segments of one record (the contrastive view ``crop``)."""
    b, n, k = lead_mask.shape[0], cfg.num_patches, num_visible_patches(cfg)
    width = min(n, max(k, round(n * cfg.crop_fraction)))
    start = (random_draw((b, 1, 1), lead_mask.device, generator) * (n - width + 1)).floor()  # (B, 1, 1)
    shape = (b, 1, n) if cfg.mask_mode == "time" else (b, N_LEADS, n)
    noise = random_draw(shape, lead_mask.device, generator)                    # (B, 1 or 12, N), all < 1
    position = torch.arange(n, device=lead_mask.device)
    in_crop = (position >= start) & (position < start + width)                # (B, 1, N)
    rank = torch.where(in_crop, noise, 2.0).argsort(dim=-1).argsort(dim=-1)    # patches outside rank last
    visible = (rank < k).expand(b, N_LEADS, n) & lead_mask[:, :, None]
    return ~visible


def visible_index(keep_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the visible patches of every lead, padded to the largest count in the batch.

    keep_mask: (B, 12, N) bool. Returns ids (B, 12, K) in increasing patch order (stable sort, so the
    encoder and the decoder agree on it) and kept (B, 12, K), False where an index is padding.
    """
    k = int(keep_mask.sum(dim=-1).max()) if keep_mask.numel() else 0
    ids = torch.argsort((~keep_mask).to(torch.uint8), dim=-1, stable=True)[..., :k]
    return ids, keep_mask.gather(-1, ids)


def key_padding_mask(valid: torch.Tensor) -> torch.Tensor | None:
    """An SDPA mask (B, 1, 1, S) that hides invalid keys; None when all are valid (keeps flash attention)."""
    if bool(valid.all()):
        return None
    # A sample without any valid key (no lead recorded) makes each softmax row 0/0, which some SDPA
    # kernels return as NaN; let it attend to everything instead. Its outputs feed no loss term.
    valid = valid | ~valid.any(dim=1, keepdim=True)
    return valid[:, None, None, :]
