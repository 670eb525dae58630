"""Training state on disk: model, optimiser, LR schedule and where in the run they stand.

The stage driver decides where a checkpoint folder goes (Ray Train reports it); this module only
writes and reads the one file in it.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import torch
from torch import nn

STATE_FILE = "state.pt"


@dataclass
class Position:
    """How far a run has got: a resumed epoch takes only its remaining steps."""

    epoch: int = 0
    step_in_epoch: int = 0  # optimiser steps done in `epoch`
    global_step: int = 0


def save_training_state(folder: str, model: nn.Module, optimizer: torch.optim.Optimizer,
                        scheduler: torch.optim.lr_scheduler.LRScheduler, position: Position) -> None:
    """Write the whole training state into `folder` (STATE_FILE)."""
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "position": asdict(position)},
               os.path.join(folder, STATE_FILE))


def load_training_state(folder: str, model: nn.Module, optimizer: torch.optim.Optimizer,
                        scheduler: torch.optim.lr_scheduler.LRScheduler) -> Position:
    """Restore what save_training_state wrote into the given objects; returns the run's position."""
    state = torch.load(os.path.join(folder, STATE_FILE), map_location="cpu", weights_only=False)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return Position(**state["position"])
