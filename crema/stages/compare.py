"""The evaluation report: `python -m crema.stages.compare [--metric test_macro_auroc]` (also `crema compare`).

Prints the table of encoders and baselines × tasks from the probe and fine-tune sweeps in MLflow
(the latest sweep of each), the test metric with its patient-bootstrap 95% CI.
"""

from __future__ import annotations

from typing import Annotated, Optional

import pandas as pd
import typer
from rich.console import Console
from rich.table import Table

from crema.evaluation.report import compare_table
from crema.tracking import resolve_tracking_uri, sweep_runs

console = Console()


def run(tracking_uri: str | None = None, experiment: str = "crema-downstream",
        metric: str = "test_macro_auroc") -> pd.DataFrame:
    """The comparison table (rows: method · encoder, columns: task); empty when no sweep has finished."""
    return compare_table(sweep_runs(resolve_tracking_uri(tracking_uri), experiment), metric)


def print_table(table: pd.DataFrame, title: str) -> None:
    """The comparison table on the console (or a line saying there is none)."""
    if table.empty:
        console.print("no finished probe or fine-tune sweeps found")
        return
    out = Table(title=title)
    out.add_column(table.index.name or "")
    for column in table.columns:
        out.add_column(str(column))
    for name, row in table.iterrows():
        out.add_row(str(name), *map(str, row.tolist()))
    console.print(out)


def main(
    tracking_uri: Annotated[Optional[str], typer.Option(help="MLflow URI (default: $MLFLOW_TRACKING_URI, "
                                                             "else sqlite:///./mlflow.db)")] = None,
    experiment: Annotated[str, typer.Option(help="The downstream experiment")] = "crema-downstream",
    metric: Annotated[str, typer.Option(help="test_macro_auroc, test_macro_auprc, test_macro_f1, ...")] = \
        "test_macro_auroc",
) -> None:
    """Print encoders and baselines × tasks (test metric [95% CI]) from the sweeps in MLflow."""
    print_table(run(tracking_uri, experiment, metric), f"{metric} on test (best trial per sweep, chosen on val)")


if __name__ == "__main__":
    typer.run(main)
