"""Downstream tasks as data: which windows a task reads in which role, and their labels.

A task reads windows in three roles: ``train`` and ``val`` (the task's split names, of its training
sources) and ``test`` (its test splits, of its test sources: other hospitals for a cross-hospital
evaluation). A record is named ``source/record_id`` throughout, since two hospitals may reuse an id.
Label fractions keep whole patients (:func:`crema.evaluation.metrics.sample_label_fraction`).
The task's encoders (artifacts, random-init baselines) are :mod:`crema.evaluation.encoders`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from crema.config import ConfigError, TaskConfig, load_yaml
from crema.evaluation.metrics import aggregate_by_record, macro_auroc, multi_hot, record_targets, sample_label_fraction

Role = Literal["train", "val", "test"]
ROLES: tuple[Role, ...] = ("train", "val", "test")
# Window columns a downstream stage carries along besides the signal.
META_COLUMNS = ["source", "record_id", "patient_key", "split", "window_index", "labels"]
SIGNAL_COLUMNS = ["signal", "lead_mask", "fs"]  # fs: input conditioning filters at the window's rate


def load_task(path: str | Path, overrides: dict | None = None) -> TaskConfig:
    """A task YAML, validated, with `key=value` overrides applied."""
    return load_yaml(path, TaskConfig, overrides)


def absolute_uri(uri: str) -> str:
    """Ray workers run in other folders (Tune: the trial's): local paths must not be relative."""
    return uri if "://" in uri else os.path.abspath(uri)


def with_absolute_paths(task: TaskConfig) -> TaskConfig:
    """The task with its dataset, output and encoder paths absolute."""
    encoders = [e.model_copy(update={"path": absolute_uri(e.path)}) if e.path else e for e in task.encoders]
    return task.model_copy(update={"dataset": absolute_uri(task.dataset), "output": absolute_uri(task.output),
                                   "encoders": encoders})


# ------------------------------------------------------------------------------------------ roles

def role_filter(task: TaskConfig, role: Role) -> pc.Expression:
    """Rows of `role` (for a pyarrow dataset or table holding `source` and `split` columns). The test role
    reads the test splits of the sources the task trains on and the external splits of the others."""
    if role != "test":
        return _rows(task.sources_for("train"), [task.train_split if role == "train" else task.val_split])
    in_domain, external = task.in_domain_test_sources(), task.external_test_sources()
    if not external:
        return _rows(in_domain, task.test_splits)
    expr = _rows(external, task.external_splits)
    return expr if in_domain == [] else expr | _rows(in_domain, task.test_splits)


def _rows(sources: list[str] | None, splits: list[str]) -> pc.Expression:
    """Rows of these splits of these sources (None: of every source)."""
    expr = pc.field("split").isin(splits)
    return expr if sources is None else expr & pc.field("source").isin(sources)


def task_sources(task: TaskConfig, available: Sequence[str]) -> list[str]:
    """Every source the task reads, checked against the dataset's."""
    wanted = set(task.sources_for("train") or available) | set(task.sources_for("test") or available)
    missing = wanted - set(available)
    if missing:
        raise ConfigError(f"task {task.name}: sources {sorted(missing)} are not in {task.dataset} "
                          f"(it holds {sorted(available)})")
    return sorted(wanted)


def keep_labelled(table: pa.Table, classes: Sequence[str]) -> pa.Table:
    """Rows whose labels include at least one of `classes`."""
    has_class = multi_hot(table["labels"].to_pylist(), classes).any(axis=1)
    return table.filter(pa.array(has_class))


def record_keys(table: pa.Table) -> np.ndarray:
    """(n,) ``source/record_id`` of every row: two hospitals may reuse a record id."""
    return np.asarray(pc.binary_join_element_wise(table["source"], table["record_id"], "/").to_numpy(
        zero_copy_only=False), dtype=object)


def split_roles(table: pa.Table, task: TaskConfig) -> dict[Role, pa.Table]:
    """The table's rows by role, unlabelled records dropped if the task says so."""
    roles = {role: table.filter(role_filter(task, role)) for role in ROLES}
    if task.require_label:
        roles = {role: keep_labelled(t, task.classes) for role, t in roles.items()}
    for role, t in roles.items():
        if t.num_rows == 0:
            raise ConfigError(f"task {task.name}: no {role} windows (sources {task.sources_for(role)}, "
                              f"classes {task.classes}) in {task.dataset}")
    return roles


def label_fraction_subset(table: pa.Table, fraction: float, seed: int | None) -> pa.Table:
    """The rows of a `fraction` of the table's patients, drawn with `seed`: every record of a kept patient, nothing
    of the others. At fraction 1, the table (there is nothing to draw)."""
    if fraction == 1.0:
        return table
    if seed is None:
        raise ValueError(f"a label fraction of {fraction:g} needs the seed of its patient draw")
    keys = record_keys(table)
    kept = sample_label_fraction(keys, table["patient_key"].to_numpy(zero_copy_only=False), fraction, seed)
    return table.filter(pa.array(np.isin(keys, kept)))


# ----------------------------------------------------------------------------------------- labels

@dataclass(frozen=True)
class LabelledWindows:
    """The labels of some windows, and how their scores become record-level metrics."""

    record_keys: np.ndarray  # (n,) source/record_id
    patient_keys: np.ndarray  # (n,)
    y: np.ndarray  # (n, C) multi-hot

    @classmethod
    def from_table(cls, table: pa.Table, classes: Sequence[str]) -> "LabelledWindows":
        return cls(record_keys(table), table["patient_key"].to_numpy(zero_copy_only=False).astype(object),
                   multi_hot(table["labels"].to_pylist(), classes))

    def __len__(self) -> int:
        return len(self.record_keys)

    def records(self, window_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(record keys, labels (R, C), patient keys, scores (R, C)): each record's score is its windows' mean."""
        ids, scores = aggregate_by_record(self.record_keys, window_scores, how="mean")
        targets = record_targets(self.record_keys, self.y, self.patient_keys)
        return ids, targets.labels, targets.patient_keys, scores

    def macro_auroc(self, window_scores: np.ndarray) -> float:
        _, labels, _, scores = self.records(window_scores)
        return macro_auroc(labels, scores).value
