"""Data-quality reports: what a data engineer looks at before pretraining on a new hospital.

:func:`write_reports` writes ``OUTPUT/reports/<source>.md`` and ``.png`` with every ingest, from the
committed manifest (status and reasons, lead availability, amplitude and noise per lead, durations,
sampling rates) and the windows' labels; later measurements of the source (``crema drift``) add sections of
their own with :func:`write_report_section`, until the next ingest of the source writes a fresh report.
:func:`check_source` (``crema sources check SOURCE.yaml``) reads a
few records without writing any dataset, and draws each as a 12-lead PNG for a visual check.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: workers and CI have no display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402
from fsspec.core import url_to_fs  # noqa: E402

from crema.config import IngestConfig, SourceConfig  # noqa: E402
from crema.data.labels import LabelIndex, LabelMapper, label_name  # noqa: E402
from crema.data.readers import reader_for  # noqa: E402
from crema.data.schema import JOINED_DETAIL, twin_of  # noqa: E402
from crema.data.signals import LEADS, RecordRejected, to_canonical  # noqa: E402

QUALITY_CODES = ("ok", "derived", "missing", "flat", "saturated", "duplicate")


def markdown_table(header: list[str], rows: list[list]) -> str:
    """A Markdown table: the reports' and the sections' (crema drift) one layout."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _per_lead(column: list) -> np.ndarray:
    """(records, 12) float array from a list column (None -> NaN)."""
    values = [[np.nan if v is None else v for v in (row or [None] * len(LEADS))] for row in column]
    return np.array(values, dtype=float).reshape(-1, len(LEADS))


def source_report(source: str, manifest: pa.Table, labels: list[list[str]], version: str | None = None) -> str:
    """The Markdown report of one source from its manifest rows and its records' labels."""
    rows = manifest.filter(pc.equal(manifest["source"], source))
    status = Counter(rows["status"].to_pylist())
    reasons = Counter(r for r, s in zip(rows["reason"].to_pylist(), rows["status"].to_pylist()) if s == "rejected")
    ok = rows.filter(pc.equal(rows["status"], "ok"))
    parts = [f"# Data quality: {source}", "",
             f"Dataset version {version or '-'}; {len(rows)} records discovered, {sum(ok['n_windows'].to_pylist())} windows.",
             "", "## Records by status", "",
             markdown_table(["status", "records"], [[s, status.get(s, 0)] for s in ("ok", "rejected", "duplicate")]), ""]
    if reasons:
        parts += ["## Reject reasons", "", markdown_table(["reason", "records"], reasons.most_common()), ""]
    copies = [(r, s_, twin_of(d), JOINED_DETAIL in (d or "")) for r, s_, d in
              zip(rows["record_id"].to_pylist(), rows["status"].to_pylist(), rows["detail"].to_pylist())
              if twin_of(d) is not None]
    if copies:
        cross = [c for c in copies if c[2].split("/", 1)[0] != source]
        kept = sum(1 for c in copies if c[1] == "ok")
        parts += ["## Duplicates", "",
                  f"{len(copies)} records hold the same signal as an earlier record: {len(cross)} of another "
                  f"source's, {len(copies) - len(cross)} of this source's; {kept} kept (drop_duplicates off: a "
                  f"kept copy's patient takes its twin's patient key and split), {len(copies) - kept} dropped.", "",
                  markdown_table(["record", "status", "same signal as", "patient joined"],
                         [[r, st, twin, "yes" if joined else "-"] for r, st, twin, joined in copies[:20]]), ""]
    flags = Counter(f for value in ok["flags"].to_pylist() if value for f in value.split(","))
    if flags:
        parts += ["## Flags", "", markdown_table(["flag", "records"], flags.most_common()), ""]
    quality = ok["lead_quality"].to_pylist()
    availability = [[lead] + [sum(1 for q in quality if q and q[k] == code) for code in QUALITY_CODES]
                    for k, lead in enumerate(LEADS)]
    parts += ["## Lead availability (ok records)", "", markdown_table(["lead", *QUALITY_CODES], availability), ""]
    amplitude, noise = _per_lead(ok["lead_amplitude_mv"].to_pylist()), _per_lead(ok["lead_noise_mv"].to_pylist())

    def spread(values: np.ndarray) -> str:
        values = values[np.isfinite(values)]
        if not values.size:
            return "-"
        q1, med, q3 = np.percentile(values, [25, 50, 75])
        return f"{med:.3f} ({q1:.3f}-{q3:.3f})"

    parts += ["## Amplitude and noise per lead (median, IQR; mV)", "",
              markdown_table(["lead", "amplitude (1-99 %)", "noise"],
                     [[lead, spread(amplitude[:, k]), spread(noise[:, k])] for k, lead in enumerate(LEADS)]), ""]
    durations = np.array([v for v in ok["duration_s"].to_pylist() if v is not None], float)
    rates = Counter(f"{v:g}" for v in ok["source_fs"].to_pylist() if v is not None)
    if durations.size:
        parts += ["## Duration and sampling rate", "",
                  f"Duration (s): min {durations.min():.1f}, median {np.median(durations):.1f}, "
                  f"max {durations.max():.1f}.", "",
                  markdown_table(["sampling rate (Hz)", "records"], sorted(rates.items(), key=lambda kv: float(kv[0]))), ""]
    counts = Counter(code for record_labels in labels for code in record_labels)
    unlabelled = sum(1 for record_labels in labels if not record_labels)
    parts += ["## Labels", "", f"{len(labels) - unlabelled} records labelled, {unlabelled} without labels.", ""]
    if counts:
        parts += [markdown_table(["label", "name", "records"], [[c, label_name(c), n] for c, n in counts.most_common(30)]), ""]
    return "\n".join(parts)


def source_figure(source: str, manifest: pa.Table):
    """Durations, sampling rates, amplitude and noise per lead of the source's ok records."""
    ok = manifest.filter(pc.and_(pc.equal(manifest["source"], source), pc.equal(manifest["status"], "ok")))
    fig, axes = plt.subplots(2, 2, figsize=(13, 8), constrained_layout=True)
    durations = [v for v in ok["duration_s"].to_pylist() if v is not None]
    axes[0, 0].hist(durations or [0], bins=30, color="0.4")
    axes[0, 0].set(title="duration", xlabel="s", ylabel="records")
    rates = Counter(f"{v:g}" for v in ok["source_fs"].to_pylist() if v is not None)
    axes[0, 1].bar(list(rates), list(rates.values()), color="0.4")
    axes[0, 1].set(title="sampling rate", xlabel="Hz", ylabel="records")
    for ax, column, title in ((axes[1, 0], "lead_amplitude_mv", "amplitude (1-99 % range)"),
                              (axes[1, 1], "lead_noise_mv", "high-frequency noise")):
        values = _per_lead(ok[column].to_pylist())
        ax.boxplot([v[np.isfinite(v)] if np.isfinite(v).any() else [np.nan] for v in values.T], showfliers=False)
        ax.set_xticks(range(1, len(LEADS) + 1), LEADS)
        ax.set(title=title, ylabel="mV")
    fig.suptitle(f"{source}: {len(ok)} ok records")
    return fig


def write_reports(uri: str, sources: list[str], manifest: pa.Table, windows: pa.Table, version: str | None,
                  storage_options: dict | None = None) -> list[str]:
    """OUTPUT/reports/<source>.md and .png for each source; `windows` holds source, window_index and labels."""
    fs, root = url_to_fs(uri, **(storage_options or {}))
    folder = f"{root.rstrip('/')}/reports"
    fs.makedirs(folder, exist_ok=True)
    written = []
    for source in sources:
        firsts = windows.filter(pc.and_(pc.equal(windows["source"], source), pc.equal(windows["window_index"], 0)))
        fs.pipe(f"{folder}/{source}.md", source_report(source, manifest, firsts["labels"].to_pylist(), version).encode())
        fig = source_figure(source, manifest)
        with fs.open(f"{folder}/{source}.png", "wb") as f:
            fig.savefig(f, format="png", dpi=80)
        plt.close(fig)
        written += [f"{folder}/{source}.md", f"{folder}/{source}.png"]
    return written


def with_section(report: str, key: str, section: str) -> str:
    """`report` with `section` between the markers of `key`: in place of the one an earlier run put there, else
    appended. The markers are HTML comments, which Markdown viewers do not show."""
    start, end = f"<!-- crema section: {key} -->", f"<!-- end of crema section: {key} -->"
    block = f"{start}\n{section.rstrip()}\n{end}\n"
    head, found, rest = report.partition(start)
    if found and end in rest:
        tail = rest.split(end, 1)[1].lstrip("\n")
        return head + block + ("\n" + tail if tail else "")
    return report.rstrip("\n") + "\n\n" + block


def write_report_section(uri: str, source: str, key: str, section: str,
                         storage_options: dict | None = None) -> str | None:
    """Put `section` (Markdown) into OUTPUT/reports/<source>.md as :func:`with_section` does; the report's path,
    or None where the dataset holds no report of the source (a dataset written before reports)."""
    fs, root = url_to_fs(uri, **(storage_options or {}))
    path = f"{root.rstrip('/')}/reports/{source}.md"
    if not fs.exists(path):
        return None
    fs.pipe(path, with_section(fs.cat(path).decode(), key, section).encode())
    return path


@dataclass
class CheckedRecord:
    record_id: str
    status: str  # ok / rejected
    reason: str | None
    fs: float | None
    duration_s: float | None
    lead_quality: list[str] | None
    flags: list[str]
    png: str | None
    labels: list[str] = field(default_factory=list)  # after the source's label maps
    unmapped_labels: list[str] = field(default_factory=list)  # the statements no label map matches


def check_source(source: SourceConfig, cfg: IngestConfig, n_records: int, out_dir: Path) -> list[CheckedRecord]:
    """Read the first `n_records` of a source (no dataset written) and draw each as a 12-lead PNG."""
    reader = reader_for(source)
    reader.max_record_seconds = cfg.max_record_seconds
    out_dir.mkdir(parents=True, exist_ok=True)
    index, mapper = LabelIndex(source), LabelMapper(source)
    checked = []
    for record_id in reader.discover()[:n_records]:
        try:
            raw = reader.read(record_id)
            canonical = to_canonical(raw, cfg.normalise_options(source))
        except RecordRejected as err:
            checked.append(CheckedRecord(record_id, "rejected", err.reason, None, None, None, [], None))
            continue
        except Exception as err:  # a reader bug costs one record here too
            checked.append(CheckedRecord(record_id, "rejected", f"unreadable ({type(err).__name__})", None, None,
                                         None, [], None))
            continue
        png = out_dir / (record_id.replace("/", "__") + ".png")
        fig = plot_12_lead(canonical.signal, canonical.fs, canonical.lead_quality, f"{source.name}/{record_id}")
        fig.savefig(png, dpi=70)
        plt.close(fig)
        table, header = index.lookup(record_id), mapper.header_labels(raw.meta)
        checked.append(CheckedRecord(record_id, "ok", None, float(raw.fs), canonical.signal.shape[1] / canonical.fs,
                                     list(canonical.lead_quality), list(canonical.flags), str(png),
                                     sorted(set(table.labels) | set(header.labels)),
                                     [*table.unmapped, *header.unmapped]))
    return checked


def plot_12_lead(signal: np.ndarray, fs: float, quality: list[str], title: str, seconds: float = 10.0):
    """The first `seconds` of a canonical record, leads in the standard 6 x 2 layout, each with its quality."""
    n = min(signal.shape[1], int(seconds * fs))
    t = np.arange(n) / fs
    fig, axes = plt.subplots(6, 2, figsize=(14, 10), sharex=True, constrained_layout=True)
    for k, ax in zip(range(len(LEADS)), axes.T.ravel()):
        ax.plot(t, signal[k, :n], lw=0.6, color="k" if quality[k] in ("ok", "derived") else "tab:red")
        ax.set_ylabel(f"{LEADS[k]}\n{quality[k]}", rotation=0, ha="right", va="center", fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    return fig
