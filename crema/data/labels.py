"""Per-record labels, patients and splits from a source's label table, and its label maps.

Only three things leave the label table: canonical label codes, the patient id (pseudonymised
before it is stored) and the split. Free text, names and dates in other columns are never read
into the dataset. A source's label maps (:class:`LabelMapper`) turn its codes or statements, from the
table or from the records themselves, into canonical codes; what they leave unmatched is reported.
"""

from __future__ import annotations

import ast
import fnmatch
import hashlib
import hmac
import os
import posixpath
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import fsspec
import pandas as pd

from crema.config import ConfigError, HashSplit, LabelMap, LabelRule, SourceConfig

PSEUDONYM_KEY_ENV = "CREMA_PSEUDONYM_KEY"
# Preferred on clusters: a file holding the key (a mounted Secret, a 0600 file on the nodes), so that the
# key never travels in a job's metadata (`ray job list` shows a runtime_env's env_vars in clear).
PSEUDONYM_KEY_FILE_ENV = "CREMA_PSEUDONYM_KEY_FILE"


@dataclass(frozen=True)
class RecordInfo:
    labels: tuple[str, ...]
    patient_id: str
    split: str
    unmapped: tuple[str, ...] = ()  # the label-table statements no label map of the source matches


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
    """Source code -> canonical code, from a table label map."""
    assert spec.table is not None  # LabelMap validates: a map without rules has a table
    table = _read_csv(source.resolve(spec.table), source.storage_options)
    key_column = spec.key_column or table.columns[0]
    for column, wanted in spec.where.items():
        if column not in table.columns:
            raise ConfigError(f"label map {spec.table}: no column {column!r}")
        table = table[pd.to_numeric(table[column], errors="coerce").eq(wanted) | table[column].eq(str(wanted))]
    values = table[spec.value_column] if spec.value_column else table[key_column]
    return {k: v for k, v in zip(table[key_column], values) if v}


def normalise_statement(statement: str) -> str:
    """A statement as label rules match it: spaces collapsed, final periods dropped (case is ignored by the
    matching itself): "Rhythm: Sinus rhythm. " and "rhythm: sinus rhythm" are one statement."""
    return " ".join(statement.split()).rstrip(". ")


def _rule_matches(rule: LabelRule, statement: str) -> bool:
    """Whether `rule` matches a normalised statement, ignoring case."""
    if rule.statement is not None:
        return normalise_statement(rule.statement).casefold() == statement.casefold()
    if rule.glob is not None:
        return fnmatch.fnmatchcase(statement.casefold(), normalise_statement(rule.glob).casefold())
    return re.fullmatch(rule.regex or "", statement, re.IGNORECASE) is not None


@dataclass(frozen=True)
class MappedLabels:
    labels: tuple[str, ...]  # canonical codes, sorted
    unmapped: tuple[str, ...]  # the statements no map matched, as given


class LabelMapper:
    """A source's label maps (`label_maps`), ready to apply to a record's codes or statements.

    Every map is tried on every statement and their codes are united; a statement that none matches is
    unmapped. A table map matches its keys exactly; a rules map takes its first matching rule. Without any
    map, codes (SCP, SNOMED CT) are kept as they are and free-text statements (MUSE) are all unmapped,
    since only a map decides which statement strings may reach the dataset."""

    def __init__(self, source: SourceConfig):
        self.source = source
        self.maps = source.label_maps
        self.tables = [_build_map(m, source) if m.table is not None else {} for m in self.maps]
        self._matches: dict[str, list[tuple[str, float | None]] | None] = {}  # memoised per statement

    def _matches_of(self, statement: str) -> list[tuple[str, float | None]] | None:
        """(code, its map's min_likelihood) from every map matching `statement`; None when none matches."""
        if statement not in self._matches:
            found: list[tuple[str, float | None]] | None = None
            normalised = normalise_statement(statement)
            for spec, table in zip(self.maps, self.tables):
                codes = self._one_map(spec, table, statement, normalised)
                if codes is not None:
                    found = (found or []) + [(code, spec.min_likelihood) for code in codes]
            self._matches[statement] = found
        return self._matches[statement]

    @staticmethod
    def _one_map(spec: LabelMap, table: dict[str, str], statement: str, normalised: str) -> list[str] | None:
        if spec.table is not None:
            return [table[statement]] if statement in table else None
        rule = next((r for r in spec.rules if _rule_matches(r, normalised)), None)
        return None if rule is None else list(rule.to)

    def map(self, codes: Mapping[str, float | None] | Iterable[str], free_text: bool = False) -> MappedLabels:
        """Canonical codes of one record's `codes` ({code: likelihood} or codes), and what no map matched.
        `free_text`: statements (not codes), which are never kept without a map."""
        given = dict(codes) if isinstance(codes, Mapping) else dict.fromkeys(codes)
        if not self.maps:
            return MappedLabels((), tuple(given)) if free_text else MappedLabels(tuple(sorted(given)), ())
        labels: set[str] = set()
        unmapped = []
        for statement, likelihood in given.items():
            matches = self._matches_of(statement)
            if matches is None:
                unmapped.append(statement)
                continue
            labels.update(code for code, min_lik in matches
                          if min_lik is None or likelihood is None or likelihood >= min_lik)
        for spec in self.maps:
            labels -= {code for code, cancelling in spec.unless.items() if labels & set(cancelling)}
        return MappedLabels(tuple(sorted(labels)), tuple(unmapped))

    def header_labels(self, meta: dict) -> MappedLabels:
        """The labels a reader found in the record itself, mapped: codes (`meta["labels"]`: Challenge SNOMED CT)
        and free-text statements (`meta["statements"]`: MUSE). None where the source says `header_labels:
        false` (its default when it has a label table)."""
        use = self.source.header_labels if self.source.header_labels is not None else self.source.labels is None
        if not use:
            return MappedLabels((), ())
        codes = self.map(meta.get("labels") or ())
        statements = self.map(meta.get("statements") or (), free_text=True)
        return MappedLabels(tuple(sorted(set(codes.labels) | set(statements.labels))),
                            codes.unmapped + statements.unmapped)


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
        mapper = LabelMapper(source)
        split_of = {str(v): name for name, values in spec.split_values.items() for v in values}
        for row in table[needed].itertuples(index=False):
            fields = dict(zip(needed, row))
            codes = {}
            for column in label_columns:
                codes.update(_parse_codes(fields.get(column, ""), spec.label_format, spec.label_separator))
            mapped = mapper.map(codes)
            patient = fields.get(spec.patient_column, "") if spec.patient_column else ""
            split = ""
            if spec.split_column:
                raw_split = fields[spec.split_column].strip()
                split = split_of.get(raw_split) or split_of.get(raw_split.split(".")[0], "")
            self.rows[record_stem(fields[spec.record_column])] = RecordInfo(mapped.labels, patient, split,
                                                                           mapped.unmapped)

    def lookup(self, record_id: str) -> RecordInfo:
        """Labels, patient and split of a record; a record with no label row gets no labels and is its own patient."""
        info = self.rows.get(record_stem(record_id))
        patient = (info.patient_id if info else "") or record_id
        split = (info.split if info else "") or hash_split(self.source.name, patient, self.source.hash_split)
        return RecordInfo(info.labels if info else (), patient, split, info.unmapped if info else ())

    def unmatched(self, record_ids: list[str]) -> list[str]:
        """Label rows whose record is not in the source (a normal case: a partial download, say)."""
        present = {record_stem(r) for r in record_ids}
        return sorted(set(self.rows) - present)
