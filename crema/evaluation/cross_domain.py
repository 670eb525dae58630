"""The cross-domain table: one model's test scores split by the hospital (source) each record came from.

A model trained on some sources is scored on the test records of each of them (in-domain) and on every record
of the sources it never saw (external). Every row carries a patient-bootstrap CI and its class's positives,
and the drop from the in-domain score. A class a source never codes (or codes for every record) has no AUROC
there: its row says so rather than averaging a 0.5 into the macro, and the macro of a source is over the
classes it defines, its drop against the in-domain macro over those same classes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from crema.evaluation.bootstrap import bootstrap_ci
from crema.evaluation.metrics import macro_metric, per_class_auroc_weighted

IN_DOMAIN = "in-domain"  # the pooled test records of the training sources: the reference of every drop
MACRO = "macro"
COLUMNS = ["source", "domain", "class", "auroc", "ci_low", "ci_high", "drop", "n_records", "n_pos", "note"]


@dataclass(frozen=True)
class ScoredRecords:
    """Record-level test labels and scores, each record named ``source/record_id``."""

    keys: np.ndarray  # (R,)
    labels: np.ndarray  # (R, C)
    patient_keys: np.ndarray  # (R,)
    scores: np.ndarray  # (R, C)

    def sources(self) -> np.ndarray:
        return np.array([key.split("/", 1)[0] for key in self.keys], dtype=object)

    def subset(self, rows: np.ndarray) -> "ScoredRecords":
        return ScoredRecords(self.keys[rows], self.labels[rows], self.patient_keys[rows], self.scores[rows])


def _undefined_reason(n_pos: int, n_records: int) -> str:
    return "no positives" if n_pos == 0 else "all positive" if n_pos == n_records else ""


def _auroc_rows(records: ScoredRecords, classes: list[str], n_boot: int, seed: int) -> list[dict]:
    """One row per class and a macro row: AUROC with its patient-bootstrap 95% CI, positives, why undefined."""
    n = len(records.keys)
    n_pos = records.labels.sum(axis=0).astype(int)
    defined = np.flatnonzero((n_pos > 0) & (n_pos < n))
    rows = []
    for c, name in enumerate(classes):
        row = {"class": name, "n_records": n, "n_pos": int(n_pos[c]), "note": _undefined_reason(n_pos[c], n)}
        if c in defined:
            ci = bootstrap_ci(macro_metric(per_class_auroc_weighted, [c]), records.labels, records.scores,
                              records.patient_keys, n_boot, seed=seed)
            row.update(auroc=ci.point, ci_low=ci.low, ci_high=ci.high)
        rows.append(row)
    ci = bootstrap_ci(macro_metric(per_class_auroc_weighted, defined), records.labels, records.scores,
                      records.patient_keys, n_boot, seed=seed)
    note = ("no class defined" if len(defined) == 0 else
            f"over {', '.join(classes[c] for c in defined)}" if len(defined) < len(classes) else "")
    rows.append({"class": MACRO, "auroc": ci.point, "ci_low": ci.low, "ci_high": ci.high, "n_records": n,
                 "n_pos": int(n_pos.sum()), "note": note})
    return rows


def _with_drops(rows: list[dict], reference: list[dict]) -> list[dict]:
    """Each row's drop from the in-domain row of its class; the macro's from the in-domain macro over the
    classes this source defines (like with like: a source without HYP is not compared on HYP)."""
    ref = {row["class"]: row.get("auroc", np.nan) for row in reference}
    defined = [row["class"] for row in rows[:-1] if "auroc" in row]
    same = [ref[name] for name in defined]
    ref[MACRO] = np.mean(same) if same else np.nan
    return [{**row, "drop": ref[row["class"]] - row.get("auroc", np.nan)} for row in rows]


def cross_domain_table(records: ScoredRecords, classes: Sequence[str], in_domain_sources: Sequence[str] | None,
                       n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """The table, one row per (source, class | macro); `in_domain_sources` None: the model trained on every
    source. With several in-domain sources their pooled records come first (source "in-domain"): the
    reference of every drop; with one, that source is the reference."""
    classes = list(classes)
    sources = records.sources()
    trained_on = set(sources) if in_domain_sources is None else set(in_domain_sources) & set(sources)
    in_domain = np.isin(sources, sorted(trained_on))
    reference = _auroc_rows(records.subset(np.flatnonzero(in_domain)), classes, n_boot, seed) if trained_on else []
    rows = []
    if len(trained_on) > 1:
        rows += [{"source": IN_DOMAIN, "domain": IN_DOMAIN, **row} for row in _with_drops(reference, reference)]
    for source in sorted(set(sources)):
        if trained_on == {source}:
            part = reference
        else:
            part = _auroc_rows(records.subset(np.flatnonzero(sources == source)), classes, n_boot, seed)
        part = _with_drops(part, reference) if reference else part
        domain = IN_DOMAIN if source in trained_on else "external"
        rows += [{"source": source, "domain": domain, **row} for row in part]
    table = pd.DataFrame(rows).reindex(columns=COLUMNS)
    table["note"] = table["note"].fillna("")
    return table


def by_source_metrics(table: pd.DataFrame) -> dict[str, float]:
    """The table as flat MLflow metrics: ``on_<source>_auroc_<class>`` and ``on_<source>_macro_auroc``, each
    with ``_ci_low``, ``_ci_high`` and ``_drop``, and ``on_<source>_n_records``; undefined classes have none."""
    metrics: dict[str, float] = {}
    for row in table[table["source"] != IN_DOMAIN].to_dict("records"):
        metrics[f"on_{row['source']}_n_records"] = float(row["n_records"])
        if not np.isfinite(row["auroc"]):
            continue
        key = f"on_{row['source']}_" + ("macro_auroc" if row["class"] == MACRO else f"auroc_{row['class']}")
        metrics.update({key: row["auroc"], f"{key}_ci_low": row["ci_low"], f"{key}_ci_high": row["ci_high"]})
        if np.isfinite(row["drop"]):
            metrics[f"{key}_drop"] = row["drop"]
    return metrics


def cross_domain_figure(table: pd.DataFrame) -> Figure:
    """AUROC per class and macro, one bar per source with its 95% CI; undefined classes have no bar."""
    fig = Figure(figsize=(8, 4))
    ax = fig.add_subplot()
    groups = list(dict.fromkeys(table["class"]))
    sources = list(dict.fromkeys(table["source"]))
    width = 0.8 / len(sources)
    for i, source in enumerate(sources):
        part = table[table["source"] == source].set_index("class").reindex(groups)
        x = np.arange(len(groups)) + (i - (len(sources) - 1) / 2) * width
        err = np.vstack([part["auroc"] - part["ci_low"], part["ci_high"] - part["auroc"]]).clip(min=0)
        ax.bar(x, part["auroc"].fillna(0), width, yerr=np.nan_to_num(err), capsize=2, label=source)
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_xticks(np.arange(len(groups)), groups)
    ax.set_ylim(0, 1)
    ax.set_ylabel("AUROC (95% patient-bootstrap CI)")
    ax.set_title("test AUROC by source: no bar where a source lacks the class")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
