"""Validated configuration schemas (pydantic) and the YAML loader every stage uses.

YAML values may reference environment variables as ``${VAR}`` or ``${VAR:-default}``, so one
source file serves a laptop, CI and a cluster (``path: ${PTBXL_ROOT:-/data/ptb-xl}/records500``).
"""

from __future__ import annotations

import functools
import os
import posixpath
import re
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Annotated, Literal, TypeVar
from urllib.parse import urlsplit, urlunsplit

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from crema.data.signals import LEADS, NormaliseOptions, lead_set_leads

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


# Readers (crema.data.readers) are plug-ins in this entry-point group: name = format, value = module:Class.
ENTRY_POINT_GROUP = "crema.readers"


@functools.cache
def installed_readers() -> dict[str, EntryPoint]:
    """Every installed reader by lower-case format name, the names a source's `format` takes. Entry points
    are only named here: a reader's module (and its library: pydicom, edfio, ...) is imported when a source
    of that format is read (crema.data.readers.reader_class)."""
    return {ep.name.lower(): ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


class ConfigError(ValueError):
    """An invalid or unreadable configuration: the only reason a stage refuses to start."""


class Schema(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def expand_env(text: str, defaults_used: list[tuple[str, str]] | None = None) -> str:
    """Replace ${VAR} and ${VAR:-default} references with the environment's values; the (VAR, default)
    pairs whose default was taken are appended to `defaults_used`."""
    def substitute(m: re.Match) -> str:
        value = os.environ.get(m.group(1))
        if value is None:
            if m.group(2) is None:
                raise ConfigError(f"environment variable {m.group(1)} is not set (referenced as {m.group(0)})")
            if defaults_used is not None:
                defaults_used.append((m.group(1), m.group(2)))
            return m.group(2)
        return value
    return _ENV_REF.sub(substitute, text)


def join_uri(base: str, relative: str) -> str:
    """Resolve `relative` against a local folder or an s3:// prefix (absolute paths pass through)."""
    if "://" in relative or relative.startswith("/"):
        return relative
    if "://" in base:
        scheme, rest = base.split("://", 1)
        return f"{scheme}://{posixpath.normpath(posixpath.join(rest, relative))}"
    return os.path.normpath(os.path.join(base, relative))


def redact_uri(uri: str) -> str:
    """The URI without a password (``https://user:***@host``), for messages and logs."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    host = parts.hostname or ""
    netloc = f"{parts.username}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


M = TypeVar("M", bound=BaseModel)


# The configs shipped in the package (crema/configs: a link to the checkout's configs/, real files in a wheel).
PACKAGED_CONFIGS = Path(__file__).resolve().parent / "configs"
CONFIG_DIR_ENV = "CREMA_CONFIG_DIR"  # another folder to look in first (the image sets /opt/crema/configs)


def find_config(path: str | Path) -> Path:
    """`path` if it exists; else a relative ``configs/...`` path (or one relative to the configs folder) found
    in $CREMA_CONFIG_DIR or the configs shipped with crema, so the documented paths work from an installed
    wheel and from any working directory. Otherwise `path` unchanged (reading it then fails clearly)."""
    given = Path(path)
    if given.exists() or given.is_absolute():
        return given
    inner = Path(*given.parts[1:]) if given.parts[:1] == ("configs",) else given
    for root in (os.environ.get(CONFIG_DIR_ENV), PACKAGED_CONFIGS):
        if root and inner.parts and (Path(root) / inner).is_file():
            return Path(root) / inner
    return given


def load_yaml(path: str | Path, model: type[M], overrides: dict | None = None) -> M:
    """Read a YAML file into `model`, with env expansion and dotted-key overrides (`optim.lr=1e-3`).

    A relative ``configs/...`` path not found from the working directory is looked up in the packaged
    configs (:func:`find_config`)."""
    path = find_config(path)
    defaults: list[tuple[str, str]] = []
    try:
        data = yaml.safe_load(expand_env(Path(path).read_text(), defaults)) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot read config {path}: {err}") from err
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    loaded = validate(model, data, str(path))
    if isinstance(loaded, SourceConfig):
        _check_defaulted_path(loaded, defaults, path)
    return loaded


def validate(model: type[M], data: dict, origin: str = "command line") -> M:
    """`model` from plain data, with a ConfigError naming where the data came from."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"invalid config {origin}:\n{err}") from err


def parse_overrides(items: list[str]) -> dict:
    """`key=value` strings from the command line, values parsed as YAML scalars."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value")
        key, value = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


# ----------------------------------------------------------------------------------------- sources

class LabelRule(Schema):
    """One line of a label map: the statements (or codes) it matches and the classes they mean.

    Matching ignores case, repeated spaces and a final period ("Sinus rhythm." is "sinus rhythm"), since
    hospitals write the same statement many ways; the first rule of a map that matches a statement wins.
    """

    statement: str | None = None  # exactly this statement or code
    glob: str | None = None  # shell wildcards: "Ischemia: *"
    regex: str | None = None  # a Python regular expression matching the whole statement
    to: list[str] = Field(default_factory=list)  # the canonical codes it means (a single one may be a string)
    ignore: bool = False  # known to carry none of the classes (an axis, say): dropped, but not "unmapped"

    @field_validator("to", mode="before")
    @classmethod
    def _one_code(cls, v):
        return [v] if isinstance(v, str) else v

    @model_validator(mode="after")
    def _one_pattern_one_outcome(self) -> "LabelRule":
        patterns = [p for p in (self.statement, self.glob, self.regex) if p is not None]
        if len(patterns) != 1:
            raise ValueError(f"a label rule takes exactly one of statement, glob and regex, got {patterns}")
        if bool(self.to) == self.ignore:
            raise ValueError(f"label rule {patterns[0]!r}: give either `to` (its codes) or `ignore: true`")
        if self.regex is not None:
            try:
                re.compile(self.regex)
            except re.error as err:
                raise ValueError(f"label rule regex {self.regex!r}: {err}") from None
        return self


class LabelMap(Schema):
    """How a source's label codes or statements become canonical codes (the task classes and the like).

    Either a lookup table (PTB-XL's scp_statements.csv: `table`, `key_column`, `value_column`, `where`) or
    `rules` (a label map as data, usually its own YAML file under configs/label_maps/). A statement that no
    map of the source matches is *unmapped*: counted and listed in the ingest summary, never stored.
    """

    description: str = ""
    table: str | None = None  # CSV, relative to the source path
    key_column: str | None = None  # None: the table's first column (its index)
    value_column: str | None = None  # the canonical code column (e.g. diagnostic_class); None: the key itself
    where: dict[str, float | int | str] = Field(default_factory=dict)  # keep rows with these values only
    rules: list[LabelRule] = Field(default_factory=list)
    # A code that others cancel on the same record: {NORM: [MI, STTC, CD, HYP]} keeps NORM only for a record
    # with none of those (a "sinus rhythm" statement is a normal ECG only when nothing else is wrong).
    unless: dict[str, list[str]] = Field(default_factory=dict)
    min_likelihood: float | None = None  # for dict-valued codes (SCP likelihoods); None keeps all

    @model_validator(mode="after")
    def _table_or_rules(self) -> "LabelMap":
        if (self.table is None) == (not self.rules):
            raise ValueError("a label map takes either `table` (a lookup CSV) or `rules`, not both or neither")
        if self.rules and (self.key_column or self.value_column or self.where):
            raise ValueError("key_column, value_column and where belong to a table map, not to rules")
        return self


class LabelTable(Schema):
    """A source's label table: which columns hold record, labels, patient and split."""

    table: str  # CSV, relative to the source path
    record_column: str  # values matched to records by file stem (00001_hr) or by relative record id
    label_column: str | list[str] | None = None  # several columns: the union of their codes
    label_format: Literal["dict", "list", "single"] = "dict"  # "{'NORM': 100.0}", "a;b", "a"
    label_separator: str | None = None  # list format: the one separator ("|" keeps "Atrial flutter, typical"); default ; or ,
    patient_column: str | None = None
    split_column: str | None = None
    split_values: dict[str, list[int | str]] = Field(
        default_factory=lambda: {"train": list(range(1, 9)), "val": [9], "test": [10]})

    @model_validator(mode="before")
    @classmethod
    def _maps_moved(cls, data):
        if isinstance(data, dict) and "maps" in data:
            raise ValueError("`labels.maps` is now the source's `label_maps` (they map header labels too): "
                             "move the list one level up")
        return data

    @field_validator("split_values")
    @classmethod
    def _known_splits(cls, v: dict) -> dict:
        unknown = set(v) - {"train", "val", "test"}
        if unknown:
            raise ValueError(f"unknown split names {sorted(unknown)}; use train, val, test")
        return v


class HashSplit(Schema):
    """Deterministic patient-level split when the source has no split column."""

    val: float = Field(0.1, ge=0, lt=1)
    test: float = Field(0.1, ge=0, lt=1)

    @model_validator(mode="after")
    def _fractions(self) -> "HashSplit":
        if self.val + self.test >= 1:
            raise ValueError("val + test must leave room for train")
        return self


class SourceConfig(Schema):
    """One hospital source. Only `name`, `format` and `path` are required."""

    name: str = Field(pattern=r"^[A-Za-z0-9_\-]+$")
    format: str
    path: str  # local folder or s3://bucket/prefix
    records: str | None = None  # a RECORDS file or a CSV with a `record` column; default: walk the folder
    labels: LabelTable | None = None
    lead_aliases: dict[str, str] = Field(default_factory=dict)
    units: str | None = None  # overrides the file's units (for formats that lack them)
    fs: float | None = Field(None, gt=0)  # sampling rate, for formats that lack one
    hash_split: HashSplit = Field(default_factory=HashSplit)
    max_reject_fraction: float | None = Field(None, ge=0, le=1)  # this source's threshold; default the ingest's
    follow_symlinks: bool = False  # a symlink pointing outside `path` is rejected (path_outside_source) unless set
    # record_id: the path under `path` (false) or its keyed hash (true); default true without a label table,
    # since hospital exports often name files by medical record number.
    pseudonymise_record_ids: bool | None = None
    # Labels a reader finds in the record itself (PhysioNet-Challenge `#Dx:` SNOMED CT codes in WFDB headers)
    # join the label table's; default: used when the source has no label table.
    header_labels: bool | None = None
    # Label table and header labels -> canonical codes: a map file's name or a map itself, their union; none
    # keeps label codes as they are (and stores no free-text statement: those need a map).
    label_maps: list[LabelMap] = Field(default_factory=list)
    storage_options: dict = Field(default_factory=dict)  # fsspec options, e.g. client_kwargs.endpoint_url
    # Delimited text (format: csv) only: a CSV holds no lead names, rate or units of its own.
    columns: list[str] | None = None  # column names in file order (overrides a header row); "" skips a column
    delimiter: str | None = None  # default: tab for .tsv files, comma otherwise
    header: bool | None = None  # whether the first row holds names; None: detected (a non-numeric first row)
    scale: float | None = Field(None, gt=0)  # stored value x scale = a value in `units` (ADC counts -> uV)
    # MATLAB files (format: mat) hold no rate, lead names or units either: `fs`, `columns` (the leads in array
    # order), `units` and `scale` as for a CSV; `variable` names the array: "val" by default, "ECG.data" for
    # a field of a struct.
    variable: str | None = Field(None, pattern=r"^[A-Za-z]\w*(\.[A-Za-z]\w*)*$")

    @field_validator("format")
    @classmethod
    def _installed_format(cls, v: str) -> str:
        name = v.strip().lower()
        if name not in installed_readers():
            raise ValueError(f"unknown format {v!r}; installed readers: {sorted(installed_readers())}")
        return name

    @field_validator("label_maps", mode="before")
    @classmethod
    def _read_map_files(cls, v):
        """Maps given as file names (`- configs/label_maps/ludb.yaml`) read in place, so that the rules travel
        inside the source config (to Ray workers, into its fingerprint: an edited map re-ingests)."""
        return [load_yaml(m, LabelMap) if isinstance(m, str) else m for m in v] if isinstance(v, list) else v

    @field_validator("lead_aliases")
    @classmethod
    def _alias_targets(cls, v: dict[str, str]) -> dict[str, str]:
        bad = {k: t for k, t in v.items() if t not in LEADS}
        if bad:
            raise ValueError(f"lead_aliases must map to one of {LEADS}; got {bad}")
        return v

    def resolve(self, relative: str) -> str:
        return join_uri(self.path, relative)


class CatalogConfig(Schema):
    """Where the dataset's two Iceberg tables (`windows`, `manifest`) are registered.

    Left out, ingest uses the embedded default: pyiceberg's SQL catalog on SQLite at OUTPUT/catalog.db with
    its warehouse at OUTPUT/warehouse (a local OUTPUT only: nothing to start). On a cluster: a REST or Glue
    catalog (or SQL on PostgreSQL) and an s3:// warehouse. Secrets (tokens, keys) belong in pyiceberg's
    environment variables (PYICEBERG_CATALOG__CREMA__...) or .pyiceberg.yaml, never here: this block is
    written beside the dataset (OUTPUT/catalog.json) so that readers find the catalog from the dataset URI.
    """

    type: Literal["sql", "rest", "glue"] = "sql"
    uri: str | None = None  # sqlite:///..., postgresql+psycopg://..., https://rest-catalog...; glue: none
    warehouse: str | None = None  # default: OUTPUT/warehouse
    namespace: str = Field("crema", pattern=r"^[A-Za-z0-9_]+$")
    properties: dict[str, str] = Field(default_factory=dict)  # any other pyiceberg catalog property

    @model_validator(mode="after")
    def _complete(self) -> "CatalogConfig":
        if self.type in ("sql", "rest") and not self.uri:
            raise ValueError(f"a {self.type} catalog needs `uri`")
        return self


def _check_defaulted_path(source: "SourceConfig", defaults: list[tuple[str, str]], origin) -> None:
    """A source path built from a variable's default that does not exist: name the variable to set."""
    if "://" in source.path or Path(source.path).exists():
        return
    for var, default in defaults:
        if default and default in source.path:
            raise ConfigError(f"{origin}: source {source.name}'s path {source.path} does not exist: environment "
                              f"variable {var} is not set, so its default {default} was used; set {var}")


class IngestConfig(Schema):
    """How every source is normalised and windowed: one dataset has one rate and window length."""

    target_fs: int = Field(500, gt=0, le=10_000)
    window_s: float = Field(10.0, gt=0)
    stride_s: float | None = Field(None, gt=0)  # default: window_s (no overlap)
    pad_short: bool = False  # pad records shorter than a window (valid_samples marks the pad) instead of rejecting
    dtype: Literal["float16", "float32"] = "float16"
    min_leads: int = Field(8, ge=1, le=12)  # after derivation; fewer and the record is rejected
    filter_low_hz: float | None = Field(None, gt=0)
    filter_high_hz: float | None = Field(None, gt=0)
    notch_hz: float | None = Field(None, gt=0)
    # Byte-identical recordings (PTB-XL itself holds a few pairs) are kept once; the copies are
    # `duplicate` in the manifest. False keeps every copy as `ok`, noting the twin in `detail`.
    drop_duplicates: bool = True
    max_reject_fraction: float = Field(0.5, ge=0, le=1)  # above this the job exits non-zero
    max_record_seconds: float = Field(24 * 3600, gt=0)  # a header declaring more is hostile or broken
    records_per_task: int = Field(256, ge=1)  # one Ray task; larger amortises scheduling, smaller spreads small corpora
    row_group_bytes: int = Field(32 * 2**20, ge=2**16)
    storage_options: dict = Field(default_factory=dict)  # fsspec options for the output URI
    catalog: CatalogConfig | None = None  # None: the embedded SQLite catalog inside a local OUTPUT

    @property
    def window_samples(self) -> int:
        return int(round(self.window_s * self.target_fs))

    def normalise_options(self, source: SourceConfig) -> NormaliseOptions:
        """The signal normalisation of a source under these ingest settings."""
        return NormaliseOptions(
            target_fs=self.target_fs,
            min_leads=self.min_leads,
            lead_aliases=source.lead_aliases or None,
            filter_low_hz=self.filter_low_hz,
            filter_high_hz=self.filter_high_hz,
            notch_hz=self.notch_hz,
        )


# ------------------------------------------------------------------------------------------- model

# Sizes per preset: (embed_dim, depth, num_heads, decoder_embed_dim, decoder_depth, decoder_num_heads).
# `tiny` trains on a laptop CPU in minutes; `base` matches ViT-B/MAE-B.
MODEL_PRESETS: dict[str, tuple[int, int, int, int, int, int]] = {
    "tiny": (192, 4, 3, 128, 2, 4),
    "small": (384, 12, 6, 256, 4, 8),
    "base": (768, 12, 12, 512, 8, 16),
}


class InputConditioning(Schema):
    """How windows are conditioned on their way into the model; the dataset itself stays raw.

    Part of the model's config, so it is logged with the pretraining params and stored in the encoder
    artifact: embedding and fine-tuning condition inputs exactly as pretraining did. Defaults: baseline
    wander and high-frequency noise removed, each lead standardised, outliers clipped; with them a tiny
    model learns to reconstruct within a few hundred CPU steps (tests/model/test_reconstruction.py).
    `python -m benchmarks.quality --input scale=fixed ...` compares recipes by downstream AUROC.
    """

    highpass_hz: float | None = Field(0.5, gt=0)  # baseline wander; None: no high-pass
    lowpass_hz: float | None = Field(40.0, gt=0)  # muscle and mains noise; skipped at or above Nyquist
    notch_hz: float | None = Field(None, gt=0)  # e.g. 50 or 60 where mains hum survives the low-pass
    scale: Literal["lead", "record", "fixed"] = "lead"  # standardise per lead, per window, or divide by fixed_mv
    fixed_mv: float = Field(1.0, gt=0)  # the divisor of scale: fixed
    std_floor_mv: float = Field(0.01, gt=0)  # a near-flat lead is not blown up into unit-variance noise
    clip: float | None = Field(8.0, gt=0)  # clip conditioned values to +/- this (pacing spikes, electrode pops)

    @model_validator(mode="after")
    def _band(self) -> "InputConditioning":
        if self.highpass_hz and self.lowpass_hz and self.highpass_hz >= self.lowpass_hz:
            raise ValueError(f"highpass_hz={self.highpass_hz} must be below lowpass_hz={self.lowpass_hz}")
        return self


class ModelConfig(Schema):
    """The CREMA encoder/decoder architecture and the CR-MAE objective.

    Explicit sizes override the `size` preset; :meth:`resolved` fills the rest in, and that resolved
    form is what an encoder artifact stores, so it reloads identically even if presets change.
    """

    size: Literal["tiny", "small", "base"] = "tiny"
    window_samples: int = Field(5000, gt=0)
    patch_size: int = Field(125, gt=0)
    embed_dim: int | None = Field(None, gt=0)
    depth: int | None = Field(None, gt=0)
    num_heads: int | None = Field(None, gt=0)
    decoder_embed_dim: int | None = Field(None, gt=0)
    decoder_depth: int | None = Field(None, gt=0)
    decoder_num_heads: int | None = Field(None, gt=0)
    mlp_ratio: float = Field(4.0, gt=0)
    conv_stem: bool = False  # a small per-patch conv stem before the patch projection
    pos_embed: Literal["sincos", "learned"] = "sincos"
    drop_path: float = Field(0.0, ge=0, lt=1)  # stochastic depth of the last encoder block
    mask_ratio: float = Field(0.75, gt=0, lt=1)
    mask_mode: Literal["independent", "time"] = "independent"
    norm_target: bool = True  # reconstruct per-patch standardised targets (MAE's norm_pix_loss)
    time_bias: bool = True  # attention penalised by time distance (ALiBi); see crema.model.network
    # cross_attention: hidden patches attend to the encoded visible ones only (CrossMAE, ~2x cheaper);
    # self_attention: MAE's decoder over every token
    decoder: Literal["cross_attention", "self_attention"] = "cross_attention"
    input: InputConditioning = Field(default_factory=InputConditioning)
    contrastive_weight: float = Field(0.1, ge=0)  # lambda; 0 is the plain MAE
    temperature: float = Field(0.1, gt=0)  # tau of the NT-Xent loss
    projection_dim: int = Field(128, gt=0)
    positives: Literal["window", "record"] = "window"  # record: other windows of the same record too
    # The second contrastive view: another random mask of the whole window (mask), or K visible patches
    # from one random crop in time of crop_fraction of the window (crop: another stretch of the record)
    contrastive_view: Literal["mask", "crop"] = "mask"
    crop_fraction: float = Field(0.5, gt=0, le=1)
    augment: bool = True  # amplitude scaling and gaussian noise on the second contrastive view
    augment_scale: float = Field(0.2, ge=0, lt=1)  # amplitude factor drawn from 1 +/- this
    augment_noise: float = Field(0.05, ge=0)  # std of the added gaussian noise, in conditioned-input units
    # Lead dropout, so that one encoder serves wearables too: in training, this share of the windows keeps only
    # the leads of one of lead_dropout_sets (drawn per window; crema.data.signals.lead_set_leads names).
    lead_dropout: float = Field(0.0, ge=0, le=1)
    lead_dropout_sets: list[str] = ["limb6", "I", "II"]

    @field_validator("lead_dropout_sets")
    @classmethod
    def _lead_dropout_sets(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("lead_dropout_sets needs at least one lead set")
        for name in v:
            lead_set_leads(name)
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "ModelConfig":
        """Cross-field checks that a single field's validator cannot make."""
        if self.window_samples % self.patch_size:
            raise ValueError(f"window_samples={self.window_samples} is not a multiple of "
                             f"patch_size={self.patch_size}")
        r = self.resolved_sizes()
        if r["embed_dim"] % r["num_heads"]:
            raise ValueError(f"embed_dim={r['embed_dim']} is not divisible by num_heads={r['num_heads']}")
        if r["decoder_embed_dim"] % r["decoder_num_heads"]:
            raise ValueError(f"decoder_embed_dim={r['decoder_embed_dim']} is not divisible by "
                             f"decoder_num_heads={r['decoder_num_heads']}")
        return self

    @property
    def num_patches(self) -> int:
        """Patches per lead."""
        return self.window_samples // self.patch_size

    def resolved_sizes(self) -> dict[str, int]:
        names = ("embed_dim", "depth", "num_heads", "decoder_embed_dim", "decoder_depth", "decoder_num_heads")
        return {name: getattr(self, name) or preset for name, preset in zip(names, MODEL_PRESETS[self.size])}

    def resolved(self) -> "ModelConfig":
        """This config with every size explicit."""
        return self.model_copy(update=self.resolved_sizes())


# ---------------------------------------------------------------------------------------- pretrain

class PretrainData(Schema):
    dataset: str  # an ingest OUTPUT (folder or s3://), its Iceberg tables found through its catalog
    batch_size: int = Field(64, ge=1)  # per worker and micro-batch; the global batch is × workers × accum_steps
    shuffle_buffer: int = Field(2048, ge=0)  # rows in each worker's local shuffle buffer; 0: no shuffling
    prefetch_batches: int = Field(2, ge=0)
    # Read and decode each split once into Ray's object store, so that an epoch streams from memory instead of
    # restarting the read tasks (measured: the restart was ~15% of a 49-step epoch on 2 cores). Only for a
    # dataset that fits in the object store.
    materialize: bool = False
    storage_options: dict = Field(default_factory=dict)  # fsspec options for reading the dataset's metadata


class OptimConfig(Schema):
    """AdamW with linear warm-up then cosine decay, stepped per optimiser step."""

    lr: float = Field(1.5e-4, gt=0)  # peak
    min_lr_ratio: float = Field(0.0, ge=0, le=1)  # the cosine ends at lr × this
    weight_decay: float = Field(0.05, ge=0)  # not applied to biases, norms, tokens and embeddings
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = Field(100, ge=0)
    clip_grad: float | None = Field(1.0, gt=0)  # max global grad norm; None: no clipping
    accum_steps: int = Field(1, ge=1)  # micro-batches per optimiser step


class ScalingSettings(Schema):
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)  # leave some CPUs free: Ray Data reads with its own tasks
    # PyTorch's intra-op threads per worker; None: the worker's CPUs. More than cpus_per_worker lets a
    # small machine's training use the cores Ray keeps for the (mostly idle) read tasks.
    torch_threads: int | None = Field(None, ge=1)


class CheckpointSettings(Schema):
    every_steps: int = Field(500, ge=1)  # plus one at the end of every epoch
    num_to_keep: int | None = Field(3, ge=1)


class TrackingSettings(Schema):
    tracking_uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db
    experiment: str = "crema-pretrain"
    log_every_steps: int = Field(10, ge=1)


class ChaosSettings(Schema):
    """Failure drills: prove that a lost worker costs at most `checkpoint.every_steps` steps."""

    exit_after_step: int | None = Field(None, ge=1)  # the last rank dies (os._exit) after this step,
    # in an attempt that started without a checkpoint, like a worker lost to an OOM kill or a preemption


def _one_folder(name: str) -> str:
    if ".." in name:
        raise ValueError(f"name {name!r} contains '..': it must name one folder, not a path")
    return name


# A name that becomes a folder (a run's, a task's, an encoder's): letters, digits, "_", "-", "." (never "..").
FolderName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$"), AfterValidator(_one_folder)]


class PretrainConfig(Schema):
    """One CR-MAE pretraining job. `name` is both the Ray run and the MLflow run: same name, same run."""

    name: FolderName  # the run's folder under storage_path and the MLflow run name
    storage_path: str  # checkpoints and the encoder artifact: a local folder or s3://bucket/prefix
    storage_options: dict = Field(default_factory=dict)  # fsspec options for storage_path (e.g. an S3 endpoint)
    epochs: int = Field(1, ge=1)
    seed: int = 0
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 autocast on GPU, fp32 on CPU
    max_failures: int = Field(0, ge=-1)  # worker-group restarts from the latest checkpoint; -1: unlimited
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: PretrainData
    optim: OptimConfig = Field(default_factory=OptimConfig)
    scaling: ScalingSettings = Field(default_factory=ScalingSettings)
    checkpoint: CheckpointSettings = Field(default_factory=CheckpointSettings)
    tracking: TrackingSettings = Field(default_factory=TrackingSettings)
    chaos: ChaosSettings = Field(default_factory=ChaosSettings)


class PretrainSweepConfig(Schema):
    """A sweep over pretraining recipes on Ray Tune (`crema sweep-pretrain`): every point of `grid`, once per
    seed, is a pretraining job of the base config with those settings, named ``<name>-<index>``.

    Trials are judged on validation data only: ASHA stops a trial on its validation reconstruction loss after
    `grace_period` epochs, and the trials left are ranked by `rank_by`; the converged linear probe's macro
    AUROC on `probe_task`'s train and val windows (fold 9 for PTB-XL) needs a probe task. Nothing reads the
    test split: score the chosen encoder once, with `crema probe`.
    """

    name: FolderName
    grid: dict[str, list] = Field(min_length=1)  # dotted pretrain keys -> the values to try; axes are crossed
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)  # every grid point once per seed
    probe_task: str | None = None  # a task YAML (classes, splits); its dataset is the pretraining one
    rank_by: Literal["val_probe_macro_auroc", "val_recon_loss"] = "val_probe_macro_auroc"
    grace_period: int = Field(1, ge=1)  # epochs before ASHA may stop a trial
    reduction_factor: float = Field(3.0, gt=1)
    max_concurrent_trials: int = Field(1, ge=1)

    @field_validator("grid")
    @classmethod
    def _axes(cls, v: dict[str, list]) -> dict[str, list]:
        empty = [key for key, values in v.items() if not values]
        if empty:
            raise ValueError(f"grid axes without values: {empty}")
        if "seed" in v or "name" in v:
            raise ValueError("the grid sets neither `seed` (use seeds:) nor `name` (trials are named <name>-<index>)")
        return v

    @model_validator(mode="after")
    def _probe_for_probe_ranking(self) -> "PretrainSweepConfig":
        if self.rank_by == "val_probe_macro_auroc" and self.probe_task is None:
            raise ValueError("rank_by: val_probe_macro_auroc needs a probe_task (or rank_by: val_recon_loss)")
        return self


# -------------------------------------------------------------------------------------- downstream

class LogUniform(Schema):
    """A range Ray Tune samples log-uniformly, once per `num_samples`: ``{log_uniform: [1e-4, 1e-2]}``."""

    log_uniform: tuple[float, float]

    @model_validator(mode="after")
    def _ordered(self) -> "LogUniform":
        low, high = self.log_uniform
        if not 0 < low < high:
            raise ValueError(f"log_uniform needs 0 < low < high, got {list(self.log_uniform)}")
        return self


# A list: every value is tried (a grid axis). A log_uniform range: sampled.
SearchSpace = list[float] | LogUniform


class SweepConfig(Schema):
    """One Ray Tune sweep: the search space, ASHA early stopping and what a trial may use."""

    epochs: int = Field(20, ge=1)  # per trial: ASHA's max_t
    grace_period: int = Field(2, ge=1)  # epochs every trial runs before ASHA may stop it
    reduction_factor: float = Field(3.0, gt=1)
    num_samples: int = Field(1, ge=1)  # draws of the sampled ranges, each crossed with the whole grid
    max_concurrent_trials: int | None = Field(None, ge=1)
    batch_size: int = Field(256, ge=1)
    lr: SearchSpace = [1e-3]  # fine-tune: the rate of the head and the top layer (layer decay scales the rest)
    weight_decay: SearchSpace = [0.0]
    layer_decay: SearchSpace = [0.75]  # fine-tune only
    drop_path: SearchSpace = [0.1]  # fine-tune only
    warmup_epochs: int = Field(0, ge=0)  # fine-tune only: linear warm-up, then cosine decay
    clip_grad: float | None = Field(None, gt=0)
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 autocast on GPU, fp32 on CPU
    cpus_per_trial: float = Field(1.0, gt=0)
    gpus_per_trial: float | None = Field(None, ge=0)  # None: fine-tune takes 1 when the cluster has GPUs
    register_model: str | None = None  # fine-tune: register the best model under this name


class EmbedSettings(Schema):
    """The frozen-encoder pass over the windows (Ray Data, an actor pool)."""

    batch_size: int = Field(64, ge=1)
    num_actors: int | None = Field(None, ge=1)  # None: one per GPU, else the CPUs less one for reading
    cpus_per_actor: float = Field(1.0, gt=0)
    precision: Literal["auto", "bf16", "fp32"] = "auto"


class EncoderSpec(Schema):
    """An encoder to evaluate: a pretrained artifact (`path`), or a baseline: a random initialisation, or the
    feature floor (`init: features`, nine hand-made features per lead: probe only)."""

    name: FolderName  # its embeddings' folder under the task's output
    init: Literal["pretrained", "random", "features"] = "pretrained"
    path: str | None = None  # pretrained: an encoder.pt written by save_encoder (local or s3://)
    like: str | None = None  # random: the architecture of this other (pretrained) encoder
    model: ModelConfig | None = None  # random: or an explicit architecture
    seed: int = 0  # random: the initialisation seed
    methods: list[Literal["probe", "finetune"]] = ["probe", "finetune"]  # random + finetune = supervised from scratch
    mlflow_run_id: str | None = None  # the pretraining run; None: looked up by the run's encoder_path tag
    description: str = ""

    @model_validator(mode="before")
    @classmethod
    def _features_are_probed(cls, data: object) -> object:
        if isinstance(data, dict) and data.get("init") == "features" and "methods" not in data:
            return {**data, "methods": ["probe"]}
        return data

    @model_validator(mode="after")
    def _source_of_weights(self) -> "EncoderSpec":
        if self.init == "pretrained" and (not self.path or self.like or self.model):
            raise ValueError(f"encoder {self.name}: a pretrained encoder takes `path` (and no `like`/`model`)")
        if self.init == "random" and (self.path or (self.like is None) == (self.model is None)):
            raise ValueError(f"encoder {self.name}: a random encoder takes exactly one of `like` and `model`, no `path`")
        if self.init == "features":
            if self.path or self.like or self.model:
                raise ValueError(f"encoder {self.name}: the feature floor takes no `path`, `like` or `model`")
            if self.methods != ["probe"]:
                raise ValueError(f"encoder {self.name}: the feature floor has no network to fine-tune: methods: [probe]")
        return self


SplitName = Literal["train", "val", "test"]


class TaskConfig(Schema):
    """A downstream task as data: which windows, which labels, which encoders and how to sweep them."""

    name: FolderName  # its folder under `output`
    dataset: str  # an ingest OUTPUT (folder or s3://)
    storage_options: dict = Field(default_factory=dict)  # fsspec options for the dataset and `output`
    output: str  # embeddings and Tune trials go under <output>/<name>/ (local folder or s3://)
    classes: list[str] = Field(min_length=1)  # multi-label: a window's labels outside these are ignored
    require_label: bool = True  # drop records with none of `classes` (the usual PTB-XL superdiagnostic set)
    train_split: SplitName = "train"
    val_split: SplitName = "val"
    test_splits: list[SplitName] = ["test"]  # of the training sources
    train_sources: list[str] | None = None  # None: every source; training and validation use these
    test_sources: list[str] | None = None  # None: the training sources (cross-hospital: others too)
    # The splits of a test source the task does not train on: none of its records was trained or selected on.
    external_splits: list[SplitName] = ["train", "val", "test"]
    label_fractions: list[float] = [1.0]  # of the training patients; one sweep each
    # The patient subsets drawn at each fraction below 1, one sweep per seed: [0, 1, 2] draws three, and the
    # comparison table gives their mean and spread (a 1 % subset's score depends on which patients it drew).
    fraction_seeds: list[int] = [0]
    # The leads the probe sees at train and test time (crema.data.signals.lead_set_leads): all, limb6, I, I+II...
    lead_sets: list[str] = ["all"]
    seed: int = 0
    n_boot: int = Field(1000, ge=1)  # patient bootstrap resamples for the test CIs
    converged_probe: bool = True  # also probe with L-BFGS to convergence (method probe_lbfgs), C chosen on val
    encoders: list[EncoderSpec] = Field(min_length=1)
    embed: EmbedSettings = Field(default_factory=EmbedSettings)
    probe: SweepConfig = Field(default_factory=lambda: SweepConfig(
        epochs=50, grace_period=5, batch_size=512, lr=LogUniform(log_uniform=(1e-4, 1e-2)),
        weight_decay=[0.0, 1e-4], num_samples=4))
    finetune: SweepConfig = Field(default_factory=lambda: SweepConfig(
        epochs=30, grace_period=3, batch_size=32, lr=LogUniform(log_uniform=(1e-4, 1e-3)), weight_decay=[0.05],
        layer_decay=[0.65, 0.75], drop_path=[0.1], warmup_epochs=2, clip_grad=1.0, num_samples=2))
    tracking: TrackingSettings = Field(default_factory=lambda: TrackingSettings(experiment="crema-downstream"))

    @field_validator("classes")
    @classmethod
    def _unique_classes(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"classes repeat: {v}")
        return v

    @field_validator("lead_sets")
    @classmethod
    def _lead_sets(cls, v: list[str]) -> list[str]:
        if not v or len(set(v)) != len(v):
            raise ValueError(f"lead sets must be given and not repeat, got {v}")
        for name in v:
            lead_set_leads(name)
        return v

    @field_validator("label_fractions")
    @classmethod
    def _fractions(cls, v: list[float]) -> list[float]:
        if not v or any(not 0 < f <= 1 for f in v):
            raise ValueError(f"label fractions must be in (0, 1], got {v}")
        return v

    @field_validator("fraction_seeds")
    @classmethod
    def _fraction_seeds(cls, v: list[int]) -> list[int]:
        if not v or len(set(v)) != len(v):
            raise ValueError(f"fraction seeds must be given and not repeat, got {v}")
        return v

    def label_subsets(self) -> list[tuple[float, int | None]]:
        """(fraction, seed of its patient draw) per sweep: every seed below 1, no draw (None) at 1, all patients."""
        subsets: list[tuple[float, int | None]] = []
        for fraction in self.label_fractions:
            subsets += [(fraction, None)] if fraction == 1.0 else [(fraction, seed) for seed in self.fraction_seeds]
        return subsets

    @model_validator(mode="after")
    def _consistent(self) -> "TaskConfig":
        """Cross-field checks that a single field's validator cannot make."""
        names = [e.name for e in self.encoders]
        if len(set(names)) != len(names):
            raise ValueError(f"encoder names repeat: {names}")
        pretrained = {e.name for e in self.encoders if e.init == "pretrained"}
        for e in self.encoders:
            if e.like is not None and e.like not in pretrained:
                raise ValueError(f"encoder {e.name}: like={e.like!r} is not a pretrained encoder of this task")
        if self.val_split == self.train_split:
            raise ValueError("val_split must differ from train_split")
        if self.in_domain_test_sources() != [] and {self.train_split, self.val_split} & set(self.test_splits):
            raise ValueError(f"test_splits {self.test_splits} overlap the training/validation splits of the same "
                             "sources: test records would be trained or selected on")
        return self

    def sources_for(self, role: Literal["train", "test"]) -> list[str] | None:
        """The sources a role reads (None: all of them)."""
        if role == "test" and self.test_sources is not None:
            return self.test_sources
        return self.train_sources

    def in_domain_test_sources(self) -> list[str] | None:
        """The test sources the task also trains on (None: all of them), tested on `test_splits`."""
        test, train = self.sources_for("test"), self.train_sources
        return test if train is None else [s for s in test if s in train]

    def external_test_sources(self) -> list[str]:
        """The test sources the task does not train on (other hospitals), tested on `external_splits`."""
        test, train = self.sources_for("test"), self.train_sources
        return [] if test is None or train is None else [s for s in test if s not in train]
