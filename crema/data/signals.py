"""Canonical 12-lead ECG normalisation: lead order, units, sampling rate, filtering, windows.

Every reader hands a :class:`RawRecord` (whatever leads, units and rate the file had) to
:func:`to_canonical`, which returns a :class:`CanonicalRecord`: 12 leads in the fixed order
:data:`LEADS`, in millivolts, at the target rate, with a lead mask saying which leads hold signal.
:func:`windows` then cuts that into fixed-length windows. Nothing here knows about Ray or files.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np
from scipy import signal as sps

LEADS: tuple[str, ...] = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")
N_LEADS = len(LEADS)
LEAD_INDEX = {name: i for i, name in enumerate(LEADS)}
# Lead sets by name (a task's `lead_sets`); any lead, or leads joined by "+", is one too.
ALL_LEADS = "all"
LEAD_SETS = {ALL_LEADS: LEADS, "limb6": ("I", "II", "III", "aVR", "aVL", "aVF")}  # limb6: six-electrode devices

# Lower-cased, whitespace-free spellings seen in WFDB headers, XML exports and CSV columns.
# Deliberately absent: "MLII"/"MLI"/"MLIII" (the modified limb leads of ambulatory Holter recordings,
# Mason-Likar placement). Their morphology differs from the standard limb leads, so they are treated
# as non-standard channels and dropped unless a source maps them explicitly (`lead_aliases: {MLII: II}`).
_ALIASES: dict[str, str] = {
    "i": "I", "ii": "II", "iii": "III",
    "lead i": "I", "lead ii": "II", "lead iii": "III",
    "avr": "aVR", "avl": "aVL", "avf": "aVF",
    "-avr": "-aVR",
    **{f"v{k}": f"V{k}" for k in range(1, 7)},
    **{f"lead v{k}": f"V{k}" for k in range(1, 7)},
}

UNIT_TO_MV: dict[str, float] = {
    "v": 1e3, "mv": 1.0, "uv": 1e-3, "µv": 1e-3, "μv": 1e-3, "nv": 1e-6,
    "normalized": 1.0, "normalised": 1.0,  # declared normalised amplitudes: stored as they are (see below)
}
# `units: normalized` in a source: amplitudes z-scored or scaled per lead, not mV. Kept as they are, exempt
# from the mV plausibility check (absurd_amplitude), flagged normalised_amplitude, and the rows say so.
UNITS_MV, UNITS_NORMALIZED = "mV", "normalized"


def lead_set_leads(name: str) -> tuple[str, ...]:
    """The leads of a lead set: a LEAD_SETS name, a lead (``I``), or leads joined by "+" (``I+II+V2``)."""
    if name in LEAD_SETS:
        return LEAD_SETS[name]
    leads = tuple(name.split("+"))
    unknown = [lead for lead in leads if lead not in LEAD_INDEX]
    if unknown or len(set(leads)) != len(leads):
        raise ValueError(f"lead set {name!r}: neither {' nor '.join(LEAD_SETS)}, nor leads of {', '.join(LEADS)} "
                         f"joined by '+' (unknown: {unknown})")
    return leads


def is_normalized_unit(unit: str | None) -> bool:
    return bool(unit) and unit.strip().lower() in ("normalized", "normalised")

# Above this absolute amplitude (mV) a lead is physiologically absurd: a surface ECG is a few mV,
# pacing spikes and saturated amplifiers stay well under 50 mV.
ABSURD_AMPLITUDE_MV = 50.0
# Sampling rates outside this range are not a 12-lead ECG (a 1 Hz "record" cut into windows is a broken header).
MIN_FS, MAX_FS = 50.0, 10_000.0
# A lead holding one of its two extreme values in this share of its samples or more is clipped (saturated ADC).
SATURATED_FRACTION = 0.05

# Per-lead quality codes (the `lead_quality` column): only "ok" and "derived" leads are True in `lead_mask`.
LEAD_OK, LEAD_DERIVED, LEAD_MISSING = "ok", "derived", "missing"
LEAD_FLAT, LEAD_SATURATED, LEAD_DUPLICATE = "flat", "saturated", "duplicate"


class RecordRejected(ValueError):
    """A record that cannot become canonical windows. `reason` is a short stable code for the manifest."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass
class RawRecord:
    """A record as a reader found it: one row per channel, in the channel's own unit."""

    record_id: str
    signal: np.ndarray  # (n_channels, n_samples), float
    fs: float
    channel_names: list[str]
    units: list[str]
    content_hash: str = ""
    meta: dict = field(default_factory=dict)


@dataclass
class CanonicalRecord:
    record_id: str
    signal: np.ndarray  # (12, n_samples) float32, mV
    fs: int
    lead_mask: np.ndarray  # (12,) bool: True where the lead holds recorded or derived signal
    derived_mask: np.ndarray  # (12,) bool: True where the lead was derived from I and II
    lead_quality: list[str] = field(default_factory=lambda: [LEAD_OK] * N_LEADS)  # one code per lead
    flags: list[str] = field(default_factory=list)  # record-level notes, e.g. "normalised_amplitude"


def canonical_lead_name(name: str, aliases: dict[str, str] | None = None) -> str | None:
    """Map a channel label to a canonical lead name, or None for a channel we drop."""
    key = re.sub(r"\s+", " ", name.strip()).lower()
    if aliases:
        for alias, target in aliases.items():
            if re.sub(r"\s+", " ", alias.strip()).lower() == key:
                return target if target in LEAD_INDEX else None
    return _ALIASES.get(key) or _ALIASES.get(key.replace(" ", ""))


def unit_scale_to_mv(unit: str) -> float:
    key = unit.strip().lower().replace("micro", "u")
    if key in UNIT_TO_MV:
        return UNIT_TO_MV[key]
    raise RecordRejected("unknown_unit", f"cannot convert unit {unit!r} to mV")


def select_leads(raw: RawRecord, aliases: dict[str, str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Place the raw channels into the 12 canonical slots (in mV). Returns (signal, present mask)."""
    n = raw.signal.shape[1]
    out = np.zeros((N_LEADS, n), dtype=np.float32)  # float32 is finer than any ECG ADC, and half the work
    present = np.zeros(N_LEADS, dtype=bool)
    for row, (name, unit) in enumerate(zip(raw.channel_names, raw.units)):
        lead = canonical_lead_name(name, aliases)
        if lead is None:
            continue  # Frank leads, rhythm strips, annotations, non-standard labels
        sign = 1.0
        if lead == "-aVR":
            lead, sign = "aVR", -1.0
        i = LEAD_INDEX[lead]
        if present[i]:
            continue  # a repeated lead (rhythm strip of II, say): keep the first
        out[i] = sign * raw.signal[row] * unit_scale_to_mv(unit)
        present[i] = True
    return out, present


def derive_limb_leads(sig: np.ndarray, present: np.ndarray) -> np.ndarray:
    """Fill missing III/aVR/aVL/aVF from I and II (Einthoven/Goldberger), in place. Returns the derived mask."""
    derived = np.zeros(N_LEADS, dtype=bool)
    i, ii = LEAD_INDEX["I"], LEAD_INDEX["II"]
    if not (present[i] and present[ii]):
        return derived
    formulas = {
        "III": lambda a, b: b - a,
        "aVR": lambda a, b: -(a + b) / 2,
        "aVL": lambda a, b: a - b / 2,
        "aVF": lambda a, b: b - a / 2,
    }
    for name, formula in formulas.items():
        k = LEAD_INDEX[name]
        if not present[k]:
            sig[k] = formula(sig[i], sig[ii])
            derived[k] = True
    return derived


def resample(sig: np.ndarray, fs_in: float, fs_out: int) -> np.ndarray:
    """Polyphase resampling along the last axis (anti-aliased), exact for rational rate ratios."""
    if abs(fs_in - fs_out) < 1e-9:
        return sig
    ratio = Fraction(fs_out / fs_in).limit_denominator(1000)
    up, down = ratio.numerator, ratio.denominator
    if max(up, down) <= FAST_RESAMPLE_MAX_FACTOR:
        return _resample_blocks(sig, up, down)
    return sps.resample_poly(sig, up, down, axis=-1)


# Fast path of `scipy.signal.resample_poly` for small integer ratios (100 -> 500 Hz, 250 -> 500, 1000 -> 500).
# resample_poly is linear and shifts by `block_out` outputs when its input shifts by `block_in` samples, so
# the whole record is one matrix product: overlapping input blocks (12 leads x blocks, `width` samples each)
# times one (width x block_out) operator built from scipy's own filter (firwin, Kaiser beta 5, half length
# 10 x max(up, down)), alignment and zero padding. Measured per 12-lead record, float32, one core: 100 -> 500 Hz
# scipy's upfirdn 1.76 ms, a per-sample polyphase product 0.55 ms, this 0.16 ms; 1000 -> 500 Hz 3.1, 5.4 and
# 0.45 ms. tests/data/test_signals.py checks it against resample_poly on every shared PTB-XL record and every
# ratio the ingest meets.
FAST_RESAMPLE_MAX_FACTOR = 10


@functools.lru_cache(maxsize=64)
def _block_operator(up: int, down: int, dtype: str) -> tuple[np.ndarray, int, int]:
    """(width x block_out) operator of resample_poly(up, down), the inputs per block, and the first
    input's offset (<= 0) relative to the block's start."""
    max_rate = max(up, down)
    half_len = 10 * max_rate
    h = sps.firwin(2 * half_len + 1, 1.0 / max_rate, window=("kaiser", 5.0)) * up
    pre_pad = down - half_len % down
    h = np.concatenate([np.zeros(pre_pad), h])
    drop = (half_len + pre_pad) // down  # outputs resample_poly discards at the start
    taps = -(-len(h) // up)  # input samples under the filter
    block_in = down * -(-taps // down)  # about one filter length (fastest, measured), a whole number of outputs
    block_out = block_in * up // down
    first = -((len(h) - 1 - drop * down) // up)
    last = ((block_out - 1 + drop) * down) // up
    # Output j of a block takes input i (relative to the block's start) with filter tap (j + drop)·down − i·up.
    tap = (np.arange(block_out)[None, :] + drop) * down - np.arange(first, last + 1)[:, None] * up
    operator = np.where((tap >= 0) & (tap < len(h)), h[np.clip(tap, 0, len(h) - 1)], 0.0)
    return operator.astype(dtype), block_in, first


def _resample_blocks(sig: np.ndarray, up: int, down: int) -> np.ndarray:
    """resample_poly(sig, up, down, axis=-1) as one matrix product over overlapping input blocks."""
    sig = np.asarray(sig, dtype=np.float32 if sig.dtype == np.float32 else np.float64)
    operator, block_in, first = _block_operator(up, down, sig.dtype.str)
    width, block_out = operator.shape
    n = sig.shape[-1]
    n_out = -(-n * up // down)
    n_blocks = -(-n_out // block_out)
    padded = np.zeros(sig.shape[:-1] + ((n_blocks - 1) * block_in + width,), sig.dtype)
    padded[..., -first:-first + n] = sig
    blocks = np.lib.stride_tricks.sliding_window_view(padded, width, axis=-1)[..., ::block_in, :]
    out = np.ascontiguousarray(blocks) @ operator
    return out.reshape(*sig.shape[:-1], -1)[..., :n_out]


def bandpass(sig: np.ndarray, fs: float, low_hz: float | None, high_hz: float | None,
             notch_hz: float | None) -> np.ndarray:
    """Zero-phase Butterworth band-pass (second-order sections) and an optional mains notch."""
    nyquist = fs / 2
    if low_hz or high_hz:
        if low_hz and high_hz and high_hz < nyquist:
            sos = sps.butter(4, [low_hz, high_hz], btype="bandpass", fs=fs, output="sos")
        elif low_hz:
            sos = sps.butter(4, low_hz, btype="highpass", fs=fs, output="sos")
        else:
            sos = sps.butter(4, min(high_hz, 0.99 * nyquist), btype="lowpass", fs=fs, output="sos")
        sig = sps.sosfiltfilt(sos, sig, axis=-1)
    if notch_hz and notch_hz < nyquist:
        b, a = sps.iirnotch(notch_hz, Q=30.0, fs=fs)
        sig = sps.filtfilt(b, a, sig, axis=-1)
    return sig


@dataclass(frozen=True)
class NormaliseOptions:
    target_fs: int = 500
    min_leads: int = 8
    lead_aliases: dict[str, str] | None = None
    filter_low_hz: float | None = None
    filter_high_hz: float | None = None
    notch_hz: float | None = None


def to_canonical(raw: RawRecord, opts: NormaliseOptions) -> CanonicalRecord:
    """Lead order, units, derivation, rate, filter: the whole normalisation of one record."""
    if raw.signal.ndim != 2 or raw.signal.shape[0] != len(raw.channel_names):
        raise RecordRejected("inconsistent_shape",
                             f"signal {raw.signal.shape} vs {len(raw.channel_names)} channel names")
    if not np.isfinite(raw.fs) or not MIN_FS <= raw.fs <= MAX_FS:
        raise RecordRejected("bad_sampling_rate", f"fs={raw.fs} Hz, outside {MIN_FS:g}-{MAX_FS:g} Hz")
    sig, present = select_leads(raw, opts.lead_aliases)
    if present.sum() == 0:
        raise RecordRejected("no_standard_leads", f"channels {raw.channel_names} hold none of {LEADS}")
    quality = lead_quality(sig, present)
    present &= np.array([q == LEAD_OK for q in quality])
    if not present.any():
        if all(q in (LEAD_FLAT, LEAD_MISSING) for q in quality):
            raise RecordRejected("flat_signal", "every present lead is constant")
        raise RecordRejected("no_usable_leads", f"lead quality {dict(zip(LEADS, quality))}")
    derived = derive_limb_leads(sig, present)
    for k in np.flatnonzero(derived):
        quality[k] = LEAD_DERIVED
    lead_mask = present | derived
    if lead_mask.sum() < opts.min_leads:
        kept = [LEADS[k] for k in np.flatnonzero(lead_mask)]
        raise RecordRejected(
            "too_few_leads",
            f"{lead_mask.sum()} of 12 canonical leads ({kept}) from channels {raw.channel_names}; "
            f"min_leads={opts.min_leads}",
        )
    present_sig = sig[lead_mask]
    if np.isnan(present_sig).any():
        # NaN marks gaps in WFDB: a lead that is mostly missing is not signal.
        nan_frac = np.isnan(present_sig).mean(axis=1)
        if (nan_frac > 0.5).any():
            raise RecordRejected("missing_samples", f"a lead is more than half NaN ({nan_frac.max():.0%})")
        np.nan_to_num(sig, copy=False, nan=0.0)
        present_sig = sig[lead_mask]
    low, high = present_sig.min(initial=0.0), present_sig.max(initial=0.0)
    declared_normalized = bool(raw.units) and all(is_normalized_unit(u) for u in raw.units)
    if max(-low, high) > ABSURD_AMPLITUDE_MV and not declared_normalized:
        raise RecordRejected("absurd_amplitude", f"peak |x| = {max(-low, high):.1f} mV > {ABSURD_AMPLITUDE_MV} mV")
    flags = ["normalised_amplitude"] if declared_normalized or looks_normalised(sig[present]) else []
    sig = resample(sig, raw.fs, opts.target_fs)
    if opts.filter_low_hz or opts.filter_high_hz or opts.notch_hz:
        sig = bandpass(sig, opts.target_fs, opts.filter_low_hz, opts.filter_high_hz, opts.notch_hz)
    sig[~lead_mask] = 0.0
    return CanonicalRecord(raw.record_id, sig.astype(np.float32, copy=False), opts.target_fs, lead_mask, derived, quality, flags)


def lead_quality(sig: np.ndarray, present: np.ndarray) -> list[str]:
    """A code per canonical lead: missing, flat (constant), saturated (clipped at its extremes), duplicate
    (the same samples as an earlier lead: a copied channel is not a second lead), or ok."""
    codes = [LEAD_OK if p else LEAD_MISSING for p in present]
    rows = np.flatnonzero(present)
    if rows.size == 0:
        return codes
    block = sig[rows]
    finite = np.isfinite(block)
    n_finite = finite.sum(axis=1)
    if n_finite.all() and n_finite.min() == block.shape[1]:
        top, bottom = block.max(axis=1), block.min(axis=1)
    else:  # NaN gaps: extremes of the finite samples only
        top = np.where(finite, block, -np.inf).max(axis=1)
        bottom = np.where(finite, block, np.inf).min(axis=1)
    at_extreme = np.maximum((block == top[:, None]).sum(axis=1), (block == bottom[:, None]).sum(axis=1))
    saturated = at_extreme >= SATURATED_FRACTION * np.maximum(n_finite, 1)
    first_with: dict[bytes, int] = {}  # the samples of each ok lead so far: an exact copy is a duplicate
    for row, k in enumerate(rows):
        if n_finite[row] == 0 or top[row] == bottom[row]:
            codes[k] = LEAD_FLAT
        elif saturated[row]:
            codes[k] = LEAD_SATURATED
        elif first_with.setdefault(block[row].tobytes(), k) != k:
            codes[k] = LEAD_DUPLICATE
    return codes


def looks_normalised(sig: np.ndarray) -> bool:
    """Amplitudes that were normalised, not measured in mV: every lead with std ~1 (z-scored), or every lead
    exactly 1 mV peak to peak (scaled per lead). A model trained on them learns no amplitude."""
    if sig.size == 0:
        return False
    gaps = np.isnan(sig).any()  # the nan-aware reductions cost twice the plain ones
    std = np.nanstd(sig, axis=1) if gaps else sig.std(axis=1)
    peak = (np.nanmax(sig, axis=1) - np.nanmin(sig, axis=1)) if gaps else np.ptp(sig, axis=1)
    return bool(np.all(np.abs(std - 1) < 0.05) or np.all(np.abs(peak - 1) < 1e-3))


@dataclass(frozen=True)
class Window:
    index: int
    start: int  # first sample, at the canonical rate
    signal: np.ndarray  # (12, window_samples)
    valid_samples: int  # < window_samples only for a padded short record


def windows(rec: CanonicalRecord, window_s: float, stride_s: float | None = None,
            pad_short: bool = False) -> list[Window]:
    """Cut a canonical record into fixed-length windows; the tail that does not fill one is dropped."""
    length = int(round(window_s * rec.fs))
    stride = int(round((stride_s or window_s) * rec.fs))
    n = rec.signal.shape[1]
    if n < length:
        if not pad_short:
            raise RecordRejected("too_short", f"{n / rec.fs:.2f} s < one window of {window_s} s")
        padded = np.zeros((N_LEADS, length), dtype=rec.signal.dtype)
        padded[:, :n] = rec.signal
        return [Window(0, 0, padded, n)]
    return [Window(k, start, rec.signal[:, start:start + length], length)
            for k, start in enumerate(range(0, n - length + 1, stride))]
