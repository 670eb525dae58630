"""NT-Xent: the textbook loss on one process, and the same loss over the global batch on two gloo ranks."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from crema.data.batches import group_ids
from crema.model.losses import gather_with_grad, nt_xent

torch.set_num_threads(1)

WORLD = 2
LOCAL_BATCH = 4
FEATURES, DIM = 6, 5
TEMPERATURE = 0.2
# Record groups that put positives on both ranks (3 and 7 each span ranks 0 and 1).
RECORD_GROUPS = torch.tensor([3, 3, 7, 9, 7, 11, 3, 12])


def simclr_reference(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's formulation: cross-entropy of each view against the other view, self excluded."""
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    logits = z @ z.T / temperature
    logits.fill_diagonal_(float("-inf"))
    partner = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    return F.cross_entropy(logits, partner)


def global_inputs():
    g = torch.Generator().manual_seed(0)
    x1 = torch.randn(WORLD * LOCAL_BATCH, FEATURES, generator=g)
    x2 = x1 + 0.3 * torch.randn(WORLD * LOCAL_BATCH, FEATURES, generator=g)
    projector = torch.nn.Linear(FEATURES, DIM)
    with torch.no_grad():
        projector.weight.copy_(torch.randn(DIM, FEATURES, generator=g))
        projector.bias.copy_(torch.randn(DIM, generator=g))
    return x1, x2, projector


def loss_and_grads(x1, x2, projector, groups):
    """Loss, gradients w.r.t. both views' embeddings, and the projector's weight gradient."""
    projector.zero_grad()
    z1, z2 = projector(x1), projector(x2)
    z1.retain_grad()
    z2.retain_grad()
    loss = nt_xent(z1, z2, TEMPERATURE, groups)
    loss.backward()
    return loss.detach(), z1.grad, z2.grad, projector.weight.grad.clone()


# ----------------------------------------------------------------------------------- one process

def test_matches_the_simclr_formulation():
    x1, x2, projector = global_inputs()
    z1, z2 = projector(x1), projector(x2)
    torch.testing.assert_close(nt_xent(z1, z2, TEMPERATURE), simclr_reference(z1, z2, TEMPERATURE))
    # Distinct groups leave one positive per view: the plain NT-Xent.
    torch.testing.assert_close(nt_xent(z1, z2, TEMPERATURE, torch.arange(8) * 5), nt_xent(z1, z2, TEMPERATURE))


def test_record_groups_add_positives():
    x1, x2, projector = global_inputs()
    z1, z2 = projector(x1), projector(x2)
    plain = nt_xent(z1, z2, TEMPERATURE)
    grouped = nt_xent(z1, z2, TEMPERATURE, RECORD_GROUPS)
    assert not torch.allclose(plain, grouped)
    # Pull the windows of record 3 together (both on rank 0 and on rank 1) and the multi-positive loss falls.
    same_record = z1.detach().clone()
    same_record[[1, 6]] = z1[0].detach()
    assert nt_xent(same_record, z2, TEMPERATURE, RECORD_GROUPS) < grouped


def test_group_ids_are_stable_and_distinct():
    ids = group_ids(["ptbxl/00001_hr", "ptbxl/00002_hr", "ptbxl/00001_hr"])
    assert ids.dtype == torch.int64 and ids[0] == ids[2] and ids[0] != ids[1]
    assert torch.equal(ids, group_ids(["ptbxl/00001_hr", "ptbxl/00002_hr", "ptbxl/00001_hr"]))


def test_gather_is_the_identity_without_a_process_group():
    z = torch.randn(3, 4)
    assert gather_with_grad(z) is z


# ----------------------------------------------------------------------------------- two ranks

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, port: int, results: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        x1, x2, projector = global_inputs()
        local = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        out = {}
        for mode, groups in (("window", None), ("record", RECORD_GROUPS[local])):
            loss, g1, g2, weight_grad = loss_and_grads(x1[local], x2[local], projector, groups)
            dist.all_reduce(weight_grad)  # what DDP does to parameter gradients: the mean over ranks
            out[mode] = {"loss": loss, "z1_grad": g1, "z2_grad": g2, "weight_grad": weight_grad / WORLD}
        torch.save(out, f"{results}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_negatives_come_from_every_rank(tmp_path):
    mp.spawn(_rank_main, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    x1, x2, projector = global_inputs()
    for mode, groups in (("window", None), ("record", RECORD_GROUPS)):
        loss, g1, g2, weight_grad = loss_and_grads(x1, x2, projector, groups)
        assert loss > 0
        for rank in range(WORLD):
            got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)[mode]
            local = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
            # Every rank holds the loss of the whole global batch ...
            torch.testing.assert_close(got["loss"], loss, msg=f"{mode} loss, rank {rank}")
            # ... the gather's backward sums the copies of every rank, hence world size x the gradient ...
            torch.testing.assert_close(got["z1_grad"] / WORLD, g1[local], msg=f"{mode} z1 grad, rank {rank}")
            torch.testing.assert_close(got["z2_grad"] / WORLD, g2[local], msg=f"{mode} z2 grad, rank {rank}")
            # ... which DDP's averaging turns into exactly the single-process parameter gradient.
            torch.testing.assert_close(got["weight_grad"], weight_grad, msg=f"{mode} weight grad, rank {rank}")


@pytest.mark.parametrize("mode", ["window", "record"])
def test_a_local_batch_alone_gives_a_different_loss(mode):
    """Guards the test above: with negatives from one rank only, the losses would not have matched."""
    x1, x2, projector = global_inputs()
    groups = RECORD_GROUPS if mode == "record" else None
    whole, *_ = loss_and_grads(x1, x2, projector, groups)
    half, *_ = loss_and_grads(x1[:LOCAL_BATCH], x2[:LOCAL_BATCH], projector,
                              None if groups is None else groups[:LOCAL_BATCH])
    assert not torch.allclose(whole, half)
