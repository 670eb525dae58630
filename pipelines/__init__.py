"""Thin Ray entrypoints, one per stage: `python -m pipelines.<stage>`."""
