"""The feature floor: nine hand-made numbers per lead, the baseline every pretrained encoder has to beat.

A task lists it as an encoder (``init: features``): its "embedding" of a window is these 108 numbers, probed like
any encoder's, so the results table and the cross-hospital table read it beside CR-MAE and a random init.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from scipy import signal as sps

from crema.data.schema import decode_signals

BANDS_HZ = ((0.5, 5.0), (5.0, 15.0), (15.0, 40.0))
FEATURES_PER_LEAD = 6 + len(BANDS_HZ)
# What the embeddings cache digests in place of an encoder's weights: a new formula needs a new tag.
FEATURES_ID = b"crema hand-made features: mean std min max ptp slope, log Welch power 0.5-5 5-15 15-40 Hz; v1"


def hand_made_features(signal: np.ndarray, fs: float) -> np.ndarray:
    """(n, leads * 9) float32 of (n, leads, samples) mV: per lead the mean, std, min, max, peak-to-peak, mean
    |slope| per sample, and the log Welch power in 0.5-5, 5-15 and 15-40 Hz (2.56-s segments at any rate)."""
    raw = np.asarray(signal, dtype=np.float64)
    slope = np.abs(np.diff(raw, axis=-1)).mean(axis=-1)
    freqs, power = sps.welch(raw, fs=fs, nperseg=min(raw.shape[-1], int(round(2.56 * fs))), axis=-1)
    bands = [np.log(power[..., (freqs >= lo) & (freqs < hi)].sum(axis=-1) + 1e-8) for lo, hi in BANDS_HZ]
    features = [raw.mean(-1), raw.std(-1), raw.min(-1), raw.max(-1), np.ptp(raw, axis=-1), slope, *bands]
    return np.stack(features, axis=-1).reshape(len(raw), -1).astype(np.float32)


def window_features(windows: pa.Table) -> np.ndarray:
    """(n, 12 * 9) features of a table holding `signal` (mV) and `fs`, in row order; each rate on its own."""
    signals = decode_signals(windows)
    rates = windows.column("fs").to_numpy(zero_copy_only=False)
    out = np.zeros((len(signals), signals.shape[1] * FEATURES_PER_LEAD), dtype=np.float32)
    for fs in np.unique(rates):
        rows = np.flatnonzero(rates == fs)
        out[rows] = hand_made_features(signals[rows], float(fs))
    return out
