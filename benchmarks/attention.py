"""Dense attention (SDPA + relative bias) vs the edge-sparse kernels, forward + backward.

BEiT-B width (12 heads x 64), one clip, T = 4, 8, 16 frames of 14 x 14 patches (N = 196 T + 1),
blocks (K_l, K_r, G) = (1, 3, 56). Each (kernel, T) runs in a fresh subprocess so its peak memory
is its own: on CUDA torch.cuda.max_memory_allocated, on CPU the growth of peak RSS over the
process's RSS before the step. Writes JSON with per-run numbers and the T = 16 target ratios
(gather at least 3x faster than dense and at most 0.25x its peak memory).

    python benchmarks/attention.py --out benchmarks/results/attention_cpu.json
"""
from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch
from common import measure, run_worker, write_report

from svitt.models.relative_position import table_size, token_positions
from svitt.models.sparse_attention import attention, make_layout

HEADS, HEAD_DIM, SIDE = 12, 64, 14
BLOCKS = dict(local_blocks=1, random_blocks=3, block_size=56)


def run_one(kernel: str, frames: int, device: str, repeats: int, dtype: torch.dtype) -> dict:
    torch.manual_seed(0)
    grid = (frames, SIDE, SIDE)
    n = frames * SIDE * SIDE
    q, k, v = (torch.randn(1, HEADS, n + 1, HEAD_DIM, device=device, dtype=dtype, requires_grad=True)
               for _ in range(3))
    table = torch.randn(table_size(grid), HEADS, device=device, dtype=dtype, requires_grad=True)
    pos = token_positions(grid, device)[None]
    generator = torch.Generator().manual_seed(0)

    def step():
        layout = None if kernel == "dense" else make_layout(
            n, BLOCKS["block_size"], BLOCKS["local_blocks"], BLOCKS["random_blocks"], generator, device)
        out, _ = attention(q, k, v, table, pos, grid, layout, kernel=kernel)
        out.float().pow(2).mean().backward()
        for t in (q, k, v, table):
            t.grad = None

    return {"kernel": kernel, "frames": frames, "tokens": n + 1, **measure(step, device, repeats)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--kernels", nargs="+", default=None,
                        help="default: dense gather (and flex on CUDA)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/attention.json"))
    parser.add_argument("--worker", nargs=2, metavar=("KERNEL", "FRAMES"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    if args.worker:
        print(json.dumps(run_one(args.worker[0], int(args.worker[1]), args.device, args.repeats, dtype)))
        return
    kernels = args.kernels or (["dense", "gather", "flex"] if args.device == "cuda" else ["dense", "gather"])
    runs = [run_worker(__file__, [kernel, str(frames)],
                       ["--device", args.device, "--dtype", args.dtype, "--repeats", str(args.repeats)],
                       {"kernel": kernel, "frames": frames})
            for frames in args.frames for kernel in kernels]
    report = {
        "benchmark": "attention forward+backward, BEiT-B width (12 x 64), batch 1",
        "blocks": BLOCKS,
        "device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu",
        "cpu_threads": torch.get_num_threads(),
        "dtype": args.dtype,
        "torch": torch.__version__,
        "runs": runs,
        "targets": _targets(runs),
    }
    write_report(args.out, report)


def _targets(runs: list[dict]) -> dict:
    by = {(r["kernel"], r["frames"]): r for r in runs if "error" not in r}
    dense, gather = by.get(("dense", 16)), by.get(("gather", 16))
    if not dense or not gather:
        return {"note": "T=16 dense or gather run missing"}
    speedup = dense["seconds"] / gather["seconds"]
    memory = gather["peak_bytes"] / dense["peak_bytes"]
    return {
        "T16_speedup_gather_vs_dense": round(speedup, 2), "T16_speedup_target": 3.0,
        "T16_speedup_met": speedup >= 3.0,
        "T16_memory_ratio_gather_vs_dense": round(memory, 3), "T16_memory_ratio_target": 0.25,
        "T16_memory_met": memory <= 0.25,
    }


if __name__ == "__main__":
    main()
