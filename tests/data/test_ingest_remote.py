"""Ingest against real services: an S3 API server (moto) and a Ray cluster taking `ray job submit`."""

from __future__ import annotations

import sys

import boto3
import numpy as np
import pyarrow.compute as pc
import pytest
import s3fs
import wfdb

from crema.config import CatalogConfig, ConfigError, IngestConfig
from crema.data.catalog import read_manifest, read_windows
from crema.data.schema import decode_signals
from crema.stages.ingest import ingest
from tests.conftest import REPO, submit_job
from tests.data.test_ingest import KEY, ptbxl_source


def test_ingest_from_and_to_s3(s3_server, ptbxl_root, ray_local, tmp_path):
    options = {"key": "testing", "secret": "testing",
               "client_kwargs": {"endpoint_url": s3_server, "region_name": "us-east-1"}}
    boto3.client("s3", endpoint_url=s3_server, aws_access_key_id="testing", aws_secret_access_key="testing",
                 region_name="us-east-1").create_bucket(Bucket="hospital")
    s3 = s3fs.S3FileSystem(**options)
    ids = [f"{i:05d}_hr" for i in range(1, 13)]
    for name in ids:
        for ext in ("hea", "dat"):
            s3.put(str(ptbxl_root / "records500/00000" / f"{name}.{ext}"), f"hospital/ptbxl/records500/00000/{name}.{ext}")
    for table in ("ptbxl_database.csv", "scp_statements.csv"):
        s3.put(str(ptbxl_root / table), f"hospital/ptbxl/{table}")

    source = ptbxl_source(ptbxl_root).model_copy(update={"path": "s3://hospital/ptbxl/records500",
                                                          "storage_options": options})
    # The embedded SQLite catalog needs a local folder: an s3:// output names its catalog (here SQL on a
    # local SQLite file, as a stand-in for a REST or Glue catalog) and keeps its warehouse on S3.
    with pytest.raises(ConfigError, match="Set `catalog:`"):
        ingest([source], "s3://hospital/out", IngestConfig(storage_options=options), pseudonym=KEY)
    catalog = CatalogConfig(type="sql", uri=f"sqlite:///{tmp_path}/catalog.db")
    summary = ingest([source], "s3://hospital/out", IngestConfig(storage_options=options, catalog=catalog),
                     pseudonym=KEY)
    assert summary.sources[0].ok == 12

    assert s3.exists("hospital/out/catalog.json") and s3.ls("hospital/out/warehouse/crema/windows/data")
    assert "testing" not in s3.cat_file("hospital/out/catalog.json").decode()  # no secrets beside the data
    assert read_manifest("s3://hospital/out", options).num_rows == 12
    table = read_windows("s3://hospital/out", storage_options=options)
    assert sorted(r.split("/")[-1] for r in table["record_id"].to_pylist()) == ids
    k = table["record_id"].to_pylist().index("00000/00005_hr")
    ref = wfdb.rdrecord(str(ptbxl_root / "records500/00000/00005_hr")).p_signal.T
    np.testing.assert_allclose(decode_signals(table)[k].astype(np.float32), ref, atol=2e-3, rtol=1e-3)
    assert not s3.find("hospital/out/_runs") and not s3.find("hospital/out/_pending")  # no run left behind


@pytest.mark.slow
def test_ingest_entrypoint_via_ray_job_submit(ray_cluster, ptbxl_root, tmp_path):
    out = tmp_path / "dataset"
    result = submit_job(
        ray_cluster,
        [sys.executable, "-m", "crema.stages.ingest", str(REPO / "configs/sources/ptbxl.yaml"), "--output", str(out)],
        {"PTBXL_ROOT": str(ptbxl_root), "CREMA_PSEUDONYM_KEY": KEY.decode(), "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "succeeded" in (result.stdout + result.stderr)
    manifest = read_manifest(str(out), {})
    assert manifest.num_rows == 500
    ok = manifest.filter(pc.equal(manifest["status"], "ok")).num_rows
    assert ok >= 490 and read_windows(str(out), columns=["record_id"]).num_rows == ok
