"""The downstream metrics: agreement with scikit-learn, record aggregation, the patient-level bootstrap."""

from __future__ import annotations

import io

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, f1_score, roc_auc_score

from crema.evaluation import bootstrap, metrics

CLASSES = ["NORM", "MI", "STTC", "CD", "HYP"]


def predictions(n_records: int, n_patients: int, seed: int, signal: float = 1.0):
    """Seeded multi-label data with informative, rounded (so tied) scores, and records grouped in patients."""
    rng = np.random.default_rng(seed)
    y = (rng.random((n_records, len(CLASSES))) < [0.45, 0.25, 0.25, 0.2, 0.12]).astype(np.int8)
    s = np.round(signal * y + rng.normal(size=y.shape), 1)
    patients = np.array([f"p{k:04d}" for k in rng.integers(0, n_patients, size=n_records)])
    return y, s, patients


def test_metrics_agree_with_sklearn():
    y, s, _ = predictions(300, 150, seed=1)
    assert np.allclose(metrics.per_class_auroc(y, s), roc_auc_score(y, s, average=None), atol=1e-12)
    assert np.allclose(metrics.per_class_auprc(y, s), average_precision_score(y, s, average=None), atol=1e-12)
    auroc, auprc = metrics.macro_auroc(y, s), metrics.macro_auprc(y, s)
    assert auroc.value == pytest.approx(roc_auc_score(y, s, average="macro"), abs=1e-12)
    assert auprc.value == pytest.approx(average_precision_score(y, s, average="macro"), abs=1e-12)
    assert auroc.undefined == auprc.undefined == ()

    thresholds = np.array([0.1, 0.4, 0.5, 0.6, 0.9])
    f1 = metrics.f1_at_thresholds(y, s, thresholds)
    predicted = (s >= thresholds).astype(int)
    assert np.allclose(f1.per_class, f1_score(y, predicted, average=None), atol=1e-12)
    assert f1.value == pytest.approx(f1_score(y, predicted, average="macro"), abs=1e-12)


def test_weighted_metrics_equal_sklearn_on_the_resampled_records():
    y, s, _ = predictions(120, 60, seed=2)
    counts = np.random.default_rng(3).integers(0, 4, size=(6, len(y)))
    thresholds = metrics.tune_thresholds(y, s)
    auroc = metrics.per_class_auroc_weighted(y, s, counts)
    auprc = metrics.per_class_auprc_weighted(y, s, counts)
    f1 = metrics.per_class_f1_weighted(y, s, counts, thresholds=thresholds)
    assert auroc.shape == auprc.shape == f1.shape == (6, len(CLASSES))
    for b, row in enumerate(counts):
        chosen = np.repeat(np.arange(len(y)), row)  # the resample as the records it materialises
        yb, sb = y[chosen], s[chosen]
        assert np.allclose(auroc[b], roc_auc_score(yb, sb, average=None), atol=1e-12)
        assert np.allclose(auprc[b], average_precision_score(yb, sb, average=None), atol=1e-12)
        assert np.allclose(f1[b], f1_score(yb, (sb >= thresholds).astype(int), average=None), atol=1e-12)


def test_aggregate_by_record_from_hand_built_windows():
    record_ids = np.array(["r2", "r1", "r2", "r3", "r1", "r2"])
    scores = np.array([[0.2, 0.9], [0.1, 0.0], [0.4, 0.3], [0.7, 0.5], [0.5, 0.2], [0.9, 0.6]])
    ids, mean = metrics.aggregate_by_record(record_ids, scores, how="mean")
    assert list(ids) == ["r1", "r2", "r3"]
    assert np.allclose(mean, [[0.3, 0.1], [0.5, 0.6], [0.7, 0.5]])
    ids_max, top = metrics.aggregate_by_record(record_ids, scores, how="max")
    assert list(ids_max) == ["r1", "r2", "r3"]
    assert np.allclose(top, [[0.5, 0.2], [0.9, 0.9], [0.7, 0.5]])
    with pytest.raises(ValueError, match="how"):
        metrics.aggregate_by_record(record_ids, scores, how="median")

    labels = np.array([[1, 0], [0, 1], [1, 0], [1, 1], [0, 1], [1, 0]])
    patients = np.array(["pa", "pb", "pa", "pa", "pb", "pa"])
    targets = metrics.record_targets(record_ids, labels, patients)
    assert list(targets.record_ids) == list(ids)
    assert targets.labels.tolist() == [[0, 1], [1, 0], [1, 1]]
    assert list(targets.patient_keys) == ["pb", "pa", "pa"]

    inconsistent = labels.copy()
    inconsistent[2] = [0, 0]  # second window of r2 now disagrees with its first
    with pytest.raises(ValueError, match="labels differ.*r2"):
        metrics.record_targets(record_ids, inconsistent, patients)
    moved = patients.copy()
    moved[4] = "pc"
    with pytest.raises(ValueError, match="patient keys differ.*r1"):
        metrics.record_targets(record_ids, labels, moved)


def test_multi_hot_ignores_labels_outside_the_task():
    y = metrics.multi_hot([["MI", "NORM"], [], ["HYP", "PACE"]], CLASSES)
    assert y.tolist() == [[1, 1, 0, 0, 0], [0, 0, 0, 0, 0], [0, 0, 0, 0, 1]]


def test_patient_bootstrap_never_splits_a_patient():
    rng = np.random.default_rng(4)
    patients = rng.permutation(np.repeat([f"p{k}" for k in range(30)], rng.integers(1, 5, size=30)))
    patient_names, patient_of_record = np.unique(patients, return_inverse=True)
    resamples = list(bootstrap.patient_bootstrap_indices(patients, n_boot=200, seed=7))
    assert len(resamples) == 200
    for chosen in resamples:
        multiplicity = np.bincount(chosen, minlength=len(patients))
        per_patient = [np.unique(multiplicity[patient_of_record == p]) for p in range(len(patient_names))]
        # Every record of a patient is there exactly as often as the patient was drawn...
        assert all(len(m) == 1 for m in per_patient)
        # ...and the resample draws as many patients as there are, with replacement.
        assert sum(int(m[0]) for m in per_patient) == len(patient_names)
    assert len({tuple(chosen) for chosen in resamples}) > 190
    assert any(np.bincount(c, minlength=len(patients)).max() > 1 for c in resamples)

    again = list(bootstrap.patient_bootstrap_indices(patients, n_boot=200, seed=7))
    assert all(np.array_equal(a, b) for a, b in zip(resamples, again))
    other = list(bootstrap.patient_bootstrap_indices(patients, n_boot=200, seed=8))
    assert not all(np.array_equal(a, b) for a, b in zip(resamples, other))


def test_bootstrap_ci_evaluates_exactly_the_patient_resamples():
    y, s, patients = predictions(80, 30, seed=5)
    n_boot, alpha = 60, 0.1
    by_resample = []
    for chosen in bootstrap.patient_bootstrap_indices(patients, n_boot, seed=11):
        try:
            by_resample.append(roc_auc_score(y[chosen], s[chosen], average="macro"))
        except ValueError:  # a class with one label value in this resample
            pass
    expected_low, expected_high = np.quantile(by_resample, [alpha / 2, 1 - alpha / 2])

    all_classes = range(len(CLASSES))
    fast = bootstrap.bootstrap_ci(metrics.macro_metric(metrics.per_class_auroc_weighted, all_classes),
                                y, s, patients, n_boot=n_boot, alpha=alpha, seed=11)
    slow = bootstrap.bootstrap_ci(metrics.per_resample(lambda yb, sb: roc_auc_score(yb, sb, average="macro")),
                                y, s, patients, n_boot=n_boot, alpha=alpha, seed=11)
    for ci in (fast, slow):
        assert ci.point == pytest.approx(roc_auc_score(y, s, average="macro"), abs=1e-12)
        assert (ci.low, ci.high) == pytest.approx((expected_low, expected_high), abs=1e-12)
        assert ci.n_valid == len(by_resample) and ci.n_valid + ci.n_skipped == n_boot
    point, low, high = fast
    assert (point, low, high) == (fast.point, fast.low, fast.high)


def test_undefined_resamples_are_skipped_and_counted():
    y, s, patients = predictions(60, 30, seed=6)
    y[:, 4] = 0
    y[patients == patients[0], 4] = 1  # HYP positive for a single patient: absent from many resamples
    undefined = sum(1 for chosen in bootstrap.patient_bootstrap_indices(patients, 300, seed=2)
                    if y[chosen, 4].min() == y[chosen, 4].max())
    ci = bootstrap.bootstrap_ci(metrics.macro_metric(metrics.per_class_auroc_weighted, range(len(CLASSES))),
                              y, s, patients, n_boot=300, seed=2)
    assert 0 < ci.n_skipped == undefined < 300
    assert ci.n_valid == 300 - undefined and np.isfinite([ci.low, ci.high]).all()


def test_ci_contains_the_point_and_narrows_with_more_patients():
    widths = []
    for n_patients in (40, 400):
        y, s, patients = predictions(2 * n_patients, n_patients, seed=12)
        results = metrics.evaluate(y, s, patients, CLASSES, metrics.tune_thresholds(y, s), n_boot=400, seed=3)
        for name in ("auroc", "auprc", "f1"):
            assert results[f"macro_{name}_ci_low"] <= results[f"macro_{name}"] <= results[f"macro_{name}_ci_high"]
        widths.append(results["macro_auroc_ci_high"] - results["macro_auroc_ci_low"])
    assert widths[1] < 0.6 * widths[0]


def test_tuned_thresholds_maximise_validation_f1():
    y, s, _ = predictions(200, 100, seed=14, signal=0.8)
    thresholds = metrics.tune_thresholds(y, s)
    tuned = metrics.f1_at_thresholds(y, s, thresholds).per_class
    for c in range(len(CLASSES)):
        values = np.unique(s[:, c])
        grid = np.concatenate([values, (values[1:] + values[:-1]) / 2, [values[0] - 1, values[-1] + 1],
                               np.linspace(values[0], values[-1], 301)])
        predicted = s[:, c] >= grid[:, None]
        tp = (predicted & (y[:, c] == 1)).sum(axis=1)
        brute_f1 = 2 * tp / (predicted.sum(axis=1) + y[:, c].sum())
        assert tuned[c] == pytest.approx(brute_f1.max(), abs=1e-12)
        assert thresholds[c] not in values  # midway between two validation scores, not on one

    y[:, 2] = 0
    no_positives = metrics.tune_thresholds(y, s)
    assert no_positives[2] > s[:, 2].max()
    assert np.array_equal(np.delete(no_positives, 2), np.delete(thresholds, 2))


def test_undefined_classes_are_excluded_and_reported():
    y, s, patients = predictions(100, 50, seed=15)
    y[:, 1] = 0  # no MI at all
    y[:, 3] = 1  # CD everywhere
    kept = [0, 2, 4]
    auroc = metrics.macro_auroc(y, s)
    assert auroc.undefined == (1, 3)
    assert np.isnan(auroc.per_class[[1, 3]]).all()
    assert auroc.value == pytest.approx(roc_auc_score(y[:, kept], s[:, kept], average="macro"), abs=1e-12)
    auprc = metrics.macro_auprc(y, s)
    assert auprc.undefined == (1, 3)
    assert auprc.value == pytest.approx(average_precision_score(y[:, kept], s[:, kept], average="macro"), abs=1e-12)
    f1 = metrics.f1_at_thresholds(y, s, 0.5)
    assert f1.undefined == (1, 3)
    assert f1.value == pytest.approx(f1_score(y[:, kept], (s[:, kept] >= 0.5).astype(int), average="macro"))

    with pytest.warns(metrics.UndefinedClassWarning, match="MI.*CD"):
        results = metrics.evaluate(y, s, patients, CLASSES, np.full(5, 0.5), n_boot=200, seed=0)
    assert results["n_undefined_classes"] == 2
    assert np.isnan(results["auroc_MI"]) and np.isnan(results["auprc_CD"]) and np.isnan(results["f1_MI"])
    assert results["macro_auroc"] == pytest.approx(auroc.value)
    assert np.isfinite([results["macro_auroc_ci_low"], results["macro_f1_ci_high"]]).all()

    nothing = metrics.macro_auroc(np.zeros((10, 2)), np.random.default_rng(0).random((10, 2)))
    assert np.isnan(nothing.value) and nothing.undefined == (0, 1)
    with pytest.warns(metrics.UndefinedClassWarning):
        empty = metrics.evaluate(np.zeros((10, 2)), np.zeros((10, 2)), np.arange(10), ["A", "B"], 0.5, n_boot=20)
    assert np.isnan(empty["macro_auroc"]) and np.isnan(empty["macro_auroc_ci_low"])
    assert empty["macro_auroc_boot_skipped"] == 20


def test_evaluate_report_and_table():
    y, s, patients = predictions(150, 90, seed=16)
    thresholds = metrics.tune_thresholds(*predictions(150, 90, seed=17)[:2])
    results = metrics.evaluate(y, s, patients, CLASSES, thresholds, n_boot=300, seed=1)
    assert all(isinstance(v, float) for v in results.values())
    assert results["n_records"] == 150 and results["n_patients"] == len(np.unique(patients))
    assert results["macro_auprc"] == pytest.approx(average_precision_score(y, s, average="macro"), abs=1e-12)
    assert results["macro_f1"] == pytest.approx(f1_score(y, (s >= thresholds).astype(int), average="macro"))
    for c, name in enumerate(CLASSES):
        assert results[f"auroc_{name}"] == pytest.approx(roc_auc_score(y[:, c], s[:, c]), abs=1e-12)
        assert results[f"threshold_{name}"] == thresholds[c]

    table = metrics.metrics_table(results)
    assert list(table.columns) == ["metric", "value", "ci_low", "ci_high"]
    assert not table["metric"].str.endswith(("_ci_low", "_ci_high")).any()
    row = table.set_index("metric").loc["macro_auroc"]
    assert (row["value"], row["ci_low"], row["ci_high"]) == (
        results["macro_auroc"], results["macro_auroc_ci_low"], results["macro_auroc_ci_high"])
    assert np.isnan(table.set_index("metric").loc["auroc_MI", "ci_low"])
    assert len(table) == len(results) - 6  # three macro metrics, two CI bounds each


def test_roc_curve_figure():
    y, s, _ = predictions(100, 50, seed=18)
    y[:, 4] = 0
    figure = metrics.roc_curve_figure(y, s, CLASSES)
    labels = [text.get_text() for text in figure.axes[0].get_legend().get_texts()]
    assert labels[0] == f"NORM (AUROC {roc_auc_score(y[:, 0], s[:, 0]):.3f})"
    assert "undefined" in labels[4] and len(labels) == len(CLASSES)
    png = io.BytesIO()
    figure.savefig(png, format="png")
    assert png.getvalue().startswith(b"\x89PNG")


def test_label_fraction_samples_whole_patients():
    rng = np.random.default_rng(19)
    patients = np.repeat([f"p{k:03d}" for k in range(400)], rng.integers(1, 4, size=400))
    records = np.array([f"r{k:05d}" for k in range(len(patients))])
    patient_of = dict(zip(records, patients))

    subsets = {}
    for fraction in (0.01, 0.1, 1.0):
        selected = metrics.sample_label_fraction(records, patients, fraction, seed=5)
        chosen_patients = {patient_of[r] for r in selected}
        # No patient partially selected: every record of a chosen patient is in.
        assert set(selected) == {r for r in records if patient_of[r] in chosen_patients}
        assert len(chosen_patients) == round(fraction * 400)
        subsets[fraction] = set(selected)
    assert subsets[0.01] < subsets[0.1] < subsets[1.0] == set(records)

    order = rng.permutation(len(records))
    shuffled = metrics.sample_label_fraction(records[order], patients[order], 0.1, seed=5)
    assert set(shuffled) == subsets[0.1]
    assert set(metrics.sample_label_fraction(records, patients, 0.1, seed=6)) != subsets[0.1]

    windows = np.repeat(records[:6], 3)  # per-window ids work too and come back once each
    one = metrics.sample_label_fraction(windows, np.repeat(patients[:6], 3), 0.001, seed=0)
    assert len({patient_of[r] for r in one}) == 1 and len(one) == len(set(one))
    with pytest.raises(ValueError, match="fraction"):
        metrics.sample_label_fraction(records, patients, 0.0, seed=0)
    with pytest.raises(ValueError, match="more than one patient"):
        metrics.sample_label_fraction(np.array(["r1", "r1"]), np.array(["pa", "pb"]), 0.5, seed=0)
