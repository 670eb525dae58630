"""Pretraining, embedding and evaluation read one fixed dataset version: the `windows` snapshot id resolved
once at the stage's start. An ingest committing between resolving and reading changes none of the reads,
and the version logged is the one read. Catalog-level (no Ray cluster)."""

from __future__ import annotations

import numpy as np
import pyarrow.compute as pc

from crema.config import PretrainConfig
from crema.data.catalog import dataset_version, read_windows, windows_dataset, write_windows
from crema.data.schema import decode_signals
from crema.evaluation.tasks import load_task
from crema.stages import common, finetune, pretrain
from crema.tracking import TAG_DATASET_VERSION, dataset_tags
from tests.conftest import REPO
from tests.data.test_dataset_tables import L, make_windows

TINY = dict(size="tiny", window_samples=5000, patch_size=250, embed_dim=32, depth=2, num_heads=2,
            decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2, contrastive_weight=0.1)


def test_reads_at_the_resolved_version_ignore_a_commit_made_meanwhile(tmp_path):
    uri = str(tmp_path / "ds")
    write_windows(uri, make_windows("a", 6), L)
    version = dataset_version(uri)  # what a stage does once, at its start

    # An ingest commits meanwhile: source a rewritten (other values, more records), source b added.
    write_windows(uri, make_windows("a", 9, value=2.0), L)
    write_windows(uri, make_windows("b", 3), L)
    assert dataset_version(uri) != version
    assert read_windows(uri).num_rows == 24  # "current" has moved on

    def is_pinned(table):
        return (table.num_rows == 12 and set(table["source"].to_pylist()) == {"a"}
                and bool(np.all(decode_signals(table) == 1.0)))

    assert is_pinned(windows_dataset(uri, version=version).to_table())
    assert is_pinned(read_windows(uri, version=version))
    # Pretraining's driver reads (counts, the fixed val window) at the pinned version; so is what it logs.
    cfg = PretrainConfig.model_validate({"name": "pin", "storage_path": str(tmp_path), "data": {"dataset": uri}})
    windows = pretrain._windows_dataset(cfg, version)
    assert windows.count_rows() == 12 and pretrain._split_rows(windows, "train") == 4
    assert dataset_tags(uri, version=version)[TAG_DATASET_VERSION] == version
    assert common.run_tags(uri, None, version)[TAG_DATASET_VERSION] == version
    # Fine-tuning's one read in the driver, at the pinned version.
    task = load_task(REPO / "configs/tasks/ptbxl_superdiagnostic.yaml",
                     {"dataset": uri, "output": str(tmp_path / "out"),
                      "encoders": [{"name": "r", "init": "random", "model": TINY}]})
    roles = finetune.read_role_windows(task, version)
    assert sum(t.num_rows for t in roles.values()) == 12
    assert all(set(t["source"].to_pylist()) == {"a"} and pc.max(t["record_id"]).as_py() <= "r005"
               for t in roles.values())
