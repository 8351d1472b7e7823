#!/usr/bin/env python
"""Ego4D NLQ video features from an exported SViTT-Ego model (paper section 4.4).

    python workflow_scripts/nlq_features.py --model results/pretrain/egoclip/model.safetensors \\
        --shards resources/frames/ego_nlq/*.h5 --out results/nlq_features/egoclip.h5 --window 4 --stride 4

The shards hold whole videos extracted at a fixed fps (extract_frames.py --fps). Output: one HDF5
file, a float32 dataset [num_windows, D] per video (video [CLS] of each window of `window` frames
every `stride` frames) with attributes window, stride, start_frames and start_seconds (from the
stored frames' timestamps): per-video feature sequences as GroundNLQ-style grounding models read.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # svitt from this repository


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, type=Path, help="model.safetensors (model.json beside it)")
    p.add_argument("--shards", nargs="+", required=True)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--window", type=int, default=4, help="frames per clip (the model runs at this length)")
    p.add_argument("--stride", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    import h5py
    import torch

    from svitt.checkpoint import load_exported
    from svitt.data.datasets import FrameStore
    from svitt.data.transforms import EvalTransform
    from svitt.evaluation import extract_window_features
    from svitt.io import atomic_path

    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else (
        "cpu" if args.device == "auto" else args.device)
    model, info = load_exported(args.model, frames=args.window)
    data_cfg = info["train_config"]["data"]
    transform = EvalTransform(size=model.cfg["video"]["image_size"], mean=tuple(data_cfg["mean"]),
                              std=tuple(data_cfg["std"]))
    store = FrameStore(args.shards)
    ids = sorted(store.shard_of)
    with atomic_path(args.out) as tmp, h5py.File(tmp, "w") as out:
        out.attrs.update(model=str(args.model), stage=info["name"], window=args.window, stride=args.stride)
        for video_id, feats, starts in extract_window_features(model, store, ids, transform, args.window,
                                                               args.stride, args.batch_size, device,
                                                               not args.no_progress):
            timestamps = store.attrs(video_id)["timestamps"]
            ds = out.create_dataset(video_id, data=feats.numpy())
            ds.attrs.update(window=args.window, stride=args.stride, start_frames=starts.numpy(),
                            start_seconds=timestamps[starts.numpy()])
    print(f"nlq_features: {len(ids)} videos -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
