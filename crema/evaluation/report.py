"""The comparison table: every encoder and baseline × every task, read back from the sweeps' MLflow runs.

A sweep's parent run (tag ``crema.kind=sweep``) carries task, method, encoder and label_fraction tags
and the test metrics of its best trial (read back by :func:`crema.tracking.sweep_runs`). The latest sweep
of each (task, sources, label fraction and draw, method, encoder, pretraining run) is the one reported: rows
are keyed by the encoder's pretraining run, so two runs' encoders of one name are two rows. The draws of a
label fraction (its patient subsets) share one cell: their mean and standard deviation.
"""

from __future__ import annotations

import json
import math

import pandas as pd

from crema.data.signals import ALL_LEADS
from crema.tracking import PRETRAIN_RUN, SWEEP_GROUP, TAG_ENCODER_INIT

GROUP = SWEEP_GROUP
FILTERS = ("task", "method", "encoder", PRETRAIN_RUN)  # what `crema compare` can select on
FORMATS = ("table", "csv", "json", "markdown")


def baseline_name(method: str, encoder: str, encoder_init: str, pretrain_run: str = "") -> str:
    """How a row reads: fine-tuning a random init is training from scratch; a pretrained encoder's row
    names its pretraining run."""
    if method == "finetune" and encoder_init == "random":
        return f"supervised from scratch ({encoder})"
    return f"{method} · {encoder}" + (f" · {pretrain_run}" if pretrain_run else "")


def filter_runs(runs: pd.DataFrame, **selected: str | None) -> pd.DataFrame:
    """The sweeps whose FILTERS columns equal the given values (None: any)."""
    unknown = set(selected) - set(FILTERS)
    if unknown:
        raise ValueError(f"cannot filter on {sorted(unknown)}; filters: {list(FILTERS)}")
    for column, value in selected.items():
        if value is not None and not runs.empty:
            runs = runs[runs[column].astype(str) == value]
    return runs


def render(table: pd.DataFrame, fmt: str) -> str:
    """The table as CSV, JSON (one object per row) or a Markdown table."""
    if fmt not in FORMATS[1:]:
        raise ValueError(f"unknown format {fmt!r}; one of {list(FORMATS)}")
    flat = table.reset_index() if not table.empty else pd.DataFrame()
    if fmt == "csv":
        return flat.to_csv(index=False)
    if fmt == "json":
        return json.dumps(flat.to_dict(orient="records"), ensure_ascii=False, indent=2)
    header = [str(c) for c in flat.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(v).replace("|", "\\|") for v in row) + " |" for row in flat.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def column_name(task: str, train_sources: str, test_sources: str, lead_set: str, label_fraction: str) -> str:
    """The task, its sources when it is a cross-hospital evaluation, and its lead set and label fraction when
    not all."""
    name = task
    if (train_sources, test_sources) != ("*", "*"):
        name += f" ({train_sources} → {test_sources})"
    if lead_set != ALL_LEADS:
        name += f" [{lead_set}]"
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


def _cell_over_draws(sweeps: pd.DataFrame, metric: str) -> str:
    """One sweep's cell; several draws of a label fraction: mean ± sd (n draws), each draw's CI left out."""
    if len(sweeps) == 1:
        return sweeps["cell"].iloc[0]
    values = sweeps[metric].astype(float).dropna() if metric in sweeps else pd.Series(dtype=float)
    if values.empty:
        return "–"
    if len(values) == 1:
        return f"{values.iloc[0]:.3f} (1 draw)"
    return f"{values.mean():.3f} ± {values.std(ddof=1):.3f} ({len(values)} draws)"


def compare_table(runs: pd.DataFrame, metric: str = "test_macro_auroc") -> pd.DataFrame:
    """Rows: method · encoder (baselines included); columns: task (see column_name); cells: value [CI]."""
    if runs.empty:
        return pd.DataFrame()
    runs = runs.assign(lead_set=runs["lead_set"].replace("", ALL_LEADS))  # sweeps from before lead sets saw all
    latest = runs.sort_values("start_time", ascending=False).drop_duplicates(GROUP)
    latest = latest.assign(
        row=[baseline_name(m, e, i, p) for m, e, i, p in
             zip(latest["method"], latest["encoder"], latest[TAG_ENCODER_INIT], latest[PRETRAIN_RUN])],
        column=[column_name(*values) for values in
                zip(latest["task"], latest["train_sources"], latest["test_sources"], latest["lead_set"],
                    latest["label_fraction"])],
        cell=[_cell(r, metric) for _, r in latest.iterrows()],
    )
    cells = {key: _cell_over_draws(sweeps, metric) for key, sweeps in latest.groupby(["row", "column"])}
    table = pd.Series(cells).unstack().fillna("–")
    table.index.name = metric
    table.columns.name = None
    return table.sort_index()
