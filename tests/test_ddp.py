"""Data-parallel training keeps the one-worker recipe: on one global batch, the gradients DDP averages over 2
ranks (gloo, one process each, as Ray Train's CPU workers run) equal the gradients of 1 rank on the whole batch,
with the loss the training loop builds (`mode_ray.train.losses.global_batch_loss`)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp

from tests.conftest import _free_port

GLOBAL_BATCH = 8


def _global_batch(context_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    images = torch.randn(GLOBAL_BATCH, 3, 32, 32, generator=g)
    texts = torch.randint(1, 400, (GLOBAL_BATCH, context_length), generator=g)
    return images, texts


def _gradients(rank: int, world: int, smoothing: float, port: int, out: dict) -> None:
    """Rank `rank` of `world`: the same initial model, its contiguous share of the global batch, one backward
    through DDP; its gradients by parameter name."""
    from torch.nn.parallel import DistributedDataParallel

    from mode_ray.models.clip import build_clip
    from mode_ray.train.losses import global_batch_loss, training_loss

    torch.manual_seed(0)
    model = build_clip("mode-tiny")[0]
    images, texts = _global_batch(model.context_length)
    share = GLOBAL_BATCH // world
    images, texts = images[rank * share : (rank + 1) * share], texts[rank * share : (rank + 1) * share]
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
        model = DistributedDataParallel(model)
    loss = training_loss(global_batch_loss(smoothing, rank, world), model, model(images, texts), None)
    loss.backward()
    named = getattr(model, "module", model).named_parameters()
    out[rank] = {name: p.grad.detach().clone() for name, p in named if p.grad is not None}
    if world > 1:
        torch.distributed.destroy_process_group()


def _ranks(world: int, smoothing: float) -> dict[int, dict[str, torch.Tensor]]:
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_gradients, args=(world, smoothing, _free_port(), out), nprocs=world, join=True)
        return dict(out)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])  # open_clip's loss, and the MCL stages' label smoothing
def test_two_ranks_give_the_one_rank_gradient_on_one_global_batch(smoothing: float) -> None:
    one = _ranks(1, smoothing)[0]
    two = _ranks(2, smoothing)
    assert set(two[0]) == set(one) and len(one) > 10
    for name, grad in one.items():
        torch.testing.assert_close(two[0][name], grad, rtol=1e-4, atol=1e-6, msg=name)
        assert torch.equal(two[0][name], two[1][name]), name  # DDP hands every rank the same average
    assert any(grad.abs().sum() > 0 for grad in one.values())
