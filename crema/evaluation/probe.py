"""Linear probing: a multi-label linear classifier on frozen embeddings.

Two probes. :func:`fit_converged_probe` is the measuring stick (L-BFGS logistic regression to convergence,
C chosen on validation: the protocol of the SSL literature), used by the quality benchmark and the demo.
:class:`LinearProbe` below is the trainable torch head the Ray Tune probe sweep trains with AdamW:

The embeddings are standardised with the training set's statistics (frozen into the module, as MAE's
linear probe does with an affine-free BatchNorm), then one linear layer gives a logit per class. It is
trained with AdamW on the label-aware BCE of :mod:`crema.train.engine_finetune` under a cosine schedule, on
windows; a record's score is the mean of its windows' scores (done by the caller).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.multiclass import OneVsRestClassifier
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn

from crema.evaluation.tasks import LabelledWindows
from crema.train.optim import warmup_cosine
from crema.train.engine_finetune import multilabel_loss

_STD_FLOOR = 1e-6


class LinearProbe(nn.Module):
    """Standardise with frozen training statistics, then one linear layer: (n, D) embeddings -> (n, C) logits."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, num_classes: int):
        super().__init__()
        self.register_buffer("mean", mean.float())
        self.register_buffer("std", std.float().clamp(min=_STD_FLOOR))
        self.head = nn.Linear(mean.numel(), num_classes)

    @classmethod
    def for_embeddings(cls, z_train: np.ndarray, num_classes: int) -> "LinearProbe":
        """A probe standardising with the mean and std of the training embeddings."""
        z = torch.tensor(np.asarray(z_train), dtype=torch.float32)
        return cls(z.mean(dim=0), z.std(dim=0), num_classes)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.head((z - self.mean) / self.std)


@dataclass(frozen=True)
class ProbeEpoch:
    epoch: int  # 1-based
    train_loss: float
    model: LinearProbe  # the probe after this epoch (trained further in place by the next one)


def train_probe(z_train: np.ndarray, y_train: np.ndarray, *, lr: float, weight_decay: float, epochs: int,
                batch_size: int, seed: int = 0) -> Iterator[ProbeEpoch]:
    """Train a probe on (n, D) embeddings and (n, C) multi-hot labels, yielding after every epoch."""
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LinearProbe.for_embeddings(z_train, y_train.shape[1])
    # Copies: arrays from Ray's object store are read-only.
    z = torch.tensor(np.asarray(z_train), dtype=torch.float32)
    y = torch.tensor(np.asarray(y_train), dtype=torch.float32)
    loss_fn = multilabel_loss(y_train)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(z) / batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(0, epochs * steps_per_epoch))
    for epoch in range(1, epochs + 1):
        model.train()
        order = torch.randperm(len(z), generator=generator)
        total = 0.0
        for start in range(0, len(z), batch_size):
            rows = order[start:start + batch_size]
            loss = loss_fn(model(z[rows]), y[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += loss.item() * len(rows)
        yield ProbeEpoch(epoch, total / len(z), model)


@torch.no_grad()
def predict_probe(model: LinearProbe, z: np.ndarray) -> np.ndarray:
    """(n, C) class probabilities."""
    model.eval()
    return torch.sigmoid(model(torch.tensor(np.asarray(z), dtype=torch.float32))).numpy()



# ------------------------------------------------------------------------------ converged probe

DEFAULT_CS = (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)  # inverse L2 strengths tried; the best on validation wins
_LBFGS_MAX_ITER = 2000


@dataclass(frozen=True)
class ConvergedProbe:
    """The SSL literature's linear probe: standardised embeddings, one logistic regression per class
    solved to convergence by L-BFGS, its L2 strength C chosen on the validation split."""

    C: float
    val_macro_auroc: float
    pipeline: Pipeline

    def predict(self, z: np.ndarray) -> np.ndarray:
        """(n, classes) probabilities."""
        return self.pipeline.predict_proba(np.asarray(z, dtype=np.float64))


def fit_converged_probe(z_train: np.ndarray, y_train: np.ndarray, z_val: np.ndarray, y_val: np.ndarray,
                        score: Callable[[np.ndarray, np.ndarray], float], cs: Sequence[float] = DEFAULT_CS,
                        ) -> ConvergedProbe:
    """Fit at every C in `cs`; keep the one whose `score(y_val, p_val)` (e.g. macro AUROC) is highest.

    Inputs are window or record embeddings (n, D) with multi-hot labels (n, classes); the caller decides
    how scores aggregate to records before `score` sees them, through `score` itself.
    """
    best: ConvergedProbe | None = None
    for c in cs:
        pipeline = make_pipeline(StandardScaler(), OneVsRestClassifier(
            LogisticRegression(C=c, solver="lbfgs", max_iter=_LBFGS_MAX_ITER)))
        pipeline.fit(np.asarray(z_train, dtype=np.float64), np.asarray(y_train))
        candidate = ConvergedProbe(c, 0.0, pipeline)
        val = score(np.asarray(y_val), candidate.predict(z_val))
        if best is None or val > best.val_macro_auroc:
            best = ConvergedProbe(c, float(val), pipeline)
    assert best is not None, "cs is empty"
    return best


def converged_probe_val_auroc(z_train: np.ndarray, train: LabelledWindows, z_val: np.ndarray,
                              val: LabelledWindows) -> float:
    """The validation records' macro AUROC of the converged probe (C chosen on them): a pretraining trial's
    score, which leaves the test split unread."""
    probe = fit_converged_probe(z_train, train.y, z_val, val.y,
                                score=lambda _, window_scores: val.macro_auroc(window_scores))
    return probe.val_macro_auroc
