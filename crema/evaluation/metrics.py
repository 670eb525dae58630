"""Downstream evaluation of multi-label ECG diagnosis: record-level AUROC / AUPRC / F1 with patient-level CIs.

The evaluation unit is the record (its windows' scores are aggregated first) and the sampling unit is the
patient: confidence intervals resample patients, label-efficiency subsets keep or drop whole patients, so
that records of one patient, which are strongly correlated, never count as independent evidence.

A class with one label value only (no positives, or no negatives) has no AUROC, AUPRC or meaningful F1.
Such a class is left out of the macro averages and named in the result rather than raising, because a
small test split or a 1 % label subset routinely lacks a rare class.

Point estimates come from scikit-learn. Bootstrap resamples are evaluated all at once as record
multiplicity weights (a resample that draws a patient twice gives each of its records weight 2), which
is exact for these metrics and about a thousand times faster than one scikit-learn call per resample.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import average_precision_score, f1_score, roc_auc_score, roc_curve

from crema.evaluation.bootstrap import WeightedMetric, bootstrap_ci


class UndefinedClassWarning(UserWarning):
    """Some classes have a single label value in y_true and were left out of the macro averages."""


@dataclass(frozen=True)
class MacroScore:
    value: float  # mean over the defined classes; NaN when no class is defined
    per_class: np.ndarray  # (C,), NaN for undefined classes
    undefined: tuple[int, ...]  # indices of the classes left out: a single label value in y_true


@dataclass(frozen=True)
class RecordTargets:
    record_ids: np.ndarray  # (R,), the order of aggregate_by_record
    labels: np.ndarray  # (R, C)
    patient_keys: np.ndarray  # (R,)


# --------------------------------------------------------------------------------------------------
# Windows to records


def _group_rows(record_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Unique record ids (sorted), a row order that puts each record's rows together, group starts and sizes."""
    unique_ids, inverse = np.unique(np.asarray(record_ids), return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    sizes = np.bincount(inverse, minlength=len(unique_ids))
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    return unique_ids, order, starts, sizes


def aggregate_by_record(record_ids: np.ndarray, scores: np.ndarray, how: str = "mean") -> tuple[np.ndarray, np.ndarray]:
    """One score row per record from its windows' rows; records come out sorted by id."""
    scores = np.asarray(scores, dtype=np.float64)
    if len(scores) != len(record_ids):
        raise ValueError(f"{len(record_ids)} record ids for {len(scores)} score rows")
    if len(scores) == 0:
        raise ValueError("no windows to aggregate")
    unique_ids, order, starts, sizes = _group_rows(record_ids)
    grouped = scores[order]
    if how == "mean":
        record_scores = np.add.reduceat(grouped, starts, axis=0) / sizes.reshape((-1,) + (1,) * (scores.ndim - 1))
    elif how == "max":
        record_scores = np.maximum.reduceat(grouped, starts, axis=0)
    else:
        raise ValueError(f"how must be 'mean' or 'max', not {how!r}")
    return unique_ids, record_scores


def record_targets(record_ids: np.ndarray, labels: np.ndarray, patient_keys: np.ndarray) -> RecordTargets:
    """Per-record labels and patient, in aggregate_by_record's order; both must be constant within a record."""
    labels, patient_keys = np.asarray(labels), np.asarray(patient_keys)
    if not len(record_ids) == len(labels) == len(patient_keys):
        raise ValueError(f"{len(record_ids)} record ids, {len(labels)} label rows, {len(patient_keys)} patient keys")
    if len(labels) == 0:
        raise ValueError("no windows to aggregate")
    unique_ids, order, starts, sizes = _group_rows(record_ids)
    record_of_row = np.repeat(np.arange(len(unique_ids)), sizes)
    for name, values in (("labels", labels), ("patient keys", patient_keys)):
        grouped = values[order]
        first = grouped[starts]
        differs = (grouped != first[record_of_row]).reshape(len(grouped), -1).any(axis=1)
        if differs.any():
            bad = unique_ids[np.unique(record_of_row[differs])]
            raise ValueError(f"{name} differ between windows of record(s) {list(bad[:5])}")
    return RecordTargets(unique_ids, labels[order][starts], patient_keys[order][starts])


def multi_hot(labels: Iterable[Iterable[str]], class_names: Sequence[str]) -> np.ndarray:
    """(n, C) 0/1 matrix from per-row label lists; labels outside class_names belong to no task class."""
    column = {name: c for c, name in enumerate(class_names)}
    rows = list(labels)
    y = np.zeros((len(rows), len(column)), dtype=np.int8)
    for i, row_labels in enumerate(rows):
        for label in row_labels:
            if label in column:
                y[i, column[label]] = 1
    return y


# --------------------------------------------------------------------------------------------------
# Point estimates (scikit-learn)


def _check_predictions(y_true: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Labels and scores as 2-D arrays of the same shape (a ValueError otherwise)."""
    y, s = np.asarray(y_true), np.asarray(scores, dtype=np.float64)
    if y.ndim == 1:
        y = y[:, None]
    if s.ndim == 1:
        s = s[:, None]
    if y.shape != s.shape or y.ndim != 2:
        raise ValueError(f"y_true {np.shape(y_true)} and scores {np.shape(scores)} must both be (n, C)")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("y_true must be 0/1 (multi-hot)")
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite")
    return y.astype(np.int8), s


def _defined_classes(y: np.ndarray) -> np.ndarray:
    positives = y.sum(axis=0)
    return (positives > 0) & (positives < len(y))


def _macro(per_class: np.ndarray, defined: np.ndarray) -> MacroScore:
    value = float(per_class[defined].mean()) if defined.any() else float("nan")
    return MacroScore(value, per_class, tuple(int(c) for c in np.flatnonzero(~defined)))


def _per_class(binary_metric: Callable[[np.ndarray, np.ndarray], float], y: np.ndarray, s: np.ndarray) -> np.ndarray:
    defined = _defined_classes(y)
    return np.array([binary_metric(y[:, c], s[:, c]) if defined[c] else np.nan for c in range(y.shape[1])])


def per_class_auroc(y_true: np.ndarray, scores: np.ndarray) -> np.ndarray:
    y, s = _check_predictions(y_true, scores)
    return _per_class(roc_auc_score, y, s)


def per_class_auprc(y_true: np.ndarray, scores: np.ndarray) -> np.ndarray:
    y, s = _check_predictions(y_true, scores)
    return _per_class(average_precision_score, y, s)


def macro_auroc(y_true: np.ndarray, scores: np.ndarray) -> MacroScore:
    y, s = _check_predictions(y_true, scores)
    return _macro(_per_class(roc_auc_score, y, s), _defined_classes(y))


def macro_auprc(y_true: np.ndarray, scores: np.ndarray) -> MacroScore:
    y, s = _check_predictions(y_true, scores)
    return _macro(_per_class(average_precision_score, y, s), _defined_classes(y))


def f1_at_thresholds(y_true: np.ndarray, scores: np.ndarray, thresholds: np.ndarray) -> MacroScore:
    """F1 of ``score >= threshold`` per class; the macro F1 covers the same classes as macro AUROC."""
    y, s = _check_predictions(y_true, scores)
    thresholds = np.broadcast_to(np.asarray(thresholds, dtype=np.float64), (y.shape[1],))
    per_class = _per_class(lambda yc, sc: f1_score(yc, sc, zero_division=0), y, (s >= thresholds).astype(np.int8))
    return _macro(per_class, _defined_classes(y))


def tune_thresholds(y_val: np.ndarray, s_val: np.ndarray) -> np.ndarray:
    """Per-class threshold maximising F1 of ``score >= threshold`` on validation.

    The threshold lies midway between the best cut's score and the next lower score, which gives the same
    validation F1 as the score itself but does not sit on a validation sample. A class with no validation
    positives gets a threshold above every validation score (F1 is 0 whatever is predicted).
    """
    y, s = _check_predictions(y_val, s_val)
    thresholds = np.empty(y.shape[1])
    for c in range(y.shape[1]):
        order = np.argsort(-s[:, c], kind="stable")
        values, positives = s[order, c], y[order, c].astype(np.int64)
        n_pos = positives.sum()
        if n_pos == 0:
            thresholds[c] = np.nextafter(values[0], np.inf)
            continue
        # Only the last row of a run of equal scores is a cut: ties are predicted alike.
        cuts = np.flatnonzero(np.append(values[1:] != values[:-1], True))
        tp = np.cumsum(positives)[cuts]
        predicted = cuts + 1
        best = int(np.argmax(2 * tp / (predicted + n_pos)))
        at = values[cuts[best]]
        if best + 1 < len(cuts):
            below = values[cuts[best + 1]]
            middle = below + (at - below) / 2
            thresholds[c] = middle if below < middle <= at else at
        else:
            thresholds[c] = at
    return thresholds


# --------------------------------------------------------------------------------------------------
# Weighted metrics: many resamples at once, each given as per-record multiplicities (B, n)


def _tie_groups(s: np.ndarray, y: np.ndarray, sample_weight: np.ndarray,
                descending: bool) -> tuple[np.ndarray, np.ndarray]:
    """Positive and negative weight per resample and per run of equal scores, runs in score order: (B, G) each."""
    order = np.argsort(-s if descending else s, kind="stable")
    values = s[order]
    starts = np.flatnonzero(np.concatenate([[True], values[1:] != values[:-1]]))
    weights = sample_weight[:, order].astype(np.float64)
    is_pos = y[order].astype(bool)
    pos = np.add.reduceat(np.where(is_pos, weights, 0.0), starts, axis=1)
    neg = np.add.reduceat(np.where(is_pos, 0.0, weights), starts, axis=1)
    return pos, neg


def _nan_where_undefined(values: np.ndarray, n_pos: np.ndarray, n_neg: np.ndarray) -> np.ndarray:
    return np.where((n_pos > 0) & (n_neg > 0), values, np.nan)


def _weighted_auroc_one(y: np.ndarray, s: np.ndarray, sample_weight: np.ndarray) -> np.ndarray:
    """One class's AUROC under each resample's record weights, (B,)."""
    pos, neg = _tie_groups(s, y, sample_weight, descending=False)
    # Mann-Whitney: each positive beats the negatives below its score and ties half of those level with it.
    negatives_below = np.cumsum(neg, axis=1) - neg
    n_pos, n_neg = pos.sum(axis=1), neg.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        auc = (pos * (negatives_below + 0.5 * neg)).sum(axis=1) / (n_pos * n_neg)
    return _nan_where_undefined(auc, n_pos, n_neg)


def _weighted_auprc_one(y: np.ndarray, s: np.ndarray, sample_weight: np.ndarray) -> np.ndarray:
    """One class's average precision under each resample's record weights, (B,)."""
    pos, neg = _tie_groups(s, y, sample_weight, descending=True)
    tp, fp = np.cumsum(pos, axis=1), np.cumsum(neg, axis=1)
    n_pos, n_neg = tp[:, -1], fp[:, -1]
    # Step-wise AP (scikit-learn's definition): precision at each cut, weighted by the recall it adds.
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(tp + fp > 0, tp / (tp + fp), 0.0)
        ap = (pos * precision).sum(axis=1) / n_pos
    return _nan_where_undefined(ap, n_pos, n_neg)


def _per_class_weighted(one_class: Callable, y_true: np.ndarray, scores: np.ndarray,
                        sample_weight: np.ndarray) -> np.ndarray:
    y, s = _check_predictions(y_true, scores)
    weights = np.atleast_2d(sample_weight)
    return np.stack([one_class(y[:, c], s[:, c], weights) for c in range(y.shape[1])], axis=1)


def per_class_auroc_weighted(y_true: np.ndarray, scores: np.ndarray, sample_weight: np.ndarray) -> np.ndarray:
    """(B, C) AUROC under each row of sample_weight (B, n); equals scikit-learn's with sample_weight=row."""
    return _per_class_weighted(_weighted_auroc_one, y_true, scores, sample_weight)


def per_class_auprc_weighted(y_true: np.ndarray, scores: np.ndarray, sample_weight: np.ndarray) -> np.ndarray:
    """(B, C) average precision under each row of sample_weight (B, n)."""
    return _per_class_weighted(_weighted_auprc_one, y_true, scores, sample_weight)


def per_class_f1_weighted(y_true: np.ndarray, scores: np.ndarray, sample_weight: np.ndarray, *,
                          thresholds: np.ndarray) -> np.ndarray:
    """(B, C) F1 of ``score >= threshold`` under each row of sample_weight (B, n); NaN for a single-valued class."""
    y, s = _check_predictions(y_true, scores)
    weights = np.atleast_2d(sample_weight).astype(np.float64)
    predicted = (s >= np.asarray(thresholds, dtype=np.float64)).astype(np.float64)
    actual = y.astype(np.float64)
    tp = weights @ (actual * predicted)
    fp = weights @ ((1 - actual) * predicted)
    n_pos, n_neg = weights @ actual, weights @ (1 - actual)
    with np.errstate(divide="ignore", invalid="ignore"):
        f1 = np.where(tp > 0, 2 * tp / (tp + fp + n_pos), 0.0)
    return _nan_where_undefined(f1, n_pos, n_neg)


def macro_metric(per_class_weighted: Callable[..., np.ndarray], classes: Sequence[int]) -> WeightedMetric:
    """A bootstrap_ci metric: the mean over `classes`, undefined (NaN) if any of them is undefined in a resample.

    Fixing the classes keeps every resample's average over the same classes as the point estimate.
    """
    classes = np.asarray(classes, dtype=np.int64)

    def metric(y: np.ndarray, s: np.ndarray, sample_weight: np.ndarray) -> np.ndarray:
        if len(classes) == 0:
            return np.full(len(np.atleast_2d(sample_weight)), np.nan)
        return per_class_weighted(y, s, sample_weight)[:, classes].mean(axis=1)

    return metric


def per_resample(metric_fn: Callable[[np.ndarray, np.ndarray], float]) -> WeightedMetric:
    """Lets bootstrap_ci take any plain ``metric_fn(y, s) -> float`` by materialising each resample (slow)."""

    def metric(y: np.ndarray, s: np.ndarray, sample_weight: np.ndarray) -> np.ndarray:
        rows = np.arange(len(y))
        values = np.empty(len(sample_weight))
        for b, counts in enumerate(np.atleast_2d(sample_weight)):
            chosen = np.repeat(rows, counts)
            try:
                values[b] = metric_fn(y[chosen], s[chosen])
            except ValueError:  # scikit-learn's way of saying the metric is undefined on this sample
                values[b] = np.nan
        return values

    return metric


# --------------------------------------------------------------------------------------------------
# Reports


def evaluate(y_true: np.ndarray, scores: np.ndarray, patient_keys: np.ndarray, class_names: Sequence[str],
             thresholds: np.ndarray, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05) -> dict[str, float]:
    """Record-level metrics as a flat dict of floats (ready for mlflow.log_metrics).

    Keys: macro_{auroc,auprc,f1} with _ci_low, _ci_high and _boot_skipped; {auroc,auprc,f1}_<class>
    (NaN for a class with a single label value, which is also left out of the macro averages and warned
    about); threshold_<class>; n_records, n_patients, n_undefined_classes. The three CIs share their
    patient resamples.
    """
    y, s = _check_predictions(y_true, scores)
    class_names = list(class_names)
    if len(class_names) != y.shape[1]:
        raise ValueError(f"{len(class_names)} class names for {y.shape[1]} score columns")
    patient_keys = np.asarray(patient_keys)
    thresholds = np.broadcast_to(np.asarray(thresholds, dtype=np.float64), (y.shape[1],))
    defined = np.flatnonzero(_defined_classes(y))
    undefined = [class_names[c] for c in np.flatnonzero(~_defined_classes(y))]
    if undefined:
        warnings.warn(UndefinedClassWarning(
            f"classes {undefined} have a single label value among {len(y)} records: no AUROC/AUPRC/F1, "
            "left out of the macro averages"), stacklevel=2)

    results: dict[str, float] = {}
    for name, point, per_class_weighted in (
        ("auroc", macro_auroc(y, s), per_class_auroc_weighted),
        ("auprc", macro_auprc(y, s), per_class_auprc_weighted),
        ("f1", f1_at_thresholds(y, s, thresholds), partial(per_class_f1_weighted, thresholds=thresholds)),
    ):
        ci = bootstrap_ci(macro_metric(per_class_weighted, defined), y, s, patient_keys, n_boot, alpha, seed)
        results[f"macro_{name}"] = point.value
        results[f"macro_{name}_ci_low"] = ci.low
        results[f"macro_{name}_ci_high"] = ci.high
        results[f"macro_{name}_boot_skipped"] = float(ci.n_skipped)
        results.update({f"{name}_{cls}": float(v) for cls, v in zip(class_names, point.per_class)})
    results.update({f"threshold_{cls}": float(t) for cls, t in zip(class_names, thresholds)})
    results["n_records"] = float(len(y))
    results["n_patients"] = float(len(np.unique(patient_keys)))
    results["n_undefined_classes"] = float(len(undefined))
    return results


def metrics_table(results: dict[str, float]) -> pd.DataFrame:
    """One row per metric of an evaluate() dict, its CI bounds in columns (NaN where it has none)."""
    suffixes = ("_ci_low", "_ci_high")
    rows = [
        {"metric": key, "value": value,
         "ci_low": results.get(f"{key}_ci_low", np.nan), "ci_high": results.get(f"{key}_ci_high", np.nan)}
        for key, value in results.items() if not key.endswith(suffixes)
    ]
    return pd.DataFrame(rows, columns=["metric", "value", "ci_low", "ci_high"])


def roc_curve_figure(y_true: np.ndarray, scores: np.ndarray, class_names: Sequence[str]) -> Figure:
    """Per-class ROC curves, AUROC in the legend; an Agg-backed Figure (no pyplot state, nothing displayed)."""
    y, s = _check_predictions(y_true, scores)
    figure = Figure(figsize=(5.5, 5))
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    auroc = _per_class(roc_auc_score, y, s)
    for c, name in enumerate(class_names):
        if np.isnan(auroc[c]):
            ax.plot([], [], label=f"{name} (undefined: one label value)")
            continue
        fpr, tpr, _ = roc_curve(y[:, c], s[:, c])
        ax.plot(fpr, tpr, label=f"{name} (AUROC {auroc[c]:.3f})")
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=0.8)
    ax.set(xlabel="False positive rate", ylabel="True positive rate", xlim=(0, 1), ylim=(0, 1.01), aspect="equal")
    ax.legend(loc="lower right", fontsize="small")
    figure.tight_layout()
    return figure


# --------------------------------------------------------------------------------------------------
# Label efficiency


def sample_label_fraction(record_ids: np.ndarray, patient_keys: np.ndarray, fraction: float,
                          seed: int = 0) -> np.ndarray:
    """Record ids (sorted, unique) of a random `fraction` of the patients, whole patients only.

    Deterministic given the seed and the set of patients (not their order), at least one patient, and
    nested: with one seed the 1 % subset lies inside the 10 % subset, so a label-efficiency curve adds
    patients rather than swapping them.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    record_ids, patient_keys = np.asarray(record_ids), np.asarray(patient_keys)
    if len(record_ids) != len(patient_keys) or len(record_ids) == 0:
        raise ValueError(f"{len(record_ids)} record ids for {len(patient_keys)} patient keys")
    pairs = pd.DataFrame({"record": record_ids, "patient": patient_keys}).drop_duplicates()
    shared = pairs["record"][pairs["record"].duplicated()]
    if len(shared):
        raise ValueError(f"records under more than one patient key: {list(shared[:5])}")
    patients, patient_of_row = np.unique(patient_keys, return_inverse=True)
    n_keep = max(1, int(round(fraction * len(patients))))
    kept = np.zeros(len(patients), dtype=bool)
    kept[np.random.default_rng(seed).permutation(len(patients))[:n_keep]] = True
    return np.unique(record_ids[kept[patient_of_row]])
