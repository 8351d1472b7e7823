"""Node sparsity (SViTT section 3.3): keep the tokens a CLS query attends to most.

Visual pruning ranks regional video tokens by the video CLS attention (eq. 10-11); multimodal
pruning ranks them by the text CLS cross-attention (eq. 12-13). Both keep ceil(q * N) regional
tokens in their original order, with CLS always kept at index 0, and carry each token's position
along so the relative position bias stays correct.
"""

from __future__ import annotations

import torch

from svitt.models.sparsity import kept_count


def select_tokens(scores: torch.Tensor, keep_rate: float) -> torch.Tensor:
    """Indices [B, k] of the k = ceil(q N) highest scores per row (at least one), sorted by
    position. The count is the one svitt.models.sparsity uses for edge accounting."""
    k = max(1, kept_count(scores.shape[1], keep_rate))
    return scores.topk(k, dim=1).indices.sort(dim=1).values


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B, N, ...] -> [B, k, ...] along dim 1."""
    shape = index.shape + x.shape[2:]
    return torch.gather(x, 1, index.view(index.shape + (1,) * (x.dim() - 2)).expand(shape))


def prune_tokens(x: torch.Tensor, pos: torch.Tensor, cls_attn: torch.Tensor, keep_rate: float):
    """Keep CLS and the top ceil(q N) regional tokens by `cls_attn`.

    x: [B, 1 + N, D] (CLS first); pos: [B or 1, N] positions of the regional tokens;
    cls_attn: [B, N]. Returns (x [B, 1 + k, D], pos [B, k]).
    """
    index = select_tokens(cls_attn, keep_rate)
    regional = gather_tokens(x[:, 1:], index)
    pos = torch.gather(pos.expand(x.shape[0], -1), 1, index)
    return torch.cat([x[:, :1], regional], dim=1), pos
