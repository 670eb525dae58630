"""What an evaluation leaves in MLflow: the chosen model's test evaluation and the cross-domain table on a
sweep's parent run, and a `crema drift` measurement as its own run."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping
from pathlib import Path

import mlflow
import pandas as pd
from matplotlib.figure import Figure

from crema.tracking.names import KIND_DRIFT, METRIC_BEST_VAL_AUROC, TAG_KIND, TEST_METRIC_PREFIX
from crema.tracking.server import ensure_experiment


def log_test_evaluation(val_auroc: float, results: Mapping[str, float], roc_figure: Figure,
                        metrics_csv: str, predictions: pd.DataFrame) -> None:
    """The chosen model's evaluation on the active sweep run: metrics, ROC curves, table, record predictions."""
    mlflow.log_metric(METRIC_BEST_VAL_AUROC, val_auroc)
    mlflow.log_metrics({f"{TEST_METRIC_PREFIX}{k}": v for k, v in results.items()})
    mlflow.log_figure(roc_figure, "roc_curves.png")
    mlflow.log_text(metrics_csv, "metrics/test_metrics.csv")
    mlflow.log_text(json.dumps(dict(results), indent=2), "metrics/test_metrics.json")
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "test_records.parquet"
        predictions.to_parquet(path)
        mlflow.log_artifact(str(path), "predictions")


def log_cross_domain(metrics: Mapping[str, float], table: pd.DataFrame, figure: Figure) -> None:
    """The cross-domain table on the active sweep run: its cells as test metrics, the table and its plot."""
    mlflow.log_metrics({f"{TEST_METRIC_PREFIX}{k}": v for k, v in metrics.items()})
    mlflow.log_text(table.to_csv(index=False), "metrics/cross_domain.csv")
    mlflow.log_figure(figure, "cross_domain.png")


def log_drift_run(tracking_uri: str, experiment: str, run_name: str, tags: Mapping[str, str],
                  params: Mapping[str, object], metrics: Mapping[str, float], embedding_map: Figure,
                  summary: Mapping) -> str:
    """One `crema drift` measurement as its own run: statistics as metrics, the map and a JSON summary."""
    mlflow.set_tracking_uri(tracking_uri)
    experiment_id = ensure_experiment(experiment, tracking_uri)
    with mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags={**tags, TAG_KIND: KIND_DRIFT}) as run:
        mlflow.log_params(dict(params))
        mlflow.log_metrics(dict(metrics))
        mlflow.log_figure(embedding_map, "drift_map.png")
        mlflow.log_dict(dict(summary), "drift.json")
    return run.info.run_id
