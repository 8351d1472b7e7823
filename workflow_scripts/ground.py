#!/usr/bin/env python
"""Ego4D NLQ grounding, the CLI of svitt.evaluation.nlq.ground_nlq: train a grounder
(svitt.evaluation.grounding.GROUNDERS, evaluation.nlq.grounder.model) on SViTT-Ego window features
of the train split, evaluate it on val (R@1 / R@5 at IoU 0.3 / 0.5), next to the baseline that
predicts the query-independent most frequent windows.

    python workflow_scripts/ground.py videos --train nlq_train.json --val nlq_val.json --out videos.tsv
    python workflow_scripts/ground.py train --features results/nlq_features/egoclip \\
        --train nlq_train.json --val nlq_val.json --model results/pretrain/egoclip/model.safetensors \\
        --tokenizer DIR --config-json '{"epochs": 30}' \\
        --out results/eval/nlq/egoclip.json --out-dir results/nlq/egoclip

videos: the video_uid<TAB>split list of both annotation files (what download.py reads), so the
videos to extract follow the annotations.
train: --features is a folder from nlq_features.py --pt-dir ({video_uid}.pt + features.json); the
query encoder is the (frozen) text encoder of --model. Trains on train, evaluates on val. Writes
--out (metrics, baseline, skipped queries, settings, conventions) and, in --out-dir,
grounder.safetensors, metrics.jsonl (one row per epoch: losses and val recall) and
predictions_val.json in the Ego4D NLQ challenge format (what the official evaluate_ego4d_nlq.py
reads). A query whose window lies outside its clip, or whose clip has no features, is left out
and listed under "skipped" with the reason.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # svitt from this repository


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    videos = sub.add_parser("videos", help="video_uid<TAB>split list of the annotation files")
    train = sub.add_parser("train", help="train on the train split, evaluate on val")
    for q in (videos, train):
        q.add_argument("--train", required=True, type=Path, help="Ego4D nlq_train.json (v1 or v2)")
        q.add_argument("--val", required=True, type=Path, help="Ego4D nlq_val.json")
        q.add_argument("--out", required=True, type=Path)
    train.add_argument("--features", required=True, type=Path, help="per-video .pt folder with features.json")
    train.add_argument("--model", required=True, type=Path, help="SViTT model.safetensors: its text encoder")
    train.add_argument("--tokenizer", required=True)
    train.add_argument(
        "--config-json", default="{}", help="grounder settings (svitt.evaluation.grounding.GROUNDER_DEFAULTS)"
    )
    train.add_argument("--out-dir", required=True, type=Path)
    train.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    train.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads (the grounder's matrices are small: more threads mostly wait)",
    )
    train.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def list_videos(args, splits) -> int:
    from svitt.data.nlq import write_video_list

    count = write_video_list(args.out, splits)
    print(f"ground videos: {count} videos -> {args.out}")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    from svitt.data.nlq import read_nlq

    try:
        splits = {"train": read_nlq(args.train), "val": read_nlq(args.val)}
    except ValueError as error:  # another layout: the message names the key it expected
        print(f"ground: error: {error}", file=sys.stderr)
        return 2
    return list_videos(args, splits) if args.command == "videos" else train_and_evaluate(args, splits)


def train_and_evaluate(args, splits) -> int:
    """svitt.evaluation.nlq.ground_nlq, its outputs written atomically: --out-dir's
    metrics.jsonl, grounder.safetensors and predictions_val.json, then --out."""
    import torch

    from svitt.evaluation.nlq import NothingToGround, ground_nlq
    from svitt.io import atomic_write_bytes, atomic_write_json, write_safetensors

    torch.set_num_threads(args.threads)
    try:
        run = ground_nlq(
            splits,
            args.features,
            args.model,
            args.tokenizer,
            json.loads(args.config_json),
            device=args.device,
            progress=not args.no_progress,
        )
    except NothingToGround as error:
        raise SystemExit(f"ground: {error}") from None
    args.out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(args.out_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in run.rows).encode())
    write_safetensors(args.out_dir / "grounder.safetensors", run.grounder_state(), run.metadata)
    atomic_write_json(args.out_dir / "predictions_val.json", run.predictions)
    result = {**run.result, "predictions": str(args.out_dir / "predictions_val.json")}
    atomic_write_json(args.out, result)
    print(
        json.dumps(
            {
                "grounder": result["metrics"],
                "baseline": result["baseline"]["metrics"],
                "evaluated": result["evaluated"],
                "skipped": {k: len(v) for k, v in result["skipped"].items()},
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
