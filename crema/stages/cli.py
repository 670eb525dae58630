"""The `crema` command: one subcommand per stage, each the `main` of `crema.stages.<stage>`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from crema import logs

from crema.config import ConfigError
from crema.data.signals import LEADS
from crema.stages import compare as compare_stage
from crema.stages import demo as demo_stage
from crema.stages import drift as drift_stage
from crema.stages import finetune as finetune_stage
from crema.stages import ingest as ingest_stage
from crema.stages import pretrain as pretrain_stage
from crema.stages import sweep_pretrain as sweep_pretrain_stage
from crema.stages import probe as probe_stage
from crema.stages.common import exit_2_on_config_error

app = typer.Typer(help="CREMA: 12-lead ECG foundation model pipeline on Ray.", no_args_is_help=True,
                  pretty_exceptions_show_locals=False)
data_app = typer.Typer(help="Get data: the real PTB-XL, or a synthetic corpus.", no_args_is_help=True)
app.add_typer(data_app, name="data")
sources_app = typer.Typer(help="Hospital sources: the file formats that can be read, a quick check of a source.",
                          no_args_is_help=True)
app.add_typer(sources_app, name="sources")
dataset_app = typer.Typer(help="An ingested dataset (Iceberg tables): its version, removing a source.",
                          no_args_is_help=True)
app.add_typer(dataset_app, name="dataset")



@app.callback()
def setup(
    log_level: Annotated[Optional[str], typer.Option(
        "--log-level", help=f"DEBUG, INFO, WARNING or ERROR (default: ${logs.ENV_LEVEL}, else INFO)")] = None,
) -> None:
    """Logging for every subcommand (and the Ray workers it starts, through the environment)."""
    try:
        level = logs.level_name(log_level)
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--log-level")
    os.environ[logs.ENV_LEVEL] = level
    logs.configure(level)


app.command("ingest")(ingest_stage.main)
app.command("pretrain")(pretrain_stage.main)
app.command("sweep-pretrain")(sweep_pretrain_stage.main)
app.command("probe")(probe_stage.main)
app.command("finetune")(finetune_stage.main)
app.command("compare")(compare_stage.main)
app.command("drift")(drift_stage.main)
app.command("demo")(demo_stage.main)


@data_app.command("download")
def download(
    dataset: Annotated[str, typer.Argument(help="Only 'ptbxl' for now")],
    dest: Annotated[Path, typer.Option(help="Destination folder")],
    base_url: Annotated[str, typer.Option(help="PhysioNet release URL")] = "https://physionet.org/files/ptb-xl/1.0.3/",
    workers: int = 8,
) -> None:
    """Fetch a public dataset, resumable and checked against its SHA256SUMS."""
    from crema.data.download import DownloadError, download_ptbxl

    if dataset != "ptbxl":
        raise typer.BadParameter(f"unknown dataset {dataset!r}; known: ptbxl")
    try:
        report = download_ptbxl(dest, base_url=base_url, workers=workers)
    except DownloadError as err:
        typer.echo(str(err), err=True)
        raise typer.Exit(1)
    typer.echo(report.summary())


@data_app.command("synthetic")
def synthetic(
    dest: Annotated[Path, typer.Option(help="Destination folder")],
    n_records: int = 200,
    seed: int = 0,
) -> None:
    """Write a small synthetic 12-lead corpus as real WFDB files, with labels and a source YAML."""
    from crema.data.synthetic import write_synthetic_corpus

    write_synthetic_corpus(dest, n_records=n_records, seed=seed)
    typer.echo(f"wrote {n_records} records and {dest / 'source.yaml'}")


@sources_app.command("formats")
def formats() -> None:
    """List the installed readers (entry-point group `crema.readers`): the names a source's `format` takes."""
    import sys

    from crema.config import installed_readers

    for name, entry_point in sorted(installed_readers().items()):
        try:
            cls = entry_point.load()
            extensions = " ".join(dict.fromkeys(ext.lower() for ext in cls.extensions))
            doc = (sys.modules[cls.__module__].__doc__ or "").strip().replace("``", "")
            summary = doc.splitlines()[0] if doc else ""  # the module docstring's first line
        except Exception as err:  # a broken plug-in is listed, not fatal to the listing
            extensions, summary = "?", f"cannot load {entry_point.value}: {type(err).__name__}: {err}"
        provider = entry_point.dist.name if entry_point.dist else "?"
        typer.echo(f"{name:<12} {extensions:<10} {provider:<10} {summary}")


@sources_app.command("check")
def check(
    source: Annotated[Path, typer.Argument(help="A source YAML")],
    records: Annotated[int, typer.Option("--records", "-n", help="How many records to read")] = 5,
    out: Annotated[Path, typer.Option(help="Folder for the 12-lead PNGs")] = Path("source-check"),
    config: Annotated[Optional[Path], typer.Option(help="Ingest settings YAML (rate, leads, filters)")] = None,
) -> None:
    """Read a few records of a source without writing a dataset: a table of what each became, and a 12-lead
    PNG per record for a visual check, before ingesting a new hospital."""
    from crema.config import IngestConfig, SourceConfig, load_yaml
    from crema.data.report import check_source

    with exit_2_on_config_error():
        cfg = load_yaml(config, IngestConfig) if config else IngestConfig()
        checked = check_source(load_yaml(source, SourceConfig), cfg, records, out)
        if not checked:
            raise ConfigError(f"no records found for {source}")
    for r in checked:
        leads = "" if r.lead_quality is None else " ".join(
            f"{lead}:{q}" for lead, q in zip(LEADS, r.lead_quality) if q not in ("ok", "derived"))
        what = f"ok  fs={r.fs:g} Hz  {r.duration_s:.1f} s  {leads or 'all leads ok'}" if r.status == "ok" \
            else f"rejected  {r.reason}"
        flags = f"  flags: {','.join(r.flags)}" if r.flags else ""
        labels = f"  labels: {','.join(r.labels)}" if r.labels else ""
        unmapped = f"  unmapped: {' | '.join(r.unmapped_labels)}" if r.unmapped_labels else ""
        typer.echo(f"{r.record_id:<32} {what}{flags}{labels}{unmapped}" + (f"  → {r.png}" if r.png else ""))


@dataset_app.command("drop-source")
def drop_source(
    output: Annotated[str, typer.Argument(help="The dataset URI (the ingest --output)")],
    source: Annotated[str, typer.Argument(help="The source name to remove")],
) -> None:
    """Remove one source's windows and manifest rows (the only way a source leaves a dataset)."""
    from crema.data import catalog

    with exit_2_on_config_error():
        dataset = catalog.open_dataset(output)
        if source not in catalog.dataset_sources(output):
            raise ConfigError(f"no source {source!r} in {output}; it holds {catalog.dataset_sources(output)}")
        records = catalog.drop_source(dataset, source)
    typer.echo(f"dropped {source} ({records} records) from {output}; "
               f"dataset version {catalog.dataset_version(output)}")


@dataset_app.command("version")
def dataset_version(output: Annotated[str, typer.Argument(help="The dataset URI (the ingest --output)")]) -> None:
    """The dataset version (the windows table's Iceberg snapshot id) and its sources."""
    from crema.data import catalog

    with exit_2_on_config_error():
        typer.echo(f"{catalog.dataset_version(output)}\t{','.join(catalog.dataset_sources(output))}")


if __name__ == "__main__":
    app()
