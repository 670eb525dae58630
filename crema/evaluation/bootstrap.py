"""Patient-level bootstrap confidence intervals.

Records of one patient are strongly correlated, so the sampling unit is the patient: each resample draws
patients with replacement and brings all of their records. Resamples are evaluated all at once as record
multiplicity weights (a resample that draws a patient twice gives each of its records weight 2), which is
exact for the weighted metrics of :mod:`crema.evaluation.metrics` and about a thousand times faster than
one scikit-learn call per resample.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

# Resamples evaluated together are capped so that a (resamples x records) weight matrix stays ~16 MB.
_MAX_WEIGHT_ELEMENTS = 2_000_000

# metric(y (n, C), scores (n, C), sample_weight (B, n)) -> (B,) values, NaN where undefined.
WeightedMetric = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


@dataclass(frozen=True)
class BootstrapCI:
    """Unpacks as ``point, low, high``; also says how many resamples had the metric undefined."""

    point: float
    low: float
    high: float
    n_valid: int
    n_skipped: int

    def __iter__(self) -> Iterator[float]:
        return iter((self.point, self.low, self.high))


def _patient_resample_counts(patient_keys: np.ndarray, n_boot: int, seed: int) -> Iterator[np.ndarray]:
    """Record multiplicities (b, n) of successive blocks of resamples; each resample draws n_patients patients."""
    _, patient_of_record = np.unique(np.asarray(patient_keys), return_inverse=True)
    n_records, n_patients = len(patient_of_record), int(patient_of_record.max()) + 1
    rng = np.random.default_rng(seed)
    block = max(1, _MAX_WEIGHT_ELEMENTS // max(n_records, n_patients))
    for first in range(0, n_boot, block):
        b = min(block, n_boot - first)
        drawn = rng.integers(0, n_patients, size=(b, n_patients))
        flat = (drawn + n_patients * np.arange(b)[:, None]).ravel()
        patient_counts = np.bincount(flat, minlength=b * n_patients).reshape(b, n_patients)
        # A drawn patient brings all of its records, each as many times as the patient was drawn.
        yield patient_counts[:, patient_of_record]


def patient_bootstrap_indices(patient_keys: np.ndarray, n_boot: int, seed: int = 0) -> Iterator[np.ndarray]:
    """Record indices of each bootstrap resample (the ones bootstrap_ci evaluates for the same seed)."""
    rows = np.arange(len(patient_keys))
    for counts in _patient_resample_counts(patient_keys, n_boot, seed):
        for row_counts in counts:
            yield np.repeat(rows, row_counts)


def bootstrap_ci(metric_fn: WeightedMetric, y: np.ndarray, s: np.ndarray, patient_keys: np.ndarray,
                 n_boot: int = 1000, alpha: float = 0.05, seed: int = 0) -> BootstrapCI:
    """Percentile CI of a metric, resampling patients with replacement.

    ``metric_fn(y, s, sample_weight)`` gets the (B, n) record multiplicities of B resamples and returns
    B values, NaN where the metric is undefined (those resamples are skipped and counted): see
    macro_metric, or per_resample for a plain scalar metric. The point estimate is the metric on the data.
    """
    y, s = np.asarray(y), np.asarray(s)
    patient_keys = np.asarray(patient_keys)
    if not len(y) == len(s) == len(patient_keys) > 0:
        raise ValueError(f"{len(y)} label rows, {len(s)} score rows, {len(patient_keys)} patient keys")
    if not 0 < alpha < 1 or n_boot < 1:
        raise ValueError(f"need 0 < alpha < 1 and n_boot >= 1, got alpha={alpha}, n_boot={n_boot}")
    point = float(metric_fn(y, s, np.ones((1, len(y)), dtype=np.int64))[0])
    resamples = _patient_resample_counts(patient_keys, n_boot, seed)
    values = np.concatenate([metric_fn(y, s, counts) for counts in resamples])
    valid = values[np.isfinite(values)]
    if len(valid) == 0:
        return BootstrapCI(point, float("nan"), float("nan"), 0, n_boot)
    low, high = np.quantile(valid, [alpha / 2, 1 - alpha / 2])
    return BootstrapCI(point, float(low), float(high), len(valid), n_boot - len(valid))
