"""The CR-MAE pretraining step loop: one epoch of optimisation, and a validation pass.

Only the loop lives here (as in MAE's engine_pretrain.py): where batches come from, when to
checkpoint and where metrics go are the caller's business, handed in as an iterable and callbacks.
Works on a bare module, or a DistributedDataParallel one (gradient accumulation then skips the
all-reduce on all but the last micro-batch of a step).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from crema.model.distributed import world_size
from crema.train.precision import autocast


@dataclass(frozen=True)
class StepStats:
    """What the loop hands its `on_step` callback after every optimiser step."""

    step: int  # optimiser steps taken so far, over the whole run
    loss: float
    terms: dict[str, float]  # the model's loss terms by name (CRMAEOutput.terms), over the step's micro-batches
    lr: float
    grad_norm: float
    samples_per_s: float  # over all ranks

    def metrics(self) -> dict[str, float]:
        """The step's metrics by name, as they are logged: loss, every term, lr, grad_norm, samples_per_s."""
        return {"loss": self.loss, **self.terms, "lr": self.lr, "grad_norm": self.grad_norm,
                "samples_per_s": self.samples_per_s}


def _stacked(loss: torch.Tensor, terms: dict[str, torch.Tensor]) -> torch.Tensor:
    """(1 + terms,) float64: the loss and its terms in the terms' order, detached, for summing over batches."""
    return torch.stack([t.detach().double() for t in (loss, *terms.values())])


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Every tensor of a batch on `device` (asynchronous copies from pinned memory)."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def train_one_epoch(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    *,
    num_steps: int,
    start_step: int,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    accum_steps: int = 1,
    clip_grad: float | None = None,
    on_step: Callable[[StepStats], None] | None = None,
) -> int:
    """Take exactly `num_steps` optimiser steps (each over `accum_steps` micro-batches); return the step count.

    Every rank must be given the same `num_steps` so that every rank joins every all-reduce:
    the loop stops there even if `batches` has more, and fails loudly if it has fewer.
    """
    model.train()
    world = world_size()
    micro_batches: Iterator = iter(batches)
    step = start_step
    for _ in range(num_steps):
        started = time.perf_counter()
        totals: torch.Tensor | None = None  # the loss and its terms, summed over micro-batches
        samples = 0
        for micro in range(accum_steps):
            try:
                batch = _to_device(next(micro_batches), device)
            except StopIteration:
                raise RuntimeError(f"data ran out after {step - start_step} of {num_steps} steps") from None
            last_micro = micro == accum_steps - 1
            sync = contextlib.nullcontext() if last_micro or not hasattr(model, "no_sync") else model.no_sync()
            with sync:
                with autocast(device, amp_dtype):
                    out = model(batch["x"], batch["lead_mask"], batch["record_group"])
                (out.loss / accum_steps).backward()
            stacked = _stacked(out.loss, out.terms)
            totals = stacked if totals is None else totals + stacked
            samples += batch["x"].shape[0]

        grad_norm = nn.utils.clip_grad_norm_(model.parameters(), clip_grad if clip_grad else math.inf)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        step += 1

        loss, *term_values = (totals / accum_steps).tolist()
        if not math.isfinite(loss):
            raise FloatingPointError(f"loss is {loss} at step {step}; stopping before it corrupts the weights")
        if on_step is not None:
            elapsed = time.perf_counter() - started
            on_step(StepStats(step, loss, dict(zip(out.terms, term_values)), lr, float(grad_norm),
                              samples * world / elapsed))
    return step


@torch.no_grad()
def validate(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    *,
    num_steps: int,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """Mean loss terms over `num_steps` batches, weighted by batch size and reduced over all ranks.

    The random masks are drawn from their own generator with a fixed seed, so that validation
    losses of different epochs are measured on the same masking (and training's RNG is untouched).
    """
    model.eval()
    sums: torch.Tensor | None = None  # the loss and its terms (each × n), then n
    names: list[str] = []
    generator = torch.Generator(device=device).manual_seed(seed)
    micro_batches = iter(batches)
    for _ in range(num_steps):
        batch = _to_device(next(micro_batches), device)
        with autocast(device, amp_dtype):
            out = model(batch["x"], batch["lead_mask"], batch["record_group"], generator=generator)
        n = batch["x"].shape[0]
        names = list(out.terms)
        batch_sums = torch.cat([_stacked(out.loss, out.terms) * n, torch.tensor([n], device=device).double()])
        sums = batch_sums if sums is None else sums + batch_sums
    if sums is None:
        raise ValueError("validation needs at least one batch (num_steps >= 1)")
    if world_size() > 1:
        dist.all_reduce(sums)
    *totals, n = sums.tolist()
    return {f"val_{name}": total / n for name, total in zip(["loss", *names], totals)}
