"""Does masked reconstruction work? The masking path's plumbing, and learning beyond the trivial answer.

With ``norm_target`` every target patch is standardised, so predicting zero (each patch's mean) scores a
loss of exactly 1: the trivial answer. These tests pin the gather/scatter plumbing down with a model whose
layers are identities; that the shipped recipe learns to reconstruct far better than that trivial 1 is
tests/model/test_learning.py's.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from crema.config import InputConditioning, ModelConfig, SourceConfig
from crema.data.conditioning import condition
from crema.data.readers import reader_for
from crema.data.signals import N_LEADS, NormaliseOptions, to_canonical
from crema.model.network import CREMA, patchify

P = 24  # the identity model needs embed_dim == patch_size: an even number (sin-cos) of samples per patch


def identity_crema(norm_target: bool = False) -> CREMA:
    """A CREMA whose encoder and decoder only gather and scatter: every learnt map an identity, no
    position, lead or mask-token offsets, no transformer blocks. Its prediction of a visible patch is
    that patch, and of a hidden patch zero, wherever the plumbing puts them."""
    cfg = ModelConfig(window_samples=40 * P, patch_size=P, embed_dim=P, depth=1, num_heads=1,
                      decoder_embed_dim=P, decoder_depth=1, decoder_num_heads=1, contrastive_weight=0.0,
                      norm_target=norm_target, decoder="self_attention")
    model = CREMA(cfg)
    with torch.no_grad():
        for part in (model.encoder, model.decoder):
            part.blocks = nn.ModuleList()
            part.norm = nn.Identity()
            part.lead_embed.zero_()
            part.pos_embed.zero_()
        for linear in (model.encoder.patch_embed.proj, model.decoder.embed, model.decoder.pred):
            linear.weight.copy_(torch.eye(P))
            linear.bias.zero_()
        model.decoder.mask_token.zero_()
    return model


def distinct_signals(batch: int, model: CREMA) -> torch.Tensor:
    """Every sample a different value, so a patch landing at another lead or position cannot match."""
    n = batch * N_LEADS * model.cfg.window_samples
    return (torch.arange(n, dtype=torch.float32) + 1).reshape(batch, N_LEADS, -1) / n


def test_visible_patches_round_trip_to_their_own_lead_and_position():
    model = identity_crema()
    x = distinct_signals(4, model)
    lead_mask = torch.ones(4, N_LEADS, dtype=torch.bool)
    lead_mask[1, 5] = False
    mask = model.random_masking(lead_mask, torch.Generator().manual_seed(0))
    pred = model.forward_decoder(model.forward_encoder(x, lead_mask, mask), lead_mask, mask)
    patches = patchify(x, P)
    visible = ~mask
    assert visible.sum() == (4 * N_LEADS - 1) * 10  # 10 of 40 per present lead, none of the missing one
    torch.testing.assert_close(pred[visible], patches[visible], rtol=0, atol=1e-6)
    assert torch.count_nonzero(pred[mask]) == 0  # hidden slots hold the (zero) mask token, nothing leaked


def test_loss_is_zero_for_true_patches_and_one_for_predicting_the_mean(ptbxl_root):
    model = identity_crema(norm_target=True)
    x = torch.from_numpy(real_windows(ptbxl_root, n_records=8, window=model.cfg.window_samples,
                                      conditioning=model.cfg.input))
    lead_mask = torch.ones(len(x), N_LEADS, dtype=torch.bool)
    lead_mask[0, 3] = False
    mask = model.random_masking(lead_mask, torch.Generator().manual_seed(0))
    target = model.reconstruction_target(x, lead_mask)
    assert model.forward_loss(target, target, mask, lead_mask) == 0
    # Predicting zero is predicting each standardised patch's mean: the loss is its variance, 1
    # (less the epsilon's share, negligible for real signals).
    trivial = model.forward_loss(target, torch.zeros_like(target), mask, lead_mask)
    assert trivial == pytest.approx(1.0, abs=1e-3)
    # And a wrong prediction on the missing lead costs nothing: it is never a target.
    garbage = target.clone()
    garbage[0, 3] = 100.0
    assert model.forward_loss(target, garbage, mask, lead_mask) == 0


def real_windows(ptbxl_root, n_records: int, window: int, conditioning: InputConditioning) -> np.ndarray:
    """Conditioned 100 Hz PTB-XL windows (n, 12, window) read by the product's WFDB reader."""
    source = SourceConfig(name="ptbxl", format="wfdb", path=str(ptbxl_root / "records100"))
    reader = reader_for(source)
    ids = reader.discover()[:n_records]
    signals = []
    for record_id in ids:
        record = to_canonical(reader.read(record_id), NormaliseOptions(target_fs=100))
        signals.append(record.signal[:, :window])
    x = np.stack(signals)
    return condition(x, np.ones(x.shape[:2], dtype=bool), 100.0, conditioning)
