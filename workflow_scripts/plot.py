#!/usr/bin/env python
"""Draw one figure of the workflow from result files.

    python workflow_scripts/plot.py training stage1=results/pretrain/stage1/metrics.jsonl ... --out F.png
    python workflow_scripts/plot.py retrieval stage1=results/eval/retrieval/demo_retrieval/stage1.json ...
    python workflow_scripts/plot.py egomcq egoclip=results/eval/egomcq/egoclip.json --out F.png
    python workflow_scripts/plot.py sparsity stage1=results/pretrain/stage1/model.json ... --out F.png
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # svitt from this repository

FIGURES = ("training", "retrieval", "egomcq", "sparsity")


def parse_pairs(items: list[str]) -> dict[str, str]:
    pairs = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"expected NAME=PATH, got {item!r}")
        pairs[name] = path
    return pairs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("figure", choices=FIGURES)
    p.add_argument("inputs", nargs="+", metavar="NAME=PATH")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    from svitt import plots

    draw = {"training": plots.plot_training_curves, "retrieval": plots.plot_retrieval,
            "egomcq": plots.plot_egomcq, "sparsity": plots.plot_sparsity}[args.figure]
    draw(parse_pairs(args.inputs), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
