"""Edge sparsity (SViTT section 3.2): block-sparse local + random + global attention.

Regional tokens (everything but CLS, index 0) are chunked into ceil(N / G) blocks of G tokens.
Each query block attends to K_l local blocks centred on itself and K_r distinct random non-local
blocks, redrawn every forward pass and shared over batch and heads; CLS attends to every token and
every token attends to CLS. Padding up to a multiple of G is masked out.

Kernels behind one interface, `attention(...)`:
  - "dense":     SDPA over all pairs with the relative bias (no edge sparsity);
  - "reference": masked dense attention with the block layout (tests only, O(N^2) memory);
  - "gather":    gathers each query block's key blocks; trains on CPU and GPU, memory O(N K G);
  - "flex":      FlexAttention with a BlockMask (CUDA, G a multiple of 16; forward also on CPU).
All return (output [B, H, N, d], cls_attn [B, N-1] or None), where cls_attn is CLS's attention
to the regional tokens averaged over heads (node sparsity ranks tokens by it, eq. 10).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from svitt.models.relative_position import lookup, relative_bias, relative_index, special_bias, table_size

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
        kernel = "flex" if (q.is_cuda and layout.block_size % 16 == 0) else "gather"
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


def _cls_row(q, k, v, table, pos, grid, scale):
    """CLS query against all keys (global edges, eq. 9): (out [B,H,1,d], probs [B,H,N])."""
    bias = relative_bias(table, pos[:, :1].new_full((pos.shape[0], 1), -1), _with_cls(pos), grid)
    logits = (q[:, :, :1] @ k.transpose(-1, -2)) * scale + bias
    probs = _softmax(logits)
    return probs @ v, probs[:, :, 0]


def _cls_attention(probs: torch.Tensor) -> torch.Tensor:
    """Mean over heads of CLS->regional attention, renormalised over regional tokens (eq. 10)."""
    regional = probs[:, :, 1:]
    return (regional / regional.sum(-1, keepdim=True)).mean(1)


def dense_attention(q, k, v, table, pos, grid, need_cls_attn=False, dropout_p=0.0):
    bias = relative_bias(table, _with_cls(pos), _with_cls(pos), grid).to(q.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p)
    cls_attn = None
    if need_cls_attn:
        scale = q.shape[-1] ** -0.5
        logits = (q[:, :, :1] @ k.transpose(-1, -2)) * scale + bias[:, :, :1]
        cls_attn = _cls_attention(_softmax(logits)[:, :, 0])
    return out, cls_attn


def reference_attention(q, k, v, table, pos, grid, layout, need_cls_attn=False):
    """Masked dense attention: the definition the fast kernels are tested against."""
    scale = q.shape[-1] ** -0.5
    bias = relative_bias(table, _with_cls(pos), _with_cls(pos), grid)
    logits = (q @ k.transpose(-1, -2)) * scale + bias
    logits = logits.masked_fill(~layout_mask(layout), float("-inf"))
    probs = _softmax(logits)
    cls_attn = _cls_attention(probs[:, :, 0]) if need_cls_attn else None
    return probs @ v, cls_attn


def _pad_regional(x: torch.Tensor, padded: int) -> torch.Tensor:
    """[B, H, N, d] regional tokens -> [B, H, padded, d] with zeros appended."""
    return F.pad(x, (0, 0, 0, padded - x.shape[2]))


def gather_attention(q, k, v, table, pos, grid, layout, need_cls_attn=False):
    """Block-sparse attention by gathering each query block's key blocks.

    Memory: the gathered keys/values and logits are [B, H, N_blocks, G, (K_l+K_r) G].
    """
    b, h, n, d = q.shape
    g, nb, slots = layout.block_size, layout.num_blocks, layout.block_ids.shape[1]
    scale = d ** -0.5
    padded = nb * g
    cls_out, cls_probs = _cls_row(q, k, v, table, pos, grid, scale)

    qb = _pad_regional(q[:, :, 1:], padded).view(b, h, nb, g, d)
    kb = _pad_regional(k[:, :, 1:], padded).view(b, h, nb, g, d)
    vb = _pad_regional(v[:, :, 1:], padded).view(b, h, nb, g, d)
    ids = layout.block_ids
    kg = kb.index_select(2, ids.reshape(-1)).view(b, h, nb, slots * g, d)
    vg = vb.index_select(2, ids.reshape(-1)).view(b, h, nb, slots * g, d)

    # Positions are [1, N] while unpruned (shared over the batch): the bias then broadcasts.
    pos_pad = F.pad(pos, (0, padded - (n - 1))).view(pos.shape[0], nb, g)
    pos_k = pos_pad[:, ids].reshape(pos.shape[0], nb, slots * g)
    index = relative_index(pos_pad[..., :, None], pos_k[..., None, :], grid)  # [B, nb, G, KG]
    bias = lookup(table, index).permute(0, 4, 1, 2, 3)  # [B, H, nb, G, KG]

    key_token = ids[:, :, None] * g + torch.arange(g, device=ids.device)
    key_ok = (layout.valid[:, :, None] & (key_token < n - 1)).reshape(nb, slots * g)
    logits = (qb @ kg.transpose(-1, -2)) * scale + bias
    logits = logits.masked_fill(~key_ok[:, None, :], float("-inf"))
    _, tok_to_cls, _ = special_bias(table)
    cls_logit = (qb @ k[:, :, :1, None].transpose(-1, -2)) * scale + tok_to_cls.view(1, h, 1, 1, 1)
    probs = _softmax(torch.cat([logits, cls_logit], dim=-1))
    out = probs[..., :-1] @ vg + probs[..., -1:] * v[:, :, :1, None]
    out = out.reshape(b, h, padded, d)[:, :, : n - 1]
    cls_attn = _cls_attention(cls_probs) if need_cls_attn else None
    return torch.cat([cls_out, out], dim=2), cls_attn


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex_block_attention(q, k, v, table, pos, grid, layout, need_cls_attn=False, compiled=None):
    """FlexAttention with a BlockMask built from the layout (block size G, CLS in its own block).

    Sequence for flex: regional tokens padded to N_blocks * G, then one extra block holding the
    CLS key (and padding). The CLS query row is computed densely like in the gather kernel.
    compiled: use the fused torch.compile kernel (default on CUDA); eager flex is the unfused
    reference path and has no CPU backward either way.
    """
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    b, h, n, d = q.shape
    g, nb = layout.block_size, layout.num_blocks
    padded = nb * g
    scale = d ** -0.5
    pos = pos.expand(b, -1)
    cls_out, cls_probs = _cls_row(q, k, v, table, pos, grid, scale)

    q_seq = _pad_regional(q[:, :, 1:], padded)
    kv_len = padded + g
    k_seq = torch.cat([_pad_regional(k[:, :, 1:], padded), _pad_regional(k[:, :, :1], g)], dim=2)
    v_seq = torch.cat([_pad_regional(v[:, :, 1:], padded), _pad_regional(v[:, :, :1], g)], dim=2)
    # Key positions: regional positions, then CLS (-1) and padding.
    pos_k = torch.cat([F.pad(pos, (0, padded - (n - 1))), pos.new_full((b, g), -1)], dim=1)
    cls_slot, num_regional = padded, n - 1

    # Valid slots first in each row, then the CLS block.
    order = torch.argsort((~layout.valid).int(), dim=1, stable=True)
    kv_ids = torch.gather(layout.block_ids, 1, order)
    counts = layout.valid.sum(1)
    # kv_indices spans every KV block (nb regional + 1 CLS); only the first `counts + 1` are read.
    kv_ids = torch.cat([kv_ids, kv_ids.new_zeros(nb, nb + 1 - kv_ids.shape[1])], dim=1)
    kv_ids[torch.arange(nb, device=kv_ids.device), counts] = nb
    # The BlockMask only lets the fused kernel skip blocks; mask_mod must define every edge.
    block_adj = F.pad(block_adjacency(layout), (0, 1))  # last column: the CLS block

    def mask_mod(batch, head, q_idx, kv_idx):
        regional = (kv_idx < num_regional) & block_adj[q_idx // g, kv_idx // g]
        return regional | (kv_idx == cls_slot)

    block_mask = BlockMask.from_kv_blocks(
        (counts + 1).int()[None, None], kv_ids.int()[None, None],
        BLOCK_SIZE=(g, g), mask_mod=mask_mod, seq_lengths=(padded, kv_len))

    def score_mod(score, batch, head, q_idx, kv_idx):
        index = relative_index(pos_k[batch, q_idx], pos_k[batch, kv_idx], grid)
        return score + table[index, head]

    flex = _compiled_flex() if (q.is_cuda if compiled is None else compiled) else flex_attention
    out = flex(q_seq, k_seq, v_seq, score_mod=score_mod, block_mask=block_mask, scale=scale)
    out = out[:, :, :num_regional]
    cls_attn = _cls_attention(cls_probs) if need_cls_attn else None
    return torch.cat([cls_out, out], dim=2), cls_attn
