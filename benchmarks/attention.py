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
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from svitt.models.relative_position import table_size, token_positions  # noqa: E402
from svitt.models.sparse_attention import attention, make_layout  # noqa: E402

HEADS, HEAD_DIM, SIDE = 12, 64, 14
BLOCKS = dict(local_blocks=1, random_blocks=3, block_size=56)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


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

    step()  # warm-up (and compilation for flex)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_bytes()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"kernel": kernel, "frames": frames, "tokens": n + 1, "seconds": min(times),
            "seconds_all": times, "peak_bytes": max(peak, 0)}


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
    runs = []
    for frames in args.frames:
        for kernel in kernels:
            cmd = [sys.executable, __file__, "--worker", kernel, str(frames), "--device", args.device,
                   "--dtype", args.dtype, "--repeats", str(args.repeats)]
            result = subprocess.run(cmd, capture_output=True, text=True)
            if result.returncode:
                runs.append({"kernel": kernel, "frames": frames, "error": result.stderr.strip()[-2000:]})
            else:
                runs.append(json.loads(result.stdout.strip().splitlines()[-1]))
            print(json.dumps(runs[-1])[:200], flush=True)
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
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(args.out)
    print(json.dumps(report["targets"], indent=2))


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
