"""Edge sparsity kernels against the masked-dense definition, dense attention and hand math."""

import math

import pytest
import torch
import torch.nn.functional as F

from svitt.models import sparse_attention as sa
from svitt.models.relative_position import code_offset, position_code, relative_bias, relative_index, table_size

GRID = (3, 4, 5)  # 60 regional positions


def _inputs(n, batch=2, heads=3, dim=8, dtype=torch.float64, seed=0, pruned=True):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, n + 1, dim, generator=g, dtype=dtype, requires_grad=True) for _ in range(3))
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


@pytest.mark.parametrize(
    "n,g,kl,kr", [(60, 7, 1, 2), (60, 16, 3, 1), (37, 8, 1, 3), (10, 4, 1, 5), (59, 6, 5, 2), (33, 32, 1, 0)]
)
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
    scale = 4**-0.5
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


# --- issue 14: the recomputing gather kernel, the dense bias, CLS rows and the flex tiles ---


def _with_table_grad(n, batch, pruned, seed=0):
    q, k, v, table, pos = _inputs(n, batch=batch, pruned=pruned, seed=seed)
    return q, k, v, table.requires_grad_(), pos


@pytest.mark.parametrize("chunk_blocks", [1, None])  # None: one chunk for everything
@pytest.mark.parametrize(
    "n,g,kl,kr,batch,pruned",
    [
        (60, 7, 1, 2, 2, True),  # padding (60 = 8 * 7 + 4), per-sample pruned positions
        (37, 8, 3, 1, 3, True),  # padding, local blocks cut at both ends
        (60, 6, 1, 3, 2, False),  # no padding, positions shared over the batch
        (10, 4, 1, 5, 1, False),  # fewer blocks than K_r: invalid random slots
        (59, 6, 5, 2, 2, True),
    ],
)
def test_gather_kernel_values_and_gradients_including_the_table_match_reference(
    n, g, kl, kr, batch, pruned, chunk_blocks, monkeypatch
):
    if chunk_blocks is not None:  # the chunk budget is in logits: blocks * B H G (K_l + K_r) G
        monkeypatch.setattr(sa, "CHUNK_ELEMENTS", chunk_blocks * batch * 3 * g * (kl + kr) * g)
    q, k, v, table, pos = _with_table_grad(n, batch, pruned, seed=n + g)
    layout = sa.make_layout(n, g, kl, kr, torch.Generator().manual_seed(n))
    ref, ref_cls = sa.reference_attention(q, k, v, table, pos, GRID, layout, need_cls_attn=True)
    out, out_cls = sa.gather_attention(q, k, v, table, pos, GRID, layout, need_cls_attn=True)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(out_cls, ref_cls, rtol=0, atol=1e-12)
    weights = torch.randn_like(ref)
    grads_ref = torch.autograd.grad((ref * weights).sum(), (q, k, v, table))
    grads_out = torch.autograd.grad((out * weights).sum(), (q, k, v, table))
    for name, a, b in zip("q k v table".split(), grads_out, grads_ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-11, msg=name)


def test_gather_kernel_passes_gradcheck():
    """Finite differences, independent of the reference's autograd (tiny: 6 positions, 2 blocks)."""
    grid, n = (1, 2, 3), 5
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, n + 1, 2, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    table = torch.randn(table_size(grid), 2, generator=g, dtype=torch.float64, requires_grad=True)
    pos = torch.tensor([[0, 1, 2, 4, 5], [0, 2, 3, 4, 5]])
    layout = sa.make_layout(n, 3, 1, 1, torch.Generator().manual_seed(0))
    assert torch.autograd.gradcheck(lambda *t: sa.gather_attention(*t, pos, grid, layout)[0], (q, k, v, table))


def test_gather_kernel_saves_only_q_k_v_the_output_and_the_log_sum_exp():
    """What backward keeps is O(N d): padded q, k, v, the output, one lse per query and the table,
    nothing of size (K_l + K_r) G per query (the old kernel kept logits and gathered blocks)."""
    b, h, n, d, g = 2, 3, 37, 8, 8
    q, k, v, table, pos = _with_table_grad(n, b, pruned=True)
    layout = sa.make_layout(n, g, 1, 3, torch.Generator().manual_seed(0))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        sa.gather_attention(q, k, v, table, pos, GRID, layout, need_cls_attn=True)
    padded = b * h * (1 + layout.num_blocks * g)  # CLS + blocks, per batch element and head
    expected = 3 * padded * d + b * h * (n + 1) * d + padded + table.numel()  # q k v, out, lse, table
    assert sum(t.numel() for t in saved) == expected
    assert max(t.numel() for t in saved) == b * h * layout.num_blocks * g * d  # padded regional


def test_gather_kernel_never_builds_an_n_by_n_tensor():
    """Forward and backward, every tensor any op returns stays far below N^2 per head."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    Largest.numel = max(Largest.numel, t.numel())
            return out

    grid, n, heads = (4, 10, 10), 400, 2
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, n + 1, 4, generator=g, requires_grad=True) for _ in range(3))
    table = torch.randn(table_size(grid), heads, generator=g, requires_grad=True)
    layout = sa.make_layout(n, 8, 1, 1, torch.Generator().manual_seed(0))
    with Largest():
        out, cls_attn = sa.attention(q, k, v, table, torch.arange(n)[None], grid, layout, "gather", need_cls_attn=True)
        out.sum().backward()
    assert cls_attn.shape == (1, n) and table.grad is not None
    assert Largest.numel < heads * (n + 1) ** 2 / 8


def test_gather_kernel_computes_half_precision_inputs_in_float32():
    q, k, v, table, pos = _inputs(37, dtype=torch.float32)
    layout = sa.make_layout(37, 8, 1, 2, torch.Generator().manual_seed(0))
    ref, _ = sa.gather_attention(q, k, v, table, pos, GRID, layout)
    half = [x.detach().bfloat16().requires_grad_() for x in (q, k, v)]
    out, _ = sa.gather_attention(*half, table.bfloat16(), pos, GRID, layout)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=0, atol=0.05)
    out.float().sum().backward()
    assert all(x.grad.dtype == torch.bfloat16 and x.grad.isfinite().all() for x in half)


def test_position_code_difference_is_the_relative_index():
    grid = (3, 4, 5)
    pos = torch.arange(60)
    code = position_code(pos, grid)
    expected = relative_index(pos[:, None], pos[None, :], grid)
    assert torch.equal(code[:, None] - code[None, :] + code_offset(grid), expected)


@pytest.mark.parametrize("pruned", [False, True])
def test_dense_path_equals_the_previous_relative_bias_with_sdpa(pruned):
    """The dense path gathers its bias differently now; outputs and gradients must not change
    (previous path: relative_bias over [CLS, pos] x [CLS, pos], then SDPA), fp32 to 1e-5."""
    q, k, v, table, pos = _inputs(40, dtype=torch.float32, pruned=pruned)
    table.requires_grad_()
    full = F.pad(pos, (1, 0), value=-1)
    before = F.scaled_dot_product_attention(q, k, v, attn_mask=relative_bias(table, full, full, GRID))
    now, _ = sa.dense_attention(q, k, v, table, pos, GRID)
    torch.testing.assert_close(now, before, rtol=0, atol=1e-5)
    weights = torch.randn_like(now)
    grads_before = torch.autograd.grad((before * weights).sum(), (q, k, v, table))
    grads_now = torch.autograd.grad((now * weights).sum(), (q, k, v, table))
    for a, b in zip(grads_now, grads_before):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("cls_score", sa.CLS_SCORES)
def test_every_kernel_gives_the_reference_cls_attention(cls_score):
    """CLS attends to every token in every layout, so all kernels share the reference's CLS row;
    renormalised sums to one per clip, raw to one less CLS's own (head-mean) share."""
    q, k, v, table, pos = _inputs(37)
    layout = sa.make_layout(37, 8, 1, 1, torch.Generator().manual_seed(4))
    _, expected = sa.reference_attention(q, k, v, table, pos, GRID, layout, need_cls_attn=True, cls_score=cls_score)
    for kernel in ("dense", "gather", "reference"):
        _, cls_attn = sa.attention(q, k, v, table, pos, GRID, layout, kernel, need_cls_attn=True, cls_score=cls_score)
        torch.testing.assert_close(cls_attn, expected, rtol=0, atol=1e-12, msg=kernel)
    torch.testing.assert_close(sa.cls_attention(q, k, table, cls_score), expected, rtol=0, atol=1e-12)
    with torch.no_grad():  # eager flex on the CPU: forward only
        _, flex = sa.flex_block_attention(q, k, v, table, pos, GRID, layout, True, compiled=False, cls_score=cls_score)
    torch.testing.assert_close(flex, expected, rtol=0, atol=1e-12, msg="flex")
    scale = q.shape[-1] ** -0.5
    logits = (q[:, :, :1] @ k.transpose(-1, -2))[:, :, 0] * scale + sa._cls_row_bias(table, k.shape[2])
    self_share = logits.softmax(-1)[:, :, 0].mean(1)  # CLS's attention to itself, mean over heads
    total = torch.ones(2, dtype=expected.dtype) - (self_share if cls_score == "raw" else 0)
    torch.testing.assert_close(expected.sum(-1), total, rtol=0, atol=1e-12)


@pytest.mark.parametrize("g,tile", [(7, 16), (16, 16), (33, 64), (56, 64), (64, 64), (100, 128), (200, 256)])
def test_flex_tiles_are_powers_of_two_from_16_or_multiples_of_128(g, tile):
    assert sa.flex_tile(g) == tile


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_kernel_with_blocks_padded_to_tiles_matches_reference():
    """G not a multiple of 16: each block is padded to its tile with masked keys, so the kept pairs
    (and the output) are exactly the layout's."""
    q, k, v, table, pos = _inputs(37)
    layout = sa.make_layout(37, 7, 3, 2, torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, ref_cls = sa.reference_attention(q, k, v, table, pos, GRID, layout, True)
        out, out_cls = sa.flex_block_attention(q, k, v, table, pos, GRID, layout, True, compiled=False)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(out_cls, ref_cls, rtol=0, atol=1e-12)


def test_released_kernel_reimplementation_in_the_benchmark_equals_the_reference():
    """The benchmark's baseline computes the same attention (K_l = 1, N a multiple of G, the same
    random blocks), so its time and memory are those of the same function."""
    import importlib.util
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parents[1] / "benchmarks"
    sys.path.insert(0, str(bench))
    try:
        spec = importlib.util.spec_from_file_location("bench_attention", bench / "attention.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(bench))
    torch.manual_seed(0)
    layer = module.ReleasedSparseAttention(GRID, 2, 4, local_blocks=1, random_blocks=2, block_size=6).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.5)
    x = torch.randn(2, 61, 8, dtype=torch.float64)
    layout = sa.make_layout(60, 6, 1, 2, torch.Generator().manual_seed(0))
    out = layer(x, random_ids=layout.block_ids[:, 1:].sort(1).values)

    def heads(t):
        return t.view(2, 61, 2, 4).transpose(1, 2)

    q, k, v = heads(layer.query(x)), heads(layer.key(x)), heads(layer.value(x))
    ref, _ = sa.reference_attention(q, k, v, layer.table, torch.arange(60)[None], GRID, layout)
    torch.testing.assert_close(out, ref.transpose(1, 2).reshape(2, 61, 8), rtol=0, atol=1e-12)


def test_gather_kernel_rejects_positions_that_do_not_match_the_layout():
    q, k, v, table, pos = _inputs(20)
    layout = sa.make_layout(24, 8, 1, 1, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="20 regional tokens, the block layout 24"):
        sa.gather_attention(q, k, v, table, pos, GRID, layout)
