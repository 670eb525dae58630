"""How far a new hospital's ECGs lie from a reference in an encoder's embedding space.

Two statistics, on one embedding per record (the mean of its windows) and one record per patient, so that the
units are independent and a patient seen on both sides cannot make two sources look alike:

- a domain classifier: a logistic regression told to tell the two sides apart, scored out of fold; its AUROC
  is 0.5 when they cannot be told apart, with a patient-bootstrap CI;
- the maximum mean discrepancy (MMD², RBF kernel at the median distance) with a permutation p-value: the
  share of random relabellings of the pooled records that lie as far apart.

And a picture: both sides on the first two principal components of the pooled embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from matplotlib.figure import Figure
from scipy.spatial.distance import pdist, squareform
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.preprocessing import StandardScaler

from crema.data.signals import ALL_LEADS
from crema.evaluation.bootstrap import BootstrapCI, bootstrap_ci
from crema.evaluation.metrics import aggregate_by_record, macro_metric, per_class_auroc_weighted

SIGNIFICANCE = 0.05


@dataclass(frozen=True)
class Side:
    """One side of the comparison: a name, and one embedding per record with the record's patient."""

    name: str
    embeddings: np.ndarray  # (R, D)
    patient_keys: np.ndarray  # (R,)

    @classmethod
    def from_windows(cls, name: str, record_keys: np.ndarray, patient_keys: np.ndarray, embeddings: np.ndarray,
                     max_records: int, seed: int) -> "Side":
        """Each record's mean window embedding, then one record per patient and at most `max_records` of them,
        drawn at random (`seed`)."""
        records, z = aggregate_by_record(record_keys, embeddings, how="mean")
        patient_of = dict(zip(record_keys, patient_keys))
        patients = np.array([patient_of[r] for r in records], dtype=object)
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(records))
        _, first = np.unique(patients[order], return_index=True)  # a random record of each patient
        keep = order[first]
        keep = rng.choice(keep, size=min(max_records, len(keep)), replace=False)
        return cls(name, z[keep], patients[keep])


@dataclass(frozen=True)
class DriftReport:
    reference: str
    source: str
    n_reference: int
    n_source: int
    domain_auroc: BootstrapCI
    mmd2: float
    mmd_p_value: float
    n_permutations: int

    @property
    def shifted(self) -> bool:
        """Both statistics agree that the sides differ: the AUROC's CI lies above 0.5 and the MMD is significant."""
        return self.domain_auroc.low > 0.5 and self.mmd_p_value < SIGNIFICANCE

    def metrics(self) -> dict[str, float]:
        return {"domain_auroc": self.domain_auroc.point, "domain_auroc_ci_low": self.domain_auroc.low,
                "domain_auroc_ci_high": self.domain_auroc.high, "mmd2": self.mmd2, "mmd_p_value": self.mmd_p_value,
                "n_reference_records": float(self.n_reference), "n_source_records": float(self.n_source)}


def _pooled(reference: Side, source: Side) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Standardised pooled embeddings, 0/1 side labels, patient keys (prefixed: two sources may share keys)."""
    z = np.concatenate([reference.embeddings, source.embeddings]).astype(np.float64)
    z = StandardScaler().fit_transform(z)
    y = np.concatenate([np.zeros(len(reference.embeddings)), np.ones(len(source.embeddings))]).astype(np.int64)
    patients = np.concatenate([[f"r/{p}" for p in reference.patient_keys], [f"s/{p}" for p in source.patient_keys]])
    return z, y, patients


def domain_classifier_auroc(reference: Side, source: Side, *, n_boot: int = 1000, seed: int = 0,
                            folds: int = 5) -> BootstrapCI:
    """Out-of-fold AUROC of a logistic regression telling `source` records from `reference` ones."""
    z, y, patients = _pooled(reference, source)
    folds = min(folds, int(np.bincount(y).min()))
    if folds < 2:
        raise ValueError(f"a domain classifier needs at least 2 records a side, got {np.bincount(y).tolist()}")
    classifier = LogisticRegression(C=1.0, max_iter=2000)  # on the pooled standardised embeddings
    scores = cross_val_predict(classifier, z, y, cv=StratifiedKFold(folds, shuffle=True, random_state=seed),
                               method="predict_proba")[:, 1]
    return bootstrap_ci(macro_metric(per_class_auroc_weighted, [0]), y[:, None], scores[:, None], patients,
                        n_boot, seed=seed)


def mmd_permutation_test(reference: Side, source: Side, *, n_permutations: int = 1000,
                         seed: int = 0) -> tuple[float, float]:
    """(MMD², permutation p-value) of the two sides, an RBF kernel of the pooled median distance."""
    z, y, _ = _pooled(reference, source)
    distances = squareform(pdist(z, "sqeuclidean"))
    bandwidth = np.median(distances[np.triu_indices(len(z), 1)])
    kernel = np.exp(-distances / bandwidth)
    n_ref, n = int((y == 0).sum()), len(y)

    def mmd2(is_source: np.ndarray) -> np.ndarray:
        """(P,) biased MMD² of P labellings (P, n): a' K a with a = 1/m on one side and -1/n_ref on the other."""
        weights = np.where(is_source, 1.0 / (n - n_ref), -1.0 / n_ref)
        return np.einsum("pi,ij,pj->p", weights, kernel, weights)

    observed = float(mmd2(y[None, :] == 1)[0])
    rng = np.random.default_rng(seed)
    exceed = 0
    for first in range(0, n_permutations, 200):  # 200 labellings at a time bound the (P, n) weights
        block = min(200, n_permutations - first)
        shuffled = np.argsort(rng.random((block, n)), axis=1) >= n_ref
        exceed += int((mmd2(shuffled) >= observed).sum())
    return observed, (1 + exceed) / (1 + n_permutations)


def measure_drift(reference: Side, source: Side, *, n_permutations: int = 1000, n_boot: int = 1000,
                  seed: int = 0) -> DriftReport:
    auroc = domain_classifier_auroc(reference, source, n_boot=n_boot, seed=seed)
    mmd2, p_value = mmd_permutation_test(reference, source, n_permutations=n_permutations, seed=seed)
    return DriftReport(reference.name, source.name, len(reference.embeddings), len(source.embeddings), auroc,
                       mmd2, p_value, n_permutations)


def embedding_map(reference: Side, source: Side, report: DriftReport, lead_set: str = ALL_LEADS) -> Figure:
    """Both sides on the first two principal components of the pooled, standardised embeddings."""
    z, y, _ = _pooled(reference, source)
    pca = PCA(n_components=2, random_state=0).fit(z)
    xy = pca.transform(z)
    fig = Figure(figsize=(6, 5))
    ax = fig.add_subplot()
    for side, label in ((reference, 0), (source, 1)):
        ax.scatter(*xy[y == label].T, s=8, alpha=0.5, label=f"{side.name} ({(y == label).sum()} records)")
    ratio = pca.explained_variance_ratio_
    ax.set_xlabel(f"PC 1 ({ratio[0]:.0%} of the variance)")
    ax.set_ylabel(f"PC 2 ({ratio[1]:.0%})")
    a = report.domain_auroc
    ax.set_title(f"leads {lead_set}: domain AUROC {a.point:.2f} [{a.low:.2f}, {a.high:.2f}], "
                 f"MMD² {report.mmd2:.3f} (p = {report.mmd_p_value:.3f})", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
