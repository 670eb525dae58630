"""CREMA: a Contrastive Regularized Masked Autoencoder over 12-lead ECG (the SiT encoder and CR-MAE).

Tokens. Every lead is cut into patches of ``patch_size`` samples; a patch becomes a token through a
linear projection (or a small conv stem that sees only its own patch), plus the lead's embedding and
the patch's temporal position. Each lead's tokens are preceded by the lead's SEP token (a shared
learnable vector plus the lead embedding), which attends to every lead and serves as that lead's
summary. The sequence of a sample is ``[SEP_I, patches of I, SEP_II, patches of II, ..., SEP_V6, ...]``.

Masking and missing leads (:mod:`crema.model.masking`). A batch needs one sequence length, so every lead keeps the same number K
of visible patches (``round(num_patches * (1 - mask_ratio))``): each present lead has exactly K
visible patches, chosen per lead (``independent``) or shared by all leads (``time``). Missing leads
(``lead_mask`` False, zero-filled) are entirely masked: they still occupy K + 1 slots of the sequence
so that shapes stay rectangular, but their tokens are excluded from attention as keys, their patches
are never reconstruction targets, and their samples are replaced by zeros before anything reads
them, so nothing a missing lead holds can reach the loss or its gradient.

Why a time-distance bias. Most of what a hidden patch holds is written in the other leads at the same
instant (III = II - I sample by sample; the precordial leads are strongly correlated), but a token knows
its instant only through a sine-cosine position code that, after the first LayerNorm, varies little between
neighbouring patches, next to 12 leads x N patches of other tokens. Without help, attention starts out
spread evenly over all of them and the gradient that would sharpen it is tiny: measured on PTB-XL (tiny
model, 100 Hz), reconstruction sat at the loss of predicting zero (1.0) for hundreds of steps. So every
head's attention logits get a fixed penalty proportional to the time distance between two patches (ALiBi,
one slope per head from sharp, 4 per patch, to nearly flat): attention starts out looking at the same
instant in the other leads, and the same model leaves the trivial loss within about a hundred steps. SEP
tokens attend without penalty and sit one patch away from every patch.

Pooling. The contrastive term compares the mean of the present leads' SEP tokens (``SiTEncoder.pool``):
the SEP tokens are the only tokens present in every view whatever the mask, and they average over the
leads actually recorded. Downstream (probe, fine-tune, serving, drift) a window's representation is that
SEP mean beside the mean of the present leads' patch tokens (``SiTEncoder.embed``, 2 x D): chosen on PTB-XL
fold 9, where it led the SEP mean alone for every pretrained encoder measured (README, "The representation").

CR-MAE. View 1 is the MAE view (masked, not augmented): its reconstruction of the hidden patches is
the MSE term. When the contrastive weight lambda > 0, a second view of the same windows, masked
independently (or showing one crop in time of the window only: ``contrastive_view: crop``) and
(optionally) amplitude-scaled and noised, is encoded too; the projected pooled
embeddings of the two views enter NT-Xent with negatives from the global batch of every rank
(:mod:`crema.model.losses`). With lambda == 0 the second view is never built, so the loss, the random
numbers drawn and the cost are exactly those of the plain MAE.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from crema.config import ModelConfig
from crema.data.signals import LEADS, N_LEADS, lead_set_leads
from crema.model.losses import nt_xent
from crema.model.masking import crop_masking, key_padding_mask, random_draw, random_masking, visible_index

STEM_CHANNELS = (16, 32)
STEM_KERNELS = (7, 5)
STEM_STRIDE = 2
_TARGET_EPS = 1e-6


# ------------------------------------------------------------------------------------ helpers

def patchify(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, 12, L) -> (B, 12, L / patch_size, patch_size)."""
    if x.ndim != 3 or x.shape[1] != N_LEADS:
        raise ValueError(f"expected signals of shape (B, {N_LEADS}, L); got {tuple(x.shape)}")
    if x.shape[2] % patch_size:
        raise ValueError(f"signal length {x.shape[2]} is not a multiple of patch_size={patch_size}")
    return x.reshape(x.shape[0], N_LEADS, x.shape[2] // patch_size, patch_size)


def unpatchify(patches: torch.Tensor) -> torch.Tensor:
    """(B, 12, N, P) -> (B, 12, N * P)."""
    return patches.reshape(patches.shape[0], patches.shape[1], -1)


def sincos_position_embedding(num_positions: int, dim: int) -> torch.Tensor:
    """The fixed 1-D sine-cosine embedding of MAE/ViT, (num_positions, dim)."""
    if dim % 2:
        raise ValueError(f"sin-cos position embeddings need an even dimension; got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = torch.arange(num_positions, dtype=torch.float64)[:, None] * omega[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1).float()


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """Per-head penalties per patch of time distance: 4, 1, 1/4, ... (sharp heads see the same instant)."""
    return 4.0 ** (1 - torch.arange(num_heads, dtype=torch.float32))


def attention_bias(query_times: torch.Tensor, key_times: torch.Tensor, key_valid: torch.Tensor,
                   slopes: torch.Tensor | None) -> torch.Tensor | None:
    """The additive SDPA mask (B, heads, Q, S): -slope * |time distance|, and -inf for invalid keys.

    query_times (B or 1, Q), key_times (B or 1, S): patch index of every token, NaN for SEP tokens;
    key_valid: (B, S) bool. None when there is nothing to add (no slopes, every key valid), which keeps
    flash attention.
    """
    keys = key_padding_mask(key_valid)                                         # (B, 1, 1, S) bool or None
    if slopes is None:
        return keys
    distance = (query_times[:, :, None] - key_times[:, None, :]).abs()        # (B, Q, S)
    distance = torch.where(torch.isnan(key_times)[:, None, :], torch.ones_like(distance), distance)  # -> SEP: 1
    distance = torch.where(torch.isnan(query_times)[:, :, None], torch.zeros_like(distance), distance)  # SEP -> all: 0
    bias = -slopes.to(distance)[None, :, None, None] * distance[:, None]       # (B, heads, Q, S)
    if keys is not None:
        bias = bias.masked_fill(~keys, float("-inf"))
    return bias


def token_times(patch_index: torch.Tensor) -> torch.Tensor:
    """(B, 12, K) patch indices -> (B, 12 * (1 + K)) token times in sequence order, NaN for each SEP."""
    sep = torch.full_like(patch_index[:, :, :1], float("nan"), dtype=torch.float32)
    return torch.cat([sep, patch_index.float()], dim=2).reshape(patch_index.shape[0], -1)


def _init_weights(module: nn.Module) -> None:
    """Xavier-uniform linear layers with zero biases, unit LayerNorms (as MAE)."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


# ------------------------------------------------------------------------------ building blocks

class DropPath(nn.Module):
    """Stochastic depth: drops a residual branch for whole samples while training."""

    def __init__(self, rate: float):
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rate == 0.0 or not self.training:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - self.rate)
        return x * keep / (1 - self.rate)


class Attention(nn.Module):
    """Multi-head self-attention through SDPA; `attn_mask` is a bool key mask or an additive bias."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        b, s, d = x.shape                                                    # x: (B, S, D)
        q, k, v = self.qkv(x).reshape(b, s, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, heads, S, D / heads)
        return self.proj(out.transpose(1, 2).reshape(b, s, d))              # (B, S, D)


class CrossAttention(nn.Module):
    """Multi-head attention of query tokens over a memory of other tokens, through SDPA."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        b, q_len, d = x.shape                                                # x: (B, Q, D)
        heads, width = self.num_heads, d // self.num_heads
        q = self.q(x).reshape(b, q_len, heads, width).transpose(1, 2)       # (B, heads, Q, D / heads)
        k, v = self.kv(memory).reshape(b, memory.shape[1], 2, heads, width).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, heads, Q, D / heads)
        return self.proj(out.transpose(1, 2).reshape(b, q_len, d))          # (B, Q, D)


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop_path: float = 0.0):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), attn_mask))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class CrossBlock(nn.Module):
    """Pre-norm decoder block of CrossMAE: the queries attend to the memory only, never to each other."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm_query = nn.LayerNorm(dim)
        self.norm_memory = nn.LayerNorm(dim)
        self.attn = CrossAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, memory: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attn(self.norm_query(x), self.norm_memory(memory), attn_mask)
        return x + self.mlp(self.norm2(x))


def stem_out_len(length: int, kernel: int) -> int:
    """Length after one stem convolution (stride STEM_STRIDE, "same" padding)."""
    return (length + 2 * (kernel // 2) - kernel) // STEM_STRIDE + 1


class PatchEmbed(nn.Module):
    """One token per patch. The optional conv stem runs inside each patch, never across patches,
    so a visible token cannot carry samples of a hidden neighbour."""

    def __init__(self, patch_size: int, dim: int, conv_stem: bool):
        super().__init__()
        if conv_stem:
            layers, channels, length = [], 1, patch_size
            for out_channels, kernel in zip(STEM_CHANNELS, STEM_KERNELS):
                layers += [nn.Conv1d(channels, out_channels, kernel, STEM_STRIDE, kernel // 2), nn.GELU()]
                channels, length = out_channels, stem_out_len(length, kernel)
            self.stem = nn.Sequential(*layers)
            self.proj = nn.Linear(channels * length, dim)
        else:
            self.stem = None
            self.proj = nn.Linear(patch_size, dim)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """(..., P) samples -> (..., D) tokens."""
        if self.stem is not None:
            *outer, p = patches.shape
            patches = self.stem(patches.reshape(-1, 1, p)).reshape(*outer, -1)  # (..., 32 * stem length)
        return self.proj(patches)


# ------------------------------------------------------------------------------------- encoder

class SiTEncoder(nn.Module):
    """The signal transformer: all the weights a downstream task needs, savable on its own."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg = cfg.resolved()
        self.cfg = cfg
        dim = cfg.embed_dim
        self.patch_size = cfg.patch_size
        self.patch_embed = PatchEmbed(cfg.patch_size, dim, cfg.conv_stem)
        self.lead_embed = nn.Parameter(torch.zeros(N_LEADS, dim))
        self.sep_token = nn.Parameter(torch.zeros(dim))
        if cfg.pos_embed == "learned":
            self.pos_embed = nn.Parameter(torch.zeros(cfg.num_patches, dim))
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        else:
            self.register_buffer("pos_embed", sincos_position_embedding(cfg.num_patches, dim), persistent=False)
        self.register_buffer("slopes", alibi_slopes(cfg.num_heads) if cfg.time_bias else None, persistent=False)
        rates = torch.linspace(0, cfg.drop_path, cfg.depth).tolist()
        self.blocks = nn.ModuleList(Block(dim, cfg.num_heads, cfg.mlp_ratio, rate) for rate in rates)
        self.norm = nn.LayerNorm(dim)
        self.apply(_init_weights)
        nn.init.trunc_normal_(self.lead_embed, std=0.02)
        nn.init.trunc_normal_(self.sep_token, std=0.02)

    @property
    def embed_dim(self) -> int:
        """The width of a token."""
        return self.cfg.embed_dim

    @property
    def representation_dim(self) -> int:
        """The width of :meth:`embed`'s window representation: the SEP mean and the patch mean."""
        return 2 * self.cfg.embed_dim

    def forward(self, x: torch.Tensor, lead_mask: torch.Tensor,
                keep_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Encode the visible patches of `x` (all patches when keep_mask is None).

        x: (B, 12, L) conditioned inputs (:mod:`crema.data.conditioning`); lead_mask: (B, 12) bool; keep_mask: (B, 12, L / patch_size) bool, True = visible.
        Returns normalised tokens (B, 12, 1 + K, D): per lead its SEP token, then its K visible
        patches in time order (see :func:`visible_index`; K = all patches without a keep_mask).
        """
        patches = patchify(x, self.patch_size)                                 # (B, 12, N, P)
        b, _, n, p = patches.shape
        if n > self.pos_embed.shape[0]:
            raise ValueError(f"{n} patches per lead exceed the {self.pos_embed.shape[0]} this encoder was built for")
        # Missing leads' samples become zeros before anything reads them.
        patches = torch.where(lead_mask[:, :, None, None], patches, torch.zeros((), dtype=patches.dtype,
                                                                               device=patches.device))
        pos = self.pos_embed[:n]                                               # (N, D)
        if keep_mask is None:
            token_valid = lead_mask[:, :, None].expand(b, N_LEADS, n)          # (B, 12, N)
            ids = torch.arange(n, device=x.device).expand(1, N_LEADS, n)       # (1, 12, N): same for all
            pos = pos.expand(b, N_LEADS, n, -1)                                # (B, 12, N, D)
        else:
            ids, kept = visible_index(keep_mask)                               # (B, 12, K) each
            patches = patches.gather(2, ids[..., None].expand(-1, -1, -1, p))  # (B, 12, K, P)
            pos = pos[ids]                                                     # (B, 12, K, D)
            token_valid = kept & lead_mask[:, :, None]                         # (B, 12, K)
        lead = self.lead_embed[None, :, None, :]                               # (1, 12, 1, D)
        tokens = self.patch_embed(patches) + pos + lead                        # (B, 12, K, D)
        sep = (self.sep_token + lead).expand(b, -1, -1, -1).to(tokens.dtype)   # (B, 12, 1, D)
        seq = torch.cat([sep, tokens], dim=2)                                  # (B, 12, 1 + K, D)
        valid = torch.cat([lead_mask[:, :, None], token_valid], dim=2)         # (B, 12, 1 + K)
        per_lead = seq.shape[2]
        h = seq.reshape(b, N_LEADS * per_lead, -1)                             # (B, 12 * (1 + K), D)
        times = token_times(ids)                                               # (B or 1, S)
        attn_mask = attention_bias(times, times, valid.reshape(b, -1), self.slopes)  # (B, heads, S, S) or None
        for block in self.blocks:
            h = block(h, attn_mask)                                            # (B, 12 * (1 + K), D)
        return self.norm(h).reshape(b, N_LEADS, per_lead, -1)                  # (B, 12, 1 + K, D)

    @staticmethod
    def mean_over_leads(per_lead: torch.Tensor, lead_mask: torch.Tensor) -> torch.Tensor:
        """Mean of the present leads' vectors: (B, 12, D) -> (B, D)."""
        weights = lead_mask.to(per_lead.dtype)[:, :, None]                    # (B, 12, 1)
        return (per_lead * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)

    @staticmethod
    def pool(tokens: torch.Tensor, lead_mask: torch.Tensor) -> torch.Tensor:
        """Mean of the present leads' SEP tokens: (B, 12, 1 + K, D) -> (B, D)."""
        return SiTEncoder.mean_over_leads(tokens[:, :, 0], lead_mask)

    def embed(self, x: torch.Tensor, lead_mask: torch.Tensor) -> torch.Tensor:
        """The representation (B, 2 x D) of whole windows, for probing and fine-tuning: the SEP mean, then
        the mean of the present leads' patch tokens (every patch is visible here)."""
        tokens = self.forward(x, lead_mask)                                    # (B, 12, 1 + N, D)
        patches = self.mean_over_leads(tokens[:, :, 1:].mean(dim=2), lead_mask)  # (B, D)
        return torch.cat([self.pool(tokens, lead_mask), patches], dim=-1)

    def layer_id(self, name: str) -> int:
        """0 for the embeddings, i + 1 for block i, depth + 1 for the final norm (layer-wise lr decay)."""
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        if name.startswith("norm."):
            return len(self.blocks) + 1
        return 0


# What SiTEncoder.embed computes, by name: stored embeddings are keyed on it as well as on the weights, so a
# new formula never reads the embeddings of an old one.
REPRESENTATION = "sep_mean+patch_mean"

_HEAD_INIT_STD = 2e-5  # MAE's fine-tuning head init: the classifier starts from chance, not random logits


class Classifier(nn.Module):
    """Encoder + linear head: window (B, 12, L) -> class logits (B, C)."""

    def __init__(self, encoder: SiTEncoder, num_classes: int):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.representation_dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=_HEAD_INIT_STD)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor, lead_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder.embed(x, lead_mask))


def unwrap(model: nn.Module) -> nn.Module:
    """The module under DDP (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while True:
        inner = next((getattr(model, attr) for attr in ("module", "_orig_mod")
                      if isinstance(getattr(model, attr, None), nn.Module)), None)
        if inner is None:
            return model
        model = inner


# ------------------------------------------------------------------------------------- decoder

class MAEDecoder(nn.Module):
    """The light transformer that fills every hidden patch back in from the encoded visible ones."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        dim = cfg.decoder_embed_dim
        self.num_patches = cfg.num_patches
        self.embed = nn.Linear(cfg.embed_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(dim))
        self.lead_embed = nn.Parameter(torch.zeros(N_LEADS, dim))
        if cfg.pos_embed == "learned":
            self.pos_embed = nn.Parameter(torch.zeros(cfg.num_patches, dim))
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        else:
            self.register_buffer("pos_embed", sincos_position_embedding(cfg.num_patches, dim), persistent=False)
        self.register_buffer("slopes", alibi_slopes(cfg.decoder_num_heads) if cfg.time_bias else None,
                             persistent=False)
        self.blocks = nn.ModuleList(Block(dim, cfg.decoder_num_heads, cfg.mlp_ratio)
                                    for _ in range(cfg.decoder_depth))
        self.norm = nn.LayerNorm(dim)
        self.pred = nn.Linear(dim, cfg.patch_size)
        self.apply(_init_weights)
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        nn.init.trunc_normal_(self.lead_embed, std=0.02)

    def forward(self, latent: torch.Tensor, lead_mask: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """latent (B, 12, 1 + K, D_enc), mask (B, 12, N) True = hidden -> predicted patches (B, 12, N, P)."""
        h = self.embed(latent)                                                 # (B, 12, 1 + K, D_dec)
        b, dim = h.shape[0], h.shape[-1]
        ids, kept = visible_index(~mask)                                       # (B, 12, K) each
        mask_token = self.mask_token.to(h.dtype)
        # Padding slots (leads with fewer visible patches, i.e. missing ones) point at hidden patches:
        # writing the mask token there leaves those slots as they were.
        visible = torch.where(kept[..., None], h[:, :, 1:], mask_token)        # (B, 12, K, D_dec)
        full = mask_token.expand(b, N_LEADS, self.num_patches, dim)            # (B, 12, N, D_dec)
        full = torch.scatter(full, 2, ids[..., None].expand(-1, -1, -1, dim), visible)  # visible back in place
        lead = self.lead_embed[None, :, None, :]                               # (1, 12, 1, D_dec)
        seq = torch.cat([h[:, :, :1] + lead, full + self.pos_embed + lead], dim=2)  # (B, 12, 1 + N, D_dec)
        per_lead = seq.shape[2]
        x = seq.reshape(b, N_LEADS * per_lead, dim)                            # (B, 12 * (1 + N), D_dec)
        times = token_times(torch.arange(self.num_patches, device=x.device).expand(1, N_LEADS, -1))  # (1, S)
        valid = lead_mask[:, :, None].expand(b, N_LEADS, per_lead).reshape(b, -1)  # (B, S)
        attn_mask = attention_bias(times, times, valid, self.slopes)           # (1 or B, heads, S, S) or None
        for block in self.blocks:
            x = block(x, attn_mask)                                            # (B, 12 * (1 + N), D_dec)
        x = self.norm(x).reshape(b, N_LEADS, per_lead, dim)[:, :, 1:]          # (B, 12, N, D_dec): SEP slots dropped
        return self.pred(x)                                                    # (B, 12, N, P)


class CrossDecoder(nn.Module):
    """A cheaper decoder (CrossMAE): one query per hidden patch, attending only to the encoded visible tokens.

    The self-attention decoder runs 12 x (1 + N) tokens through every block, attention over all pairs of
    them; here only the 12 x (N - K) hidden patches are computed, each looking at the 12 x (1 + K)
    encoded tokens (with the same time-distance bias), which measured about twice the pretraining
    samples per CPU-second of the tiny model at 100 Hz (benchmarks.pretrain).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        dim = cfg.decoder_embed_dim
        self.num_patches = cfg.num_patches
        self.embed = nn.Linear(cfg.embed_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(dim))
        self.lead_embed = nn.Parameter(torch.zeros(N_LEADS, dim))
        if cfg.pos_embed == "learned":
            self.pos_embed = nn.Parameter(torch.zeros(cfg.num_patches, dim))
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        else:
            self.register_buffer("pos_embed", sincos_position_embedding(cfg.num_patches, dim), persistent=False)
        self.register_buffer("slopes", alibi_slopes(cfg.decoder_num_heads) if cfg.time_bias else None,
                             persistent=False)
        self.blocks = nn.ModuleList(CrossBlock(dim, cfg.decoder_num_heads, cfg.mlp_ratio)
                                    for _ in range(cfg.decoder_depth))
        self.norm = nn.LayerNorm(dim)
        self.pred = nn.Linear(dim, cfg.patch_size)
        self.apply(_init_weights)
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        nn.init.trunc_normal_(self.lead_embed, std=0.02)

    def forward(self, latent: torch.Tensor, lead_mask: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """latent (B, 12, 1 + K, D_enc), mask (B, 12, N) True = hidden -> predicted patches (B, 12, N, P),
        zero at the visible patches (nothing is predicted there)."""
        h = self.embed(latent)                                                 # (B, 12, 1 + K, D_dec)
        b, dim = h.shape[0], h.shape[-1]
        lead = self.lead_embed[None, :, None, :]                               # (1, 12, 1, D_dec)
        visible_ids, visible_kept = visible_index(~mask)                       # (B, 12, K) each
        memory = torch.cat([h[:, :, :1], h[:, :, 1:] + self.pos_embed[visible_ids]], dim=2) + lead
        memory_valid = torch.cat([lead_mask[:, :, None], visible_kept & lead_mask[:, :, None]], dim=2)
        # Queries: every lead has the same count M of hidden patches, except missing leads (all hidden),
        # which pad the others; a padding query points at a visible patch and predicts nothing.
        hidden_ids, hidden_kept = visible_index(mask)                          # (B, 12, M) each
        queries = (self.mask_token.to(h.dtype) + self.pos_embed[hidden_ids] + lead).reshape(b, -1, dim)
        attn_mask = attention_bias(hidden_ids.float().reshape(b, -1), token_times(visible_ids),
                                   memory_valid.reshape(b, -1), self.slopes)  # (B, heads, 12 M, 12 (1 + K))
        memory = memory.reshape(b, -1, dim)                                    # (B, 12 (1 + K), D_dec)
        for block in self.blocks:
            queries = block(queries, memory, attn_mask)                        # (B, 12 M, D_dec)
        pred = self.pred(self.norm(queries)).reshape(b, N_LEADS, hidden_ids.shape[2], -1)  # (B, 12, M, P)
        pred = pred * hidden_kept[..., None].to(pred.dtype)
        full = pred.new_zeros(b, N_LEADS, self.num_patches, pred.shape[-1])    # (B, 12, N, P)
        return full.scatter(2, hidden_ids[..., None].expand_as(pred), pred)


# ----------------------------------------------------------------------------------------- CREMA

@dataclass
class CRMAEOutput:
    loss: torch.Tensor  # the sum of the terms, each times its weight (CREMA.loss_weights)
    # The loss terms by name, unweighted (scalars): the step loops log each as a metric under its name
    # (`val_<name>` in validation). contrastive_loss is 0 when contrastive_weight is 0.
    terms: dict[str, torch.Tensor]
    pred: torch.Tensor  # (B, 12, N, P) predicted patches (in target space: standardised if norm_target)
    mask: torch.Tensor  # (B, 12, N) bool, True = hidden from the encoder
    target: torch.Tensor  # (B, 12, N, P) reconstruction targets


class CREMA(nn.Module):
    """CR-MAE: the SiT encoder, the MAE decoder and (when lambda > 0) the contrastive projection head."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg = cfg.resolved()
        self.cfg = cfg
        self.encoder = SiTEncoder(cfg)
        self.decoder = CrossDecoder(cfg) if cfg.decoder == "cross_attention" else MAEDecoder(cfg)
        # Only built when used: DDP rejects parameters that never receive a gradient.
        # (S, 12) bool: the leads of each lead_dropout_sets entry; a constant, not a weight (never saved)
        kept = [[lead in lead_set_leads(name) for lead in LEADS] for name in cfg.lead_dropout_sets]
        self.register_buffer("lead_dropout_masks", torch.tensor(kept, dtype=torch.bool), persistent=False)
        # A new loss term: its weight here (from its ModelConfig field) and its value in forward's terms.
        self.loss_weights = {"recon_loss": 1.0, "contrastive_loss": cfg.contrastive_weight}
        self.projector = None
        if cfg.contrastive_weight > 0:
            dim = cfg.embed_dim
            self.projector = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, cfg.projection_dim))
            self.projector.apply(_init_weights)

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        return patchify(x, self.cfg.patch_size)

    def unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        return unpatchify(patches)

    def random_masking(self, lead_mask: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, 12, N) bool, True = hidden (:func:`crema.model.masking.random_masking`)."""
        return random_masking(self.cfg, lead_mask, generator)

    def augment(self, x: torch.Tensor, lead_mask: torch.Tensor,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """A light, label-preserving perturbation for the second contrastive view.

        One gain per window (not per lead), so the Einthoven relations between limb leads hold.
        """
        b = x.shape[0]
        gain = 1 + self.cfg.augment_scale * (2 * random_draw((b, 1, 1), x.device, generator) - 1)  # (B, 1, 1)
        noise = self.cfg.augment_noise * random_draw(tuple(x.shape), x.device, generator, normal=True)
        return (x * gain.to(x.dtype) + noise.to(x.dtype)) * lead_mask[:, :, None].to(x.dtype)

    def drop_leads(self, x: torch.Tensor, lead_mask: torch.Tensor,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Lead dropout (training only): a `lead_dropout` share of the windows keep the leads of one random
        lead set, the others zeroed and absent, as a wearable's window reaches the encoder downstream. A window
        that has none of its set's leads keeps its own."""
        b = x.shape[0]
        sets = self.lead_dropout_masks
        chosen = (random_draw((b,), x.device, generator) * len(sets)).long().clamp(max=len(sets) - 1)
        dropped = random_draw((b,), x.device, generator) < self.cfg.lead_dropout
        kept = torch.where(dropped[:, None], sets[chosen] & lead_mask, lead_mask)   # (B, 12)
        kept = torch.where(kept.any(dim=1, keepdim=True), kept, lead_mask)
        return x * kept[:, :, None].to(x.dtype), kept

    def forward_encoder(self, x: torch.Tensor, lead_mask: torch.Tensor,
                        mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.encoder(x, lead_mask, None if mask is None else ~mask)

    def forward_decoder(self, latent: torch.Tensor, lead_mask: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.decoder(latent, lead_mask, mask)

    def reconstruction_target(self, x: torch.Tensor, lead_mask: torch.Tensor) -> torch.Tensor:
        """The patches to reconstruct, in float32; standardised per patch when norm_target."""
        target = self.patchify(x).float()
        target = torch.where(lead_mask[:, :, None, None], target, torch.zeros((), device=target.device))
        if self.cfg.norm_target:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True, correction=0)
            target = (target - mean) / torch.sqrt(var + _TARGET_EPS)
        return target

    def forward_loss(self, target: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor,
                     lead_mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error over the hidden patches of present leads."""
        per_patch = ((pred.float() - target) ** 2).mean(dim=-1)               # (B, 12, N)
        scored = mask & lead_mask[:, :, None]                                  # hidden patches of present leads
        return torch.where(scored, per_patch, torch.zeros_like(per_patch)).sum() / scored.sum().clamp(min=1)

    def forward_contrastive(self, x: torch.Tensor, lead_mask: torch.Tensor, latent: torch.Tensor,
                            record_group: torch.Tensor | None, generator: torch.Generator | None) -> torch.Tensor:
        """NT-Xent between the MAE view (its `latent`) and a second, independently masked (or cropped) view."""
        if self.cfg.positives == "record" and record_group is None:
            raise ValueError("positives='record' needs record_group (one integer id per window's record)")
        if self.cfg.contrastive_view == "crop":
            mask2 = crop_masking(self.cfg, lead_mask, generator)              # (B, 12, N)
        else:
            mask2 = self.random_masking(lead_mask, generator)                 # (B, 12, N)
        x2 = self.augment(x, lead_mask, generator) if self.cfg.augment else x  # (B, 12, L)
        latent2 = self.forward_encoder(x2, lead_mask, mask2)                   # (B, 12, 1 + K, D)
        z1 = self.projector(SiTEncoder.pool(latent, lead_mask))               # (B, projection_dim)
        z2 = self.projector(SiTEncoder.pool(latent2, lead_mask))              # (B, projection_dim)
        groups = record_group if self.cfg.positives == "record" else None
        return nt_xent(z1, z2, self.cfg.temperature, groups)

    def _check_window(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.cfg.window_samples:
            raise ValueError(f"windows of {x.shape[-1]} samples; this model is built for {self.cfg.window_samples}")

    def forward(self, x: torch.Tensor, lead_mask: torch.Tensor, record_group: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> CRMAEOutput:
        """x (B, 12, L) conditioned inputs, lead_mask (B, 12) bool, record_group (B,) int64 -> the loss terms and the MAE view."""
        self._check_window(x)
        if self.training and self.cfg.lead_dropout > 0:
            x, lead_mask = self.drop_leads(x, lead_mask, generator)           # (B, 12, L), (B, 12)
        mask = self.random_masking(lead_mask, generator)                      # (B, 12, N), True = hidden
        latent = self.forward_encoder(x, lead_mask, mask)                      # (B, 12, 1 + K, D)
        pred = self.forward_decoder(latent, lead_mask, mask)                   # (B, 12, N, P)
        target = self.reconstruction_target(x, lead_mask)                      # (B, 12, N, P)
        recon_loss = self.forward_loss(target, pred, mask, lead_mask)          # scalar
        if self.projector is None:  # plain MAE: the loss is the reconstruction itself
            terms = {"recon_loss": recon_loss, "contrastive_loss": torch.zeros_like(recon_loss)}
            return CRMAEOutput(recon_loss, terms, pred, mask, target)
        terms = {"recon_loss": recon_loss,
                 "contrastive_loss": self.forward_contrastive(x, lead_mask, latent, record_group, generator)}
        loss = sum(self.loss_weights[name] * term for name, term in terms.items())
        return CRMAEOutput(loss, terms, pred, mask, target)

    def embed(self, x: torch.Tensor, lead_mask: torch.Tensor) -> torch.Tensor:
        return self.encoder.embed(x, lead_mask)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, lead_mask: torch.Tensor,
                    generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """A masked reconstruction in input units, for plots: (signal (B, 12, L), hidden-and-present (B, 12, L) bool).

        With norm_target the model predicts standardised patches; they are mapped back with each true
        patch's own mean and spread (as MAE's visualisation does), so the plot shows the waveform shape.
        """
        self._check_window(x)
        mask = self.random_masking(lead_mask, generator)
        pred = self.forward_decoder(self.forward_encoder(x, lead_mask, mask), lead_mask, mask).float()
        if self.cfg.norm_target:
            patches = torch.where(lead_mask[:, :, None, None], self.patchify(x).float(),
                                  torch.zeros((), device=x.device))
            mean = patches.mean(dim=-1, keepdim=True)
            var = patches.var(dim=-1, keepdim=True, correction=0)
            pred = pred * torch.sqrt(var + _TARGET_EPS) + mean
        pred = pred * lead_mask[:, :, None, None]
        hidden = (mask & lead_mask[:, :, None]).repeat_interleave(self.cfg.patch_size, dim=-1)
        return self.unpatchify(pred), hidden
