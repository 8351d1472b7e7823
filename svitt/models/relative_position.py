"""3D relative position bias for BEiT over video clips (SViTT appendix A.1, eq. 24-27).

A token's position is one integer p = t * H * W + h * W + w on its (T, H, W) grid; the CLS token
has position -1. Indices into the bias table are computed from positions on the fly, so no N x N
index buffer is stored (at T = 16 such a buffer would be ~79 MB per layer), and pruned or gathered
tokens keep their true bias.

Table layout (timm BEiT, extended with a temporal axis): entry
    ((dt + T-1) * (2H-1) + (dh + H-1)) * (2W-1) + (dw + W-1),   d = query - key,
followed by three special entries: CLS->token, token->CLS, CLS->CLS.
"""

from __future__ import annotations

import torch

CLS_POSITION = -1


def table_size(grid: tuple[int, int, int]) -> int:
    t, h, w = grid
    return (2 * t - 1) * (2 * h - 1) * (2 * w - 1) + 3


def token_positions(grid: tuple[int, int, int], device=None) -> torch.Tensor:
    """Positions of the regional tokens of a full clip, in flattening order: [T*H*W]."""
    t, h, w = grid
    return torch.arange(t * h * w, device=device)


def relative_index(pos_q: torch.Tensor, pos_k: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """Table index for every (query, key) pair.

    pos_q: [..., Nq, 1] or broadcastable, pos_k: [..., 1, Nk]; returns the broadcast shape.
    Positions of -1 denote CLS.
    """
    t, h, w = grid
    n = table_size(grid)
    hw = h * w
    q_cls, k_cls = pos_q < 0, pos_k < 0
    pq, pk = pos_q.clamp(min=0), pos_k.clamp(min=0)
    dt = pq // hw - pk // hw + (t - 1)
    dh = (pq // w) % h - (pk // w) % h + (h - 1)
    dw = pq % w - pk % w + (w - 1)
    index = (dt * (2 * h - 1) + dh) * (2 * w - 1) + dw
    index = torch.where(q_cls & ~k_cls, n - 3, index)
    index = torch.where(~q_cls & k_cls, n - 2, index)
    index = torch.where(q_cls & k_cls, n - 1, index)
    return index


def code_offset(grid: tuple[int, int, int]) -> int:
    """The table index of a zero offset (dt, dh, dw) = (0, 0, 0)."""
    t, h, w = grid
    return ((t - 1) * (2 * h - 1) + (h - 1)) * (2 * w - 1) + (w - 1)


def position_code(pos: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """Per-token code with relative_index(p, q) = code(p) - code(q) + code_offset(grid) for any two
    regional positions p, q: the index is linear in (t, h, w), so a block of indices is one
    broadcast subtraction instead of the divisions and selects of relative_index."""
    t, h, w = grid
    hw = h * w
    return ((pos // hw) * (2 * h - 1) + (pos // w) % h) * (2 * w - 1) + pos % w


def relative_bias(
    table: torch.Tensor, pos_q: torch.Tensor, pos_k: torch.Tensor, grid: tuple[int, int, int]
) -> torch.Tensor:
    """Bias for queries at pos_q [B, Nq] and keys at pos_k [B, Nk]: returns [B, heads, Nq, Nk]."""
    index = relative_index(pos_q[..., :, None], pos_k[..., None, :], grid)
    return lookup(table, index).movedim(-1, -3)


def lookup(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """table[index] -> [*index.shape, heads]; index_select's backward (index_add) is several times
    faster on CPU than advanced indexing's (index_put with accumulation)."""
    return table.index_select(0, index.reshape(-1)).view(*index.shape, table.shape[1])


def sequence_index(pos: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """Table index of every pair of [CLS, tokens at pos [B, N]]: [B, 1+N, 1+N] (int64: the
    backward of index_select, index_add, is several times slower with int32 indices on CPU)."""
    n = table_size(grid)
    code = position_code(pos, grid).long()
    index = code.new_empty(pos.shape[0], pos.shape[1] + 1, pos.shape[1] + 1)
    torch.sub(code[:, :, None] + code_offset(grid), code[:, None, :], out=index[:, 1:, 1:])
    index[:, 0, 1:] = n - 3
    index[:, 1:, 0] = n - 2
    index[:, 0, 0] = n - 1
    return index


def sequence_bias(table: torch.Tensor, pos: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """Bias of every pair of [CLS, tokens at pos [B, N]]: [B, heads, 1+N, 1+N], equal to
    relative_bias(table, [-1, pos], [-1, pos]) but gathered straight into the heads-first layout
    from the (small) transposed table, so no [..., heads]-last tensor is permuted and copied."""
    index = sequence_index(pos, grid)
    b, m = index.shape[0], index.shape[1]
    bias = table.t().contiguous().index_select(1, index.view(-1)).view(table.shape[1], b, m, m)
    return bias.transpose(0, 1)


def special_bias(table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-head biases (CLS->token, token->CLS, CLS->CLS), each [heads]."""
    return table[-3], table[-2], table[-1]


TEMPORAL_RESIZES = ("symmetric", "interpolate_nearest")


def _temporal_source(t_src: int, t_dst: int, rule: str = "symmetric") -> torch.Tensor:
    """For each temporal offset d' of a t_dst-frame table, the offset of a t_src-frame table it takes
    (as a row index 0 .. 2 t_src - 2). t_src = 1 tiles the 2D table over every offset (eq. 26-27).

    symmetric: nearest neighbour in time (eq. 23 applied to offsets): a clip of t_dst frames spans
    the same video as one of t_src frames, so offset d' corresponds to d' * t_src / t_dst, rounded
    half away from zero (the table stays symmetric) and clamped to the source range.
    interpolate_nearest: what the released code does, torch's F.interpolate(mode="nearest") over
    the 2 t - 1 offset rows: row i takes row floor(i (2 t_src - 1) / (2 t_dst - 1)). Asymmetric: at
    4 -> 8 frames offset +1 takes offset 0 while -1 takes -1. Integer arithmetic here; tests check
    it against F.interpolate.
    """
    if rule == "interpolate_nearest":
        rows_src, rows_dst = 2 * t_src - 1, 2 * t_dst - 1
        return torch.arange(rows_dst, dtype=torch.long) * rows_src // rows_dst
    if rule != "symmetric":
        raise ValueError(f"temporal resize rule must be one of {TEMPORAL_RESIZES}, got {rule!r}")
    offsets = torch.arange(-(t_dst - 1), t_dst, dtype=torch.float64)
    scaled = torch.sign(offsets) * torch.floor(offsets.abs() * t_src / t_dst + 0.5)
    return scaled.clamp(-(t_src - 1), t_src - 1).long() + (t_src - 1)


def resize_table(
    table: torch.Tensor, src_grid: tuple[int, int, int], dst_grid: tuple[int, int, int], rule: str = "symmetric"
) -> torch.Tensor:
    """Resize a relative position bias table [table_size(src), heads] to dst_grid along time, by
    `rule` (TEMPORAL_RESIZES, _temporal_source).

    The spatial extent must agree; a 2D table is src_grid = (1, H, W).
    """
    if tuple(src_grid[1:]) != tuple(dst_grid[1:]):
        raise ValueError(
            f"relative position table has spatial grid {tuple(src_grid[1:])}, expected "
            f"{tuple(dst_grid[1:])} (image_size / patch_size must match the checkpoint)"
        )
    if table.shape[0] != table_size(src_grid):
        raise ValueError(
            f"relative position table has {table.shape[0]} rows, expected "
            f"{table_size(src_grid)} for grid {tuple(src_grid)}"
        )
    t_src, h, w = src_grid
    t_dst = dst_grid[0]
    heads = table.shape[1]
    regional = table[:-3].reshape(2 * t_src - 1, (2 * h - 1) * (2 * w - 1), heads)
    regional = regional[_temporal_source(t_src, t_dst, rule).to(table.device)]
    return torch.cat([regional.reshape(-1, heads), table[-3:]], dim=0)
