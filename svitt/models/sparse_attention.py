"""Edge sparsity (SViTT section 3.2): block-sparse local + random + global attention.

Regional tokens (everything but CLS, index 0) are chunked into ceil(N / G) blocks of G tokens.
Each query block attends to K_l local blocks centred on itself and K_r distinct random non-local
blocks, redrawn every forward pass and shared over batch and heads; CLS attends to every token and
every token attends to CLS. Padding up to a multiple of G is masked out.

Kernels behind one interface, `attention(...)`:
  - "dense":     SDPA over all pairs with the relative bias (no edge sparsity);
  - "reference": masked dense attention with the block layout (tests only, O(N^2) memory);
  - "gather":    gathers each query block's key blocks in a custom autograd function that
                 recomputes them in backward; trains on CPU and GPU, saves O(N d) per layer;
  - "flex":      FlexAttention with a BlockMask, blocks padded to its tiles (CUDA; forward also
                 on CPU).
All return (output [B, H, N, d], cls_attn [B, N-1] or None), where cls_attn is CLS's attention
to the regional tokens averaged over heads (node sparsity ranks tokens by it, eq. 10), scored by
`cls_score` (CLS_SCORES). The CLS query is one dense row in every kernel, so cls_attn never needs
an N x N matrix.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from svitt.models.relative_position import (
    code_offset,
    position_code,
    relative_bias,
    relative_index,
    sequence_bias,
    special_bias,
    table_size,
)

KERNELS = ("auto", "dense", "reference", "gather", "flex")
# How CLS's attention row scores the regional tokens for pruning. renormalised: each head's
# attention renormalised over the regional tokens (eq. 10's softmax over j = 1..N), then the mean
# over heads; raw: the mean over heads of the softmax over [CLS, tokens] (the released code's
# `attn.mean(1)[:, 0, 1:]`). They rank alike with one head, not with several.
CLS_SCORES = ("renormalised", "raw")


@dataclass(frozen=True)
class BlockLayout:
    """Which key blocks each query block of the regional tokens attends to.

    block_ids: [num_blocks, K_l + K_r] key block of each slot; valid: same shape, False for slots
    that point outside the sequence (local slots at the ends, random slots when fewer non-local
    blocks exist than K_r). num_tokens: regional tokens before padding.
    """

    block_ids: torch.Tensor
    valid: torch.Tensor
    block_size: int
    num_tokens: int

    @property
    def num_blocks(self) -> int:
        return self.block_ids.shape[0]


def make_layout(
    num_tokens: int,
    block_size: int,
    local_blocks: int,
    random_blocks: int,
    generator: torch.Generator | None = None,
    device=None,
) -> BlockLayout:
    """Draw a block layout for `num_tokens` regional tokens (eq. 7-8)."""
    if local_blocks < 1 or local_blocks % 2 == 0:
        raise ValueError(f"local_blocks (K_l) must be a positive odd number, got {local_blocks}")
    if random_blocks < 0:
        raise ValueError(f"random_blocks (K_r) must be >= 0, got {random_blocks}")
    if block_size < 1:
        raise ValueError(f"block_size (G) must be >= 1, got {block_size}")
    nb = -(-num_tokens // block_size)
    half = (local_blocks - 1) // 2
    rows = torch.arange(nb)
    local = rows[:, None] + torch.arange(-half, half + 1)[None, :]
    local_valid = (local >= 0) & (local < nb)
    ids, valid = [local.clamp(0, nb - 1)], [local_valid]
    if random_blocks > 0:
        # Distinct non-local blocks: rank uniform scores with local blocks pushed last.
        scores = torch.rand(nb, nb, generator=generator)
        is_local = (rows[None, :] - rows[:, None]).abs() <= half
        scores = scores.masked_fill(is_local, 2.0)
        k = min(random_blocks, nb)
        picked = scores.topk(k, dim=1, largest=False)
        picked_valid = picked.values < 2.0
        if k < random_blocks:
            pad = random_blocks - k
            picked_ids = torch.cat([picked.indices, picked.indices.new_zeros(nb, pad)], dim=1)
            picked_valid = torch.cat([picked_valid, picked_valid.new_zeros(nb, pad)], dim=1)
        else:
            picked_ids = picked.indices
        ids.append(picked_ids)
        valid.append(picked_valid)
    block_ids = torch.cat(ids, dim=1).to(device)
    return BlockLayout(block_ids, torch.cat(valid, dim=1).to(device), block_size, num_tokens)


def block_adjacency(layout: BlockLayout) -> torch.Tensor:
    """[num_blocks, num_blocks] bool: query block i attends to key block j."""
    nb = layout.num_blocks
    adj = torch.zeros(nb, nb, dtype=torch.bool, device=layout.block_ids.device)
    rows = torch.arange(nb, device=adj.device)[:, None].expand_as(layout.block_ids)
    adj[rows[layout.valid], layout.block_ids[layout.valid]] = True
    return adj


def layout_mask(layout: BlockLayout) -> torch.Tensor:
    """Dense boolean mask [N+1, N+1] (CLS first) of the edges the layout keeps."""
    n, g = layout.num_tokens, layout.block_size
    block_adj = block_adjacency(layout)
    token_block = torch.arange(n, device=block_adj.device) // g
    regional = block_adj[token_block][:, token_block]
    mask = torch.ones(n + 1, n + 1, dtype=torch.bool, device=block_adj.device)
    mask[1:, 1:] = regional
    return mask


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    table: torch.Tensor,
    pos: torch.Tensor,
    grid: tuple[int, int, int],
    layout: BlockLayout | None,
    kernel: str = "auto",
    need_cls_attn: bool = False,
    dropout_p: float = 0.0,
    cls_score: str = "renormalised",
):
    """Multi-head attention over [CLS, regional tokens] with relative position bias.

    q, k, v: [B, H, N, d] with CLS at index 0 (already split into heads, unscaled).
    table: relative position table [table_size(grid), H]; pos: regional positions [B or 1, N-1].
    layout: None for dense attention. Returns (out [B, H, N, d], cls_attn [B, N-1] or None), cls_attn
    scored by cls_score (CLS_SCORES).
    """
    if kernel not in KERNELS:
        raise ValueError(f"attention kernel must be one of {KERNELS}, got {kernel!r}")
    if cls_score not in CLS_SCORES:
        raise ValueError(f"cls_score must be one of {CLS_SCORES}, got {cls_score!r}")
    if table.shape[0] != table_size(grid):
        raise ValueError(
            f"relative position table has {table.shape[0]} rows, expected {table_size(grid)} for grid {grid}"
        )
    if layout is None or kernel == "dense":
        return dense_attention(q, k, v, table, pos, grid, need_cls_attn, dropout_p, cls_score=cls_score)
    if kernel == "auto":
        kernel = "flex" if q.is_cuda else "gather"
    if kernel == "reference":
        return reference_attention(q, k, v, table, pos, grid, layout, need_cls_attn, cls_score=cls_score)
    if kernel == "gather":
        return gather_attention(q, k, v, table, pos, grid, layout, need_cls_attn, cls_score=cls_score)
    return flex_block_attention(q, k, v, table, pos, grid, layout, need_cls_attn, cls_score=cls_score)


def _with_cls(pos: torch.Tensor) -> torch.Tensor:
    return F.pad(pos, (1, 0), value=-1)


def _softmax(logits: torch.Tensor) -> torch.Tensor:
    """Softmax in at least float32 precision, returned in the input dtype."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        return logits.float().softmax(-1).to(logits.dtype)
    return logits.softmax(-1)


def _cls_attention(probs: torch.Tensor, cls_score: str = "renormalised") -> torch.Tensor:
    """The pruning score of each regional token [B, N-1] from CLS's attention probs [B, H, N] over
    [CLS, tokens]: the mean over heads, each head renormalised over the regional tokens first
    (eq. 10) unless cls_score is "raw" (CLS_SCORES)."""
    regional = probs[:, :, 1:]
    if cls_score == "raw":
        return regional.mean(1)
    return (regional / regional.sum(-1, keepdim=True)).mean(1)


def _cls_row_bias(table: torch.Tensor, n: int) -> torch.Tensor:
    """Bias of the CLS query against [CLS, n-1 tokens]: [H, n] (CLS->CLS, then CLS->token)."""
    cls_to_tok, _, cls_to_cls = special_bias(table)
    return torch.cat([cls_to_cls[:, None], cls_to_tok[:, None].expand(-1, n - 1)], dim=1)


@torch.no_grad()
def cls_attention(
    q: torch.Tensor, k: torch.Tensor, table: torch.Tensor, cls_score: str = "renormalised"
) -> torch.Tensor:
    """CLS's attention to the regional tokens for node pruning: one query row, [B, N-1], never an
    N x N matrix. Every kernel's CLS row is dense (global edges, eq. 9), so this is shared."""
    logits = (k @ q[:, :, 0, :, None]).squeeze(-1) * q.shape[-1] ** -0.5
    return _cls_attention(_softmax(logits + _cls_row_bias(table, k.shape[2]).to(logits.dtype)), cls_score)


def dense_attention(q, k, v, table, pos, grid, need_cls_attn=False, dropout_p=0.0, cls_score="renormalised"):
    bias = sequence_bias(table, pos, grid).to(q.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p)
    return out, cls_attention(q, k, table, cls_score) if need_cls_attn else None


def reference_attention(q, k, v, table, pos, grid, layout, need_cls_attn=False, cls_score="renormalised"):
    """Masked dense attention: the definition the fast kernels are tested against."""
    scale = q.shape[-1] ** -0.5
    bias = relative_bias(table, _with_cls(pos), _with_cls(pos), grid)
    logits = (q @ k.transpose(-1, -2)) * scale + bias
    logits = logits.masked_fill(~layout_mask(layout), float("-inf"))
    probs = _softmax(logits)
    cls_attn = _cls_attention(probs[:, :, 0], cls_score) if need_cls_attn else None
    return probs @ v, cls_attn


def gather_attention(q, k, v, table, pos, grid, layout, need_cls_attn=False, cls_score="renormalised"):
    """Block-sparse attention that gathers each query block's key blocks (CPU and GPU, trains).

    A custom autograd function (flash-attention style): it keeps q, k, v, the log-sum-exp per query
    and its output, and recomputes the gathered key/value blocks, the bias (from the small table)
    and the probabilities in backward, one chunk of query blocks at a time, so memory is O(N d)
    saved plus O(chunk) transient instead of the O(N K G) logits and gathered blocks autograd
    would keep.
    """
    plan = _Plan.build(layout, pos, grid, q.shape[0], q.shape[1])
    out, cls_probs = _BlockSparseAttention.apply(q, k, v, table, plan)
    return out, _cls_attention(cls_probs, cls_score) if need_cls_attn else None


# Logits per chunk of heads (16 MB in fp32): bounds the transient [heads, blocks, G, (K_l+K_r) G]
# buffers of forward and backward. Smaller chunks save little more (the saved q, k, v and the
# gradient buffers dominate) and cost ~35 more ops each, which is what a loaded CPU pays for.
CHUNK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class _Plan:
    """What the block-sparse kernel needs beside q, k, v and the table (no gradients).

    ids [nb S]: key block of each (query block, slot); masked [nb, S G]: slot invalid or key is
    padding; q_code, k_code [B', nb, G]: position codes (relative_position.position_code) of the
    padded regional tokens, q_code offset so that q_code - k_code is the table index.
    chunks: (batch element, first head, last head + 1) of each chunk.
    """

    ids: torch.Tensor
    masked: torch.Tensor
    q_code: torch.Tensor
    k_code: torch.Tensor
    block_size: int
    num_blocks: int
    heads: int
    chunks: tuple[tuple[int, int, int], ...]
    table_rows: int

    @staticmethod
    def build(layout: BlockLayout, pos: torch.Tensor, grid, batch: int, heads: int) -> "_Plan":
        g, nb = layout.block_size, layout.num_blocks
        if pos.shape[-1] != layout.num_tokens:
            raise ValueError(f"positions cover {pos.shape[-1]} regional tokens, the block layout {layout.num_tokens}")
        ids = layout.block_ids
        token = ids[:, :, None] * g + torch.arange(g, device=ids.device)
        masked = ~(layout.valid[:, :, None] & (token < layout.num_tokens)).reshape(nb, -1)
        code = F.pad(position_code(pos, grid), (0, nb * g - pos.shape[-1])).view(-1, nb, g)
        # Chunks of equal numbers of heads within one batch element (heads share positions).
        per_head = nb * g * ids.shape[1] * g
        count = -(-heads // max(1, CHUNK_ELEMENTS // per_head))
        size = -(-heads // count)
        chunks = tuple((b, h, min(h + size, heads)) for b in range(batch) for h in range(0, heads, size))
        return _Plan(ids.reshape(-1), masked, code + code_offset(grid), code, g, nb, heads, chunks, table_size(grid))

    def index(self) -> torch.Tensor:
        """Table index (table_rows where masked) of every (query, key) pair: [B', nb G S G]."""
        k_code = self.k_code[:, self.ids].view(self.k_code.shape[0], self.num_blocks, 1, -1)
        index = self.q_code[..., None] - k_code  # [B', nb, G, S G]
        index.masked_fill_(self.masked[:, None, :], self.table_rows)
        return index.view(index.shape[0], -1)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _table_columns(table: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[H, rows + 1]: the table heads-first, with a -inf column that masked pairs index."""
    table = table.detach().to(dtype)
    return torch.cat([table.t(), table.new_full((table.shape[1], 1), float("-inf"))], 1)


# Columns of _table_columns: the three special entries, then the mask.
_CLS_TO_TOKEN, _TOKEN_TO_CLS, _CLS_TO_CLS = -4, -3, -2


class _Split:
    """q, k or v [B, H, N, d] as its CLS row [B H, d] and its regional tokens, zero-padded to
    blocks, [B H, nb, G, d], both contiguous (so a chunk of heads is a contiguous slice)."""

    def __init__(self, x: torch.Tensor | None, plan: _Plan, dtype=None, cls=None, regional=None):
        if x is not None:  # always copies: what is saved must not keep x's storage (e.g. qkv) alive
            b, h, n, d = x.shape
            cls = x.new_empty(b, h, d, dtype=dtype).copy_(x[:, :, 0]).view(b * h, d)
            regional = x.new_zeros(b, h, plan.num_blocks * plan.block_size, d, dtype=dtype)
            regional[:, :, : n - 1] = x[:, :, 1:]
            regional = regional.view(b * h, plan.num_blocks, plan.block_size, d)
        self.cls, self.regional = cls, regional

    def join(self, b: int, n: int) -> torch.Tensor:
        """Back to [B, H, N, d] (the regional padding dropped)."""
        bh, _, _, d = self.regional.shape
        return torch.cat([self.cls[:, None], self.regional.view(bh, -1, d)[:, : n - 1]], 1).view(b, -1, n, d)


def _no_autocast(device_type: str):
    """Autocast off inside the kernel (it picks its own compute dtype); the meta device, where
    svitt.analysis.efficiency counts FLOPs and memory, has no autocast to turn off."""
    if device_type == "meta":
        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False)


class _BlockSparseAttention(torch.autograd.Function):
    """(q, k, v [B, H, N, d], table, plan) -> (out [B, H, N, d], CLS probabilities [B, H, N]).

    Regional queries attend to their gathered key blocks and CLS, the CLS query to every key.
    Saves q (pre-scaled), k, v split and padded, the output and the log-sum-exp; the gathered
    blocks, bias and probabilities are recomputed per chunk of heads in backward. Each chunk
    runs in its own function so its buffers are freed before the next chunk allocates.
    """

    @staticmethod
    def forward(ctx, q, k, v, table, plan: _Plan):
        with _no_autocast(q.device.type):
            b, h, n, d = q.shape
            dtype = _compute_dtype(q.dtype)
            qs, ks, vs = (_Split(x, plan, dtype) for x in (q, k, v))
            qs.cls.mul_(d**-0.5)
            qs.regional.mul_(d**-0.5)
            columns = _table_columns(table, dtype)
            out = qs.regional.new_empty(b * h, n, d)
            lse = qs.regional.new_empty(b * h, plan.num_blocks, plan.block_size)
            cls_probs, cls_lse = _cls_forward(qs, ks, vs, columns, plan, n, out)
            index = plan.index()
            for chunk in plan.chunks:
                _chunk_forward(qs, ks, vs, columns, plan, index, chunk, out, lse)
            out = out.view(b, h, n, d).to(q.dtype)
            ctx.save_for_backward(
                qs.cls, qs.regional, ks.cls, ks.regional, vs.cls, vs.regional, out, lse, cls_lse, table
            )
            ctx.plan = plan
            ctx.mark_non_differentiable(cls_probs)
            return out, cls_probs

    @staticmethod
    def backward(ctx, grad_out, _grad_cls):
        q_cls, q_reg, k_cls, k_reg, v_cls, v_reg, out, lse, cls_lse, table = ctx.saved_tensors
        plan, want_table = ctx.plan, ctx.needs_input_grad[3]
        qs, ks, vs = (_Split(None, plan, None, c, r) for c, r in ((q_cls, q_reg), (k_cls, k_reg), (v_cls, v_reg)))
        with _no_autocast(q_reg.device.type):
            b, h, n, d = out.shape
            dtype = q_reg.dtype
            columns = _table_columns(table, dtype)
            grad_out = grad_out.to(dtype)
            # D_i = dO_i . O_i = sum_j P_ij dP_ij (flash attention): the softmax backward's row term.
            row = _Split((grad_out * out.to(dtype)).sum(-1, keepdim=True), plan, dtype)
            dcolumns = torch.zeros_like(columns)
            dq, dk, dv = _cls_backward(qs, ks, vs, columns, plan, n, cls_lse, grad_out, row, dcolumns)
            index = plan.index()
            for chunk in plan.chunks:
                _chunk_backward(
                    qs,
                    ks,
                    vs,
                    columns,
                    plan,
                    index,
                    chunk,
                    lse,
                    grad_out,
                    row,
                    dq,
                    dk,
                    dv,
                    dcolumns if want_table else None,
                )
            dtable = dcolumns[:, :-1].t().to(table.dtype) if want_table else None
            dq.cls.mul_(d**-0.5)
            dq.regional.mul_(d**-0.5)
            grads = []
            for split in (dq, dk, dv):  # one at a time, each split freed once joined
                grads.append(split.join(b, n).to(out.dtype))
                split.cls = split.regional = None
            return (*grads, dtable, None)


def _cls_logits(qs: _Split, ks: _Split, columns, plan: _Plan, n: int):
    """CLS query (pre-scaled) against the regional keys [B H, nb G] (padding at -inf) and against
    the CLS key [B H]."""
    bh, nb, g, d = ks.regional.shape
    heads = columns.shape[0]
    regional = (ks.regional.view(bh, -1, d) @ qs.cls[:, :, None]).view(bh // heads, heads, -1)
    regional = regional.add_(columns[:, _CLS_TO_TOKEN, None]).view(bh, -1)
    regional[:, n - 1 :] = float("-inf")
    to_cls = (ks.cls * qs.cls).sum(-1).view(-1, heads).add_(columns[:, _CLS_TO_CLS]).view(bh)
    return regional, to_cls


def _cls_forward(qs, ks, vs, columns, plan, n, out):
    """The CLS query row: writes out[:, 0]; returns its probabilities [B, H, N] and lse [B H]."""
    regional, to_cls = _cls_logits(qs, ks, columns, plan, n)
    top = torch.maximum(regional.amax(-1), to_cls)
    p_reg, p_cls = regional.sub_(top[:, None]).exp_(), to_cls.sub_(top).exp_()
    total = p_reg.sum(-1).add_(p_cls)
    bh, _, _, d = vs.regional.shape
    row = (p_reg[:, None, :] @ vs.regional.view(bh, -1, d)).squeeze(1).addcmul_(p_cls[:, None], vs.cls)
    out[:, 0] = row.div_(total[:, None])
    probs = torch.cat([p_cls[:, None], p_reg[:, : n - 1]], 1).div_(total[:, None])
    return probs.view(-1, columns.shape[0], n), top.add_(total.log_())


def _cls_backward(qs, ks, vs, columns, plan, n, cls_lse, grad_out, row, dcolumns):
    """Gradients from the CLS query row; returns the dq, dk, dv buffers (_Split) they start."""
    regional, to_cls = _cls_logits(qs, ks, columns, plan, n)
    p_reg, p_cls = regional.sub_(cls_lse[:, None]).exp_(), to_cls.sub_(cls_lse).exp_()
    bh, nb, g, d = qs.regional.shape
    g0, d0 = grad_out[:, :, 0].reshape(bh, d), row.cls[:, 0]  # [B H, d], [B H]
    ds_reg = (vs.regional.view(bh, -1, d) @ g0[:, :, None]).squeeze(-1).sub_(d0[:, None]).mul_(p_reg)
    ds_cls = (vs.cls * g0).sum(-1).sub_(d0).mul_(p_cls)
    heads = columns.shape[0]
    dcolumns[:, _CLS_TO_TOKEN] += ds_reg.view(-1, heads, nb * g).sum((0, 2))
    dcolumns[:, _CLS_TO_CLS] += ds_cls.view(-1, heads).sum(0)
    dq = _Split(
        None,
        plan,
        None,
        (ds_reg[:, None, :] @ ks.regional.view(bh, -1, d)).squeeze(1).addcmul_(ds_cls[:, None], ks.cls),
        torch.empty_like(qs.regional),
    )
    dk = _Split(
        None, plan, None, ds_cls[:, None] * qs.cls, (ds_reg[:, :, None] * qs.cls[:, None, :]).view(bh, nb, g, d)
    )
    dv = _Split(None, plan, None, p_cls[:, None] * g0, (p_reg[:, :, None] * g0[:, None, :]).view(bh, nb, g, d))
    return dq, dk, dv


def _chunk_logits(qs: _Split, ks: _Split, columns, plan: _Plan, index, chunk):
    """Logits of a chunk of heads against the gathered key blocks of each query block.

    Returns logits [Hc, nb, G, S G] (bias from the table, masked pairs -inf), the gathered keys
    [Hc, nb, S G, d] and the logits against the CLS key [Hc, nb, G].
    """
    b, h0, h1 = chunk
    rows = slice(b * plan.heads + h0, b * plan.heads + h1)
    hc, (_, nb, g, d) = h1 - h0, qs.regional.shape
    kg = ks.regional[rows].index_select(1, plan.ids).view(hc * nb, -1, d)
    logits = kg.new_empty(hc, nb, g, kg.shape[1])
    torch.index_select(columns[h0:h1], 1, index[b % index.shape[0]], out=logits.view(hc, -1))
    qc = qs.regional[rows]
    logits.view(hc * nb, g, -1).baddbmm_(qc.view(hc * nb, g, d), kg.transpose(1, 2))
    to_cls = (qc.view(hc, -1, d) @ ks.cls[rows, :, None]).view(hc, nb, g)
    return logits, kg, to_cls.add_(columns[h0:h1, _TOKEN_TO_CLS, None, None]), rows


def _gathered_values(vs: _Split, plan: _Plan, rows):
    vg = vs.regional[rows].index_select(1, plan.ids)
    return vg.view(-1, vg.shape[1] * vg.shape[2] // plan.num_blocks, vg.shape[3])


def _chunk_forward(qs, ks, vs, columns, plan: _Plan, index, chunk, out, lse):
    """Output rows and log-sum-exp of a chunk of heads (written into out [B H, N, d] and lse)."""
    logits, kg, to_cls, rows = _chunk_logits(qs, ks, columns, plan, index, chunk)
    del kg
    top = torch.maximum(logits.amax(-1), to_cls)
    probs = logits.sub_(top[..., None]).exp_()  # unnormalised
    cls_p = to_cls.sub_(top).exp_()
    total = probs.sum(-1).add_(cls_p)
    hc, nb, g, sg = probs.shape
    res = torch.bmm(probs.view(hc * nb, g, sg), _gathered_values(vs, plan, rows)).view(hc, nb, g, -1)
    res.addcmul_(cls_p[..., None], vs.cls[rows, None, None, :]).div_(total[..., None])
    n = out.shape[1]
    out[rows, 1:] = res.view(hc, nb * g, -1)[:, : n - 1]
    lse[rows] = top.add_(total.log_())


def _chunk_grad(grad_out: torch.Tensor, plan: _Plan, chunk) -> torch.Tensor:
    """The output gradient of a chunk's regional queries, [Hc, nb, G, d] (zero padded)."""
    b, h0, h1 = chunk
    go = grad_out.new_zeros(h1 - h0, plan.num_blocks * plan.block_size, grad_out.shape[-1])
    go[:, : grad_out.shape[2] - 1] = grad_out[b, h0:h1, 1:]
    return go.view(h1 - h0, plan.num_blocks, plan.block_size, -1)


def _chunk_backward(qs, ks, vs, columns, plan: _Plan, index, chunk, lse, grad_out, row, dq, dk, dv, dcolumns):
    """Add a chunk of heads' gradients into dq (pre-scale), dk, dv and dcolumns."""
    logits, kg, to_cls, rows = _chunk_logits(qs, ks, columns, plan, index, chunk)
    hc, nb, g, sg = logits.shape
    d = kg.shape[-1]
    lse_c = lse[rows]
    probs = logits.sub_(lse_c[..., None]).exp_()
    del logits
    cls_p = to_cls.sub_(lse_c).exp_()
    go, row_c = _chunk_grad(grad_out, plan, chunk), row.regional[rows, ..., 0]
    dvg = torch.bmm(probs.view(hc * nb, g, sg).transpose(1, 2), go.view(hc * nb, g, d))
    dv.regional[rows].index_add_(1, plan.ids, dvg.view(hc, -1, g, d))
    del dvg
    dv.cls[rows] += (cls_p.view(hc, 1, -1) @ go.view(hc, -1, d)).squeeze(1)
    ds = torch.bmm(go.view(hc * nb, g, d), _gathered_values(vs, plan, rows).transpose(1, 2))
    ds = ds.view(hc, nb, g, sg).sub_(row_c[..., None]).mul_(probs)  # dlogits
    del probs
    ds_cls = (go.view(hc, -1, d) @ vs.cls[rows, :, None]).view(hc, nb, g).sub_(row_c).mul_(cls_p)
    dqc = dq.regional[rows]
    torch.bmm(ds.view(hc * nb, g, sg), kg, out=dqc.view(hc * nb, g, d))
    dqc.addcmul_(ds_cls[..., None], ks.cls[rows, None, None, :])
    del kg
    qc = qs.regional[rows]
    dkg = torch.bmm(ds.view(hc * nb, g, sg).transpose(1, 2), qc.view(hc * nb, g, d))
    dk.regional[rows].index_add_(1, plan.ids, dkg.view(hc, -1, g, d))
    del dkg
    dk.cls[rows] += (ds_cls.view(hc, 1, -1) @ qc.view(hc, -1, d)).squeeze(1)
    if dcolumns is not None:
        b, h0, h1 = chunk
        dcolumns[h0:h1].index_add_(1, index[b % index.shape[0]], ds.view(hc, -1))
        dcolumns[h0:h1, _TOKEN_TO_CLS] += ds_cls.sum((1, 2))


def _cls_row(q, k, v, table):
    """CLS query against every key with autograd: (out [B, H, 1, d], probabilities [B, H, N])."""
    logits = (k @ q[:, :, 0, :, None]).squeeze(-1) * q.shape[-1] ** -0.5
    probs = _softmax(logits + _cls_row_bias(table, k.shape[2]).to(logits.dtype))
    return (probs[:, :, None, :] @ v), probs


def flex_tile(block_size: int) -> int:
    """Tokens per FlexAttention block for blocks of `block_size`: a power of two >= 16 up to 128
    (the fused kernel's tiles then divide it), else a multiple of 128. G = 56 -> 64."""
    if block_size > 128:
        return -(-block_size // 128) * 128
    return max(16, 1 << (block_size - 1).bit_length())


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _to_tiles(x: torch.Tensor, num_blocks: int, g: int, tile: int) -> torch.Tensor:
    """Regional tokens [B, H, n, ...] -> [B, H, num_blocks * tile, ...]: token j of block i at
    i * tile + j, the rest zeros (what padding is for: see flex_block_attention)."""
    x = F.pad(x.movedim(2, -1), (0, num_blocks * g - x.shape[2])).unflatten(-1, (num_blocks, g))
    return F.pad(x, (0, tile - g)).flatten(-2).movedim(-1, 2)


def flex_block_attention(
    q, k, v, table, pos, grid, layout, need_cls_attn=False, compiled=None, cls_score="renormalised"
):
    """FlexAttention with a BlockMask built from the layout (BlockMask.from_kv_blocks).

    Each block of G regional tokens is padded to a tile of flex_tile(G) slots (G = 56 -> 64) whose
    extra slots are masked keys, so any G suits the fused kernel's tiles and the kept pairs are
    exactly the layout's; one more tile holds the CLS key. The CLS query row is dense (_cls_row).
    compiled: use the fused torch.compile kernel (default on CUDA); eager flex is the unfused
    reference path and has no CPU backward either way.
    """
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    b, h, n, d = q.shape
    g, nb = layout.block_size, layout.num_blocks
    tile = flex_tile(g)
    scale = d**-0.5
    pos = pos.expand(b, -1)
    cls_out, cls_probs = _cls_row(q, k, v, table)

    def keys(x):  # regional tiles, then the CLS tile
        return torch.cat([_to_tiles(x[:, :, 1:], nb, g, tile), F.pad(x[:, :, :1], (0, 0, 0, tile - 1))], 2)

    q_seq, k_seq, v_seq = _to_tiles(q[:, :, 1:], nb, g, tile), keys(k), keys(v)
    pos_q = _to_tiles(pos[:, None], nb, g, tile)[:, 0]  # [B, nb * tile]; padding slots at 0
    pos_k = torch.cat([pos_q, pos.new_full((b, tile), -1)], dim=1)
    # A key slot is real if it holds a token (or is the CLS slot); blocks as in the layout.
    real = _to_tiles(torch.ones(1, 1, n - 1, dtype=torch.bool, device=q.device), nb, g, tile)[0, 0]
    real = torch.cat([real, F.pad(real.new_ones(1), (0, tile - 1))])
    block_adj = F.pad(block_adjacency(layout), (0, 1), value=True)  # last column: the CLS tile

    def mask_mod(batch, head, q_idx, kv_idx):
        # The BlockMask only lets the fused kernel skip tiles; mask_mod defines every edge.
        return real[kv_idx] & block_adj[q_idx // tile, kv_idx // tile]

    # Valid slots first in each row, then the CLS tile.
    order = torch.argsort((~layout.valid).int(), dim=1, stable=True)
    kv_ids = torch.gather(layout.block_ids, 1, order)
    counts = layout.valid.sum(1)
    # kv_indices spans every KV tile (nb regional + 1 CLS); only the first `counts + 1` are read.
    kv_ids = torch.cat([kv_ids, kv_ids.new_zeros(nb, nb + 1 - kv_ids.shape[1])], dim=1)
    kv_ids[torch.arange(nb, device=kv_ids.device), counts] = nb
    block_mask = BlockMask.from_kv_blocks(
        (counts + 1).int()[None, None],
        kv_ids.int()[None, None],
        BLOCK_SIZE=(tile, tile),
        mask_mod=mask_mod,
        seq_lengths=(nb * tile, (nb + 1) * tile),
    )

    def score_mod(score, batch, head, q_idx, kv_idx):
        index = relative_index(pos_q[batch, q_idx], pos_k[batch, kv_idx], grid)
        return score + table[index, head]

    flex = _compiled_flex() if (q.is_cuda if compiled is None else compiled) else flex_attention
    out = flex(q_seq, k_seq, v_seq, score_mod=score_mod, block_mask=block_mask, scale=scale)
    out = out.unflatten(2, (nb, tile))[:, :, :, :g].flatten(2, 3)[:, :, : n - 1]
    cls_attn = _cls_attention(cls_probs.detach(), cls_score) if need_cls_attn else None
    return torch.cat([cls_out, out], dim=2), cls_attn
