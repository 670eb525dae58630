"""The evaluation report: `python -m crema.stages.compare [--metric test_macro_auroc]` (also `crema compare`).

Prints the table of encoders and baselines × tasks from the probe and fine-tune sweeps in MLflow
(the latest sweep of each), the test metric with its patient-bootstrap 95% CI. Rows are keyed by the
encoder's pretraining run; `--task/--method/--encoder/--pretrain-run` select sweeps, and
`--format csv|json|markdown` writes the table for other tools instead of drawing it.
"""

from __future__ import annotations

from typing import Annotated, Optional

import pandas as pd
import typer
from rich.console import Console
from rich.table import Table

from crema.evaluation.report import FORMATS, compare_table, filter_runs, render
from crema.stages.common import exit_2_on_config_error
from crema.tracking import check_reachable, resolve_tracking_uri, sweep_runs

console = Console()


def run(tracking_uri: str | None = None, experiment: str = "crema-downstream",
        metric: str = "test_macro_auroc", **filters: str | None) -> pd.DataFrame:
    """The comparison table (rows: method · encoder · pretraining run, columns: task); empty when no sweep
    has finished. `filters`: task, method, encoder, pretrain_run (see crema.evaluation.report.FILTERS)."""
    uri = resolve_tracking_uri(tracking_uri)
    check_reachable(uri)
    return compare_table(filter_runs(sweep_runs(uri, experiment), **filters), metric)


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
    task: Annotated[Optional[str], typer.Option(help="Only this task")] = None,
    method: Annotated[Optional[str], typer.Option(help="Only probe or finetune")] = None,
    encoder: Annotated[Optional[str], typer.Option(help="Only this encoder name")] = None,
    pretrain_run: Annotated[Optional[str], typer.Option(help="Only encoders of this pretraining run")] = None,
    output_format: Annotated[str, typer.Option("--format", help=f"One of {', '.join(FORMATS)}")] = "table",
) -> None:
    """Print encoders and baselines × tasks (test metric [95% CI]) from the sweeps in MLflow."""
    if output_format not in FORMATS:
        raise typer.BadParameter(f"unknown format {output_format!r}; one of {', '.join(FORMATS)}",
                                 param_hint="--format")
    with exit_2_on_config_error():
        table = run(tracking_uri, experiment, metric, task=task, method=method, encoder=encoder,
                    pretrain_run=pretrain_run)
    if output_format == "table":
        print_table(table, f"{metric} on test (best trial per sweep, chosen on val)")
    else:
        typer.echo(render(table, output_format), nl=False)


if __name__ == "__main__":
    typer.run(main)
