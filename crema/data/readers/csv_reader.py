"""Delimited text (CSV, TSV): one file per record, one column per lead, one row per sample.

A text file carries no rate and often no lead names or units, so the source YAML gives them:
``fs`` (required), ``columns`` (lead names in file order; "" skips a column such as a time stamp),
``units`` (default mV), ``scale`` (stored value x scale = a value in `units`, e.g. ADC counts to µV),
``delimiter`` (default tab for ``.tsv``, comma otherwise) and ``header`` (whether the first row holds
names; detected when unset: a first row with a non-numeric field is a header). Without ``columns``,
the header's names are used, and a headerless file of exactly 12 columns is taken to be in the
canonical order :data:`crema.data.signals.LEADS`.

An empty column (an export that leaves the leads it did not record blank) is dropped, not read as
zeros; empty cells in a recorded column become NaN, as gaps.
"""

from __future__ import annotations

import io

import numpy as np
import pandas as pd

from crema.data.signals import LEADS, RawRecord, RecordRejected
from crema.data.readers import SingleFileReader


def _looks_like_header(first_line: str, delimiter: str) -> bool:
    """Whether a first row holds names rather than numbers."""
    for field in first_line.split(delimiter):
        field = field.strip().strip('"')
        if field:
            try:
                float(field)
            except ValueError:
                return True
    return False


class CsvReader(SingleFileReader):
    """Delimited text: samples only; lead order, rate and units come from the source YAML."""

    extensions = (".csv", ".tsv", ".CSV", ".TSV")

    def parse(self, record_id: str, data: bytes, path: str) -> RawRecord:
        """One file's bytes -> its RawRecord (RecordRejected for bad input)."""
        cfg = self.source
        if cfg.fs is None:
            raise RecordRejected("missing_sampling_rate", "a CSV source needs `fs` in its YAML")
        delimiter = cfg.delimiter or ("\t" if path.lower().endswith(".tsv") else ",")
        first_line = data[:4096].split(b"\n", 1)[0].decode("utf-8", "replace")
        header = cfg.header if cfg.header is not None else _looks_like_header(first_line, delimiter)
        try:
            table = pd.read_csv(io.BytesIO(data), sep=delimiter, header=0 if header else None,
                                dtype=np.float64, skipinitialspace=True)
        except (ValueError, pd.errors.ParserError, UnicodeDecodeError) as err:
            raise RecordRejected("unreadable", f"{type(err).__name__}: {str(err)[:200]}") from None

        if cfg.columns is not None:
            names = list(cfg.columns)
            if len(names) != table.shape[1]:
                raise RecordRejected("inconsistent_shape", f"{table.shape[1]} columns, `columns` names {len(names)}")
        elif header:
            names = [str(c).strip() for c in table.columns]
        elif table.shape[1] == len(LEADS):
            names = list(LEADS)
        else:
            raise RecordRejected("missing_lead_names",
                                 f"{table.shape[1]} columns and neither a header nor `columns` in the source")
        values = table.to_numpy(dtype=np.float64).T
        keep = [k for k, name in enumerate(names) if name and not np.isnan(values[k]).all()]
        if not keep or values.shape[1] == 0:
            raise RecordRejected("no_signals", "every column is empty or skipped")
        signal = values[keep]
        if cfg.scale is not None:
            signal *= cfg.scale
        return RawRecord(record_id=record_id, signal=signal, fs=float(cfg.fs), channel_names=[names[k] for k in keep],
                         units=[cfg.units or "mV"] * len(keep), meta={"empty_columns": [
                             names[k] for k in range(len(names)) if names[k] and k not in keep]})
