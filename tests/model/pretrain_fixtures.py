"""A small windows dataset cut from real PTB-XL records, committed to the dataset's Iceberg tables.

Built directly (wfdb → crema.data.signals → the `windows` table) so the pretraining tests depend on the dataset
contract only, not on the ingest job; PTB-XL's own folds give the splits (1-8 train, 9 val, 10 test).
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import wfdb

from crema.data.catalog import write_windows
from crema.data.schema import window_schema
from crema.data.signals import NormaliseOptions, RawRecord, to_canonical, windows

FOLD_SPLITS = {**{fold: "train" for fold in range(1, 9)}, 9: "val", 10: "test"}


def write_ptbxl_windows(ptbxl_root: Path, out: Path, *, n_records: int, window_s: float = 2.0,
                        target_fs: int = 500, dtype: str = "float16", source: str = "ptbxl") -> Path:
    """Windows of the first `n_records` 500 Hz records, committed as the dataset at `out` (embedded catalog)."""
    db = pd.read_csv(ptbxl_root / "ptbxl_database.csv", index_col="ecg_id")
    window_samples = int(round(window_s * target_fs))
    schema = window_schema(window_samples, dtype)
    rows: dict[str, list[dict]] = defaultdict(list)
    for path in sorted((ptbxl_root / "records500").glob("*/*_hr.hea"))[:n_records]:
        record = wfdb.rdrecord(str(path.with_suffix("")))
        ecg_id = int(path.stem.split("_")[0])
        meta = db.loc[ecg_id]
        raw = RawRecord(path.stem, record.p_signal.T, record.fs, record.sig_name, record.units)
        canonical = to_canonical(raw, NormaliseOptions(target_fs=target_fs))
        for window in windows(canonical, window_s):
            rows[FOLD_SPLITS[int(meta.strat_fold)]].append({
                "source": source,
                "split": FOLD_SPLITS[int(meta.strat_fold)],
                "record_id": path.stem,
                "patient_key": str(int(meta.patient_id)),
                "window_index": window.index,
                "window_start": window.start,
                "fs": target_fs,
                "valid_samples": window.valid_samples,
                "signal": window.signal.astype(np.dtype(dtype).newbyteorder("<")).tobytes(),
                "lead_mask": canonical.lead_mask.tolist(),
                "derived_mask": canonical.derived_mask.tolist(),
                "lead_quality": list(canonical.lead_quality),
                "labels": sorted(ast.literal_eval(meta.scp_codes)),
            })
    table = pa.Table.from_pylist([row for split_rows in rows.values() for row in split_rows], schema=schema)
    write_windows(str(out), table, window_samples, dtype)
    return out
