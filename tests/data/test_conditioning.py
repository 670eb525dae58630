"""Input conditioning (crema.data.conditioning): what each step does to a window, and what it must not do."""

from __future__ import annotations

import numpy as np
import pytest

from crema.config import InputConditioning
from crema.data.conditioning import condition

FS = 500.0


def tones(*components: tuple[float, float], seconds: float = 10.0) -> np.ndarray:
    """(1, 12, L) windows, every lead the same sum of (frequency Hz, amplitude mV) sines."""
    t = np.arange(int(seconds * FS)) / FS
    x = sum(a * np.sin(2 * np.pi * f * t) for f, a in components)
    return np.broadcast_to(x, (1, 12, len(t))).copy()


def amplitude_at(x: np.ndarray, freq: float) -> float:
    """The amplitude of lead 0's component at `freq` (an exact FFT bin for 10-s windows)."""
    spectrum = np.abs(np.fft.rfft(x[0, 0])) * 2 / x.shape[-1]
    return float(spectrum[int(round(freq * x.shape[-1] / FS))])


def test_band_pass_removes_baseline_wander_and_noise_and_keeps_the_ecg_band():
    x = tones((0.1, 2.0), (10.0, 1.0), (100.0, 0.5))
    out = condition(x, np.ones((1, 12), bool), FS, InputConditioning(scale="fixed", clip=None))
    assert amplitude_at(out, 0.1) < 0.05 * 2.0  # wander below 0.5 Hz: gone
    assert amplitude_at(out, 100.0) < 0.05 * 0.5  # above 40 Hz: gone
    assert amplitude_at(out, 10.0) == pytest.approx(1.0, rel=0.05)  # the ECG band: kept, zero phase


def test_each_present_lead_is_standardised_and_missing_leads_stay_zero():
    rng = np.random.default_rng(0)
    x = rng.normal(0.3, 0.2, size=(2, 12, 5000)) * np.arange(1, 13)[None, :, None]
    lead_mask = np.ones((2, 12), bool)
    lead_mask[1, 4] = False
    x[1, 4] = 0.0
    out = condition(x, lead_mask, FS, InputConditioning(highpass_hz=None, lowpass_hz=None, clip=None))
    assert out.dtype == np.float32
    present = out[lead_mask]
    np.testing.assert_allclose(present.mean(axis=-1), 0, atol=1e-5)
    np.testing.assert_allclose(present.std(axis=-1), 1, atol=1e-4)
    assert not out[1, 4].any()


def test_a_flat_lead_is_not_blown_up_and_outliers_are_clipped():
    x = tones((5.0, 1.0))
    x[0, 3] = 0.001  # a flat lead: standardising it by its own ~0 spread would make noise of it
    x[0, 0, 100] = 40.0  # a pacing spike / electrode pop
    out = condition(x, np.ones((1, 12), bool), FS, InputConditioning(highpass_hz=None, lowpass_hz=None, clip=8.0))
    assert np.abs(out[0, 3]).max() < 1e-6
    assert out[0, 0].max() == pytest.approx(8.0)


def test_low_pass_at_or_above_nyquist_is_skipped_not_an_error():
    x = tones((30.0, 1.0), seconds=10.0)[:, :, ::5]  # 100 Hz sampling: Nyquist 50 Hz
    cfg = InputConditioning(highpass_hz=None, lowpass_hz=60.0, scale="fixed", clip=None)
    out = condition(x, np.ones((1, 12), bool), 100.0, cfg)
    np.testing.assert_allclose(out, x.astype(np.float32), atol=1e-6)


def test_a_band_upside_down_is_a_config_error():
    with pytest.raises(ValueError, match="below lowpass"):
        InputConditioning(highpass_hz=50.0, lowpass_hz=40.0)
