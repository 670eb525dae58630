"""The contrastive half of CR-MAE: NT-Xent over the global batch of every data-parallel rank.

Every rank gathers the projected embeddings of all ranks (with gradient) and computes the same loss
over the whole global batch, so the logged value is the global one on any rank. The gather's backward
sums each rank's gradient for a rank's slice, so the gradient that reaches a rank's local embeddings
is ``world_size`` times the single-process one; DistributedDataParallel's gradient *average* divides
that back out, and the parameter gradients equal those of one process holding the whole batch.
All ranks must hold equally many samples (the loaders drop the last, uneven batch).
"""

from __future__ import annotations


import torch
import torch.distributed.nn.functional as dist_fn
import torch.nn.functional as F

from crema.model.distributed import world_size


def gather_with_grad(z: torch.Tensor) -> torch.Tensor:
    """Concatenate `z` from every rank along dim 0, in rank order, keeping the autograd path."""
    if world_size() == 1:
        return z
    return torch.cat(dist_fn.all_gather(z), dim=0)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float,
            positive_groups: torch.Tensor | None = None) -> torch.Tensor:
    """NT-Xent (SimCLR) between two views, with negatives from the whole global batch.

    z1, z2: (B, d) projections of two views of the same B windows (not necessarily normalised).
    positive_groups: optional (B,) integer ids; samples sharing an id are positives of each other
    (both views), as in supervised-contrastive (SupCon) loss. None: the only positive of a view is the
    other view of its own window, which is exactly NT-Xent.
    Returns the mean over all 2 * global_B anchors.
    """
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(f"views must both be (B, d); got {tuple(z1.shape)} and {tuple(z2.shape)}")
    # Similarities in float32: under bf16 autocast, 1/temperature-scaled logits lose too much precision.
    g1 = F.normalize(gather_with_grad(z1).float(), dim=1)
    g2 = F.normalize(gather_with_grad(z2).float(), dim=1)
    n = g1.shape[0]
    if positive_groups is None:
        groups = torch.arange(n, device=g1.device)
    else:
        if positive_groups.shape != (z1.shape[0],):
            raise ValueError(f"positive_groups must be ({z1.shape[0]},); got {tuple(positive_groups.shape)}")
        groups = gather_with_grad(positive_groups.to(device=z1.device, dtype=torch.int64))
    z = torch.cat([g1, g2], dim=0)
    view_groups = torch.cat([groups, groups])
    logits = z @ z.T / temperature
    itself = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    log_prob = torch.log_softmax(logits.masked_fill(itself, float("-inf")), dim=1)
    positive = (view_groups[:, None] == view_groups[None, :]) & ~itself
    # where() rather than a product: the -inf on the diagonal times 0 would be NaN.
    positive_log_prob = torch.where(positive, log_prob, torch.zeros_like(log_prob)).sum(dim=1)
    return -(positive_log_prob / positive.sum(dim=1)).mean()
