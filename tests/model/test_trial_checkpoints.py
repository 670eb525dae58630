"""Ray Tune trial checkpoints (probe and fine-tune sweeps) are safetensors, never unpickled: the best one is
loaded back through the stages' own code, and a pickle where a checkpoint should be is refused and runs nothing."""

from __future__ import annotations

import os

import pytest
import torch
from ray.tune import Checkpoint, Result

from crema.config import ModelConfig
from crema.evaluation.probe import LinearProbe
from crema.model.network import SiTEncoder
from crema.stages.finetune import build_classifier
from crema.stages.probe import load_probe
from crema.stages.sweep import METRIC
from crema.train.artifacts import encoder_to_bytes
from crema.train.checkpoint import WEIGHTS_FILE, CheckpointError, load_weights, save_weights

SMALL = dict(size="tiny", window_samples=500, patch_size=50, embed_dim=32, depth=1, num_heads=2,
             decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)
DIM, CLASSES = 8, 3


class RunsCode:
    """Unpickling this creates the marker file: what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def probe(seed: int) -> LinearProbe:
    torch.manual_seed(seed)
    return LinearProbe(torch.randn(DIM), torch.rand(DIM) + 0.5, CLASSES)


def trial_result(tmp_path, scored_folders: list[tuple[str, float]]) -> Result:
    """A Tune trial's result as Tune hands it back: its checkpoints with the metric each was reported with."""
    best = [(Checkpoint.from_directory(folder), {METRIC: score}) for folder, score in scored_folders]
    return Result(metrics={METRIC: max(s for _, s in scored_folders)}, checkpoint=best[-1][0], error=None,
                  path=str(tmp_path), best_checkpoints=best)


def test_the_best_probe_checkpoint_is_safetensors_and_loads_back(tmp_path):
    folders = []
    for epoch, score in ((1, 0.61), (2, 0.74), (3, 0.70)):
        folder = tmp_path / f"checkpoint_{epoch}"
        folder.mkdir()
        save_weights(str(folder), probe(seed=epoch))
        assert (folder / WEIGHTS_FILE).read_bytes()[8:9] == b"{"  # a JSON header: safetensors
        folders.append((str(folder), score))
    loaded = load_probe(trial_result(tmp_path, folders), DIM, CLASSES)
    expected = probe(seed=2).state_dict()  # epoch 2 scored highest
    assert loaded.state_dict().keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_a_finetuned_classifier_checkpoint_round_trips(tmp_path):
    blob = encoder_to_bytes(SiTEncoder(ModelConfig(**SMALL)))
    model = build_classifier(blob, drop_path=0.0, num_classes=CLASSES)
    with torch.no_grad():
        model.head.weight.normal_()
    save_weights(str(tmp_path), model)
    fresh = build_classifier(blob, drop_path=0.0, num_classes=CLASSES)
    assert not torch.equal(fresh.head.weight, model.head.weight)
    load_weights(str(tmp_path), fresh)
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("name", [WEIGHTS_FILE, "probe.pt"])
def test_a_pickled_trial_checkpoint_is_refused_and_runs_nothing(tmp_path, name):
    """A torch.save file (the checkpoints of earlier versions, or a crafted one) under the safetensors name or
    its old name: the stage's loader refuses it, naming safetensors, and the pickle's code never runs."""
    marker = tmp_path / "pwned"
    folder = tmp_path / "checkpoint_1"
    folder.mkdir()
    torch.save({"weight": RunsCode(marker)}, folder / name)
    with pytest.raises(CheckpointError, match="safetensors") as err:
        load_probe(trial_result(tmp_path, [(str(folder), 0.9)]), DIM, CLASSES)
    assert "never" in str(err.value)
    assert not marker.exists()


def test_a_checkpoint_of_another_model_is_refused(tmp_path):
    save_weights(str(tmp_path), probe(seed=0))
    with pytest.raises(CheckpointError, match="does not match the model"):
        load_weights(str(tmp_path), LinearProbe(torch.zeros(DIM + 1), torch.ones(DIM + 1), CLASSES))
