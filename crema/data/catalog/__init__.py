"""The dataset as two Apache Iceberg tables, `windows` and `manifest`, in one catalog (pyiceberg).

A dataset is addressed by one URI, the ingest OUTPUT (a local folder or ``s3://bucket/prefix``)::

    OUTPUT/catalog.db              the embedded default catalog (pyiceberg SqlCatalog on SQLite)
    OUTPUT/warehouse/<ns>/windows  the windows table: one row per window, partitioned by source and split
    OUTPUT/warehouse/<ns>/manifest the manifest table: one row per discovered record, partitioned by source
    OUTPUT/catalog.json            only for another catalog (REST, Glue, SQL elsewhere): its settings, no secrets
    OUTPUT/_runs/<run>.json        a running (or killed) ingest; OUTPUT/_pending/<run>.parquet its manifest rows

**Commits.** An ingest writes its windows' data files from Ray tasks (nothing a reader sees), then commits
them to the `windows` table in *one* Iceberg transaction that deletes the rewritten sources' rows and
adds the new files: readers see the previous snapshot or the new one, never a mix. That snapshot is the
commit point. The manifest rows of the run are written first to ``_pending/<run>.parquet`` and applied to
the `manifest` table right after; a run killed between the two commits is rolled forward by the next
ingest (its pending rows applied), one killed earlier is rolled back (its data files, never referenced
by any snapshot, are deleted: orphan-file cleanup). A commit that loses an optimistic-concurrency race
(another ingest committed first) is retried against the new snapshot: ingests of different sources
into one dataset all land. Only ``drop_source`` removes a source.

**Version.** The `windows` table's current snapshot id is the dataset version (:func:`dataset_version`),
which pretraining and evaluation log to MLflow; any Iceberg engine (DuckDB, Spark, Trino) reads the same
tables, and an older version stays readable by its snapshot id. Pretraining, embedding and fine-tuning
resolve it once at their start and pass it to every read (``version=``) and to the tags they log, so an
ingest committing meanwhile changes nothing they read.

**Units.** `units` (optional, added by schema evolution to a table made before it: null there, meaning mV)
is "mV", or "normalized" for a source declaring normalised amplitudes.

**Signal column.** `signal` is Iceberg ``fixed[L]`` (pyarrow ``fixed_size_binary``): no repetition levels,
written and read as one buffer. Its dtype travels in the field's doc (``crema.dtype=float16``), which
pyiceberg and Ray hand on as the Arrow field's ``doc`` metadata (:func:`crema.data.schema.decode_signals`).

The package, one job per module: :mod:`.tables` (the tables' schemas and names, opening the catalog),
:mod:`.reads` (versions and reads), :mod:`.commits` (the write, commit and recovery protocol),
:mod:`.errors`. What the rest of crema uses is imported from here.
"""

from __future__ import annotations

from crema.data.catalog.errors import DatasetNotFound, DiskFull, is_disk_full
from crema.data.catalog.tables import (DTYPE_KEY, Dataset, MANIFEST, MANIFEST_ICEBERG_SCHEMA, MANIFEST_SPEC, WINDOWS,
                                       WINDOWS_SPEC, WINDOW_SAMPLES_KEY, ensure_tables, open_dataset, open_for_ingest,
                                       windows_iceberg_schema)
from crema.data.catalog.reads import (committed_manifest, dataset_sources, dataset_version, read_manifest, read_windows,
                                      windows_dataset)
from crema.data.catalog.commits import (Run, begin_run, commit_run, drop_source, end_run, record_identities, recover,
                                        rewrite_records, write_data_files, write_windows)

__all__ = ["DTYPE_KEY", "Dataset", "DatasetNotFound", "DiskFull", "MANIFEST", "MANIFEST_ICEBERG_SCHEMA",
           "MANIFEST_SPEC", "Run", "WINDOWS", "WINDOWS_SPEC", "WINDOW_SAMPLES_KEY", "begin_run", "commit_run",
           "committed_manifest", "dataset_sources", "dataset_version", "drop_source", "end_run", "ensure_tables",
           "is_disk_full", "open_dataset", "open_for_ingest", "read_manifest", "read_windows", "record_identities",
           "recover", "rewrite_records", "windows_dataset", "windows_iceberg_schema", "write_data_files",
           "write_windows"]
