"""Training state on disk: model, optimiser, LR schedule and where in the run they stand.

The stage driver decides where a checkpoint folder goes (Ray Train reports it); this module only
writes and reads the one file in it: ``state.safetensors``, the tensors as safetensors and everything
else (optimiser hyperparameters, schedule, position) as JSON metadata. Nothing is unpickled on resume;
a folder holding anything else (a legacy or crafted ``state.pt``) is refused with :class:`CheckpointError`.

A Ray Tune trial's checkpoint (the probe or classifier of its best epoch so far, :mod:`crema.stages.probe`
and :mod:`crema.stages.finetune`) is a model's weights alone: ``weights.safetensors``
(:func:`save_weights`, :func:`load_weights`), refused the same way when it is anything else.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from crema.train import safe_files

STATE_FILE = "state.safetensors"
FORMAT = "crema-training-state/1"
WEIGHTS_FILE = "weights.safetensors"
WEIGHTS_FORMAT = "crema-weights/1"

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be restored: missing, corrupt or not safetensors."""


@dataclass
class Position:
    """How far a run has got: a resumed epoch takes only its remaining steps."""

    epoch: int = 0
    step_in_epoch: int = 0  # optimiser steps done in `epoch`
    global_step: int = 0


def save_training_state(folder: str, model: nn.Module, optimizer: torch.optim.Optimizer,
                        scheduler: torch.optim.lr_scheduler.LRScheduler, position: Position) -> None:
    """Write the whole training state into `folder` (STATE_FILE)."""
    tensors, skeleton = safe_files.pack({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                         "scheduler": scheduler.state_dict(), "position": asdict(position)})
    data = safe_files.write(tensors, {"format": FORMAT, "state": skeleton})
    with open(os.path.join(folder, STATE_FILE), "wb") as f:
        f.write(data)


def _read_file(folder: str, name: str) -> tuple[str, dict[str, torch.Tensor], dict[str, str]]:
    """(path, tensors, metadata) of the safetensors file `name` in `folder`; CheckpointError when it is
    missing or not safetensors (never unpickled)."""
    path = os.path.join(folder, name)
    if not os.path.exists(path):
        others = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
        raise CheckpointError(f"checkpoint {folder} has no {name} (it holds {others}); files other than "
                              "safetensors (such as a pickled state.pt) are never loaded")
    with open(path, "rb") as f:
        data = f.read()
    try:
        tensors, metadata = safe_files.read(data, path)
    except safe_files.UnsafeArtifactError as err:
        raise CheckpointError(str(err)) from err
    return path, tensors, metadata


def save_weights(folder: str, model: nn.Module) -> None:
    """Write a model's weights alone into `folder` (WEIGHTS_FILE): a Tune trial's checkpoint."""
    data = safe_files.write(model.state_dict(), {"format": WEIGHTS_FORMAT})
    with open(os.path.join(folder, WEIGHTS_FILE), "wb") as f:
        f.write(data)


def load_weights(folder: str, model: nn.Module) -> None:
    """Restore what save_weights wrote into `model`; CheckpointError for anything else."""
    path, tensors, metadata = _read_file(folder, WEIGHTS_FILE)
    if metadata.get("format") != WEIGHTS_FORMAT:
        raise CheckpointError(f"{path} is not a crema weights file (format {metadata.get('format')!r})")
    try:
        model.load_state_dict(tensors)
    except RuntimeError as err:  # other keys or shapes: the checkpoint of another model
        raise CheckpointError(f"{path} does not match the model: {err}") from err


def read_training_state(folder: str) -> dict:
    """The state save_training_state wrote, as plain tensors and JSON values; CheckpointError if it is not one."""
    path, tensors, metadata = _read_file(folder, STATE_FILE)
    if metadata.get("format") != FORMAT or "state" not in metadata:
        raise CheckpointError(f"{path} is not a crema training state (format {metadata.get('format')!r})")
    try:
        state = safe_files.unpack(tensors, metadata["state"])
    except (KeyError, ValueError, TypeError) as err:
        raise CheckpointError(f"{path}: inconsistent training state: {err}") from err
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: the training state is not a mapping")
    return state


def load_training_state(folder: str, model: nn.Module, optimizer: torch.optim.Optimizer,
                        scheduler: torch.optim.lr_scheduler.LRScheduler) -> Position:
    """Restore what save_training_state wrote into the given objects; returns the run's position.

    Raises CheckpointError if the folder does not hold a loadable state (a later successful load
    overwrites whatever a failed one had restored).
    """
    state = read_training_state(folder)
    try:
        position = Position(**state["position"])
        model_state = dict(state["model"])
        missing = set(model.state_dict()) ^ set(model_state)
        if missing:
            raise CheckpointError(f"checkpoint {folder} does not match the model (keys differ: {sorted(missing)[:5]})")
        model.load_state_dict(model_state)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"checkpoint {folder} cannot be restored: {type(err).__name__}: {err}") from err
    return position


def load_newest_loadable(folders: Iterable[str], model: nn.Module, optimizer: torch.optim.Optimizer,
                         scheduler: torch.optim.lr_scheduler.LRScheduler,
                         ) -> tuple[Position, str, list[tuple[str, CheckpointError]]]:
    """Restore the first folder (newest first) that loads: a torn or crafted newest checkpoint costs the steps
    since the previous one, not the run. Returns (position, folder, [(newer folder skipped, why)]);
    CheckpointError when none loads."""
    skipped: list[tuple[str, CheckpointError]] = []
    for folder in folders:
        try:
            return load_training_state(folder, model, optimizer, scheduler), folder, skipped
        except CheckpointError as err:
            log.warning("checkpoint %s cannot be restored, trying the previous one: %s", folder, err)
            skipped.append((folder, err))
    raise CheckpointError("no checkpoint could be restored (start a new run name):\n"
                          + "\n".join(f"{folder}: {err}" for folder, err in skipped))
