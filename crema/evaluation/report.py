"""The comparison table: every encoder and baseline × every task, read back from the sweeps' MLflow runs.

A sweep's parent run (tag ``crema.kind=sweep``) carries task, method, encoder and label_fraction tags
and the test metrics of its best trial (read back by :func:`crema.tracking.sweep_runs`). The latest sweep
of each (task, label fraction, method, encoder) is the one reported.
"""

from __future__ import annotations

import math

import pandas as pd

from crema.tracking import SWEEP_GROUP, TAG_ENCODER_INIT

GROUP = SWEEP_GROUP


def baseline_name(method: str, encoder: str, encoder_init: str) -> str:
    """How a row reads: fine-tuning a random init is training from scratch."""
    if method == "finetune" and encoder_init == "random":
        return f"supervised from scratch ({encoder})"
    return f"{method} · {encoder}"


def column_name(task: str, train_sources: str, test_sources: str, label_fraction: str) -> str:
    """The task, its sources when it is a cross-hospital evaluation, and its label fraction when not all."""
    name = task
    if (train_sources, test_sources) != ("*", "*"):
        name += f" ({train_sources} → {test_sources})"
    if label_fraction not in ("1", ""):
        name += f" @ {label_fraction}"
    return name


def _cell(row: pd.Series, metric: str) -> str:
    """value [CI low, CI high], or – when the sweep has no such metric."""
    value = row.get(metric, math.nan)
    if value is None or pd.isna(value):
        return "–"
    low, high = row.get(f"{metric}_ci_low", math.nan), row.get(f"{metric}_ci_high", math.nan)
    if pd.isna(low) or pd.isna(high):
        return f"{value:.3f}"
    return f"{value:.3f} [{low:.3f}, {high:.3f}]"


def compare_table(runs: pd.DataFrame, metric: str = "test_macro_auroc") -> pd.DataFrame:
    """Rows: method · encoder (baselines included); columns: task (see column_name); cells: value [CI]."""
    if runs.empty:
        return pd.DataFrame()
    latest = runs.sort_values("start_time", ascending=False).drop_duplicates(GROUP)
    latest = latest.assign(
        row=[baseline_name(m, e, i) for m, e, i in zip(latest["method"], latest["encoder"], latest[TAG_ENCODER_INIT])],
        column=[column_name(*values) for values in
                zip(latest["task"], latest["train_sources"], latest["test_sources"], latest["label_fraction"])],
        cell=[_cell(r, metric) for _, r in latest.iterrows()],
    )
    table = latest.pivot(index="row", columns="column", values="cell").fillna("–")
    table.index.name = metric
    table.columns.name = None
    return table.sort_index()
