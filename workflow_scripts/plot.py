#!/usr/bin/env python
"""Draw one figure of the workflow from result files.

    python workflow_scripts/plot.py training stage1=results/pretrain/stage1/metrics.jsonl ... --out F.png
    python workflow_scripts/plot.py retrieval stage1=results/eval/retrieval/demo_retrieval/stage1.json ...
    python workflow_scripts/plot.py egomcq egoclip=results/eval/egomcq/egoclip.json --out F.png
    python workflow_scripts/plot.py sparsity stage1=results/pretrain/stage1/model.json ... --out F.png
    python workflow_scripts/plot.py probing --task retrieval stage1=...json ... --out F.png
    python workflow_scripts/plot.py control stage1=...json --late stage1=...stage1_late.json --out F.png
    python workflow_scripts/plot.py sweep --kind edge stage1/edge_1_1_8=...json --reference stage1=...json
    python workflow_scripts/plot.py ablation 4:single=...json 4:expansion=...json --out F.png
    python workflow_scripts/plot.py efficiency report=results/analysis/efficiency.json --out F.png

NAME=PATH may repeat a NAME (one file per seed): the figure shows the mean and each value.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # svitt from this repository

FIGURES = ("training", "retrieval", "egomcq", "sparsity", "probing", "control", "sweep", "ablation", "efficiency")


def parse_pairs(items: list[str]) -> dict[str, list[str]]:
    """["a=x", "a=y", "b=z"] -> {"a": ["x", "y"], "b": ["z"]} (order kept)."""
    pairs: dict[str, list[str]] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"expected NAME=PATH, got {item!r}")
        pairs.setdefault(name, []).append(path)
    return pairs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("figure", choices=FIGURES)
    p.add_argument("inputs", nargs="+", metavar="NAME=PATH")
    p.add_argument("--out", required=True)
    p.add_argument(
        "--task",
        default="retrieval",
        help="probing: retrieval, egomcq, or any task whose results have numeric `metrics` (one panel each, e.g. qa)",
    )
    p.add_argument("--late", nargs="*", default=[], metavar="NAME=PATH", help="control: the late-fusion results")
    p.add_argument("--kind", default="edge", choices=["edge", "keep"], help="sweep: which grid")
    p.add_argument(
        "--reference",
        nargs="*",
        default=[],
        metavar="STAGE=PATH",
        help="sweep: evaluation of the unmodified checkpoints",
    )
    args = p.parse_args(argv)
    from svitt.analysis import plots

    inputs = parse_pairs(args.inputs)
    if args.figure == "probing":
        plots.plot_probing(inputs, args.out, task=args.task)
    elif args.figure == "control":
        plots.plot_control(inputs, parse_pairs(args.late), args.out)
    elif args.figure == "sweep":
        plots.plot_sweep(inputs, args.out, kind=args.kind, reference=parse_pairs(args.reference))
    elif args.figure == "efficiency":
        [[report]] = inputs.values()
        plots.plot_efficiency(report, args.out)
    else:
        draw = {
            "training": plots.plot_training_curves,
            "retrieval": plots.plot_retrieval,
            "egomcq": plots.plot_egomcq,
            "sparsity": plots.plot_sparsity,
            "ablation": plots.plot_ablation,
        }[args.figure]
        draw(inputs, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
