"""The `crema` command: one subcommand per stage, each the `main` of `crema.stages.<stage>`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from crema.stages import compare as compare_stage
from crema.stages import demo as demo_stage
from crema.stages import finetune as finetune_stage
from crema.stages import ingest as ingest_stage
from crema.stages import pretrain as pretrain_stage
from crema.stages import probe as probe_stage

app = typer.Typer(help="CREMA: 12-lead ECG foundation model pipeline on Ray.", no_args_is_help=True,
                  pretty_exceptions_show_locals=False)
data_app = typer.Typer(help="Get data: the real PTB-XL, or a synthetic corpus.", no_args_is_help=True)
app.add_typer(data_app, name="data")
sources_app = typer.Typer(help="Hospital sources: the file formats that can be read.", no_args_is_help=True)
app.add_typer(sources_app, name="sources")

app.command("ingest")(ingest_stage.main)
app.command("pretrain")(pretrain_stage.main)
app.command("probe")(probe_stage.main)
app.command("finetune")(finetune_stage.main)
app.command("compare")(compare_stage.main)
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

    from crema.data.readers import installed_readers

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


if __name__ == "__main__":
    app()
