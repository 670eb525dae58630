"""Weights are safetensors, never unpickled: a crafted checkpoint or encoder (a pickle that would run code)
is refused with a clear error and runs nothing; a corrupt latest checkpoint falls back to the previous one;
the encoder logged to MLflow is a pyfunc with a signature that serves embeddings; run names are identifiers;
a dead tracking server fails at once, naming its URI."""

from __future__ import annotations

import logging
import os
import pickle
import time

import mlflow
import numpy as np
import pytest
import torch

from crema.config import ModelConfig, PretrainConfig
from crema.model.network import CREMA, SiTEncoder
from crema.train.artifacts import load_encoder, save_encoder
from crema.train.checkpoint import (STATE_FILE, CheckpointError, Position, load_newest_loadable,
                                    load_training_state, save_training_state)
from crema.train.safe_files import UnsafeArtifactError

SMALL = dict(size="tiny", window_samples=500, patch_size=50, embed_dim=32, depth=1, num_heads=2,
             decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)


class RunsCode:
    """Unpickling this creates the marker file: what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def training_objects(seed: int = 0):
    torch.manual_seed(seed)
    model = CREMA(ModelConfig(**SMALL))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5)
    return model, optimizer, scheduler


def one_step(model, optimizer, scheduler):
    x = torch.randn(4, 12, 500)
    mask = torch.ones(4, 12, dtype=torch.bool)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    optimizer.step()
    scheduler.step()
    return x, mask


def test_training_state_round_trips_without_pickle(tmp_path):
    model, optimizer, scheduler = training_objects()
    one_step(model, optimizer, scheduler)
    save_training_state(str(tmp_path), model, optimizer, scheduler, Position(1, 2, 3))
    assert (tmp_path / STATE_FILE).read_bytes()[8:9] == b"{"  # a JSON header: safetensors

    fresh = training_objects(seed=1)
    assert load_training_state(str(tmp_path), *fresh) == Position(1, 2, 3)
    for p, q in zip(model.state_dict().values(), fresh[0].state_dict().values()):
        assert torch.equal(p, q)
    a, b = optimizer.state_dict(), fresh[1].state_dict()
    assert a["param_groups"] == b["param_groups"] and a["param_groups"][0]["betas"] == (0.9, 0.95)
    for key in a["state"]:
        for name, value in a["state"][key].items():
            assert torch.equal(value, b["state"][key][name])
    assert scheduler.state_dict() == fresh[2].state_dict()


@pytest.mark.parametrize("name", [STATE_FILE, "state.pt"])
def test_a_crafted_checkpoint_is_refused_and_runs_nothing(tmp_path, name):
    marker = tmp_path / "pwned"
    folder = tmp_path / "checkpoint_step00000004"
    folder.mkdir()
    torch.save({"model": RunsCode(marker)}, folder / name)  # a torch.save zip whose pickle runs a command
    with pytest.raises(CheckpointError, match="never") as err:
        load_training_state(str(folder), *training_objects())
    assert "safetensors" in str(err.value)
    assert not marker.exists()


def test_a_raw_pickle_encoder_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "encoder.safetensors"
    path.write_bytes(pickle.dumps(RunsCode(marker)))
    with pytest.raises(UnsafeArtifactError, match="a Python pickle.*never unpickles"):
        load_encoder(path)
    torch.save({"config": {}, "state_dict": RunsCode(marker)}, path)
    with pytest.raises(UnsafeArtifactError, match="torch.save zip"):
        load_encoder(path)
    assert not marker.exists()


def test_resume_falls_back_to_the_newest_checkpoint_that_loads(tmp_path, caplog):
    model, optimizer, scheduler = training_objects()
    folders = []
    for step in (2, 4):
        one_step(model, optimizer, scheduler)
        folder = tmp_path / f"checkpoint_step{step:08d}"
        folder.mkdir()
        save_training_state(str(folder), model, optimizer, scheduler, Position(0, step, step))
        folders.append(str(folder))
    latest = tmp_path / "checkpoint_step00000004" / STATE_FILE
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])  # torn write

    logger = logging.getLogger("crema.train.checkpoint")
    logger.addHandler(caplog.handler)  # crema's own handler does not propagate to the root logger
    try:
        position, used, skipped = load_newest_loadable(reversed(folders), *training_objects(seed=1))
    finally:
        logger.removeHandler(caplog.handler)
    assert position == Position(0, 2, 2) and used == folders[0]
    assert len(skipped) == 1 and skipped[0][0].endswith("checkpoint_step00000004") and "corrupt" in str(skipped[0][1])
    assert "cannot be restored, trying the previous one" in caplog.text

    (tmp_path / "checkpoint_step00000002" / STATE_FILE).write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="no checkpoint could be restored"):
        load_newest_loadable(reversed(folders), *training_objects())


def test_encoder_artifact_round_trips_and_serves_as_an_mlflow_pyfunc(tmp_path):
    from crema import tracking

    torch.manual_seed(0)
    encoder = SiTEncoder(ModelConfig(**SMALL)).eval()
    path = tmp_path / "encoder.safetensors"
    save_encoder(encoder, path)
    x = torch.randn(3, 12, 500)
    mask = torch.ones(3, 12, dtype=torch.bool)
    mask[1, 7:] = False
    with torch.no_grad():
        assert torch.equal(load_encoder(path).embed(x, mask), encoder.embed(x, mask))
        # What the served model does: raw mV windows conditioned as in pretraining, then embedded.
        conditioned = x
        if getattr(encoder.cfg, "input", None) is not None:
            from crema.data.conditioning import condition

            conditioned = torch.from_numpy(condition(x.numpy(), mask.numpy(), 250.0, encoder.cfg.input))
        expected = encoder.embed(conditioned, mask)

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment_id=tracking.ensure_experiment("pyfunc-test", uri))
    with mlflow.start_run():
        info = tracking.log_encoder_model(path, window_samples=500, representation_dim=encoder.representation_dim)
    model = mlflow.pyfunc.load_model(info.model_uri)
    got = model.predict({"x": x.numpy(), "lead_mask": mask.numpy()}, params={"fs": 250.0})
    assert got.shape == (3, 64) and got.dtype == np.float32  # the SEP and patch means of 32-wide tokens
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-5, atol=1e-6)
    signature = model.metadata.signature
    assert [s.name for s in signature.inputs.inputs] == ["x", "lead_mask"]
    assert signature.outputs.inputs[0].shape == (-1, 64)
    local = mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(tmp_path / "model"))
    assert "crema==" in open(os.path.join(local, "requirements.txt")).read()
    # No pickle anywhere in the logged model: code as a .py file, weights as safetensors.
    files = [os.path.relpath(os.path.join(d, f), local) for d, _, fs in os.walk(local) for f in fs]
    assert not [f for f in files if f.endswith((".pkl", ".pt", ".pth", ".pickle"))], files
    assert any(f.endswith("encoder.safetensors") for f in files), files


def test_finetuned_classifier_is_logged_without_pickle_and_serves_class_probabilities(tmp_path):
    """The fine-tune stage's logging path: a classifier fine-tuned a few real steps, saved as safetensors,
    logged (and registered) as a pyfunc, loaded back by MLflow; its probabilities are the in-process model's."""
    from mlflow.tracking import MlflowClient

    from crema import tracking
    from crema.data.conditioning import condition
    from crema.stages.finetune import HYPERPARAMETERS, log_chosen_classifier
    from crema.train.artifacts import load_classifier
    from crema.model.network import Classifier
    from crema.train.engine_finetune import build_optimizer, multilabel_loss, predict, train_one_epoch, with_drop_path
    from crema.config import SweepConfig

    torch.manual_seed(0)
    classes = ["NORM", "MI", "STTC"]
    model = Classifier(with_drop_path(SiTEncoder(ModelConfig(**SMALL)), 0.1), len(classes))
    optimizer = build_optimizer(model, lr=1e-2, weight_decay=0.05, layer_decay=0.75)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    y = (torch.rand(16, len(classes)) > 0.5).float()
    batches = [{"x": torch.randn(8, 12, 500), "lead_mask": torch.ones(8, 12, dtype=torch.bool), "y": y[i:i + 8]}
               for i in (0, 8)]
    train_one_epoch(model, batches, optimizer, scheduler, multilabel_loss(y.numpy()), device=torch.device("cpu"))
    assert model.head.weight.abs().max() > 1e-3  # moved off its near-zero init: a real fine-tuned head

    x = np.random.default_rng(1).normal(0, 0.5, (5, 12, 500)).astype(np.float32)
    mask = np.ones((5, 12), dtype=bool)
    mask[2, 6:] = False
    conditioned = condition(x, mask, 500.0, model.encoder.cfg.input)
    expected = predict(model, [{"x": torch.from_numpy(conditioned), "lead_mask": torch.from_numpy(mask)}],
                       device=torch.device("cpu"))

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment_id=tracking.ensure_experiment("classifier-test", uri))
    config = {"lr": 1e-2, "weight_decay": 0.05, "layer_decay": 0.75, "drop_path": 0.1}
    sweep = SweepConfig(register_model="crema-test-classifier")
    tags = {"encoder": "crema", "encoder_run_id": "abc123", "task": "t", "label_fraction": "1.0", "other": "x"}
    with mlflow.start_run() as run:
        model_uri = log_chosen_classifier(model, classes, config, tags, sweep)

    logged = mlflow.pyfunc.load_model(model_uri)
    got = logged.predict({"x": x, "lead_mask": mask}, params={"fs": 500.0, "batch_size": 2})
    assert list(got.columns) == classes and got.shape == (5, 3)
    np.testing.assert_allclose(got.to_numpy(), expected, rtol=1e-5, atol=1e-6)
    signature = logged.metadata.signature
    assert [s.name for s in signature.inputs.inputs] == ["x", "lead_mask"]
    assert signature.inputs.inputs[0].shape == (-1, 12, 500)
    assert [c.name for c in signature.outputs.inputs] == classes

    local = mlflow.artifacts.download_artifacts(model_uri, dst_path=str(tmp_path / "model"))
    assert "crema==" in open(os.path.join(local, "requirements.txt")).read()
    files = [os.path.relpath(os.path.join(d, f), local) for d, _, fs in os.walk(local) for f in fs]
    assert not [f for f in files if f.endswith((".pkl", ".pt", ".pth", ".pickle"))], files
    for name in files:  # no file of the model is a pickle or a torch.save archive, whatever its name
        head = open(os.path.join(local, name), "rb").read(4)
        assert head[:1] != b"\x80" and head != b"PK\x03\x04", name
    (weights,) = [f for f in files if f.endswith("classifier.safetensors")]
    reloaded, names = load_classifier(os.path.join(local, weights))
    assert names == classes
    for key, tensor in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], tensor), key

    client = MlflowClient(uri)
    (version,) = client.search_model_versions("name = 'crema-test-classifier'")
    assert version.run_id == run.info.run_id
    assert version.tags["encoder_run_id"] == "abc123" and "other" not in version.tags
    logged_model = mlflow.get_logged_model(logged.metadata.model_id)
    assert {p: logged_model.params[p] for p in HYPERPARAMETERS} == {k: str(v) for k, v in config.items()}


def test_a_pickled_classifier_is_refused_and_runs_nothing(tmp_path):
    from crema.train.artifacts import load_classifier

    marker = tmp_path / "pwned"
    path = tmp_path / "classifier.safetensors"
    torch.save({"state_dict": RunsCode(marker)}, path)
    with pytest.raises(UnsafeArtifactError, match="torch.save zip"):
        load_classifier(path)
    save_encoder(SiTEncoder(ModelConfig(**SMALL)), path)  # a safetensors file, but an encoder
    with pytest.raises(UnsafeArtifactError, match="not a crema classifier"):
        load_classifier(path)
    assert not marker.exists()


@pytest.mark.parametrize("name", ["..", ".", "a/b", "../up", "a..b", "-x", ""])
def test_names_that_become_folders_are_identifiers(name, tmp_path):
    """A run, task or encoder name is a folder under an output location: never a path out of it."""
    from crema.config import EncoderSpec, TaskConfig

    with pytest.raises(ValueError):
        PretrainConfig.model_validate({"name": name, "storage_path": str(tmp_path), "data": {"dataset": "d"}})
    task = {"dataset": "d", "output": str(tmp_path), "classes": ["NORM"],
            "encoders": [{"name": "random", "init": "random", "model": {}}]}
    with pytest.raises(ValueError):
        TaskConfig.model_validate({**task, "name": name})
    with pytest.raises(ValueError):
        EncoderSpec.model_validate({"name": name, "init": "random", "model": {}})
    assert TaskConfig.model_validate({**task, "name": "ptbxl.v2"}).encoders[0].name == "random"


def test_an_unreachable_tracking_server_fails_within_seconds_naming_it():
    from crema import tracking
    from tests.conftest import free_port

    uri = f"http://user:s3cret@127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(tracking.TrackingUnavailable) as err:
        tracking.check_reachable(uri, timeout_s=2)
    assert time.monotonic() - started < 10
    assert f"http://user:***@127.0.0.1:{uri.rsplit(':', 1)[1]}" in str(err.value)
    assert "s3cret" not in str(err.value)


def test_a_tracking_server_that_never_answers_fails_within_seconds():
    """A port that accepts connections but never replies (a hung server, a black-holing proxy)."""
    import socket

    from crema import tracking

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # the kernel completes the handshake; nobody ever reads or writes
        uri = f"http://127.0.0.1:{silent.getsockname()[1]}"
        started = time.monotonic()
        with pytest.raises(tracking.TrackingUnavailable, match="ReadTimeout"):
            tracking.check_reachable(uri, timeout_s=2)
        assert time.monotonic() - started < 10


def test_content_digest_ignores_the_header_order_safetensors_happens_to_write():
    """safetensors writes its metadata from an unordered map: the same weights saved in two processes can
    differ in bytes. The digest that keys the embeddings cache must not (it once re-embedded a whole dataset)."""
    import json
    import struct

    from crema.train import safe_files

    tensors = {"b": torch.arange(6, dtype=torch.float32).reshape(2, 3), "a": torch.ones(4, dtype=torch.float16)}
    data = safe_files.write(tensors, {"format": "crema-encoder/1", "config": "{}"})
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + size])
    reordered = {"__metadata__": dict(reversed(list(header["__metadata__"].items()))),
                 **dict(reversed([(k, v) for k, v in header.items() if k != "__metadata__"]))}
    text = json.dumps(reordered).encode()
    text += b" " * (-len(text) % 8)
    other = struct.pack("<Q", len(text)) + text + data[8 + size:]
    assert other != data
    assert safe_files.read(other, "reordered")[1] == safe_files.read(data, "original")[1]
    assert safe_files.content_digest(other) == safe_files.content_digest(data)
    changed = safe_files.write({**tensors, "a": torch.zeros(4, dtype=torch.float16)},
                               {"format": "crema-encoder/1", "config": "{}"})
    assert safe_files.content_digest(changed) != safe_files.content_digest(data)
    assert safe_files.content_digest(safe_files.write(tensors, {"format": "crema-encoder/1", "config": "{ }"})) \
        != safe_files.content_digest(data)
