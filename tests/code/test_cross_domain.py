"""The cross-domain table on scores whose answer is known: per-source AUROCs as scikit-learn computes them, a
class a source lacks reported as undefined (never a 0.5 in its macro), drops that compare like with like."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from crema.evaluation.cross_domain import (IN_DOMAIN, MACRO, ScoredRecords, by_source_metrics, cross_domain_figure,
                                           cross_domain_table)

CLASSES = ["NORM", "MI", "HYP"]


def two_hospitals(seed: int = 0) -> ScoredRecords:
    """300 in-domain records scored well, 120 external ones scored worse and without a single HYP."""
    rng = np.random.default_rng(seed)
    parts = []
    for source, n, noise, hyp_rate in (("ptbxl", 300, 0.6, 0.2), ("ludb", 120, 1.5, 0.0)):
        labels = np.stack([rng.random(n) < 0.5, rng.random(n) < 0.3, rng.random(n) < hyp_rate], axis=1).astype(int)
        scores = labels + noise * rng.standard_normal(labels.shape)
        keys = np.array([f"{source}/{i}" for i in range(n)], dtype=object)
        parts.append((keys, labels, keys.copy(), scores))
    return ScoredRecords(*(np.concatenate(column) for column in zip(*parts)))


@pytest.fixture(scope="module")
def table():
    return cross_domain_table(two_hospitals(), CLASSES, in_domain_sources=["ptbxl"], n_boot=200, seed=0)


def cell(table, source: str, name: str) -> dict:
    (row,) = table[(table["source"] == source) & (table["class"] == name)].to_dict("records")
    return row


def test_each_source_is_scored_on_its_own_records_as_sklearn_scores_them(table):
    records = two_hospitals()
    for source in ("ptbxl", "ludb"):
        rows = records.sources() == source
        for c, name in enumerate(CLASSES[:2]):
            row = cell(table, source, name)
            assert row["auroc"] == pytest.approx(roc_auc_score(records.labels[rows, c], records.scores[rows, c]))
            assert row["ci_low"] < row["auroc"] < row["ci_high"]
            assert row["n_records"] == rows.sum() and row["n_pos"] == records.labels[rows, c].sum()
    assert cell(table, "ptbxl", "NORM")["domain"] == IN_DOMAIN and cell(table, "ludb", "NORM")["domain"] == "external"
    assert cell(table, "ludb", "NORM")["drop"] > 0.1  # the noisier hospital scores worse, and the table says by how much


def test_a_class_a_source_lacks_is_reported_as_such_and_left_out_of_its_macro(table):
    hyp = cell(table, "ludb", "HYP")
    assert np.isnan(hyp["auroc"]) and hyp["note"] == "no positives" and hyp["n_pos"] == 0
    macro = cell(table, "ludb", MACRO)
    defined = [cell(table, "ludb", name)["auroc"] for name in CLASSES[:2]]
    assert macro["auroc"] == pytest.approx(np.mean(defined)) and macro["note"] == "over NORM, MI"
    # its drop is against the in-domain macro over the same two classes, not the in-domain macro over three
    reference = np.mean([cell(table, "ptbxl", name)["auroc"] for name in CLASSES[:2]])
    assert macro["drop"] == pytest.approx(reference - macro["auroc"])
    assert cell(table, "ptbxl", MACRO)["drop"] == pytest.approx(0.0)


def test_the_metrics_name_source_and_class_and_skip_undefined_cells(table):
    metrics = by_source_metrics(table)
    assert metrics["on_ludb_macro_auroc"] == pytest.approx(cell(table, "ludb", MACRO)["auroc"])
    assert {"on_ludb_auroc_MI_ci_low", "on_ludb_auroc_MI_drop", "on_ptbxl_auroc_HYP"} <= set(metrics)
    assert "on_ludb_auroc_HYP" not in metrics and metrics["on_ludb_n_records"] == 120
    assert all(np.isfinite(v) for v in metrics.values())
    assert len(cross_domain_figure(table).axes[0].patches) == 2 * (len(CLASSES) + 1)


def test_several_in_domain_sources_are_pooled_into_the_reference():
    records = two_hospitals()
    table = cross_domain_table(records, CLASSES, in_domain_sources=None, n_boot=50)
    pooled = cell(table, IN_DOMAIN, "NORM")
    assert pooled["n_records"] == len(records.keys)
    assert pooled["auroc"] == pytest.approx(roc_auc_score(records.labels[:, 0], records.scores[:, 0]))
    assert set(table["domain"]) == {IN_DOMAIN}
