"""Per-record labels, patients and splits from a source's label table.

Only three things leave the label table: canonical label codes, the patient id (pseudonymised
before it is stored) and the split. Free text, names and dates in other columns are never read
into the dataset.
"""

from __future__ import annotations

import ast
import hashlib
import hmac
import os
import posixpath
from dataclasses import dataclass

import fsspec
import pandas as pd

from crema.config import ConfigError, HashSplit, LabelMap, SourceConfig

PSEUDONYM_KEY_ENV = "CREMA_PSEUDONYM_KEY"
# Preferred on clusters: a file holding the key (a mounted Secret, a 0600 file on the nodes), so that the
# key never travels in a job's metadata (`ray job list` shows a runtime_env's env_vars in clear).
PSEUDONYM_KEY_FILE_ENV = "CREMA_PSEUDONYM_KEY_FILE"


@dataclass(frozen=True)
class RecordInfo:
    labels: tuple[str, ...]
    patient_id: str
    split: str


def record_stem(name: str) -> str:
    """`records500/00000/00001_hr` and `00001_hr.hea` both give `00001_hr`."""
    base = posixpath.basename(str(name).replace("\\", "/"))
    return base.rsplit(".", 1)[0] if base.endswith((".hea", ".dat", ".npy", ".npz", ".mat")) else base


def pseudonymise(patient_id: str, source: str, key: bytes) -> str:
    """Keyed hash (HMAC-SHA256): stable for one key, not reversible or linkable without it."""
    return hmac.new(key, f"{source}\x1f{patient_id}".encode(), hashlib.sha256).hexdigest()[:32]


def pseudonym_key() -> bytes:
    """The HMAC key for patient pseudonyms: the contents of the file $CREMA_PSEUDONYM_KEY_FILE names
    (surrounding whitespace stripped), else $CREMA_PSEUDONYM_KEY; an error when neither is set."""
    path = os.environ.get(PSEUDONYM_KEY_FILE_ENV)
    if path:
        try:
            with open(path, "rb") as f:
                key = f.read().strip()
        except OSError as err:
            raise ConfigError(f"{PSEUDONYM_KEY_FILE_ENV}={path}: cannot read the pseudonym key file "
                              f"({err.strerror})") from None
        if not key:
            raise ConfigError(f"{PSEUDONYM_KEY_FILE_ENV}={path}: the pseudonym key file is empty")
        return key
    key = os.environ.get(PSEUDONYM_KEY_ENV)
    if not key:
        raise ConfigError(
            f"{PSEUDONYM_KEY_FILE_ENV} (a file holding the key) or {PSEUDONYM_KEY_ENV} is not set: patient ids "
            "are pseudonymised with a keyed hash and the key must come from the environment (keep it secret "
            "and the same across runs to keep keys stable)"
        )
    return key.encode()


def hash_split(source: str, patient_id: str, fractions: HashSplit) -> str:
    """Deterministic patient-level split: every record of a patient lands in the same split."""
    bucket = int.from_bytes(hashlib.sha256(f"{source}\x1f{patient_id}".encode()).digest()[:8], "big") / 2**64
    if bucket < fractions.test:
        return "test"
    if bucket < fractions.test + fractions.val:
        return "val"
    return "train"


def _read_csv(uri: str, storage_options: dict) -> pd.DataFrame:
    try:
        with fsspec.open(uri, "rb", **storage_options) as f:
            return pd.read_csv(f, dtype=str, keep_default_na=False)
    except (OSError, pd.errors.ParserError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read label table {uri}: {err}") from err


# The PhysioNet/CinC Challenge 2020-2021 scored classes: SNOMED CT code (as in `#Dx:` header lines) -> abbreviation.
CHALLENGE_SNOMED: dict[str, str] = {
    "164889003": "AF", "164890007": "AFL", "6374002": "BBB", "426627000": "Brady", "733534002": "CLBBB",
    "164909002": "LBBB", "713427006": "CRBBB", "59118001": "RBBB", "270492004": "IAVB", "713426002": "IRBBB",
    "39732003": "LAD", "445118002": "LAnFB", "251146004": "LQRSV", "698252002": "NSIVCB", "426783006": "NSR",
    "284470004": "PAC", "63593006": "SVPB", "10370003": "PR", "365413008": "PRWP", "427172004": "PVC",
    "17338001": "VPB", "164947007": "LPR", "111975006": "LQT", "164917005": "QAb", "47665007": "RAD",
    "427393009": "SA", "426177001": "SB", "427084000": "STach", "164934002": "TAb", "59931005": "TInv",
}


def label_name(code: str) -> str:
    """A label code's readable name where one is known (Challenge SNOMED CT codes), else the code."""
    return CHALLENGE_SNOMED.get(code, code)


def _parse_codes(value: str, fmt: str, separator: str | None = None) -> dict[str, float | None]:
    """One label cell as {code: likelihood or None}, in the table's label format."""
    value = value.strip()
    if not value:
        return {}
    if fmt == "list" and separator:
        return {code.strip(): None for code in value.split(separator) if code.strip()}
    if fmt == "dict":
        try:
            parsed = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            return {}
        return {str(k): (float(v) if isinstance(v, (int, float)) else None) for k, v in dict(parsed).items()}
    if fmt == "list":
        return {code.strip(): None for code in value.replace(",", ";").split(";") if code.strip()}
    return {value: None}


def _build_map(spec: LabelMap, source: SourceConfig) -> dict[str, str]:
    """Source code -> canonical code, from the label map (a table or inline)."""
    table = _read_csv(source.resolve(spec.table), source.storage_options)
    key_column = spec.key_column or table.columns[0]
    for column, wanted in spec.where.items():
        if column not in table.columns:
            raise ConfigError(f"label map {spec.table}: no column {column!r}")
        table = table[pd.to_numeric(table[column], errors="coerce").eq(wanted) | table[column].eq(str(wanted))]
    values = table[spec.value_column] if spec.value_column else table[key_column]
    return {k: v for k, v in zip(table[key_column], values) if v}


class LabelIndex:
    """Looks up a record's labels, patient id and split; reports label rows with no record."""

    def __init__(self, source: SourceConfig):
        self.source = source
        self.rows: dict[str, RecordInfo] = {}
        spec = source.labels
        if spec is None:
            return
        table = _read_csv(source.resolve(spec.table), source.storage_options)
        label_columns = [spec.label_column] if isinstance(spec.label_column, str) else list(spec.label_column or [])
        needed = list(dict.fromkeys(c for c in (spec.record_column, *label_columns, spec.patient_column,
                                                 spec.split_column) if c))
        missing = [c for c in needed if c not in table.columns]
        if missing:
            raise ConfigError(f"label table {spec.table}: missing columns {missing}")
        maps = [(_build_map(m, source), m.min_likelihood) for m in spec.maps]
        split_of = {str(v): name for name, values in spec.split_values.items() for v in values}
        for row in table[needed].itertuples(index=False):
            fields = dict(zip(needed, row))
            codes = {}
            for column in label_columns:
                codes.update(_parse_codes(fields.get(column, ""), spec.label_format, spec.label_separator))
            if maps:
                labels = {mapping[c] for mapping, min_lik in maps for c, lik in codes.items()
                          if c in mapping and (min_lik is None or lik is None or lik >= min_lik)}
            else:
                labels = set(codes)
            patient = fields.get(spec.patient_column, "") if spec.patient_column else ""
            split = ""
            if spec.split_column:
                raw_split = fields[spec.split_column].strip()
                split = split_of.get(raw_split) or split_of.get(raw_split.split(".")[0], "")
            self.rows[record_stem(fields[spec.record_column])] = RecordInfo(tuple(sorted(labels)), patient, split)

    def lookup(self, record_id: str) -> RecordInfo:
        """Labels, patient and split of a record; a record with no label row gets no labels and is its own patient."""
        info = self.rows.get(record_stem(record_id))
        patient = (info.patient_id if info else "") or record_id
        split = (info.split if info else "") or hash_split(self.source.name, patient, self.source.hash_split)
        return RecordInfo(info.labels if info else (), patient, split)

    def unmatched(self, record_ids: list[str]) -> list[str]:
        """Label rows whose record is not in the source (a normal case: a partial download, say)."""
        present = {record_stem(r) for r in record_ids}
        return sorted(set(self.rows) - present)
