#!/usr/bin/env python
"""Ego4D NLQ video features from an exported SViTT-Ego model (paper section 4.4).

    python workflow_scripts/nlq_features.py --model results/pretrain/egoclip/model.safetensors \\
        --shards resources/frames/ego_nlq/*.h5 --window 4 --stride 4 --kind cls \\
        --out results/nlq_features/egoclip.h5 --pt-dir results/nlq_features/egoclip

The shards hold whole videos extracted at a fixed fps (extract_frames.py --fps). Each window of
`window` stored frames every `stride` frames is encoded as one clip; its feature is the video
[CLS] (--kind cls, the encoder's width) or its vision projection (--kind projected, embed_dim, as
EgoVLP saves). Outputs:
  --out     HDF5, a float32 dataset [num_windows, D] per video with attributes window, stride,
            start_frames, start_seconds; file attributes model, stage, kind, fps, features_per_second
  --pt-dir  the layout VSLNet's / GroundNLQ's Ego4D preparation reads: {video_uid}.pt (float32
            [N, D]) per video, feature_shapes.json {video_uid: N}, features.json (kind, fps, window,
            stride, features_per_second = fps / stride, dim, stage, model)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # svitt from this repository


def shard_fps(paths) -> float:
    """The fixed frame rate the shards were extracted at (all must agree)."""
    import h5py

    rates = set()
    for path in paths:
        with h5py.File(path, "r") as handle:
            rates.add(float(handle.attrs.get("fps", 0.0)))
    if len(rates) != 1 or not next(iter(rates)) > 0:
        raise ValueError(
            f"NLQ features need whole videos extracted at one fixed fps (extract_frames.py "
            f"--fps); the shards have fps {sorted(rates)}"
        )
    return rates.pop()


def check_fixed_rate(video_id: str, attrs: dict, fps: float) -> None:
    """A video sampled sparser than fps (longer than max_frames / fps, or recorded at fewer frames
    per second) would give windows that are not fps / stride apart."""
    stored, expected = len(attrs["timestamps"]), float(attrs["duration"]) * fps
    if abs(stored - expected) <= 1:
        return
    source_fps = float(attrs.get("source_fps", 0.0))
    cause = (
        f"the video itself has {source_fps:g} fps: lower the dataset's fps to at most that"
        if 0 < source_fps < fps
        else "raise the dataset's max_frames"
    )
    raise ValueError(
        f"video {video_id}: {stored} frames stored over {float(attrs['duration']):.1f} s, "
        f"not {fps:g} fps ({expected:.0f} frames): {cause}"
    )


def main(argv=None) -> int:
    from svitt.evaluation.nlq import FEATURE_KINDS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, type=Path, help="model.safetensors (model.json beside it)")
    p.add_argument("--shards", nargs="+", required=True)
    p.add_argument("--out", required=True, type=Path, help="HDF5 file of every video's features")
    p.add_argument("--pt-dir", type=Path, help="also write {video_uid}.pt per video here (VSLNet layout)")
    p.add_argument("--window", type=int, default=4, help="frames per clip (the model runs at this length)")
    p.add_argument("--stride", type=int, default=4)
    p.add_argument(
        "--kind",
        default="cls",
        choices=FEATURE_KINDS,
        help="cls: video [CLS] after the final norm; projected: its vision projection (EgoVLP)",
    )
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    import h5py

    from svitt.data.datasets import FrameStore, resolve_shards
    from svitt.evaluation import extract_window_features
    from svitt.evaluation.loading import load_for_evaluation
    from svitt.evaluation.nlq import VideoFeatureWriter
    from svitt.io import atomic_path

    fps = shard_fps(resolve_shards(args.shards))
    loaded = load_for_evaluation(args.model, args.device, frames=args.window)
    model, info, device = loaded.model, loaded.info, loaded.device
    transform = loaded.transform()
    store = FrameStore(args.shards)
    ids = sorted(store.shard_of)
    for video_id in ids:
        check_fixed_rate(video_id, store.attrs(video_id), fps)
    meta = {
        "model": str(args.model),
        "stage": info["name"],
        "kind": args.kind,
        "fps": fps,
        "window": args.window,
        "stride": args.stride,
        "features_per_second": fps / args.stride,
    }
    writer = VideoFeatureWriter(args.pt_dir, meta) if args.pt_dir else None
    with atomic_path(args.out) as tmp, h5py.File(tmp, "w") as out:
        out.attrs.update(meta)
        for video_id, feats, starts in extract_window_features(
            model,
            store,
            ids,
            transform,
            args.window,
            args.stride,
            args.batch_size,
            device,
            not args.no_progress,
            kind=args.kind,
        ):
            timestamps = store.attrs(video_id)["timestamps"]
            ds = out.create_dataset(video_id, data=feats.numpy())
            ds.attrs.update(
                window=args.window,
                stride=args.stride,
                start_frames=starts.numpy(),
                start_seconds=timestamps[starts.numpy()],
            )
            if writer:
                writer.add(video_id, feats)
    if writer:
        writer.close()
    print(
        f"nlq_features: {len(ids)} videos ({args.kind}, {fps / args.stride:g} features/s) -> {args.out}"
        + (f" and {args.pt_dir}/" if args.pt_dir else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
