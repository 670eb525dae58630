"""Analytic training FLOPs of CREMA, for throughput as model FLOPs utilisation (MFU)."""

from __future__ import annotations

from crema.config import ModelConfig
from crema.data.signals import N_LEADS
from crema.model.masking import num_visible_patches
from crema.model.network import STEM_CHANNELS, STEM_KERNELS, stem_out_len


def _transformer_flops(tokens: int, dim: int, depth: int, mlp_ratio: float) -> float:
    """Forward FLOPs of `depth` blocks over `tokens` tokens: projections + MLP + the two attention matmuls."""
    hidden = int(dim * mlp_ratio)
    linear = tokens * (4 * dim * dim + 2 * dim * hidden)
    attention = 2 * tokens * tokens * dim
    return 2.0 * depth * (linear + attention)


def _cross_decoder_flops(queries: int, memory: int, dim: int, depth: int, mlp_ratio: float) -> float:
    """Forward FLOPs of `depth` cross-attention blocks: `queries` tokens attending to `memory` tokens."""
    hidden = int(dim * mlp_ratio)
    linear = queries * (2 * dim * dim + 2 * dim * hidden) + memory * 2 * dim * dim  # q, out, MLP; k and v
    attention = 2 * queries * memory * dim
    return 2.0 * depth * (linear + attention)


def _patch_embed_flops(cfg: ModelConfig) -> float:
    """Forward FLOPs to embed one patch."""
    if not cfg.conv_stem:
        return 2.0 * cfg.patch_size * cfg.embed_dim
    flops, channels, length = 0.0, 1, cfg.patch_size
    for out_channels, kernel in zip(STEM_CHANNELS, STEM_KERNELS):
        length = stem_out_len(length, kernel)
        flops += 2.0 * length * out_channels * channels * kernel
        channels = out_channels
    return flops + 2.0 * channels * length * cfg.embed_dim


def model_flops_per_sample(cfg: ModelConfig) -> float:
    """Analytic training FLOPs (forward + backward = 3 x forward matmul FLOPs) of one window in CREMA.forward.

    Counts the matrix products (the element-wise work is noise next to them) of the masked encoder
    (twice when lambda > 0: the second view), the decoder (over every patch, or with cross-attention
    over the hidden ones), and the projection head.
    The NT-Xent similarity matrix grows with the global batch and is left out (under 1% at the sizes
    this is used for).
    """
    cfg = cfg.resolved()
    n, k = cfg.num_patches, num_visible_patches(cfg)
    enc_tokens, dec_tokens = N_LEADS * (1 + k), N_LEADS * (1 + n)
    encoder = N_LEADS * k * _patch_embed_flops(cfg) + _transformer_flops(
        enc_tokens, cfg.embed_dim, cfg.depth, cfg.mlp_ratio)
    if cfg.decoder == "cross_attention":
        dec_tokens = N_LEADS * (n - k)
        blocks = _cross_decoder_flops(dec_tokens, enc_tokens, cfg.decoder_embed_dim, cfg.decoder_depth,
                                      cfg.mlp_ratio)
    else:
        blocks = _transformer_flops(dec_tokens, cfg.decoder_embed_dim, cfg.decoder_depth, cfg.mlp_ratio)
    decoder = (2.0 * enc_tokens * cfg.embed_dim * cfg.decoder_embed_dim + blocks
               + 2.0 * dec_tokens * cfg.decoder_embed_dim * cfg.patch_size)
    forward = encoder + decoder
    if cfg.contrastive_weight > 0:
        projector = 2.0 * (cfg.embed_dim * cfg.embed_dim + cfg.embed_dim * cfg.projection_dim)
        forward += encoder + 2 * projector
    return 3.0 * forward
