"""Downstream evaluation: task roles and labels, task encoders, frozen embeddings, linear probes,
record-level metrics with patient bootstrap CIs, figures and the comparison report."""
