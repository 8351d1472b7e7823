"""One training step (forward + backward + AdamW) of the full SViTT model, per sparsity mode.

Modes as in paper Table 2: dense; edge (K_l, K_r, G) = (1, 3, 56); node (q_v per Table 9:
0.7 / 0.6 / 0.5 at T = 4 / 8 / 16, q_m = 0.1); hybrid (both). VTC + VTM + MLM on a batch of
clips; time and peak memory per clip. Each (mode, T) runs in a fresh subprocess so its peak memory
is its own (CUDA: max_memory_allocated; CPU: growth of peak RSS over the RSS before the step).

    python benchmarks/train_step.py --size base   # BEiT-B + BERT-base (GPU)
    python benchmarks/train_step.py --size cpu    # reduced width, for a CPU
Writes JSON (default benchmarks/results/train_step_<size>_<device>.json) with the T = 16 targets:
hybrid at most 0.5x the time and 0.25x the peak memory of dense.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch
from common import measure, run_worker, write_report

from svitt.models.losses import mask_tokens
from svitt.models.svitt import SViTT

KEEP = {4: 0.7, 8: 0.6, 16: 0.5}
SIZES = {
    "base": {"video": {"preset": "beit_base"}, "text": {"preset": "bert_base"}, "embed_dim": 256},
    "cpu": {
        "video": {"preset": "beit_base", "width": 192, "heads": 3},
        "text": {"preset": "bert_base", "width": 192, "heads": 3, "intermediate_size": 768},
        "embed_dim": 128,
    },
}


def model_config(size: str, mode: str, frames: int) -> dict:
    cfg = json.loads(json.dumps(SIZES[size]))
    cfg["video"]["frames"] = frames
    if mode in ("edge", "hybrid"):
        cfg["video"].update(local_blocks=1, random_blocks=3, block_size=56)
    if mode in ("node", "hybrid"):
        cfg["video"]["visual_keep"] = KEEP[frames]
        cfg["text"]["multimodal_keep"] = 0.1
    return cfg


def run_one(size: str, mode: str, frames: int, batch: int, device: str, precision: str, repeats: int) -> dict:
    torch.manual_seed(0)
    model = SViTT(model_config(size, mode, frames)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    video = torch.randn(batch, frames, 3, 224, 224, device=device)
    ids = torch.randint(1000, 30000, (batch, 32), device=device)
    ids[:, 0] = 101
    mask = torch.ones_like(ids)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    def step():
        mlm_ids, labels = mask_tokens(ids, mask, 30522, 103, [0, 100, 101, 102, 103], 0.15)
        with torch.autocast(device, dtype=dtype, enabled=dtype is not None):
            losses = model(video, ids, mask, mlm_ids=mlm_ids, mlm_labels=labels)
        sum(losses.values()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    timing = measure(step, device, repeats)
    return {
        "mode": mode,
        "frames": frames,
        "batch": batch,
        "seconds_per_clip": timing["seconds"] / batch,
        "peak_bytes_per_clip": timing["peak_bytes"] / batch,
        "seconds_all": timing["seconds_all"],
    }


def targets(runs: list[dict]) -> dict:
    by = {(r["mode"], r["frames"]): r for r in runs if "error" not in r}
    dense, hybrid = by.get(("dense", 16)), by.get(("hybrid", 16))
    if not dense or not hybrid:
        return {"note": "dense or hybrid at T=16 missing (see errors)"}
    time_ratio = hybrid["seconds_per_clip"] / dense["seconds_per_clip"]
    mem_ratio = hybrid["peak_bytes_per_clip"] / dense["peak_bytes_per_clip"]
    return {
        "T16_time_ratio_hybrid_vs_dense": round(time_ratio, 3),
        "T16_time_target": 0.5,
        "T16_time_met": time_ratio <= 0.5,
        "T16_memory_ratio_hybrid_vs_dense": round(mem_ratio, 3),
        "T16_memory_target": 0.25,
        "T16_memory_met": mem_ratio <= 0.25,
    }


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="cpu")
    p.add_argument("--modes", nargs="+", default=["dense", "edge", "node", "hybrid"])
    p.add_argument("--frames", type=int, nargs="+", default=[4, 8, 16])
    p.add_argument("--batch", type=int, default=2, help="clips per step (VTC/VTM need >= 2)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", type=Path)
    p.add_argument("--worker", nargs=2, metavar=("MODE", "FRAMES"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(
            json.dumps(
                run_one(
                    args.size,
                    args.worker[0],
                    int(args.worker[1]),
                    args.batch,
                    args.device,
                    args.precision,
                    args.repeats,
                )
            )
        )
        return
    extra = [
        "--size",
        args.size,
        "--batch",
        str(args.batch),
        "--device",
        args.device,
        "--precision",
        args.precision,
        "--repeats",
        str(args.repeats),
    ]
    runs = [
        run_worker(__file__, [mode, str(frames)], extra, {"mode": mode, "frames": frames})
        for frames in args.frames
        for mode in args.modes
    ]
    report = {
        "benchmark": "SViTT training step (VTC + VTM + MLM, AdamW), per clip",
        "size": args.size,
        "model": SIZES[args.size],
        "batch": args.batch,
        "precision": args.precision,
        "device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu",
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "runs": runs,
        "targets": targets(runs),
    }
    write_report(args.out or Path(f"benchmarks/results/train_step_{args.size}_{args.device}.json"), report)


if __name__ == "__main__":
    main()
