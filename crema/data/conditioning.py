"""Input conditioning: what a window goes through between the dataset (raw mV) and the model.

Storage stays raw so that one dataset serves every recipe; the recipe (:class:`crema.config.InputConditioning`)
belongs to the model and travels in its config, so an encoder's embeddings and fine-tuning see inputs
conditioned exactly as in its pretraining. Steps, in order: a zero-phase Butterworth band-pass (baseline
wander below ``highpass_hz``, noise above ``lowpass_hz``) and optional notch, then scaling (per-lead
standardisation by default), then clipping. Missing leads stay exactly zero throughout.
"""

from __future__ import annotations

import functools

import numpy as np
from scipy import signal as sps

from crema.config import InputConditioning

_FILTER_ORDER = 2  # per direction; sosfiltfilt doubles it, with no phase shift to distort the QRS


@functools.lru_cache(maxsize=32)
def _filters(highpass_hz: float | None, lowpass_hz: float | None, notch_hz: float | None,
             fs: float) -> tuple[np.ndarray, ...]:
    """The second-order sections of the band-pass and notch at `fs`; a low-pass at or above Nyquist is left out."""
    nyquist = fs / 2
    low = lowpass_hz if lowpass_hz and lowpass_hz < nyquist else None
    sections = []
    if highpass_hz and low:
        sections.append(sps.butter(_FILTER_ORDER, [highpass_hz, low], btype="bandpass", fs=fs, output="sos"))
    elif highpass_hz:
        sections.append(sps.butter(_FILTER_ORDER, highpass_hz, btype="highpass", fs=fs, output="sos"))
    elif low:
        sections.append(sps.butter(_FILTER_ORDER, low, btype="lowpass", fs=fs, output="sos"))
    if notch_hz and notch_hz < nyquist:
        sections.append(sps.tf2sos(*sps.iirnotch(notch_hz, Q=30.0, fs=fs)))
    return tuple(sections)


def condition(x: np.ndarray, lead_mask: np.ndarray, fs: float, cfg: InputConditioning) -> np.ndarray:
    """(B, 12, L) mV windows -> (B, 12, L) float32 model inputs, per `cfg`; lead_mask (B, 12) bool."""
    out = np.asarray(x, dtype=np.float64)
    for sos in _filters(cfg.highpass_hz, cfg.lowpass_hz, cfg.notch_hz, float(fs)):
        out = sps.sosfiltfilt(sos, out, axis=-1)
    if cfg.scale == "lead":
        out = (out - out.mean(axis=-1, keepdims=True)) / np.maximum(out.std(axis=-1, keepdims=True), cfg.std_floor_mv)
    elif cfg.scale == "record":
        present = lead_mask[:, :, None]
        n = np.maximum(present.sum(axis=1, keepdims=True) * out.shape[-1], 1)
        mean = (out * present).sum(axis=(1, 2), keepdims=True) / n
        std = np.sqrt((((out - mean) * present) ** 2).sum(axis=(1, 2), keepdims=True) / n)
        out = (out - mean) / np.maximum(std, cfg.std_floor_mv)
    else:
        out = out / cfg.fixed_mv
    if cfg.clip is not None:
        out = np.clip(out, -cfg.clip, cfg.clip)
    return np.where(lead_mask[:, :, None], out, 0.0).astype(np.float32)
