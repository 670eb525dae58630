"""`crema drift`: how far a new hospital lies from a reference in an encoder's embedding space.

    crema drift --dataset output/dataset --encoder output/runs/crema-tiny/encoder.safetensors \\
                --reference ptbxl --source ludb

A data engineer runs it before pretraining on, or deploying to, a new hospital. Both sides are read from one
dataset (a side is ``SOURCE`` or ``SOURCE:SPLIT[,SPLIT]``, e.g. ``ptbxl:train`` against ``ptbxl:test``),
embedded in one Ray Data pass each (``--encoder features``: the feature floor's hand-made numbers, no model),
and compared (:mod:`crema.evaluation.drift`): a domain-classifier AUROC with its CI, an MMD with a permutation
p-value, and a PCA map, logged to MLflow as one run of the ``crema-drift`` experiment per lead set
(``--lead-set limb6 --lead-set I``: the sides as a wearable records them, the other leads hidden as in a task's
``lead_sets``). The table joins the source's data-quality report (``reports/<source>.md``) as a section of its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Optional

import fsspec
import pyarrow as pa
import ray
import typer
from pyiceberg.expressions import And, EqualTo, In
from rich.console import Console

from crema import tracking
from crema.config import ConfigError, EmbedSettings, EncoderSpec, redact_uri
from crema.data.catalog import dataset_sources
from crema.data.report import markdown_table, write_report_section
from crema.data.signals import ALL_LEADS, lead_set_leads
from crema.evaluation.drift import DriftReport, Side, embedding_map, measure_drift
from crema.evaluation.embeddings import embedding_matrix
from crema.evaluation.encoders import encoder_exists
from crema.evaluation.lead_sets import hide_leads, lead_set_suffix
from crema.evaluation.tasks import META_COLUMNS, SIGNAL_COLUMNS, absolute_uri, record_keys
from crema.stages.common import exit_2_on_config_error, init_ray, read_windows_table, run_tags
from crema.stages.embed import embedded
from crema.train.artifacts import encoder_from_bytes

FEATURES = "features"  # --encoder features: the feature floor
EXPERIMENT = "crema-drift"
console = Console()


@dataclass(frozen=True)
class SideSpec:
    """``SOURCE`` (every split) or ``SOURCE:SPLIT[,SPLIT]``."""

    source: str
    splits: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str) -> "SideSpec":
        source, _, splits = text.partition(":")
        if not source:
            raise ConfigError(f"{text!r}: a side is SOURCE or SOURCE:SPLIT[,SPLIT]")
        return cls(source, tuple(s for s in splits.split(",") if s))

    @property
    def name(self) -> str:
        return f"{self.source}:{','.join(self.splits)}" if self.splits else self.source

    def row_filter(self):
        expr = EqualTo("source", self.source)
        return And(expr, In("split", self.splits)) if self.splits else expr


@dataclass(frozen=True)
class DriftResult:
    report: DriftReport
    run_id: str
    lead_set: str = ALL_LEADS


def load_encoder_blob(encoder: str, storage_options: dict) -> bytes | None:
    """The encoder artifact's bytes, checked to load (None for the feature floor)."""
    if encoder == FEATURES:
        return None
    if not encoder_exists(encoder, storage_options):
        raise ConfigError(f"no encoder artifact at {encoder} (or pass --encoder {FEATURES} for the feature floor)")
    with fsspec.open(encoder, "rb", **storage_options) as f:
        blob = f.read()
    encoder_from_bytes(blob, what=encoder)  # a broken artifact fails here, not in an embedding actor
    return blob


def side_embeddings(dataset: str, storage_options: dict, side: SideSpec, blob: bytes | None, version: str | None,
                    settings: EmbedSettings, lead_set: str = ALL_LEADS) -> pa.Table:
    """Every window of the side, embedded (embedding_schema rows) with only the leads of `lead_set`."""
    windows = read_windows_table(dataset, storage_options, side.row_filter(), [*SIGNAL_COLUMNS, *META_COLUMNS],
                                 version)
    if lead_set != ALL_LEADS:
        windows = windows.map_batches(hide_leads, fn_kwargs={"name": lead_set}, batch_format="pyarrow",
                                      udf_modifying_row_count=False)
    blocks = [block for block in ray.get(embedded(windows, blob, settings=settings).to_arrow_refs()) if block.num_rows]
    if not blocks:
        raise ConfigError(f"no windows of {side.name} in {dataset}")
    return pa.concat_tables(blocks)


def run(dataset: str, encoder: str, reference: str, source: str, *, lead_sets: Sequence[str] = (ALL_LEADS,),
        max_records: int = 1000, n_permutations: int = 1000, n_boot: int = 1000, seed: int = 0,
        storage_options: dict | None = None, tracking_uri: str | None = None,
        experiment: str = EXPERIMENT) -> list[DriftResult]:
    """Measure the drift of `source` from `reference` (sides of one dataset) for each lead set, log each to MLflow
    and the table to the source's data-quality report."""
    options = storage_options or {}
    dataset, encoder = absolute_uri(dataset), encoder if encoder == FEATURES else absolute_uri(encoder)
    uri = tracking.resolve_tracking_uri(tracking_uri)
    tracking.check_reachable(uri)
    sides = [SideSpec.parse(reference), SideSpec.parse(source)]
    if sides[0] == sides[1]:
        raise ConfigError(f"the reference and the source are both {sides[0].name}")
    for lead_set in lead_sets:
        try:
            lead_set_leads(lead_set)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    known = dataset_sources(dataset, options)
    missing = sorted({s.source for s in sides} - set(known))
    if missing:
        raise ConfigError(f"sources {missing} are not in {dataset} (it holds {known})")
    blob = load_encoder_blob(encoder, options)
    init_ray()
    tags = run_tags(dataset, options)  # the version, resolved once: every read uses it
    version = tags.get(tracking.TAG_DATASET_VERSION)
    spec = EncoderSpec(name="encoder", init="features") if blob is None else EncoderSpec(name="encoder", path=encoder)
    provenance = tracking.encoder_provenance(spec, uri)
    results = []
    for lead_set in dict.fromkeys(lead_sets):
        embedded_sides = []
        for side in sides:
            leads = "" if lead_set == ALL_LEADS else f", leads {lead_set}"
            console.print(f"embedding {side.name} ({'the feature floor' if blob is None else encoder}{leads})",
                          soft_wrap=True)
            table = side_embeddings(dataset, options, side, blob, version, EmbedSettings(), lead_set)
            embedded_sides.append(Side.from_windows(side.name, record_keys(table),
                                                    table["patient_key"].to_numpy(zero_copy_only=False),
                                                    embedding_matrix(table), max_records, seed))
        report = measure_drift(*embedded_sides, n_permutations=n_permutations, n_boot=n_boot, seed=seed)
        params = {"reference": sides[0].name, "source": sides[1].name, "encoder": encoder, "lead_set": lead_set,
                  "max_records": max_records, "n_permutations": n_permutations, "n_boot": n_boot, "seed": seed}
        summary = {**params, **report.metrics(), "shifted": report.shifted}
        run_id = tracking.log_drift_run(uri, experiment,
                                        f"drift-{sides[1].name}-from-{sides[0].name}{lead_set_suffix(lead_set)}",
                                        {**tags, **provenance, tracking.TAG_LEAD_SET: lead_set}, params,
                                        report.metrics(), embedding_map(embedded_sides[0], embedded_sides[1], report, lead_set),
                                        summary)
        results.append(DriftResult(report, run_id, lead_set))
    written = write_report_section(dataset, sides[1].source, f"drift {sides[1].name} from {sides[0].name} {encoder}",
                                   report_section(results, encoder, uri), options)
    if written:
        console.print(f"the table joins the data-quality report {written}", soft_wrap=True)
    return results


def report_section(results: list[DriftResult], encoder: str, tracking_uri: str) -> str:
    """The Markdown section of the source's data-quality report: one row per lead set."""
    first = results[0].report
    rows = [[r.lead_set, r.report.n_reference, r.report.n_source,
             f"{r.report.domain_auroc.point:.3f} [{r.report.domain_auroc.low:.3f}, {r.report.domain_auroc.high:.3f}]",
             f"{r.report.mmd2:.4f}", f"{r.report.mmd_p_value:.4f}", "shift" if r.report.shifted else "none",
             r.run_id] for r in results]
    return "\n".join([
        f"## Drift of {first.source} from {first.reference}", "",
        f"`crema drift` through {'the feature floor' if encoder == FEATURES else f'the encoder {encoder}'}: a "
        "domain classifier's out-of-fold AUROC (0.5: indistinguishable; 95% patient-bootstrap CI) and an MMD "
        f"permutation test ({first.n_permutations} permutations), one record per patient. MLflow: "
        f"{redact_uri(tracking_uri)}.", "",
        markdown_table(["lead set", "reference records", "source records", "domain AUROC [95% CI]", "MMD²", "p",
                        "verdict", "MLflow run"], rows), ""])


def print_report(results: list[DriftResult], tracking_uri: str | None) -> None:
    uri = tracking.resolve_tracking_uri(tracking_uri)
    for result in results:
        r = result.report
        a = r.domain_auroc
        leads = "" if result.lead_set == ALL_LEADS else f", leads {result.lead_set}"
        console.print(f"{r.source} ({r.n_source} records, one per patient{leads}) against {r.reference} "
                      f"({r.n_reference}):")
        console.print(f"  domain classifier AUROC {a.point:.3f} [95% CI {a.low:.3f}, {a.high:.3f}]  "
                      "(0.5: indistinguishable)")
        console.print(f"  MMD² {r.mmd2:.4f}, permutation p = {r.mmd_p_value:.4f} ({r.n_permutations} permutations)")
        verdict = "[red]a measurable shift[/red]: both statistics tell the sides apart" if r.shifted else \
            "[green]no measurable shift[/green] (the AUROC's CI reaches 0.5, or the MMD is not significant)"
        console.print(f"  verdict: {verdict}")
        console.print(f"  MLflow run {result.run_id}")
    if results:  # every lead set's run is in the one crema-drift experiment
        console.print(f"MLflow: {tracking.browse_hint(uri, results[-1].run_id)}", soft_wrap=True)


def main(
    dataset: Annotated[str, typer.Option("--dataset", "-d", help="The dataset (an ingest --output)")],
    encoder: Annotated[str, typer.Option("--encoder", "-e", help=f"An encoder artifact, or '{FEATURES}'")],
    reference: Annotated[str, typer.Option(help="The reference side: SOURCE or SOURCE:SPLIT[,SPLIT]")],
    source: Annotated[str, typer.Option(help="The new side, e.g. a new hospital's source")],
    lead_set: Annotated[Optional[list[str]], typer.Option(
        "--lead-set", help="Repeatable: all, limb6, a lead (I) or leads joined by '+'; default all")] = None,
    max_records: Annotated[int, typer.Option(help="At most this many records a side (one per patient)")] = 1000,
    permutations: Annotated[int, typer.Option(help="MMD permutations")] = 1000,
    seed: int = 0,
    tracking_uri: Annotated[Optional[str], typer.Option(help="MLflow URI (default: $MLFLOW_TRACKING_URI, "
                                                             "else sqlite:///./mlflow.db)")] = None,
    experiment: Annotated[str, typer.Option(help="The MLflow experiment")] = EXPERIMENT,
) -> None:
    """How far a source lies from a reference in an encoder's embedding space: domain AUROC, MMD, a PCA map."""
    with exit_2_on_config_error():
        results = run(dataset, encoder, reference, source, lead_sets=lead_set or [ALL_LEADS],
                      max_records=max_records, n_permutations=permutations, seed=seed, tracking_uri=tracking_uri,
                      experiment=experiment)
    print_report(results, tracking_uri)


if __name__ == "__main__":
    typer.run(main)
