"""Logging the models and finding where an encoder came from: the encoder and the fine-tuned classifier as
pyfunc models (code, not a pickle), and the lineage of a downstream run.

A downstream run finds the pretraining run of its encoder through the ``encoder_path`` tag that pretraining
writes.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow.tracking import MlflowClient

from crema.config import EncoderSpec
from crema.tracking.names import (TAG_ENCODER, TAG_ENCODER_ARTIFACT, TAG_ENCODER_INIT, TAG_ENCODER_PATH,
                                  TAG_ENCODER_RUN_ID)


# The encoder and the classifier are logged as MLflow "models from code": the model is one of these modules
# (encoder_model.py, classifier_model.py), not a pickle; its weights are the safetensors artifact.
PYFUNC_MODELS = Path(__file__).resolve().parent


def _requirements() -> list[str]:
    """What serving the encoder or the classifier needs: this project (reads the artifact, builds the encoder) and torch."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        crema_version = version("crema")
    except PackageNotFoundError:
        import crema

        crema_version = crema.__version__
    return [f"crema=={crema_version}", f"torch>={torch.__version__.split('+')[0]}"]


def log_encoder_model(encoder_file: str | Path, window_samples: int, representation_dim: int, name: str = "encoder"):
    """Log the encoder (a safetensors file of :func:`crema.train.artifacts.save_encoder`) to the active run
    as a pyfunc model with a signature: inputs ``x`` (n, 12, window_samples) float32 raw mV and ``lead_mask``
    (n, 12) bool, params ``fs`` (the windows' rate, for conditioning) and ``batch_size``, output the
    (n, representation_dim) float32 representations (SiTEncoder.embed)."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ParamSchema, ParamSpec, Schema, TensorSpec

    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 12, window_samples), "x"),
                       TensorSpec(np.dtype(np.bool_), (-1, 12), "lead_mask")]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, representation_dim), "embedding")]),
        params=ParamSchema([ParamSpec("fs", "double", 500.0), ParamSpec("batch_size", "long", 256)]))
    return mlflow.pyfunc.log_model(name=name, python_model=str(PYFUNC_MODELS / "encoder_model.py"),
                                   artifacts={"encoder": str(encoder_file)}, signature=signature,
                                   pip_requirements=_requirements())


def log_classifier(classifier_file: str | Path, window_samples: int, classes: list[str],
                   params: Mapping[str, object], provenance: Mapping[str, str], register_model: str | None) -> str:
    """Log (and register, if `register_model` names a model) a fine-tuned classifier to the active run as the
    pyfunc model "model", no pickle in it: the safetensors file of :func:`crema.train.artifacts.save_classifier`
    and :mod:`crema.tracking.classifier_model`. Signature: inputs ``x`` (n, 12, window_samples) float32 raw mV and
    ``lead_mask`` (n, 12) bool, params ``fs`` and ``batch_size``, output one float32 probability column per class
    (named by `classes`). Returns the model's URI."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 12, window_samples), "x"),
                       TensorSpec(np.dtype(np.bool_), (-1, 12), "lead_mask")]),
        outputs=Schema([ColSpec("float", name) for name in classes]),
        params=ParamSchema([ParamSpec("fs", "double", 500.0), ParamSpec("batch_size", "long", 256)]))
    info = mlflow.pyfunc.log_model(name="model", python_model=str(PYFUNC_MODELS / "classifier_model.py"),
                                   artifacts={"classifier": str(classifier_file)}, signature=signature,
                                   pip_requirements=_requirements(), registered_model_name=register_model,
                                   params={k: str(v) for k, v in params.items()}, tags=dict(provenance))
    if register_model:
        client = MlflowClient()
        for key, value in provenance.items():
            client.set_model_version_tag(register_model, str(info.registered_model_version), key, value)
    return info.model_uri


# --------------------------------------------------------------------------------- lineage

def encoder_run_id(encoder_path: str, tracking_uri: str) -> str | None:
    """The latest pretraining run, in any experiment, that wrote the encoder artifact at `encoder_path`."""
    client = MlflowClient(tracking_uri)
    quoted = encoder_path.replace("'", "\\'")
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, filter_string=f"tags.{TAG_ENCODER_PATH} = '{quoted}'",
                              order_by=["attributes.start_time DESC"], max_results=1) if experiments else []
    return runs[0].info.run_id if runs else None


def encoder_provenance(spec: EncoderSpec, tracking_uri: str) -> dict[str, str]:
    """Tags that tie a downstream run to its encoder: the artifact and the pretraining run that wrote it."""
    tags = {TAG_ENCODER: spec.name, TAG_ENCODER_INIT: spec.init}
    if spec.description:
        tags["encoder_description"] = spec.description
    if spec.init == "random":
        tags["encoder_seed"] = str(spec.seed)
        if spec.like:
            tags["encoder_like"] = spec.like
    if spec.init != "pretrained":
        return tags
    # Not TAG_ENCODER_PATH: the pretraining run that wrote the artifact carries that tag, and is found by it.
    tags[TAG_ENCODER_ARTIFACT] = spec.path
    run_id = spec.mlflow_run_id or encoder_run_id(spec.path, tracking_uri)
    if run_id:
        tags[TAG_ENCODER_RUN_ID] = run_id
    return tags
