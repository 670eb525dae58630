"""Drift statistics where the answer is known: two draws of one distribution lie together, a shifted one apart;
a patient's second record never counts twice."""

from __future__ import annotations

import numpy as np
import pytest

from crema.evaluation.drift import Side, embedding_map, measure_drift


def gaussian(name: str, n: int, shift: float, seed: int) -> Side:
    z = np.random.default_rng(seed).standard_normal((n, 16))
    z[:, :4] += shift
    return Side(name, z, np.array([f"{name}-{i}" for i in range(n)], dtype=object))


def test_one_distribution_twice_shows_no_shift_and_a_shifted_one_does():
    same = measure_drift(gaussian("a", 300, 0.0, 1), gaussian("b", 150, 0.0, 2), n_permutations=300, n_boot=300)
    assert not same.shifted and same.domain_auroc.low < 0.5 < same.domain_auroc.high and same.mmd_p_value > 0.05
    moved = measure_drift(gaussian("a", 300, 0.0, 1), gaussian("b", 150, 0.5, 2), n_permutations=300, n_boot=300)
    # a 0.5-sd shift in 4 of 16 dimensions: the Bayes classifier's AUROC is Phi(1 / sqrt 2) = 0.76
    assert moved.shifted and 0.6 < moved.domain_auroc.low and moved.domain_auroc.high < 0.8 and moved.mmd_p_value < 0.01
    assert moved.mmd2 > same.mmd2
    assert len(embedding_map(gaussian("a", 50, 0, 1), gaussian("b", 50, 1, 2), moved).axes[0].collections) == 2


def test_a_side_keeps_one_record_per_patient_each_the_mean_of_its_windows():
    keys = np.array(["s/r1", "s/r1", "s/r2", "s/r3", "s/r3"], dtype=object)
    patients = np.array(["p1", "p1", "p1", "p2", "p2"], dtype=object)  # p1 has two records
    z = np.array([[0.0], [2.0], [10.0], [4.0], [6.0]])
    side = Side.from_windows("s", keys, patients, z, max_records=10, seed=0)
    assert sorted(side.patient_keys) == ["p1", "p2"]
    assert sorted(side.embeddings[:, 0]) in ([1.0, 5.0], [5.0, 10.0])  # r1's mean or r2, and r3's mean
    assert len(Side.from_windows("s", keys, patients, z, max_records=1, seed=0).embeddings) == 1


def test_a_side_of_one_record_is_refused_by_the_domain_classifier():
    with pytest.raises(ValueError, match="at least 2 records a side"):
        measure_drift(gaussian("a", 50, 0, 1), gaussian("b", 1, 0, 2), n_permutations=10, n_boot=10)
