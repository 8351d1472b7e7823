"""Edge sparsity kernels against the masked-dense definition, dense attention and hand math."""
import math

import pytest
import torch
import torch.nn.functional as F

from svitt.models import sparse_attention as sa
from svitt.models.relative_position import relative_bias, table_size

GRID = (3, 4, 5)  # 60 regional positions


def _inputs(n, batch=2, heads=3, dim=8, dtype=torch.float64, seed=0, pruned=True):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, n + 1, dim, generator=g, dtype=dtype, requires_grad=True)
               for _ in range(3))
    table = torch.randn(table_size(GRID), heads, generator=g, dtype=dtype)
    total = math.prod(GRID)
    if pruned:  # as after node pruning: per-sample subsets of positions, in order
        pos = torch.stack([torch.randperm(total, generator=g)[:n].sort().values for _ in range(batch)])
    else:
        pos = torch.arange(n)[None]
    return q, k, v, table, pos


def test_layout_local_blocks_are_centred_and_random_blocks_distinct_non_local():
    layout = sa.make_layout(100, 10, 3, 4, torch.Generator().manual_seed(0))
    assert layout.block_ids.shape == (10, 7)
    for row in range(10):
        local = layout.block_ids[row, :3][layout.valid[row, :3]].tolist()
        assert local == [b for b in (row - 1, row, row + 1) if 0 <= b < 10]
        rand = layout.block_ids[row, 3:].tolist()
        assert all(layout.valid[row, 3:])
        assert len(set(rand)) == 4 and all(abs(b - row) > 1 for b in rand)


def test_layout_is_reproducible_from_the_seed_and_redrawn_every_call():
    gen_a, gen_b = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    first_a, first_b = sa.make_layout(80, 8, 1, 3, gen_a), sa.make_layout(80, 8, 1, 3, gen_b)
    assert torch.equal(first_a.block_ids, first_b.block_ids)
    second_a = sa.make_layout(80, 8, 1, 3, gen_a)
    assert not torch.equal(first_a.block_ids, second_a.block_ids)


def test_layout_with_fewer_non_local_blocks_than_random_blocks_marks_the_rest_invalid():
    layout = sa.make_layout(20, 8, 1, 5, torch.Generator().manual_seed(0))  # 3 blocks
    assert layout.valid.sum(1).tolist() == [3, 3, 3]  # itself + the 2 others, each once
    adj = sa.block_adjacency(layout)
    assert adj.all()


@pytest.mark.parametrize("even", [0, 2, -1])
def test_layout_rejects_even_or_non_positive_local_blocks(even):
    with pytest.raises(ValueError, match="local_blocks"):
        sa.make_layout(10, 4, even, 1)


@pytest.mark.parametrize("n,g,kl,kr", [(60, 7, 1, 2), (60, 16, 3, 1), (37, 8, 1, 3), (10, 4, 1, 5),
                                       (59, 6, 5, 2), (33, 32, 1, 0)])
def test_gather_kernel_matches_masked_reference_forward_and_backward(n, g, kl, kr):
    q, k, v, table, pos = _inputs(n)
    layout = sa.make_layout(n, g, kl, kr, torch.Generator().manual_seed(n))
    ref, ref_cls = sa.reference_attention(q, k, v, table, pos, GRID, layout, need_cls_attn=True)
    out, out_cls = sa.gather_attention(q, k, v, table, pos, GRID, layout, need_cls_attn=True)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(out_cls, ref_cls, rtol=0, atol=1e-12)
    weights = torch.randn_like(ref)
    grads_ref = torch.autograd.grad((ref * weights).sum(), (q, k, v))
    grads_out = torch.autograd.grad((out * weights).sum(), (q, k, v))
    for a, b in zip(grads_out, grads_ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_gather_kernel_with_unpruned_shared_positions_matches_reference():
    q, k, v, table, pos = _inputs(60, pruned=False)
    layout = sa.make_layout(60, 8, 1, 2, torch.Generator().manual_seed(3))
    ref, _ = sa.reference_attention(q, k, v, table, pos, GRID, layout)
    out, _ = sa.gather_attention(q, k, v, table, pos, GRID, layout)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("n,g,kl", [(60, 60, 1), (60, 8, 15), (45, 16, 5)])
def test_blocks_covering_the_whole_sequence_equal_dense_attention(n, g, kl):
    q, k, v, table, pos = _inputs(n)
    layout = sa.make_layout(n, g, kl, 0)
    assert sa.layout_mask(layout).all()
    dense, dense_cls = sa.dense_attention(q, k, v, table, pos, GRID, need_cls_attn=True)
    out, out_cls = sa.gather_attention(q, k, v, table, pos, GRID, layout, need_cls_attn=True)
    torch.testing.assert_close(out, dense, rtol=0, atol=1e-12)
    torch.testing.assert_close(out_cls, dense_cls, rtol=0, atol=1e-12)


def test_random_blocks_covering_everything_equal_dense_attention():
    q, k, v, table, pos = _inputs(40)
    layout = sa.make_layout(40, 10, 1, 3, torch.Generator().manual_seed(0))  # 4 blocks: all
    dense, _ = sa.dense_attention(q, k, v, table, pos, GRID)
    out, _ = sa.gather_attention(q, k, v, table, pos, GRID, layout)
    torch.testing.assert_close(out, dense, rtol=0, atol=1e-12)


def test_padding_keys_get_no_attention():
    """N = 5, G = 4, K_l = 1: token 5 is alone in block 1 with three padding slots, so it must
    attend to exactly itself and CLS (hand-computed softmax over two logits)."""
    q, k, v, table, pos = _inputs(5, batch=1, heads=1, dim=4)
    layout = sa.make_layout(5, 4, 1, 0)
    out, _ = sa.gather_attention(q, k, v, table, pos, GRID, layout)
    scale = 4 ** -0.5
    bias_self = relative_bias(table, pos[:, 4:5], pos[:, 4:5], GRID)[0, 0, 0, 0]
    logit_self = (q[0, 0, 5] @ k[0, 0, 5]) * scale + bias_self
    logit_cls = (q[0, 0, 5] @ k[0, 0, 0]) * scale + table[-2, 0]
    w = torch.softmax(torch.stack([logit_self, logit_cls]), 0)
    expected = w[0] * v[0, 0, 5] + w[1] * v[0, 0, 0]
    torch.testing.assert_close(out[0, 0, 5], expected, rtol=0, atol=1e-12)


def test_cls_attends_to_every_token_and_every_token_to_cls():
    layout = sa.make_layout(30, 5, 1, 1, torch.Generator().manual_seed(0))
    mask = sa.layout_mask(layout)
    assert mask[0].all() and mask[:, 0].all()
    per_query = mask[1:, 1:].sum(1)
    assert (per_query == 2 * 5).all()  # (K_l + K_r) G keys per regional query


def test_dense_kernel_matches_hand_written_attention_with_bias():
    q, k, v, table, pos = _inputs(12)
    out, cls_attn = sa.dense_attention(q, k, v, table, pos, GRID, need_cls_attn=True)
    full = F.pad(pos, (1, 0), value=-1)
    logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + relative_bias(table, full, full, GRID)
    probs = logits.softmax(-1)
    torch.testing.assert_close(out, probs @ v, rtol=0, atol=1e-12)
    regional = probs[:, :, 0, 1:]
    torch.testing.assert_close(cls_attn, (regional / regional.sum(-1, keepdim=True)).mean(1))


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_kernel_eager_matches_reference():
    q, k, v, table, pos = _inputs(37)
    layout = sa.make_layout(37, 16, 1, 3, torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, ref_cls = sa.reference_attention(q, k, v, table, pos, GRID, layout, True)
        out, out_cls = sa.flex_block_attention(q, k, v, table, pos, GRID, layout, True, compiled=False)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(out_cls, ref_cls, rtol=0, atol=1e-12)


def test_flex_kernel_compiled_block_mask_matches_reference():
    """The fused kernel really skips blocks, so this checks the BlockMask itself (CPU forward)."""
    q, k, v, table, pos = _inputs(59, heads=2, dim=16, dtype=torch.float32)
    layout = sa.make_layout(59, 16, 1, 1, torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref, _ = sa.reference_attention(q, k, v, table, pos, GRID, layout)
        out, _ = sa.flex_block_attention(q, k, v, table, pos, GRID, layout, compiled=True)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


def test_unknown_kernel_is_rejected():
    q, k, v, table, pos = _inputs(4)
    with pytest.raises(ValueError, match="kernel"):
        sa.attention(q, k, v, table, pos, GRID, None, kernel="fast")
