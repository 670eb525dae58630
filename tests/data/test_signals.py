"""The hand-written fast paths of the signal normalisation against the library they replace."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
from scipy.signal import resample_poly

from crema.config import IngestConfig, SourceConfig
from crema.data.ingest import as_stored
from crema.data.readers import reader_for
from crema.data.signals import FAST_RESAMPLE_MAX_FACTOR, LEAD_DUPLICATE, LEAD_FLAT, LEAD_OK, LEAD_SATURATED, \
    lead_quality, resample, to_canonical

# (source rate, target rate) pairs the ingest meets: PTB-XL's 100 and 500 Hz to the usual 100, 250, 500 Hz.
RATES = [(100, 500), (100, 250), (500, 100), (500, 250), (500, 1000)]


@pytest.mark.parametrize("folder", ["records100", "records500"])
def test_fast_resampling_equals_scipy_on_every_shared_record(ptbxl_root, folder):
    reader = reader_for(SourceConfig(name="ptbxl", format="wfdb", path=str(ptbxl_root / folder)))
    ids = reader.discover()
    assert ids, f"no records under {folder}"
    worst = 0.0
    for record_id in ids:
        raw = reader.read(record_id)
        signal = np.nan_to_num(raw.signal).astype(np.float32)
        for fs_in, fs_out in RATES:
            if fs_in != raw.fs:
                continue
            fast = resample(signal, fs_in, fs_out)
            ratio = Fraction(fs_out, fs_in)
            reference = resample_poly(signal, ratio.numerator, ratio.denominator, axis=-1)
            assert fast.shape == reference.shape, (record_id, fs_in, fs_out)
            worst = max(worst, float(np.abs(fast - reference).max()))
    # float32 arithmetic in another order: differences of a few ULPs of a mV-sized signal, nothing more.
    assert worst < 1e-4, worst


def test_ratios_beyond_the_fast_path_go_to_scipy():
    signal = np.random.default_rng(0).normal(size=(12, 3600)).astype(np.float32)
    fs_in = 360  # MIT-BIH's rate: 500/360 = 25/18, above FAST_RESAMPLE_MAX_FACTOR
    assert 25 > FAST_RESAMPLE_MAX_FACTOR
    assert np.array_equal(resample(signal, fs_in, 500), resample_poly(signal, 25, 18, axis=-1))


def test_lead_quality_codes():
    rng = np.random.default_rng(1)
    sig = rng.normal(size=(12, 1000)).astype(np.float32)
    sig[3] = 0.0  # flat
    sig[4] = np.clip(sig[4], -0.5, 0.5)  # clipped at both ends: saturated
    sig[5] = sig[1]  # a copied channel
    sig[6, :10] = np.nan  # NaN gaps do not make a lead bad
    present = np.ones(12, bool)
    present[11] = False
    codes = lead_quality(sig, present)
    assert codes[3] == LEAD_FLAT and codes[4] == LEAD_SATURATED and codes[5] == LEAD_DUPLICATE
    assert codes[6] == LEAD_OK and codes[11] == "missing"
    assert codes.count(LEAD_OK) == 8


def test_float16_storage_cast_equals_numpy_on_every_shared_record(ptbxl_root):
    """The window pass's float16 cast (torch's) is numpy's, bit for bit, on every canonical shared record."""
    opts = IngestConfig(target_fs=500).normalise_options(SourceConfig(name="p", format="wfdb", path="."))
    checked = 0
    for folder in ("records100", "records500"):
        reader = reader_for(SourceConfig(name="ptbxl", format="wfdb", path=str(ptbxl_root / folder)))
        for record_id in reader.discover():
            canonical = to_canonical(reader.read(record_id), opts)
            fast, reference = as_stored(canonical.signal, np.dtype("<f2")), canonical.signal.astype("<f2")
            assert fast.dtype == reference.dtype and fast.shape == reference.shape
            assert np.array_equal(fast.view(np.uint16), reference.view(np.uint16)), record_id
            checked += 1
    assert checked == 2499


def test_float16_storage_cast_edge_cases():
    halfway = np.arange(0, 60000, 0.5, dtype=np.float16).astype(np.float32)
    ties = halfway[:-1] + (halfway[1:] - halfway[:-1]) / 2  # exactly between two float16 values
    rng = np.random.default_rng(2)
    values = np.concatenate([
        ties, -ties, rng.normal(size=50_000).astype(np.float32) * 1e-6,  # subnormal in float16
        np.array([np.nan, np.inf, -np.inf, 65504, 65519.9, 65520, 1e6, -1e6, 0.0, -0.0], np.float32),
    ])
    with np.errstate(over="ignore"):
        reference = values.astype(np.float16)
    assert np.array_equal(as_stored(values, np.dtype(np.float16)).view(np.uint16), reference.view(np.uint16))
    assert as_stored(values, np.dtype("<f4")).dtype == np.float32
