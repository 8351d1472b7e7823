"""gather_with_grad with two real CPU processes (gloo): loss and DDP-averaged gradients equal a
single process on the concatenated batch."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from svitt.distributed import gather_with_grad, is_dist, rank, world_size
from svitt.models.losses import egonce, info_nce

WORLD = 2
DIM_IN, DIM_OUT = 6, 4


def _data():
    """The combined batch (5 pairs, uneven split 3 + 2 across ranks) and the shared initial weights."""
    gen = torch.Generator().manual_seed(0)
    x_video = torch.randn(5, DIM_IN, generator=gen, dtype=torch.float64)
    x_text = torch.randn(5, DIM_IN, generator=gen, dtype=torch.float64)
    w_video = torch.randn(DIM_OUT, DIM_IN, generator=gen, dtype=torch.float64)
    w_text = torch.randn(DIM_OUT, DIM_IN, generator=gen, dtype=torch.float64)
    nouns = torch.tensor([[1, 0, 0], [1, 1, 0], [0, 0, 1], [1, 0, 0], [0, 0, 1]])
    verbs = torch.tensor([[1, 0], [1, 0], [0, 1], [0, 1], [0, 1]])  # positives: (0, 1), (2, 4)
    return x_video, x_text, w_video, w_text, nouns, verbs


SHARDS = [slice(0, 3), slice(3, 5)]


def _loss_and_grads(loss_name, x_video, x_text, w_video, w_text, nouns, verbs):
    """A tiny linear projection + L2 norm + the loss; returns (loss, grads of both weights and tau)."""
    w_video = w_video.clone().requires_grad_(True)
    w_text = w_text.clone().requires_grad_(True)
    tau = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    video = F.normalize(x_video @ w_video.t(), dim=1)
    text = F.normalize(x_text @ w_text.t(), dim=1)
    if loss_name == "info_nce":
        loss = info_nce(video, text, tau)
    else:
        loss = egonce(video, text, nouns, verbs, tau)
    loss.backward()
    return loss.detach(), [w_video.grad, w_text.grad, tau.grad]


def _worker(local_rank, store_path, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=local_rank, world_size=WORLD)
    try:
        assert is_dist() and world_size() == WORLD and rank() == local_rank
        x_video, x_text, w_video, w_text, nouns, verbs = _data()
        shard = SHARDS[local_rank]
        results = {}
        for loss_name in ("info_nce", "egonce"):
            loss, grads = _loss_and_grads(
                loss_name, x_video[shard], x_text[shard], w_video, w_text, nouns[shard], verbs[shard]
            )
            for grad in grads:  # what DDP does: average parameter gradients over ranks
                dist.all_reduce(grad, op=dist.ReduceOp.SUM)
                grad /= WORLD
            results[loss_name] = (loss, grads)
        # plain forward: rows in rank order, bool tensors survive the trip
        results["gathered"] = gather_with_grad(x_video[shard])
        results["gathered_bool"] = gather_with_grad(nouns[shard].bool())
        torch.save(results, os.path.join(out_dir, f"rank{local_rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gather")
    mp.spawn(_worker, args=(str(tmp / "store"), str(tmp)), nprocs=WORLD, join=True)
    return [torch.load(tmp / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


@pytest.mark.parametrize("loss_name", ["info_nce", "egonce"])
def test_two_ranks_match_single_process(two_rank_results, loss_name):
    single_loss, single_grads = _loss_and_grads(loss_name, *_data())
    for results in two_rank_results:
        loss, grads = results[loss_name]
        assert loss.item() == pytest.approx(single_loss.item(), abs=1e-6)
        for grad, expected in zip(grads, single_grads):
            torch.testing.assert_close(grad, expected, atol=1e-6, rtol=0)
    # sanity: the check is not vacuous (the gradients are far from zero)
    assert all(g.abs().max() > 1e-3 for g in single_grads)


def test_two_ranks_gather_rows_in_rank_order(two_rank_results):
    x_video, _, _, _, nouns, _ = _data()
    for results in two_rank_results:
        torch.testing.assert_close(results["gathered"], x_video, atol=0, rtol=0)
        assert results["gathered_bool"].dtype == torch.bool
        assert torch.equal(results["gathered_bool"], nouns.bool())


def test_not_initialised_is_identity():
    assert not is_dist() and world_size() == 1 and rank() == 0
    x = torch.randn(3, 2, requires_grad=True)
    assert gather_with_grad(x) is x
    with pytest.raises(ValueError, match="0-dim"):
        gather_with_grad(torch.tensor(1.0))
