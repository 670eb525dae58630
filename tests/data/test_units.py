"""`units: normalized`: a source whose amplitudes are normalised (z-scored), not mV, says so; its samples are
stored as they are, exempt from the mV plausibility check, flagged, and every window row carries its units.
A windows table made before the `units` column still reads, and gains the column on the next ingest."""

from __future__ import annotations

import shutil

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import wfdb
from pyiceberg.schema import Schema

from crema.config import IngestConfig, SourceConfig, load_yaml
from crema.data import catalog
from crema.data.catalog import read_manifest, read_windows
from crema.data.schema import decode_signals
from crema.data.ingest import run_ingest
from tests.data.test_dataset_tables import L, make_windows, manifest_rows

KEY = b"test-pseudonym-key"


def test_a_source_declaring_normalized_units_lands_as_declared(ptbxl_root, tmp_path):
    zsrc, mvsrc = tmp_path / "zscored", tmp_path / "mv"
    zsrc.mkdir()
    mvsrc.mkdir()
    record = wfdb.rdrecord(str(ptbxl_root / "records500/00000/00002_hr"))
    # z-scored x 60: peaks of ~500, which no mV record has (absurd_amplitude), with a header saying uV (which
    # would scale them by 1e-3) and a std of 60 (which looks_normalised would not guess).
    z = 60 * (record.p_signal - record.p_signal.mean(axis=0)) / record.p_signal.std(axis=0)
    wfdb.wrsamp("z", fs=500, units=["uV"] * 12, sig_name=record.sig_name, p_signal=z, fmt=["16"] * 12,
                adc_gain=[10.0] * 12, baseline=[0] * 12, write_dir=str(zsrc))
    stored = wfdb.rdrecord(str(zsrc / "z")).p_signal.T  # what the file holds, after its ADC rounding
    for ext in ("hea", "dat"):
        shutil.copy(ptbxl_root / "records500/00000" / f"00001_hr.{ext}", mvsrc)
    (tmp_path / "zscored.yaml").write_text(f"name: zscored\nformat: wfdb\npath: {zsrc}\nunits: normalized\n"
                                           "pseudonymise_record_ids: false\n")
    declared = load_yaml(tmp_path / "zscored.yaml", SourceConfig)
    plain = SourceConfig(name="mv", format="wfdb", path=str(mvsrc), pseudonymise_record_ids=False)

    out = str(tmp_path / "ds")
    summary = run_ingest([declared, plain], out, IngestConfig(), pseudonym=KEY)
    assert [(s.name, s.ok, s.rejected, s.normalised) for s in summary.sources] == [("zscored", 1, 0, 1), ("mv", 1, 0, 0)]
    flags = {r["source"]: r["flags"] for r in read_manifest(out).to_pylist()}
    assert flags == {"zscored": "normalised_amplitude", "mv": None}
    rows = read_windows(out)
    units = dict(zip(rows["source"].to_pylist(), rows["units"].to_pylist()))
    assert units == {"zscored": "normalized", "mv": "mV"}
    z_window = decode_signals(rows.filter(pc.field("source") == "zscored"))[0].astype(np.float32)
    np.testing.assert_allclose(z_window, stored, rtol=2e-3, atol=1e-2)  # as the file holds them: not scaled to mV

    # Undeclared, the same file is uV converted to mV (the declaration is what changes it, not a guess).
    undeclared = declared.model_copy(update={"units": None})
    run_ingest([undeclared], str(tmp_path / "ds2"), IngestConfig(), pseudonym=KEY)
    rows = read_windows(str(tmp_path / "ds2"))
    assert rows["units"].to_pylist() == ["mV"] and read_manifest(str(tmp_path / "ds2"))["flags"].to_pylist() == [None]
    np.testing.assert_allclose(decode_signals(rows)[0].astype(np.float32), stored * 1e-3, rtol=2e-3, atol=1e-4)


def test_a_windows_table_from_before_the_units_column_reads_and_gains_it(tmp_path):
    uri = str(tmp_path / "ds")
    dataset = catalog.open_for_ingest(uri, None)
    dataset.catalog.create_namespace_if_not_exists(dataset.namespace)
    new_schema = catalog.windows_iceberg_schema(L, "float16")
    old_schema = Schema(*[f for f in new_schema.fields if f.name != "units"])
    dataset.catalog.create_table(dataset.identifier(catalog.WINDOWS), old_schema, partition_spec=catalog.WINDOWS_SPEC,
                                 properties={catalog.WINDOW_SAMPLES_KEY: str(L), catalog.DTYPE_KEY: "float16"})
    dataset.catalog.create_table(dataset.identifier(catalog.MANIFEST), catalog.MANIFEST_ICEBERG_SCHEMA,
                                 partition_spec=catalog.MANIFEST_SPEC)
    old_rows = make_windows("old", 3).drop_columns(["units"])
    run = catalog.begin_run(dataset)
    try:
        windows = dataset.windows()
        files = catalog.write_data_files(windows.metadata, windows.io, old_rows, run.id, 0)
        catalog.commit_run(run, {"old": None}, files, manifest_rows(old_rows))
    finally:
        catalog.end_run(run)
    old_version = catalog.dataset_version(uri)
    assert "units" not in read_windows(uri).column_names  # an old dataset, as it was written

    catalog.write_windows(uri, make_windows("new", 2), L)  # the next ingest (ensure_tables) adds the column
    assert "units" in dataset.windows().schema().column_names
    rows = read_windows(uri, columns=["source", "units"])
    assert set(zip(rows["source"].to_pylist(), rows["units"].to_pylist())) == {("old", None), ("new", "mV")}
    before = read_windows(uri, version=old_version)  # the old version reads too, the column null there
    assert before.num_rows == 6 and before["units"].null_count == 6
    assert pa.types.is_string(before.schema.field("units").type)
