"""Data: canonical 12-lead signals, the file-format readers, labels, the windows dataset schema, the
per-record ingest steps, and the one decoding of window rows into tensors (:mod:`.batches`)."""
