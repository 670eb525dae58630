"""The CREMA model and CR-MAE loss on CPU: shapes, masking, what missing leads may (not) touch, the
lambda = 0 reduction to MAE, the encoder artifact, optimiser groups, the FLOP estimate, and training."""

from __future__ import annotations

import json
import math

import pytest
import torch
from pydantic import ValidationError
from safetensors import safe_open
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from crema.config import ModelConfig
from crema.model.masking import crop_masking, num_visible_patches
from crema.model.network import CREMA, SiTEncoder
from crema.train.artifacts import load_encoder, save_encoder
from crema.train.flops import model_flops_per_sample
from crema.train.optim import param_groups_lrd

torch.set_num_threads(2)

SMALL = dict(window_samples=1000, patch_size=50, embed_dim=32, depth=2, num_heads=2,
             decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)
MISSING = ((0, 2), (0, 7), (3, 11))  # (sample, lead) pairs that were not recorded


def small_config(**overrides) -> ModelConfig:
    return ModelConfig(**{**SMALL, **overrides})


def ecg_like(batch: int, samples: int, fs: int = 100, seed: int = 0) -> torch.Tensor:
    """Beats as gaussian bumps (P, QRS, T) at a per-window heart rate, lead-specific gains, baseline, noise."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(samples) / fs
    rate = 0.8 + 0.8 * torch.rand(batch, 1, 1, generator=g)  # beats per second
    phase = torch.remainder(t * rate + torch.rand(batch, 1, 1, generator=g), 1.0)
    gains = 0.5 + torch.rand(batch, 12, 3, generator=g) * torch.tensor([0.2, 1.5, 0.4])
    waves = [(0.2, 0.03), (0.4, 0.012), (0.7, 0.05)]
    x = sum(gains[:, :, i:i + 1] * torch.exp(-((phase - c) ** 2) / (2 * w ** 2)) for i, (c, w) in enumerate(waves))
    x = x + 0.1 * torch.sin(2 * math.pi * 0.3 * t + torch.rand(batch, 12, 1, generator=g) * 6)
    return x + 0.01 * torch.randn(batch, 12, samples, generator=g)


def batch_with_missing_leads(batch: int = 4, cfg: ModelConfig | None = None):
    cfg = cfg or small_config()
    x = ecg_like(batch, cfg.window_samples)
    lead_mask = torch.ones(batch, 12, dtype=torch.bool)
    for sample, lead in MISSING:
        lead_mask[sample, lead] = False
        x[sample, lead] = 0.0
    return x, lead_mask


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------- config

def test_presets_resolve_and_explicit_sizes_override_them():
    base = ModelConfig(size="base").resolved()
    assert (base.embed_dim, base.depth, base.num_heads) == (768, 12, 12)
    tiny = ModelConfig(size="tiny", depth=6).resolved()
    assert tiny.depth == 6 and tiny.embed_dim == ModelConfig(size="tiny").resolved().embed_dim
    assert ModelConfig().num_patches == 5000 // 125


@pytest.mark.parametrize("bad", [dict(patch_size=120), dict(embed_dim=100, num_heads=3),
                                 dict(decoder_embed_dim=100, decoder_num_heads=3), dict(mask_ratio=1.0),
                                 dict(unknown_field=1)])
def test_invalid_configs_are_refused(bad):
    with pytest.raises(ValidationError):
        ModelConfig(**bad)


# ---------------------------------------------------------------------------------------- shapes

@pytest.mark.parametrize("variant", [dict(), dict(conv_stem=True, pos_embed="learned", mask_mode="time"),
                                     dict(decoder="self_attention")])
def test_output_shapes(variant):
    cfg = small_config(**variant)
    model = CREMA(cfg)
    x, lead_mask = batch_with_missing_leads(cfg=cfg)
    n, p, k = cfg.num_patches, cfg.patch_size, num_visible_patches(cfg)
    out = model(x, lead_mask)
    assert out.pred.shape == out.target.shape == (4, 12, n, p)
    assert out.mask.shape == (4, 12, n) and out.mask.dtype == torch.bool
    assert out.loss.shape == out.terms["recon_loss"].shape == out.terms["contrastive_loss"].shape == ()
    assert model.forward_encoder(x, lead_mask, out.mask).shape == (4, 12, 1 + k, cfg.embed_dim)
    assert model.forward_encoder(x, lead_mask).shape == (4, 12, 1 + n, cfg.embed_dim)
    assert model.embed(x, lead_mask).shape == (4, 2 * cfg.embed_dim)
    recon, hidden = model.reconstruct(x, lead_mask)
    assert recon.shape == hidden.shape == x.shape and hidden.dtype == torch.bool
    assert torch.isfinite(recon).all() and (recon[0, 2] == 0).all()


def test_patchify_unpatchify_round_trip():
    model = CREMA(small_config(contrastive_weight=0))
    x = torch.randn(3, 12, 1000)
    patches = model.patchify(x)
    assert patches.shape == (3, 12, 20, 50)
    assert torch.equal(patches[1, 4, 7], x[1, 4, 350:400])
    assert torch.equal(model.unpatchify(patches), x)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        model.patchify(torch.randn(1, 12, 1010))


# --------------------------------------------------------------------------------------- masking

@pytest.mark.parametrize("mode", ["independent", "time"])
def test_masking_invariants(mode):
    cfg = small_config(mask_mode=mode, mask_ratio=0.7)
    model = CREMA(cfg)
    _, lead_mask = batch_with_missing_leads(batch=6)
    mask = model.random_masking(lead_mask, gen(0))
    n, k = cfg.num_patches, num_visible_patches(cfg)
    assert (n, k) == (20, 6)
    visible = ~mask
    assert (visible.sum(-1)[lead_mask] == k).all()
    assert (mask.sum(-1)[lead_mask] == n - k).all() and (n - k) / n == pytest.approx(0.7)  # in every lead
    assert not visible[~lead_mask].any()  # a missing lead never shows a patch to the encoder
    leads_of_0 = visible[0, lead_mask[0]]
    if mode == "time":
        assert (leads_of_0 == leads_of_0[0]).all()
    else:
        assert not (leads_of_0 == leads_of_0[0]).all()
    assert not torch.equal(visible[4], visible[5])  # samples are masked independently
    assert torch.equal(mask, model.random_masking(lead_mask, gen(0)))
    assert not torch.equal(mask, model.random_masking(lead_mask, gen(1)))


@pytest.mark.parametrize("mode", ["independent", "time"])
def test_crop_view_shows_k_patches_inside_one_crop_in_time(mode):
    cfg = small_config(mask_mode=mode, mask_ratio=0.75, contrastive_view="crop", crop_fraction=0.5)
    _, lead_mask = batch_with_missing_leads(batch=64)
    visible = ~crop_masking(cfg, lead_mask, gen(0))                            # (64, 12, 20)
    k = num_visible_patches(cfg)
    assert (visible.sum(-1)[lead_mask] == k).all() and not visible[~lead_mask].any()
    seen = visible.any(dim=1)                                                  # (64, 20): patches any lead shows
    first = seen.float().argmax(-1)
    last = cfg.num_patches - 1 - seen.flip(-1).float().argmax(-1)
    assert (last - first < 10).all()  # every view lies within one crop of half the window's 20 patches
    assert len(set(first.tolist())) > 3  # and the crops start at different times
    out = CREMA(small_config(contrastive_view="crop", contrastive_weight=0.5))(*batch_with_missing_leads())
    assert torch.isfinite(out.terms["contrastive_loss"]) and out.terms["contrastive_loss"] > 0


def test_loss_scores_hidden_patches_of_present_leads_only():
    model = CREMA(small_config(contrastive_weight=0))
    x, lead_mask = batch_with_missing_leads()
    out = model(x, lead_mask, generator=gen(0))

    def loss_with_pred_changed_at(where: torch.Tensor) -> torch.Tensor:
        pred = out.pred.detach().clone()
        pred[where] += 5.0
        return model.forward_loss(out.target, pred, out.mask, lead_mask)

    reference = model.forward_loss(out.target, out.pred.detach(), out.mask, lead_mask)
    missing_leads = ~lead_mask[:, :, None].expand_as(out.mask)
    visible_present = ~out.mask & lead_mask[:, :, None]
    hidden_present = out.mask & lead_mask[:, :, None]
    assert torch.equal(loss_with_pred_changed_at(missing_leads), reference)
    assert torch.equal(loss_with_pred_changed_at(visible_present), reference)
    assert loss_with_pred_changed_at(hidden_present) > reference + 1.0


# --------------------------------------------------------------------------------------- CR-MAE

def test_lambda_zero_is_exactly_the_plain_mae_loss():
    x, lead_mask = batch_with_missing_leads()
    mae = CREMA(small_config(contrastive_weight=0))
    out = mae(x, lead_mask, generator=gen(3))
    assert out.terms["contrastive_loss"].item() == 0.0 and out.loss is out.terms["recon_loss"]

    # The same computation written out: mask, encode visible, decode, MSE on standardised hidden patches.
    mask = mae.random_masking(lead_mask, gen(3))
    pred = mae.decoder(mae.encoder(x, lead_mask, keep_mask=~mask), lead_mask, mask)
    patches = x.reshape(4, 12, 20, 50)
    target = (patches - patches.mean(-1, keepdim=True)) / (patches.var(-1, keepdim=True, correction=0) + 1e-6).sqrt()
    scored = mask & lead_mask[:, :, None]
    explicit = ((pred - target) ** 2).mean(-1)[scored].mean()
    torch.testing.assert_close(out.loss, explicit, rtol=1e-6, atol=0)

    # The second view is never drawn: the random stream advances exactly as far as one masking.
    g_model, g_masking = gen(3), gen(3)
    mae(x, lead_mask, generator=g_model)
    mae.random_masking(lead_mask, g_masking)
    assert torch.equal(g_model.get_state(), g_masking.get_state())

    # A CR-MAE with the same weights reconstructs the same first view: same reconstruction term.
    crmae = CREMA(small_config(contrastive_weight=0.5))
    missing, unexpected = crmae.load_state_dict(mae.state_dict(), strict=False)
    assert not unexpected and all(name.startswith("projector.") for name in missing)
    torch.manual_seed(11)
    both = crmae(x, lead_mask)
    torch.manual_seed(11)
    only_mae = mae(x, lead_mask)
    assert torch.equal(both.terms["recon_loss"], only_mae.loss)
    assert both.terms["contrastive_loss"] > 0
    torch.testing.assert_close(both.loss, both.terms["recon_loss"] + 0.5 * both.terms["contrastive_loss"])


def test_missing_lead_values_reach_neither_loss_nor_gradient():
    model = CREMA(small_config(contrastive_weight=0.3, augment=True, conv_stem=True))
    x, lead_mask = batch_with_missing_leads()
    junk = x.clone()
    junk[~lead_mask] = 100 * torch.randn(int((~lead_mask).sum()), x.shape[-1])

    def loss_and_grads(signal: torch.Tensor):
        signal = signal.clone().requires_grad_(True)
        model.zero_grad()
        out = model(signal, lead_mask, generator=gen(5))
        out.loss.backward()
        return out, signal.grad, {n: p.grad.clone() for n, p in model.named_parameters()}

    clean_out, clean_x_grad, clean_grads = loss_and_grads(x)
    junk_out, junk_x_grad, junk_grads = loss_and_grads(junk)
    assert torch.equal(clean_out.terms["recon_loss"], junk_out.terms["recon_loss"])
    assert torch.equal(clean_out.terms["contrastive_loss"], junk_out.terms["contrastive_loss"])
    assert (junk_x_grad[~lead_mask] == 0).all() and (junk_x_grad[lead_mask] != 0).any()
    for name, grad in clean_grads.items():
        assert torch.equal(grad, junk_grads[name]), name


def test_lead_dropout_shows_some_windows_as_one_lead_set_and_only_in_training():
    model = CREMA(small_config(lead_dropout=0.5, lead_dropout_sets=["limb6", "I"]))
    x, lead_mask = batch_with_missing_leads(batch=64)
    dropped_x, kept = model.drop_leads(x, lead_mask, gen(3))
    limb6, lead_one = torch.zeros(12, dtype=torch.bool), torch.zeros(12, dtype=torch.bool)
    limb6[:6], lead_one[0] = True, True
    changed = (kept != lead_mask).any(dim=1)
    assert 16 < int(changed.sum()) < 48  # about half the windows
    for window in torch.nonzero(changed).flatten():
        assert torch.equal(kept[window], lead_mask[window] & limb6) or torch.equal(kept[window], lead_mask[window] & lead_one)
    assert (kept <= lead_mask).all() and (dropped_x[~kept] == 0).all() and torch.equal(dropped_x[kept], x[kept])
    # in training the dropped leads are absent: none of their patches is visible to the encoder
    model.train()
    out = model(x, lead_mask, generator=gen(4))
    visible_leads = (~out.mask).any(dim=2)
    assert torch.isfinite(out.loss) and (visible_leads <= lead_mask).all() and (visible_leads != lead_mask).any()
    model.eval()  # and out of training, every present lead is
    assert torch.equal((~model(x, lead_mask, generator=gen(4)).mask).any(dim=2), lead_mask)
    with pytest.raises(ValidationError, match="lead set"):
        small_config(lead_dropout_sets=["V7"])


@pytest.mark.parametrize("mode", ["embed", "masked"])
def test_missing_lead_tokens_are_never_attended(mode):
    # Zero-filled samples still make tokens (lead and position embeddings); attention must skip them.
    model = CREMA(small_config())
    x, lead_mask = batch_with_missing_leads()
    mask = model.random_masking(lead_mask, gen(0)) if mode == "masked" else None
    before = model.forward_encoder(x, lead_mask, mask)
    with torch.no_grad():
        model.encoder.lead_embed[2] += 1.0  # lead III: missing in sample 0 only
    after = model.forward_encoder(x, lead_mask, mask)
    assert torch.equal(after[0][lead_mask[0]], before[0][lead_mask[0]])
    assert not torch.allclose(after[1], before[1])


@pytest.mark.parametrize("conv_stem", [False, True])
def test_hidden_patches_do_not_leak_into_the_encoder(conv_stem):
    model = CREMA(small_config(conv_stem=conv_stem))
    x, lead_mask = batch_with_missing_leads()
    mask = model.random_masking(lead_mask, gen(0))
    latent = model.forward_encoder(x, lead_mask, mask)
    hidden_samples = mask.repeat_interleave(50, dim=-1)
    changed = torch.where(hidden_samples, torch.randn_like(x), x)
    assert torch.equal(model.forward_encoder(changed, lead_mask, mask), latent)
    visible_changed = torch.where(hidden_samples, x, x + 0.5)
    assert not torch.allclose(model.forward_encoder(visible_changed, lead_mask, mask), latent)


@pytest.mark.parametrize("decoder", ["cross_attention", "self_attention"])
def test_decoder_predicts_hidden_patches_from_visible_ones_only(decoder):
    # Whatever the hidden samples hold, the predictions (of every patch) are the same: the decoder
    # sees the encoded visible tokens and nothing else of the signal.
    model = CREMA(small_config(decoder=decoder))
    x, lead_mask = batch_with_missing_leads()
    mask = model.random_masking(lead_mask, gen(1))
    pred = model.forward_decoder(model.forward_encoder(x, lead_mask, mask), lead_mask, mask)
    hidden_samples = mask.repeat_interleave(50, dim=-1)
    changed = torch.where(hidden_samples, torch.randn_like(x), x)
    torch.testing.assert_close(model.forward_decoder(model.forward_encoder(changed, lead_mask, mask), lead_mask, mask),
                               pred, rtol=0, atol=1e-6)
    scored = mask & lead_mask[:, :, None]
    assert (pred[scored].abs().sum(-1) > 0).all()  # every scored patch gets a prediction
    if decoder == "cross_attention":
        assert (pred[~mask] == 0).all()  # nothing is predicted at the visible patches


def test_a_window_without_any_lead_stays_finite():
    model = CREMA(small_config())
    x, lead_mask = batch_with_missing_leads()
    lead_mask[1] = False
    out = model(x, lead_mask)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert torch.isfinite(model.embed(x, lead_mask)).all()


def test_record_positives_need_group_ids():
    model = CREMA(small_config(positives="record"))
    x, lead_mask = batch_with_missing_leads()
    with pytest.raises(ValueError, match="record_group"):
        model(x, lead_mask)
    out = model(x, lead_mask, record_group=torch.tensor([7, 7, 8, 9]))
    assert torch.isfinite(out.terms["contrastive_loss"]) and out.terms["contrastive_loss"] > 0


def test_bf16_autocast_gives_a_finite_float32_loss():
    model = CREMA(small_config())
    x, lead_mask = batch_with_missing_leads()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, lead_mask)
    out.loss.backward()
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


# -------------------------------------------------------------------------------- representation

def test_embed_is_deterministic_and_per_window():
    model = CREMA(small_config())
    x, lead_mask = batch_with_missing_leads()
    model.train()  # no dropout anywhere and drop_path=0: training mode must not add randomness
    first = model.embed(x, lead_mask)
    assert first.shape == (4, model.encoder.representation_dim) == (4, 2 * 32)
    assert torch.equal(first, model.embed(x, lead_mask))
    alone = model.embed(x[:1], lead_mask[:1])
    torch.testing.assert_close(alone, first[:1], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(first[0], first[1])


def test_representation_is_the_present_leads_sep_and_patch_means():
    model = CREMA(small_config()).eval()
    x, lead_mask = batch_with_missing_leads()
    with torch.no_grad():
        tokens = model.forward_encoder(x, lead_mask)                          # (B, 12, 1 + N, D)
        z = model.embed(x, lead_mask)
        for i in range(len(x)):
            present = tokens[i][lead_mask[i]]                                  # (leads, 1 + N, D)
            expected = torch.cat([present[:, 0].mean(0), present[:, 1:].mean(1).mean(0)])
            torch.testing.assert_close(z[i], expected, rtol=1e-5, atol=1e-6)
        # A missing lead's samples (and so its tokens) never reach the representation.
        changed = torch.where(lead_mask[:, :, None], x, torch.randn_like(x))
        assert torch.equal(model.embed(changed, lead_mask), z)


@pytest.mark.parametrize("variant", [dict(), dict(conv_stem=True, pos_embed="learned", drop_path=0.1)])
def test_encoder_artifact_round_trip(tmp_path, variant):
    model = CREMA(small_config(**variant))
    with torch.no_grad():  # make the weights differ from any fresh initialisation
        for p in model.encoder.parameters():
            p.add_(0.01 * torch.randn_like(p))
    path = tmp_path / "encoder.safetensors"
    save_encoder(model, path)
    # A safetensors file: the weights as plain tensors, the config as JSON metadata, no pickle.
    with safe_open(str(path), framework="pt") as f:
        config = json.loads(f.metadata()["config"])
        names = list(f.keys())
    assert config["embed_dim"] == 32 and config["conv_stem"] == variant.get("conv_stem", False)
    assert names and not any(name.startswith(("decoder", "projector")) for name in names)

    encoder = load_encoder(path)
    assert isinstance(encoder, SiTEncoder)
    x, lead_mask = batch_with_missing_leads()
    model.eval()
    encoder.eval()
    assert torch.equal(encoder.embed(x, lead_mask), model.embed(x, lead_mask))
    save_encoder(encoder, tmp_path / "again.safetensors")
    assert torch.equal(load_encoder(tmp_path / "again.safetensors").embed(x, lead_mask), model.embed(x, lead_mask))


# ------------------------------------------------------------------------------ optimiser, FLOPs

def test_layer_wise_lr_decay_groups():
    encoder = CREMA(small_config(depth=3, pos_embed="learned")).encoder
    groups = param_groups_lrd(encoder, weight_decay=0.05, layer_decay=0.5)
    grouped = [id(p) for g in groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in encoder.parameters())
    scale_of = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    decay_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert scale_of[id(encoder.norm.weight)] == 1.0
    assert scale_of[id(encoder.blocks[2].mlp[0].weight)] == 0.5
    assert scale_of[id(encoder.blocks[0].attn.qkv.weight)] == 0.5 ** 3
    assert scale_of[id(encoder.patch_embed.proj.weight)] == scale_of[id(encoder.pos_embed)] == 0.5 ** 4
    assert decay_of[id(encoder.blocks[1].attn.qkv.weight)] == 0.05
    for no_decay in (encoder.blocks[1].attn.qkv.bias, encoder.norm.weight, encoder.lead_embed, encoder.sep_token,
                     encoder.pos_embed):
        assert decay_of[id(no_decay)] == 0.0
    torch.optim.AdamW(groups, lr=1e-3)


@pytest.mark.parametrize("variant", [dict(contrastive_weight=0), dict(contrastive_weight=0.1, conv_stem=True),
                                     dict(contrastive_weight=0, decoder="self_attention")])
def test_flop_estimate_matches_counted_flops(variant):
    cfg = small_config(**variant, embed_dim=64, decoder_embed_dim=64, num_heads=4, decoder_num_heads=4)
    model = CREMA(cfg)
    batch = 4
    x = ecg_like(batch, cfg.window_samples)
    lead_mask = torch.ones(batch, 12, dtype=torch.bool)
    counter = FlopCounterMode(display=False)
    # The math backend decomposes attention into matmuls the counter sees.
    with sdpa_kernel(SDPBackend.MATH), counter:
        model(x, lead_mask).loss.backward()
    counted = counter.get_total_flops() / batch
    estimate = model_flops_per_sample(cfg)
    assert abs(estimate - counted) / counted < 0.02, (estimate, counted)


# -------------------------------------------------------------------------------------- training

def test_loss_decreases_on_a_small_batch():
    torch.manual_seed(0)
    # Raw-mV targets: with standardised ones the first 30 steps only reach the trivial zero predictor.
    cfg = small_config(norm_target=False)
    model = CREMA(cfg)
    x, lead_mask = batch_with_missing_leads(batch=16, cfg=cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    recon, contrastive = [], []
    for _ in range(30):
        out = model(x, lead_mask)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        recon.append(out.terms["recon_loss"].item())
        contrastive.append(out.terms["contrastive_loss"].item())
    first, last = sum(recon[:5]) / 5, sum(recon[-5:]) / 5
    assert last < 0.3 * first, recon
    assert sum(contrastive[-5:]) < sum(contrastive[:5]), contrastive

