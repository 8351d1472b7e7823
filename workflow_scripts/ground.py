#!/usr/bin/env python
"""Ego4D NLQ grounding: train a span grounder (svitt.evaluation.grounding) on SViTT-Ego window features of
the train split, evaluate it on val (R@1 / R@5 at IoU 0.3 / 0.5), next to the baseline that
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

CONVENTIONS = {
    "recall": "share of evaluated queries (percent) with a top-k window of IoU > threshold (strict), "
              "as Ego4D's evaluate_nlq_performance",
    "miou": "per query the mean IoU of its 3 best-overlapping windows, averaged (Ego4D's mIoU)",
    "windows": "seconds from the clip start; ground truth as annotated (clip_start_sec, clip_end_sec)",
    "decoding": "top-k (start <= end) feature pairs of the start x end probability (VSLNet on Ego4D); with "
                "settings.nms_iou, a pair whose IoU with a better kept one is >= nms_iou is skipped",
    "baseline": "the k feature spans training windows fall on most often, the same for every query",
    "skipped": "queries left out of every number here, with the reason",
}


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
    train.add_argument("--config-json", default="{}", help="grounder settings (svitt.evaluation.grounding.GROUNDER_DEFAULTS)")
    train.add_argument("--out-dir", required=True, type=Path)
    train.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    train.add_argument("--threads", type=int, default=1,
                       help="CPU threads (the grounder's matrices are small: more threads mostly wait)")
    train.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def list_videos(args, splits) -> int:
    from svitt.data.nlq import write_video_list

    count = write_video_list(args.out, splits)
    print(f"ground videos: {count} videos -> {args.out}")
    return 0


def encode_queries(model, tokenizer_dir, texts: list[str], text_len: int, device) -> list:
    """Token states [L_i, Dt] of each query from the frozen text encoder (padding removed)."""
    from svitt.data.pipeline import PairCollator, load_tokenizer
    from svitt.evaluation.encode import embed_texts

    collator = PairCollator(load_tokenizer(tokenizer_dir), text_len)
    out = []
    for first in range(0, len(texts), 1024):  # bounded memory on Ego4D's ~14k train queries
        _, hidden, mask = embed_texts(model, collator, texts[first:first + 1024], device=device)
        out += [h[m.bool()] for h, m in zip(hidden, mask)]
    return out


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
    import torch
    from safetensors.torch import save_file

    from svitt.training.checkpoint import load_exported
    from svitt.evaluation.metrics import nlq_recall
    from svitt.evaluation.nlq import read_feature_info
    from svitt.evaluation.grounding import (SpanGrounder, baseline_windows, build_items, most_frequent_spans,
                                 predict_windows, resolve_grounder_config, train_grounder)
    from svitt.io import atomic_path, atomic_write_bytes, atomic_write_json

    settings = resolve_grounder_config(json.loads(args.config_json))
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    info = read_feature_info(args.features)
    model, model_info = load_exported(args.model)
    model = model.to(device).eval()
    built = {}
    for name, split in splits.items():
        texts = encode_queries(model, args.tokenizer, [q.query for q in split.queries], settings["text_len"], device)
        built[name] = build_items(split, args.features, info["features_per_second"], texts)
    del model
    (train, train_skipped, train_clamped), (val, val_skipped, val_clamped) = built["train"], built["val"]
    for name, (items, _, _) in built.items():
        if not items:
            raise SystemExit(f"ground: no {name} query can be grounded ({splits[name].path}); "
                             f"skipped: {built[name][1][:3]}")
    val_truth = [list(item.window) for item in val]

    torch.manual_seed(settings["seed"])
    grounder = SpanGrounder(train[0].video.shape[1], train[0].text.shape[1], settings["dim"], settings["heads"],
                            settings["dropout"])

    def on_epoch(epoch):
        windows = predict_windows(grounder, val, settings["top_k"], settings["nms_iou"], device=device)
        metrics = nlq_recall(windows, val_truth)
        return {f"val_{k}": v for k, v in metrics.items()}

    rows = train_grounder(grounder, train, settings, device, not args.no_progress, on_epoch)
    predictions = predict_windows(grounder, val, settings["top_k"], settings["nms_iou"], device=device)
    metrics = nlq_recall(predictions, val_truth)
    spans = most_frequent_spans(train, settings["top_k"])
    baseline = nlq_recall(baseline_windows(spans, val), val_truth)

    args.out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(args.out_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
    with atomic_path(args.out_dir / "grounder.safetensors") as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in grounder.state_dict().items()}, str(tmp),
                  metadata={"settings": json.dumps(settings), "video_dim": str(train[0].video.shape[1]),
                            "text_dim": str(train[0].text.shape[1])})
    challenge = {"version": "1.0", "challenge": "ego4d_nlq_challenge",
                 "results": [{**splits["val"].queries[item.query_index].key, "predicted_times": windows}
                             for item, windows in zip(val, predictions)]}
    atomic_write_json(args.out_dir / "predictions_val.json", challenge)
    result = {
        "task": "nlq", "stage": model_info["name"], "model": str(args.model), "metrics": metrics,
        "baseline": {"name": "most frequent window", "metrics": baseline,
                     "spans": [list(s) for s in spans],  # feature indices; in seconds from the first feature:
                     "seconds": [[s / info["features_per_second"], (e + 1) / info["features_per_second"]]
                                 for s, e in spans]},
        "features": {**{k: info[k] for k in ("kind", "fps", "window", "stride", "features_per_second", "dim")},
                     "folder": str(args.features)},
        "annotations": {name: split.path for name, split in splits.items()},
        "queries": {name: len(split.queries) + len(split.skipped) for name, split in splits.items()},
        "evaluated": {"train": len(train), "val": len(val)},
        "skipped": {"train": train_skipped, "val": val_skipped},
        "clamped": {"train": train_clamped, "val": val_clamped},
        "settings": settings, "conventions": CONVENTIONS,
        "predictions": str(args.out_dir / "predictions_val.json"),
    }
    atomic_write_json(args.out, result)
    print(json.dumps({"grounder": metrics, "baseline": baseline, "evaluated": result["evaluated"],
                      "skipped": {k: len(v) for k, v in result["skipped"].items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
