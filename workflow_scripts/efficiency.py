#!/usr/bin/env python
"""Efficiency table (SViTT Tables 2 and 7): dense / edge / node / hybrid sparsity at each clip
length, at full BEiT-B + BERT-base size, on a CPU.

    python workflow_scripts/efficiency.py --frames 4 8 16 --modes dense edge node hybrid \\
        --out-json results/analysis/efficiency.json --out-csv results/analysis/efficiency.csv

Per row: attention edges and sparsity S (eq. 17-19), inference GFLOPs of one video-text pair
(torch.utils.flop_counter on the meta device) and training memory per clip (--memory meta: counted
on the meta device; cuda: measured; auto: cuda when present; none: skipped), beside the paper's
numbers, and the checks against Tables 7 and 2. See svitt/analysis/efficiency.py for the conventions.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # svitt from this repository

COLUMNS = [
    "frames",
    "mode",
    "local_blocks",
    "random_blocks",
    "block_size",
    "visual_keep",
    "multimodal_keep",
    "edges_m",
    "sparsity",
    "edges_m_table7",
    "sparsity_table7",
    "gflops",
    "memory_gb",
    "memory_method",
    "paper_edges_m",
    "paper_sparsity",
    "paper_gflops",
    "paper_memory_gb",
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, nargs="+", default=[4, 8, 16])
    p.add_argument("--modes", nargs="+", default=["dense", "edge", "node", "hybrid"])
    p.add_argument(
        "--model-json",
        default='{"video": {"preset": "beit_base"}, "text": {"preset": "bert_base"}, "embed_dim": 256}',
        help="the `model` config section as JSON",
    )
    p.add_argument("--blocks", type=int, nargs=3, default=[1, 3, 56], metavar=("K_L", "K_R", "G"))
    p.add_argument("--multimodal-keep", type=float, default=0.1)
    p.add_argument("--text-len", type=int, default=32)
    p.add_argument("--memory", choices=["auto", "meta", "cuda", "none"], default="auto")
    p.add_argument("--out-json", required=True, type=Path)
    p.add_argument("--out-csv", required=True, type=Path)
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    from tqdm import tqdm

    from svitt.analysis import efficiency
    from svitt.io import atomic_write_csv, atomic_write_json

    memory = {"auto": "cuda" if torch.cuda.is_available() else "meta", "none": None}.get(args.memory, args.memory)
    base = json.loads(args.model_json)
    at_paper_size = efficiency.paper_size(base)
    grid = [(frames, mode) for frames in args.frames for mode in args.modes]
    rows = []
    for frames, mode in tqdm(grid, desc="efficiency", disable=args.no_progress):
        overrides = efficiency.mode_overrides(mode, frames, tuple(args.blocks), multimodal_keep=args.multimodal_keep)
        row = {
            "frames": frames,
            "mode": mode,
            **{k: overrides["video"][k] for k in ("local_blocks", "random_blocks", "block_size", "visual_keep")},
            "multimodal_keep": overrides["text"]["multimodal_keep"],
        }
        row.update(efficiency.cost_row(efficiency.with_overrides(base, overrides), args.text_len, memory))
        paper = efficiency.TABLE2.get((frames, mode)) if at_paper_size else None
        table7 = efficiency.TABLE7.get(frames) if mode == "hybrid" and at_paper_size else None
        row.update(
            {
                "paper_gflops": paper[0] if paper else None,
                "paper_memory_gb": paper[1] if paper else None,
                "paper_edges_m": table7["edges_m"] if table7 else None,
                "paper_sparsity": table7["sparsity"] if table7 else None,
            }
        )
        rows.append(row)
        print(
            json.dumps({k: row.get(k) for k in ("frames", "mode", "edges_m", "sparsity", "gflops", "memory_gb")}),
            flush=True,
        )
    checks = efficiency.paper_checks(rows) if at_paper_size else []
    report = {
        "rows": rows,
        "checks": checks,
        "model": base,
        "model_name": efficiency.model_name(base),
        "paper_size": at_paper_size,
        "text_len": args.text_len,
        "memory": memory,
        "conventions": {
            "gflops": "2 x multiply-adds of one video-text pair at inference (video encoder on one "
            "clip, text encoder, one matching score), torch.utils.flop_counter",
            "memory_gb": "training memory per clip in 1e9 bytes, fp32, peak at batch 2 minus batch 1 "
            "(counted: live tensor bytes on the meta device; cuda: max_memory_allocated)",
            "edges_m": "attention edges in millions, appendix eq. 17-19 (svitt.models.sparsity)",
            "edges_m_table7": "the same with every fusion layer at the visual output length "
            "(q_m prunes no edge): the count Table 7 prints",
        },
    }
    atomic_write_json(args.out_json, report)
    atomic_write_csv(args.out_csv, COLUMNS, [[row.get(c) for c in COLUMNS] for row in rows])
    for check in checks:
        print(
            ("ok   " if check["ok"] else "FAIL ") + f"{check['check']}: expected {check['expected']}, "
            f"got {check['got']}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
