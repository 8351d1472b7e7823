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
to the regional tokens averaged over heads (node sparsity ranks tokens by it, eq. 10). The CLS
query is one dense row in every kernel, so cls_attn never needs an N x N matrix.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from svitt.models.relative_position import (code_offset, position_code, relative_bias, relative_index,
                                            sequence_bias, special_bias, table_size)

KERNELS = ("auto", "dense", "reference", "gather", "flex")


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


def make_layout(num_tokens: int, block_size: int, local_blocks: int, random_blocks: int,
                generator: torch.Generator | None = None, device=None) -> BlockLayout:
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


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table: torch.Tensor,
              pos: torch.Tensor, grid: tuple[int, int, int], layout: BlockLayout | None,
              kernel: str = "auto", need_cls_attn: bool = False, dropout_p: float = 0.0):
    """Multi-head attention over [CLS, regional tokens] with relative position bias.

    q, k, v: [B, H, N, d] with CLS at index 0 (already split into heads, unscaled).
    table: relative position table [table_size(grid), H]; pos: regional positions [B or 1, N-1].
    layout: None for dense attention. Returns (out [B, H, N, d], cls_attn [B, N-1] or None).
    """
    if kernel not in KERNELS:
        raise ValueError(f"attention kernel must be one of {KERNELS}, got {kernel!r}")
    if table.shape[0] != table_size(grid):
        raise ValueError(f"relative position table has {table.shape[0]} rows, expected "
                         f"{table_size(grid)} for grid {grid}")
    if layout is None or kernel == "dense":
        return dense_attention(q, k, v, table, pos, grid, need_cls_attn, dropout_p)
    if kernel == "auto":
        kernel = "flex" if q.is_cuda else "gather"
    if kernel == "reference":
        return reference_attention(q, k, v, table, pos, grid, layout, need_cls_attn)
    if kernel == "gather":
        return gather_attention(q, k, v, table, pos, grid, layout, need_cls_attn)
    return flex_block_attention(q, k, v, table, pos, grid, layout, need_cls_attn)


def _with_cls(pos: torch.Tensor) -> torch.Tensor:
    return F.pad(pos, (1, 0), value=-1)


def _softmax(logits: torch.Tensor) -> torch.Tensor:
    """Softmax in at least float32 precision, returned in the input dtype."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        return logits.float().softmax(-1).to(logits.dtype)
    return logits.softmax(-1)


def _cls_attention(probs: torch.Tensor) -> torch.Tensor:
    """Mean over heads of CLS->regional attention, renormalised over regional tokens (eq. 10).
    probs [B, H, N]: CLS's attention to [CLS, tokens]."""
    regional = probs[:, :, 1:]
    return (regional / regional.sum(-1, keepdim=True)).mean(1)


def _cls_row_bias(table: torch.Tensor, n: int) -> torch.Tensor:
    """Bias of the CLS query against [CLS, n-1 tokens]: [H, n] (CLS->CLS, then CLS->token)."""
    cls_to_tok, _, cls_to_cls = special_bias(table)
    return torch.cat([cls_to_cls[:, None], cls_to_tok[:, None].expand(-1, n - 1)], dim=1)


@torch.no_grad()
def cls_attention(q: torch.Tensor, k: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """CLS's attention to the regional tokens for node pruning: one query row, [B, N-1], never an
    N x N matrix. Every kernel's CLS row is dense (global edges, eq. 9), so this is shared."""
    logits = (k @ q[:, :, 0, :, None]).squeeze(-1) * q.shape[-1] ** -0.5
    return _cls_attention(_softmax(logits + _cls_row_bias(table, k.shape[2]).to(logits.dtype)))


def dense_attention(q, k, v, table, pos, grid, need_cls_attn=False, dropout_p=0.0):
    bias = sequence_bias(table, pos, grid).to(q.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p)
    return out, cls_attention(q, k, table) if need_cls_attn else None


def reference_attention(q, k, v, table, pos, grid, layout, need_cls_attn=False):
    """Masked dense attention: the definition the fast kernels are tested against."""
    scale = q.shape[-1] ** -0.5
    bias = relative_bias(table, _with_cls(pos), _with_cls(pos), grid)
    logits = (q @ k.transpose(-1, -2)) * scale + bias
    logits = logits.masked_fill(~layout_mask(layout), float("-inf"))
    probs = _softmax(logits)
    cls_attn = _cls_attention(probs[:, :, 0]) if need_cls_attn else None
    return probs @ v, cls_attn


def gather_attention(q, k, v, table, pos, grid, layout, need_cls_attn=False):
    """Block-sparse attention that gathers each query block's key blocks (CPU and GPU, trains).

    A custom autograd function (flash-attention style): it keeps q, k, v, the log-sum-exp per query
    and its output, and recomputes the gathered key/value blocks, the bias (from the small table)
    and the probabilities in backward, one chunk of query blocks at a time, so memory is O(N d)
    saved plus O(chunk) transient instead of the O(N K G) logits and gathered blocks autograd
    would keep.
    """
    plan = _Plan.build(layout, pos, grid, q.shape[0], q.shape[1])
    out, cls_probs = _BlockSparseAttention.apply(q, k, v, table, plan)
    return out, _cls_attention(cls_probs) if need_cls_attn else None


# Logits per chunk of query blocks (8 MB in fp32): bounds the transient [B, H, chunk, G, K G]
# buffers of forward and backward; smaller chunks only add Python overhead per chunk.
CHUNK_ELEMENTS = 1 << 21


@dataclass(frozen=True)
class _Plan:
    """What the block-sparse kernel needs beside q, k, v and the table (no gradients).

    ids [nb, S]: key block of each slot; masked [nb, S G]: slot invalid or key is padding;
    q_code, k_code [B', nb, G]: position codes (relative_position.position_code) of the padded
    regional tokens, q_code offset so that q_code - k_code is the table index.
    """
    ids: torch.Tensor
    masked: torch.Tensor
    q_code: torch.Tensor
    k_code: torch.Tensor
    block_size: int
    chunk: int
    table_rows: int

    @staticmethod
    def build(layout: BlockLayout, pos: torch.Tensor, grid, batch: int, heads: int) -> "_Plan":
        g, nb = layout.block_size, layout.num_blocks
        if pos.shape[-1] != layout.num_tokens:
            raise ValueError(f"positions cover {pos.shape[-1]} regional tokens, the block layout "
                             f"{layout.num_tokens}")
        ids = layout.block_ids
        token = ids[:, :, None] * g + torch.arange(g, device=ids.device)
        masked = ~(layout.valid[:, :, None] & (token < layout.num_tokens)).reshape(nb, -1)
        code = F.pad(position_code(pos, grid), (0, nb * g - pos.shape[-1])).view(-1, nb, g)
        # Equal chunks of at most CHUNK_ELEMENTS logits (a short last chunk would add its Python
        # overhead for little work).
        per_block = batch * heads * g * ids.shape[1] * g
        count = -(-nb // max(1, CHUNK_ELEMENTS // per_block))
        chunk = -(-nb // count)
        return _Plan(ids, masked, code + code_offset(grid), code, g, chunk, table_size(grid))

    @property
    def num_blocks(self) -> int:
        return self.ids.shape[0]

    def chunks(self):
        for start in range(0, self.num_blocks, self.chunk):
            yield start, min(start + self.chunk, self.num_blocks)

    def index(self, start: int, stop: int) -> torch.Tensor:
        """Table index (table_rows = masked) of every (query, key) of the chunk: [B', C G S G]."""
        ids = self.ids[start:stop]
        k_code = self.k_code[:, ids].flatten(2)  # [B', C, S G]
        index = self.q_code[:, start:stop, :, None] - k_code[:, :, None, :]
        index.masked_fill_(self.masked[start:stop, None, :], self.table_rows)
        return index.view(index.shape[0], -1)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _table_columns(table: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[H, rows + 1]: the table heads-first, with a -inf column that masked pairs index."""
    table = table.detach().to(dtype)
    return torch.cat([table.t(), table.new_full((table.shape[1], 1), float("-inf"))], 1)


class _BlockSparseAttention(torch.autograd.Function):
    """(q, k, v [B, H, N, d], table, plan) -> (out [B, H, N, d], CLS probabilities [B, H, N]).

    Regional queries attend to their gathered key blocks and CLS, the CLS query to every key.
    Saves the padded q (pre-scaled), k, v, the output and the log-sum-exp; the gathered blocks,
    bias and probabilities are recomputed per chunk of query blocks in backward. Each chunk runs
    in its own function so its buffers are freed before the next chunk allocates.
    """

    @staticmethod
    def forward(ctx, q, k, v, table, plan: _Plan):
        with torch.autocast(q.device.type, enabled=False):
            b, h, n, d = q.shape
            dtype = _compute_dtype(q.dtype)
            length = 1 + plan.num_blocks * plan.block_size
            qs = _padded(q, length, dtype).mul_(d ** -0.5)
            kp, vp = _padded(k, length, dtype), _padded(v, length, dtype)
            columns = _table_columns(table, dtype)
            out = qs.new_empty(b, h, n, d)
            lse = qs.new_empty(b, h, length)
            logits = _cls_logits(qs, kp, columns, n)
            lse[:, :, 0] = logits.logsumexp(-1)
            cls_probs = logits.sub_(lse[:, :, :1]).exp_()
            out[:, :, 0] = (cls_probs[:, :, None, :] @ vp).squeeze(2)
            for start, stop in plan.chunks():
                _chunk_forward(qs, kp, vp, columns, plan, start, stop, out, lse)
            out = out.to(q.dtype)
            ctx.save_for_backward(qs, kp, vp, out, lse, table)
            ctx.plan = plan
            cls_probs = cls_probs[:, :, :n]
            ctx.mark_non_differentiable(cls_probs)
            return out, cls_probs

    @staticmethod
    def backward(ctx, grad_out, _grad_cls):
        qs, kp, vp, out, lse, table = ctx.saved_tensors
        plan, want_table = ctx.plan, ctx.needs_input_grad[3]
        with torch.autocast(qs.device.type, enabled=False):
            n = out.shape[2]
            columns = _table_columns(table, qs.dtype)
            grad_out = grad_out.to(qs.dtype)
            # D_i = dO_i . O_i = sum_j P_ij dP_ij (flash attention): the softmax backward's row term.
            row_term = F.pad((grad_out * out.to(qs.dtype)).sum(-1), (0, qs.shape[2] - n))
            dcolumns = torch.zeros_like(columns)
            dq, dk, dv = _cls_backward(qs, kp, vp, columns, lse, grad_out, row_term, dcolumns, n)
            for start, stop in plan.chunks():
                _chunk_backward(qs, kp, vp, columns, plan, start, stop, lse, grad_out, row_term,
                                dq, dk, dv, dcolumns if want_table else None)
            dtable = dcolumns[:, :-1].t().to(table.dtype) if want_table else None
            dq = dq[:, :, :n].mul_(qs.shape[-1] ** -0.5)
            return dq.to(out.dtype), dk[:, :, :n].to(out.dtype), dv[:, :, :n].to(out.dtype), dtable, None


def _padded(x: torch.Tensor, length: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, H, N, d] -> contiguous [B, H, length, d], zeros appended."""
    return F.pad(x.to(dtype), (0, 0, 0, length - x.shape[2]))


def _blocks(x: torch.Tensor, plan: _Plan) -> torch.Tensor:
    """Padded [B, H, 1 + nb G, ...] -> its regional tokens as blocks [B, H, nb, G, ...] (a view)."""
    return x[:, :, 1:].unflatten(2, (plan.num_blocks, plan.block_size))


def _block_rows(x: torch.Tensor, start: int, stop: int, g: int) -> torch.Tensor:
    """Padded [B, H, L, ...] -> query blocks start..stop as [B, H, C, G, ...] (a view)."""
    return x[:, :, 1 + start * g: 1 + stop * g].unflatten(2, (stop - start, g))


def _chunk_rows(x: torch.Tensor, start: int, stop: int, g: int) -> torch.Tensor:
    """Unpadded [B, H, N, d] -> query blocks start..stop as [B, H, C, G, d], zeros past the end."""
    rows = x[:, :, 1 + start * g: 1 + stop * g]
    return F.pad(rows, (0, 0, 0, (stop - start) * g - rows.shape[2])).unflatten(2, (stop - start, g))


def _cls_vector(x: torch.Tensor) -> torch.Tensor:
    """CLS's row of [B, H, L, d] as [B, H, 1, d, 1], to multiply blocks [B, H, C, G, d] with."""
    return x[:, :, None, 0, :, None]


def _cls_logits(qs, kp, columns, n):
    """CLS query (pre-scaled) against every key of padded kp: [B, H, L], padding at -inf."""
    row = torch.cat([columns[:, -2:-1], columns[:, -4:-3].expand(-1, n - 1),
                     columns[:, -1:].expand(-1, kp.shape[2] - n)], dim=1)
    return (kp @ qs[:, :, 0, :, None]).squeeze(-1).add_(row)


def _cls_backward(qs, kp, vp, columns, lse, grad_out, row_term, dcolumns, n):
    """Gradients from the CLS query row; returns the padded dq, dk, dv buffers they start."""
    probs = _cls_logits(qs, kp, columns, n).sub_(lse[:, :, :1]).exp_()  # [B, H, L]
    g0 = grad_out[:, :, 0]
    dv = probs[..., None] * g0[:, :, None, :]
    ds = ((vp @ g0[..., None]).squeeze(-1) - row_term[:, :, :1]).mul_(probs)
    dk = ds[..., None] * qs[:, :, :1]
    dq = torch.empty_like(qs)
    dq[:, :, 0] = (ds[:, :, None, :] @ kp).squeeze(2)
    dcolumns[:, -2] += ds[:, :, 0].sum(0)  # CLS->CLS (column -1 is the mask)
    dcolumns[:, -4] += ds[:, :, 1:n].sum((0, 2))  # CLS->token
    return dq, dk, dv


def _chunk_logits(qs, kp, columns, plan: _Plan, start: int, stop: int):
    """Logits of query blocks start..stop against their gathered key blocks.

    Returns logits [B, H, C, G, S G] (bias from the table, masked pairs -inf), the gathered keys
    [B, H, C, S G, d], the logits against the CLS key [B, H, C, G], the (pre-scaled) queries
    [B, H, C, G, d] and the table index.
    """
    b, h, _, d = qs.shape
    g, c = plan.block_size, stop - start
    kg = _blocks(kp, plan).index_select(2, plan.ids[start:stop].reshape(-1)).view(b, h, c, -1, d)
    index = plan.index(start, stop)
    logits = qs.new_empty(b, h, c, g, kg.shape[3])
    for i in range(b):
        torch.index_select(columns, 1, index[i % index.shape[0]], out=logits[i].view(h, -1))
    qc = _block_rows(qs, start, stop, g).contiguous()
    logits.view(-1, g, kg.shape[3]).baddbmm_(qc.view(-1, g, d), kg.view(-1, kg.shape[3], d).transpose(1, 2))
    tok_cls = (qc @ _cls_vector(kp)).squeeze(-1).add_(columns[:, -3, None, None])
    return logits, kg, tok_cls, qc, index


def _gathered_values(vp, plan: _Plan, start: int, stop: int):
    b, h, _, d = vp.shape
    ids = plan.ids[start:stop].reshape(-1)
    return _blocks(vp, plan).index_select(2, ids).view(b, h, stop - start, -1, d)


def _chunk_forward(qs, kp, vp, columns, plan: _Plan, start, stop, out, lse):
    """Output rows and log-sum-exp of query blocks start..stop (written into out and lse)."""
    logits, kg, tok_cls, qc, _ = _chunk_logits(qs, kp, columns, plan, start, stop)
    del kg, qc
    top = torch.maximum(logits.amax(-1), tok_cls)
    probs = logits.sub_(top[..., None]).exp_()  # unnormalised
    cls_p = tok_cls.sub_(top).exp_()
    total = probs.sum(-1).add_(cls_p)
    res = probs @ _gathered_values(vp, plan, start, stop)
    res.addcmul_(cls_p[..., None], vp[:, :, None, None, 0]).div_(total[..., None])
    _put_rows(out, res, start, plan.block_size)
    _block_rows(lse, start, stop, plan.block_size).copy_(top.add_(total.log_()))


def _chunk_backward(qs, kp, vp, columns, plan: _Plan, start, stop, lse, grad_out, row_term,
                    dq, dk, dv, dcolumns):
    """Add query blocks start..stop's gradients into dq (pre-scale), dk, dv and dcolumns."""
    b, h, _, d = qs.shape
    g = plan.block_size
    ids = plan.ids[start:stop].reshape(-1)
    logits, kg, tok_cls, qc, index = _chunk_logits(qs, kp, columns, plan, start, stop)
    lse_c = _block_rows(lse, start, stop, g)
    probs = logits.sub_(lse_c[..., None]).exp_()
    del logits
    cls_p = tok_cls.sub_(lse_c).exp_()
    go = _chunk_rows(grad_out, start, stop, g)  # [B, H, C, G, d]
    row = _block_rows(row_term, start, stop, g)
    _blocks(dv, plan).index_add_(2, ids, (probs.transpose(-1, -2) @ go).view(b, h, -1, g, d))
    dv[:, :, :1] += cls_p.view(b, h, 1, -1) @ go.view(b, h, -1, d)
    ds = go @ _gathered_values(vp, plan, start, stop).transpose(-1, -2)
    ds = ds.sub_(row[..., None]).mul_(probs)  # dlogits [B, H, C, G, S G]
    del probs
    ds_cls = (go @ _cls_vector(vp)).squeeze(-1).sub_(row).mul_(cls_p)
    dqc = (ds @ kg).addcmul_(ds_cls[..., None], kp[:, :, None, None, 0])
    del kg
    _block_rows(dq, start, stop, g).copy_(dqc)
    _blocks(dk, plan).index_add_(2, ids, (ds.transpose(-1, -2) @ qc).view(b, h, -1, g, d))
    dk[:, :, :1] += ds_cls.view(b, h, 1, -1) @ qc.view(b, h, -1, d)
    if dcolumns is not None:
        for i in range(b):
            dcolumns.index_add_(1, index[i % index.shape[0]], ds[i].view(h, -1))
        dcolumns[:, -3] += ds_cls.sum((0, 2, 3))  # token->CLS


def _put_rows(out: torch.Tensor, res: torch.Tensor, start: int, g: int):
    """Write query blocks [B, H, C, G, d] into unpadded out [B, H, N, d] from block `start` on."""
    rows = out[:, :, 1 + start * g: 1 + start * g + res.shape[2] * g]
    rows.copy_(res.flatten(2, 3)[:, :, : rows.shape[2]])


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


def flex_block_attention(q, k, v, table, pos, grid, layout, need_cls_attn=False, compiled=None):
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
    scale = d ** -0.5
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
        (counts + 1).int()[None, None], kv_ids.int()[None, None], BLOCK_SIZE=(tile, tile),
        mask_mod=mask_mod, seq_lengths=(nb * tile, (nb + 1) * tile))

    def score_mod(score, batch, head, q_idx, kv_idx):
        index = relative_index(pos_q[batch, q_idx], pos_k[batch, kv_idx], grid)
        return score + table[index, head]

    flex = _compiled_flex() if (q.is_cuda if compiled is None else compiled) else flex_attention
    out = flex(q_seq, k_seq, v_seq, score_mod=score_mod, block_mask=block_mask, scale=scale)
    out = out.unflatten(2, (nb, tile))[:, :, :, :g].flatten(2, 3)[:, :, : n - 1]
    cls_attn = _cls_attention(cls_probs.detach()) if need_cls_attn else None
    return torch.cat([cls_out, out], dim=2), cls_attn
