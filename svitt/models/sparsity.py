"""Attention-edge accounting of SViTT (paper appendix A.1, eq. 17-19).

Visual layer l (1-indexed) of L_v: |E_v^(l)| = N_v^(l) (K_l + K_r) G with edge sparsity, or N_v^(l)^2
when dense. N_v^(1) = T' H' W' + 1 (the +1 is the visual CLS token: the dense row of Table 1,
7.47M = 12 * 785^2 + 3 * 32 * 785 at T = 4, needs it). After every layer in prune_layers,
N <- ceil(q_v N). Multimodal layer l of L_m: |E_m^(l)| = N_m^(l) N_t with N_m^(1) the visual output
length and N <- ceil(q_m N) after each multimodal layer. Sparsity
S = 1 - edges / (L_v N_v^2 + L_m N_t N_v) with the unpruned N_v = N_v^(1).

The formula is followed literally, like the paper: no block padding, no separate CLS rows, and
N (K_l + K_r) G is not capped at N^2 when the blocks cover more than the sequence (which happens
for Table 1's (1, 5, 56) hybrid row after the last pruning, N = 270 < 336).

How it matches the paper (tests/test_sparsity.py): taken literally, Table 1's dense and node-only
rows and Table 7's S exactly at the printed precision, Table 7's edges 1-1.4% low (1.46 / 2.58 /
4.58 M against 1.48 / 2.60 / 4.61). Table 7's edges and S are all reproduced at the printed
precision, and so is Table 1's (1, 3, 56) hybrid row, when q_m prunes no multimodal edge
(count_multimodal_pruning=False: every fusion layer attends over the visual output, 3 x 270 x 32
edges at T = 4); Table 1's node-only rows need the pruning (3.99 without q_m, 3.97 with it), so
the two tables were counted differently, and svitt.analysis.efficiency reports both counts. The edge-only
rows fit neither (2.19 / 3.24 against 2.14 / 3.21): they cannot be fitted by any
N (K_l + K_r) G + c with one shared N and c = the multimodal edges, nor by block padding, CLS
rows or a cap at the sequence length, so the printed Table 1 is not fully self-consistent.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from fractions import Fraction


def kept_count(num_tokens: int, keep_rate: float) -> int:
    """ceil(keep_rate * num_tokens), exact for decimal keep rates (0.7 * 550 is 385, not 386).

    The keep rate is read as the decimal it prints as, so float rounding cannot add a token.
    """
    return math.ceil(Fraction(str(float(keep_rate))) * num_tokens)


def _check_keep(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number in (0, 1], got {value!r}")
    if not 0.0 < float(value) <= 1.0:
        raise ValueError(f"{name} must be in (0, 1] (1 = no pruning), got {value}")
    return float(value)


def _keep_rates(keep, count: int, name: str, what: str) -> list[float]:
    """A float (same rate everywhere) or one rate per layer -> list of `count` rates."""
    if isinstance(keep, Sequence) and not isinstance(keep, str):
        if len(keep) != count:
            raise ValueError(f"{name} has {len(keep)} entries {list(keep)}, expected one per {what} ({count})")
        return [_check_keep(q, f"{name}[{i}]") for i, q in enumerate(keep)]
    return [_check_keep(keep, name)] * count


def _check_positive_int(value, name: str, allow_zero: bool = False) -> int:
    lowest = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < lowest:
        expected = "a non-negative integer" if allow_zero else "a positive integer"
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return int(value)


def _keys_per_query(local_blocks, random_blocks, block_size) -> int | None:
    """Validate the edge-sparsity triple; (K_l + K_r) G keys per query, or None for dense (all None)."""
    given = [local_blocks is not None, random_blocks is not None, block_size is not None]
    if not any(given):
        return None
    if not all(given):
        raise ValueError(
            "local_blocks, random_blocks and block_size must be all set (edge sparsity) or all None (dense), "
            f"got local_blocks={local_blocks!r}, random_blocks={random_blocks!r}, block_size={block_size!r}"
        )
    local_blocks = _check_positive_int(local_blocks, "local_blocks (K_l)")
    if local_blocks % 2 == 0:
        raise ValueError(f"local_blocks (K_l) must be odd so the local window is centred, got {local_blocks}")
    random_blocks = _check_positive_int(random_blocks, "random_blocks (K_r)", allow_zero=True)
    block_size = _check_positive_int(block_size, "block_size (G)")
    return (local_blocks + random_blocks) * block_size


def edge_count(
    frames: int,
    local_blocks: int | None,
    random_blocks: int | None,
    block_size: int | None,
    visual_keep: float | Sequence[float],
    multimodal_keep: float | Sequence[float],
    text_len: int = 32,
    image_size: int = 224,
    patch_size: int = 16,
    depth: int = 12,
    fusion_layers: int = 3,
    prune_layers: Sequence[int] = (4, 7, 10),
    tubelet_frames: int = 1,
    count_multimodal_pruning: bool = True,
) -> dict:
    """Attention edges and overall sparsity S of a SViTT model (eq. 17-19).

    frames: clip length T; tubelet_frames: frames per patch (T' = frames / tubelet_frames).
    local_blocks, random_blocks, block_size: K_l, K_r, G; all None = dense visual attention.
    visual_keep: q_v, a float or one rate per entry of prune_layers (1-indexed visual layers after
    which tokens are pruned); multimodal_keep: q_m, a float or one rate per fusion layer (applied
    after that layer). A keep rate of 1 means no pruning.
    count_multimodal_pruning: False counts every fusion layer at the visual output length, i.e.
    q_m reduces no edge: the count that reproduces Table 7's printed edges and S (module docstring).

    Returns {"edges": int, "sparsity": float, "dense_edges": int, "visual_edges": int,
    "multimodal_edges": int, "visual_tokens": [N_v^(l) for l = 1..depth] (input lengths, CLS
    included), "multimodal_tokens": [N_m^(l) for l = 1..fusion_layers]}.
    """
    frames = _check_positive_int(frames, "frames")
    tubelet_frames = _check_positive_int(tubelet_frames, "tubelet_frames")
    if frames % tubelet_frames:
        raise ValueError(f"frames={frames} must be divisible by tubelet_frames={tubelet_frames}")
    image_size = _check_positive_int(image_size, "image_size")
    patch_size = _check_positive_int(patch_size, "patch_size")
    if image_size % patch_size:
        raise ValueError(f"image_size={image_size} must be divisible by patch_size={patch_size}")
    text_len = _check_positive_int(text_len, "text_len")
    depth = _check_positive_int(depth, "depth")
    fusion_layers = _check_positive_int(fusion_layers, "fusion_layers", allow_zero=True)
    prune_layers = list(prune_layers)
    for layer in prune_layers:
        if isinstance(layer, bool) or not isinstance(layer, numbers.Integral) or not 1 <= layer <= depth:
            raise ValueError(f"prune_layers entries must be 1-indexed visual layers in [1, {depth}], got {layer!r}")
    prune_layers = [int(layer) for layer in prune_layers]
    if len(set(prune_layers)) != len(prune_layers):
        raise ValueError(f"prune_layers must not repeat a layer, got {prune_layers}")
    keys_per_query = _keys_per_query(local_blocks, random_blocks, block_size)
    visual_rates = dict(zip(prune_layers, _keep_rates(visual_keep, len(prune_layers), "visual_keep", "prune layer")))
    multimodal_rates = _keep_rates(multimodal_keep, fusion_layers, "multimodal_keep", "fusion layer")

    grid = image_size // patch_size
    n_visual = (frames // tubelet_frames) * grid * grid + 1  # + CLS

    visual_tokens, visual_edges = [], 0
    n = n_visual
    for layer in range(1, depth + 1):
        visual_tokens.append(n)
        visual_edges += n * (n if keys_per_query is None else keys_per_query)  # eq. 17; dense: N^2
        if layer in visual_rates:
            n = kept_count(n, visual_rates[layer])

    multimodal_tokens, multimodal_edges = [], 0
    for rate in multimodal_rates:
        multimodal_tokens.append(n)
        multimodal_edges += n * text_len  # eq. 18
        if count_multimodal_pruning:
            n = kept_count(n, rate)

    edges = visual_edges + multimodal_edges
    dense_edges = depth * n_visual**2 + fusion_layers * text_len * n_visual
    return {
        "edges": edges,
        "sparsity": 1.0 - edges / dense_edges,  # eq. 19
        "dense_edges": dense_edges,
        "visual_edges": visual_edges,
        "multimodal_edges": multimodal_edges,
        "visual_tokens": visual_tokens,
        "multimodal_tokens": multimodal_tokens,
    }
