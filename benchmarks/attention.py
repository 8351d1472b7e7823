"""One BEiT attention layer, forward + backward: the project's kernels against the baselines.

BEiT-B width (12 heads x 64), one clip of T frames of 14 x 14 patches (N = 196 T + 1 tokens),
edge sparsity (K_l, K_r, G) = (1, 3, 56). A step is one layer as it trains: x [1, N, 768] ->
q/k/v projection -> attention -> backward of a fixed upstream gradient (x, the projection and the
bias table all get gradients). Variants:

  gather        this project's block-sparse kernel (svitt.models.sparse_attention, recompute in
                backward)
  gather_v1     the gather kernel before issue 14 (plain autograd), kept here as a baseline
  dense         this project's dense path (SDPA with the bias gathered from the table)
  released      the released SViTT sparse attention (models/sparse_xbeit.py of the public SViTT
                repository), re-implemented from its description: separate q/k/v projections,
                per-slot einsums over rolled/gathered key blocks, a Python loop over query blocks
                for the value aggregation and a (1+N)^2 int64 relative-position index buffer
  sdpa_table    torch SDPA with the bias gathered from the table through a stored index (timm BEiT)
  sdpa_fixed    torch SDPA with a fixed additive [H, N, N] bias held outside the step
  sdpa_learned  torch SDPA with a learned [H, N, N] bias parameter (requires_grad)
  flex          FlexAttention with the block mask (CUDA only: no backward on the CPU)
  sdpa_nobias   torch SDPA without any bias: the flash kernel where it applies, the floor of a
                dense layer (asked for by name only, as flex; benchmarks/gpu_check.py runs it)

The layer's size is a LayerSize (BEiT-B by default); benchmarks/gpu_check.py runs the same layer
at a tiny size for its dry run.

Each (variant, T) runs in its own process, rounds alternate the variants; time is the best step
after a warm-up, memory the peak above the post-warm-up state (CPU: peak RSS of the timed steps
over the RSS before them, and the exact peak of PyTorch's CPU allocator over one more step;
CUDA: max_memory_allocated). Per variant the summary takes the best time and the largest peak
over the rounds. Writes JSON and prints a Markdown table.

    python benchmarks/attention.py --threads 2      # -> benchmarks/results/attention_cpu.json
    python benchmarks/attention.py --quick          # T = 2, one round: a smoke run
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from common import measure, run_worker, write_report

from svitt.models.relative_position import (
    lookup,
    relative_index,
    sequence_index,
    special_bias,
    table_size,
    token_positions,
)
from svitt.models.sparse_attention import attention, make_layout

HEADS, HEAD_DIM, SIDE = 12, 64, 14
BLOCKS = dict(local_blocks=1, random_blocks=3, block_size=56)
VARIANTS = ("gather", "gather_v1", "dense", "released", "sdpa_table", "sdpa_fixed", "sdpa_learned")
BY_NAME = ("flex", "sdpa_nobias")  # run only when asked for


class LayerSize(NamedTuple):  # not a dataclass: tests load this file without registering it
    """Heads, head width, patches per side of a frame and the block sparsity (K_l, K_r, G)."""

    heads: int = HEADS
    head_dim: int = HEAD_DIM
    side: int = SIDE
    local_blocks: int = BLOCKS["local_blocks"]
    random_blocks: int = BLOCKS["random_blocks"]
    block_size: int = BLOCKS["block_size"]

    @property
    def width(self) -> int:
        return self.heads * self.head_dim

    @property
    def blocks(self) -> dict:
        return dict(local_blocks=self.local_blocks, random_blocks=self.random_blocks, block_size=self.block_size)


BEIT_B = LayerSize()


# --- the gather kernel before issue 14 (plain autograd keeps logits, bias and gathered blocks) ---


def gather_v1(q, k, v, table, pos, grid, layout):
    b, h, n, d = q.shape
    g, nb, slots = layout.block_size, layout.num_blocks, layout.block_ids.shape[1]
    scale = d**-0.5
    padded = nb * g
    full = F.pad(pos, (1, 0), value=-1)
    cls_bias = lookup(table, relative_index(full[:, :1, None], full[:, None, :], grid)).movedim(-1, -3)
    cls_probs = ((q[:, :, :1] @ k.transpose(-1, -2)) * scale + cls_bias).softmax(-1)
    cls_out = cls_probs @ v

    def blocks(x):
        return F.pad(x[:, :, 1:], (0, 0, 0, padded - (n - 1))).view(b, h, nb, g, d)

    qb, kb, vb = blocks(q), blocks(k), blocks(v)
    ids = layout.block_ids
    kg = kb.index_select(2, ids.reshape(-1)).view(b, h, nb, slots * g, d)
    vg = vb.index_select(2, ids.reshape(-1)).view(b, h, nb, slots * g, d)
    pos_pad = F.pad(pos, (0, padded - (n - 1))).view(pos.shape[0], nb, g)
    pos_k = pos_pad[:, ids].reshape(pos.shape[0], nb, slots * g)
    index = relative_index(pos_pad[..., :, None], pos_k[..., None, :], grid)
    bias = lookup(table, index).permute(0, 4, 1, 2, 3)
    key_token = ids[:, :, None] * g + torch.arange(g, device=ids.device)
    key_ok = (layout.valid[:, :, None] & (key_token < n - 1)).reshape(nb, slots * g)
    logits = (qb @ kg.transpose(-1, -2)) * scale + bias
    logits = logits.masked_fill(~key_ok[:, None, :], float("-inf"))
    _, tok_to_cls, _ = special_bias(table)
    cls_logit = (qb @ k[:, :, :1, None].transpose(-1, -2)) * scale + tok_to_cls.view(1, h, 1, 1, 1)
    probs = torch.cat([logits, cls_logit], dim=-1).softmax(-1)
    out = probs[..., :-1] @ vg + probs[..., -1:] * v[:, :, :1, None]
    return torch.cat([cls_out, out.reshape(b, h, padded, d)[:, :, : n - 1]], dim=2)


# --- the released SViTT sparse attention, re-implemented from its description ---


class ReleasedSparseAttention(nn.Module):
    """Released SViTT BEiT sparse self-attention (CLS first, one shared position order).

    The CLS query attends densely; regional queries in blocks of G attend to CLS, K_l local blocks
    (the key blocks rolled along the block axis, wrapping at the ends) and K_r random non-local
    blocks (drawn per call, gathered). Logits: one einsum per key slot into a
    [B, H, blocks, slots, G, G] buffer, rearranged to [B, H, blocks, G, slots G] and concatenated
    after the CLS column; bias from the stored (1+N)^2 index buffer (the query rows, then the keys
    of each query block); values: a Python loop over query blocks, each gathering its value blocks.
    random_ids [blocks, K_r] fixes the random blocks (tests); padding keys are not masked.
    """

    def __init__(self, grid, heads: int, head_dim: int, local_blocks: int, random_blocks: int, block_size: int):
        super().__init__()
        width = heads * head_dim
        self.heads, self.head_dim, self.grid = heads, head_dim, grid
        self.local_blocks, self.random_blocks, self.block_size = local_blocks, random_blocks, block_size
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(width, width, bias=False)
        self.value = nn.Linear(width, width)
        self.table = nn.Parameter(torch.zeros(table_size(grid), heads))
        # Same index values as the project's relative_index, held as an int64 buffer.
        seq = torch.cat([torch.tensor([-1]), token_positions(grid)])
        self.register_buffer("index", relative_index(seq[:, None], seq[None, :], grid).long())

    def _bias(self, q_idx, k_idx):
        """Bias [H, len(q_idx), k_idx.shape[-1]] for query rows and per-row key columns."""
        rows = self.index[q_idx]  # advanced indexing copies the rows
        cols = rows.gather(1, k_idx) if k_idx.dim() == 2 else rows[:, k_idx]
        return self.table[cols.flatten()].view(*cols.shape, self.heads).permute(2, 0, 1).contiguous()

    def _random_blocks(self, nb, device):
        scores = torch.rand(nb, nb, device=device)
        half = self.local_blocks // 2
        for r in range(-half, half + 1):
            scores[torch.arange(nb), (torch.arange(nb) + r) % nb] = 0  # never a local block
        return scores.topk(self.random_blocks, dim=-1).indices.sort(dim=1).values

    def forward(self, x, random_ids=None):
        b, n, _ = x.shape
        h, d, g = self.heads, self.head_dim, self.block_size

        def heads(t):
            return t.view(b, n, h, d).transpose(1, 2)

        q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
        scale = d**-0.5
        tokens = torch.arange(n, device=x.device)
        # CLS row: dense.
        cls_sim = torch.einsum("bhid,bhjd->bhij", q[:, :, :1], k) * scale + self._bias(tokens[:1], tokens)
        cls_out = torch.einsum("bhij,bhjd->bhid", cls_sim.softmax(-1), v)
        # Regional rows: blocks (zero padded).
        cls_k, cls_v = k[:, :, :1], v[:, :, :1]
        pad = -(n - 1) % g
        nb = (n - 1 + pad) // g

        def blockify(t):
            return F.pad(t[:, :, 1:], (0, 0, 0, pad)).view(b, h, nb, g, d)

        qb, kb, vb = blockify(q), blockify(k), blockify(v)
        slots = self.local_blocks + self.random_blocks
        sim = q.new_empty(b, h, nb, slots, g, g)
        block_idx = torch.zeros(nb, slots, dtype=torch.long, device=x.device)
        half = self.local_blocks // 2
        for s, r in enumerate(range(-half, half + 1)):
            sim[:, :, :, s] = torch.einsum("bhnid,bhnjd->bhnij", qb, kb.roll(-r, dims=2))
            block_idx[:, s] = (torch.arange(nb, device=x.device) + r) % nb  # kb.roll(-r)'s blocks
        if self.random_blocks:
            rand = self._random_blocks(nb, x.device) if random_ids is None else random_ids
            block_idx[:, self.local_blocks :] = rand
            gather_idx = rand[None, None, :, :, None, None].expand(b, h, nb, self.random_blocks, g, d)
            for s in range(self.random_blocks):
                picked = kb.gather(2, gather_idx[:, :, :, s])
                sim[:, :, :, self.local_blocks + s] = torch.einsum("bhnid,bhnjd->bhnij", qb, picked)
        sim = sim.permute(0, 1, 2, 4, 3, 5).reshape(b, h, nb, g, slots * g)
        sim = torch.cat([torch.einsum("bhnid,bhjd->bhnij", qb, cls_k), sim], -1) * scale
        # Bias: keys of each query block (token indices, CLS = 0), one row per query.
        q_tok = F.pad(tokens[1:], (0, pad)).view(nb, g)
        k_tok = torch.cat([tokens.new_zeros(nb, 1), q_tok[block_idx].flatten(1)], 1)
        k_tok = k_tok.repeat_interleave(g, 0)[: n - 1]
        bias = F.pad(self._bias(tokens[1:], k_tok), (0, 0, 0, pad))
        attn = (sim + bias.view(1, h, nb, g, -1)).softmax(-1)
        out = q.new_empty(b, h, nb, g, d)
        for m in range(nb):
            v_row = torch.cat([cls_v, vb.index_select(2, block_idx[m]).flatten(2, 3)], 2)
            out[:, :, m] = torch.einsum("bhij,bhjd->bhid", attn[:, :, m], v_row)
        out = out.flatten(2, 3)[:, :, : n - 1]
        return torch.cat([cls_out, out], 2).transpose(1, 2).reshape(b, n, h * d)


# --- one layer per variant ---


class ProjectLayer(nn.Module):
    """The project's q/k/v projection (BEiT: q and v biases) and attention(...)."""

    def __init__(self, grid, kernel, size: LayerSize = BEIT_B):
        super().__init__()
        self.grid, self.kernel, self.size = grid, kernel, size
        width, heads = size.width, size.heads
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(width))
        self.v_bias = nn.Parameter(torch.zeros(width))
        self.table = nn.Parameter(torch.zeros(table_size(grid), heads))
        self.generator = torch.Generator().manual_seed(0)
        if kernel == "sdpa_learned":  # [1, H, N, N], built outside the step
            self.fixed_bias = nn.Parameter(torch.randn(1, heads, self.tokens, self.tokens))
        if kernel == "sdpa_fixed":
            self.register_buffer("fixed_bias", torch.randn(1, heads, self.tokens, self.tokens))
        if kernel == "sdpa_table":  # timm BEiT: a stored index, the table gathered every step
            self.register_buffer("index", sequence_index(token_positions(grid)[None], grid)[0].long())

    @property
    def tokens(self) -> int:
        return 1 + self.grid[0] * self.grid[1] * self.grid[2]

    def forward(self, x):
        b, n, _ = x.shape
        size = self.size
        bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        qkv = F.linear(x, self.qkv.weight, bias).view(b, n, 3, size.heads, size.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        pos = token_positions(self.grid, x.device)[None]
        if self.kernel.startswith("sdpa"):
            if self.kernel == "sdpa_table":
                mask = self.table[self.index.view(-1)].view(n, n, size.heads).permute(2, 0, 1)[None]
            elif self.kernel == "sdpa_nobias":
                mask = None
            else:
                mask = self.fixed_bias
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        elif self.kernel == "dense":
            out, _ = attention(q, k, v, self.table, pos, self.grid, None, "dense")
        else:
            layout = make_layout(
                n - 1, size.block_size, size.local_blocks, size.random_blocks, self.generator, x.device
            )
            if self.kernel == "gather_v1":
                out = gather_v1(q, k, v, self.table, pos, self.grid, layout)
            else:
                out, _ = attention(q, k, v, self.table, pos, self.grid, layout, self.kernel)
        return out.transpose(1, 2).reshape(b, n, size.width)


def build_layer(variant: str, grid, size: LayerSize = BEIT_B) -> nn.Module:
    if variant == "released":
        return ReleasedSparseAttention(grid, size.heads, size.head_dim, **size.blocks)
    return ProjectLayer(grid, variant, size)


def run_one(
    variant: str,
    frames: int,
    device: str,
    repeats: int,
    dtype: torch.dtype,
    size: LayerSize = BEIT_B,
    autocast: torch.dtype | None = None,
) -> dict:
    """One (variant, T): weights and input in `dtype`; with `autocast` (bf16 / fp16) the step runs
    under torch.autocast as training does (fp32 weights and table, half-precision q, k, v)."""
    torch.manual_seed(0)
    grid = (frames, size.side, size.side)
    layer = build_layer(variant, grid, size).to(device, dtype)
    with torch.no_grad():
        for p in layer.parameters():  # non-trivial weights: zero tables and biases are special
            p.normal_(0, 0.02)
    n = 1 + frames * size.side * size.side
    x = torch.randn(1, n, size.width, device=device, dtype=dtype, requires_grad=True)
    upstream = torch.randn(1, n, size.width, device=device, dtype=autocast or dtype)
    params = [x, *layer.parameters()]

    def step():
        with torch.autocast(device, dtype=autocast, enabled=autocast is not None):
            out = layer(x)
        out.backward(upstream)
        for p in params:
            p.grad = None

    return {"variant": variant, "frames": frames, "tokens": n, **measure(step, device, repeats)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument(
        "--variants",
        nargs="+",
        default=None,
        choices=VARIANTS + BY_NAME,
        help="default: all but sdpa_nobias (flex only on CUDA)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--repeats", type=int, default=4, help="timed steps after the warm-up")
    parser.add_argument("--rounds", type=int, default=2, help="alternating passes over the variants")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="T = 2, one round, two steps: a smoke run")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="default: benchmarks/results/attention_<device>.json (quick: not written)",
    )
    parser.add_argument("--worker", nargs=2, metavar=("VARIANT", "FRAMES"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(run_one(args.worker[0], int(args.worker[1]), args.device, args.repeats, dtype)))
        return
    if args.quick:
        args.frames, args.rounds, args.repeats = [2], 1, 2
    variants = args.variants or (VARIANTS + ("flex",) if args.device == "cuda" else VARIANTS)
    runs = [
        run_worker(
            __file__,
            [variant, str(frames)],
            [
                "--device",
                args.device,
                "--dtype",
                args.dtype,
                "--repeats",
                str(args.repeats),
                "--threads",
                str(torch.get_num_threads()),
            ],
            {"variant": variant, "frames": frames, "round": r},
        )
        for frames in args.frames
        for r in range(args.rounds)
        for variant in variants
    ]
    summary = _summary(runs)
    report = {
        "benchmark": "one BEiT-B attention layer (q/k/v projection + attention), forward + backward, batch 1",
        "blocks": BLOCKS,
        "device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu",
        "cpu_threads": torch.get_num_threads(),
        "dtype": args.dtype,
        "torch": torch.__version__,
        "repeats": args.repeats,
        "rounds": args.rounds,
        "runs": runs,
        "summary": summary,
        "targets": _targets(summary),
    }
    print(markdown_table(summary))
    if args.out or not args.quick:
        write_report(args.out or Path(f"benchmarks/results/attention_{args.device}.json"), report)
    else:
        print(json.dumps(report["targets"], indent=2))


def _summary(runs: list[dict]) -> list[dict]:
    """Per (variant, T): the best time over rounds and the largest peak (the conservative pair)."""
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        groups.setdefault((run["variant"], run["frames"]), []).append(run)
    rows = []
    for (variant, frames), group in groups.items():
        ok = [r for r in group if "error" not in r]
        row = {"variant": variant, "frames": frames}
        if ok:
            row.update(
                seconds=min(r["seconds"] for r in ok),
                peak_bytes=max(r["peak_bytes"] for r in ok),
                peak_bytes_all=[r["peak_bytes"] for r in ok],
            )
            if all("allocated_peak_bytes" in r for r in ok):
                row["allocated_peak_bytes"] = max(r["allocated_peak_bytes"] for r in ok)
        else:
            row["error"] = group[0]["error"][-300:]
        rows.append(row)
    return rows


def _ratio(summary, frames, a, b, key):
    by = {(r["variant"], r["frames"]): r for r in summary if "error" not in r}
    if (a, frames) not in by or (b, frames) not in by:
        return None
    return round(by[(a, frames)][key] / by[(b, frames)][key], 3)


def _targets(summary: list[dict]) -> dict:
    """Issue 14 at the largest T: gather memory <= 0.5x released (peak RSS and allocator peak) and
    time <= gather_v1's; dense no slower than SDPA with the table-gathered bias. Earlier: gather
    >= 3x faster than dense, <= 0.25x its memory."""
    frames = max(r["frames"] for r in summary)
    checks = {
        "memory_gather_vs_released": (_ratio(summary, frames, "gather", "released", "peak_bytes"), 0.5),
        "allocated_gather_vs_released": (_ratio(summary, frames, "gather", "released", "allocated_peak_bytes"), 0.5),
        "time_gather_vs_gather_v1": (_ratio(summary, frames, "gather", "gather_v1", "seconds"), 1.0),
        "time_dense_vs_sdpa_table": (_ratio(summary, frames, "dense", "sdpa_table", "seconds"), 1.0),
        "time_gather_vs_dense": (_ratio(summary, frames, "gather", "dense", "seconds"), 1 / 3),
        "memory_gather_vs_dense": (_ratio(summary, frames, "gather", "dense", "peak_bytes"), 0.25),
    }
    out = {"frames": frames}
    for name, (ratio, limit) in checks.items():
        met = None if ratio is None else ratio <= limit
        out[name] = {"ratio": ratio, "at_most": round(limit, 3), "met": met}
    return out


def markdown_table(summary: list[dict]) -> str:
    lines = ["| T | variant | time (s) | peak RSS (MB) | allocator peak (MB) |", "|---|---|---|---|---|"]
    order = VARIANTS + BY_NAME
    for r in sorted(summary, key=lambda r: (r["frames"], order.index(r["variant"]))):
        if "error" in r:
            lines.append(f"| {r['frames']} | {r['variant']} | error | {r['error'][-80:]!r} | |")
        else:
            peaks = "-".join(str(round(p / 2**20)) for p in sorted(set(r["peak_bytes_all"])))
            allocated = round(r["allocated_peak_bytes"] / 2**20) if "allocated_peak_bytes" in r else "-"
            lines.append(f"| {r['frames']} | {r['variant']} | {r['seconds']:.3f} | {peaks} | {allocated} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
