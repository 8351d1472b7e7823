#!/usr/bin/env python
"""Generate the embedded demo corpus: synthetic H.264 clips with order-dependent captions,
time-reversed and event-order twins, retrieval annotations (test and finetuning splits),
order-dependent QA with an answer list, an egocentric part (egoclip.csv, egomcq.json, Ego4D NLQ
nlq_train.json / nlq_val.json) and a BERT WordPiece vocabulary. Deterministic from --seed. The folder is built under
a temporary name and renamed when complete. Layout: docs/data.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # svitt from this repository

from svitt.data.demo import DemoGeometry, DemoSizes, make_demo_corpus


def parse_args(argv=None) -> argparse.Namespace:
    d_sizes, d_geo = DemoSizes(), DemoGeometry()
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", required=True, type=Path, help="corpus folder to create (replaced if present)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-videos", type=int, default=d_sizes.train_videos, help="multiple of 4")
    p.add_argument("--test-videos", type=int, default=d_sizes.test_videos, help="multiple of 4")
    p.add_argument("--qa-videos", type=int, default=d_sizes.qa_videos, help="multiple of 4 (3/4 train, 1/4 test)")
    p.add_argument(
        "--qa-questions-per-video",
        type=int,
        default=d_sizes.qa_questions_per_video,
        help="of the 4 order-dependent question types",
    )
    p.add_argument(
        "--finetune-videos",
        type=int,
        default=d_sizes.finetune_videos,
        help="multiple of 4: the retrieval finetuning split (retrieval_train.json)",
    )
    p.add_argument("--ego-train-videos", type=int, default=d_sizes.ego_train_videos)
    p.add_argument(
        "--ego-mcq-videos",
        type=int,
        default=d_sizes.ego_mcq_videos,
        help="held-out ego videos for EgoMCQ (>= 5 when there are questions)",
    )
    p.add_argument("--ego-mcq-questions", type=int, default=d_sizes.ego_mcq_questions)
    p.add_argument("--ego-seconds", type=float, default=d_sizes.ego_seconds, help="length of each ego video")
    p.add_argument("--size", type=int, default=d_geo.size, help="frame height and width in pixels")
    p.add_argument("--frames", type=int, default=d_geo.frames, help="frames per clip (even)")
    p.add_argument("--fps", type=int, default=d_geo.fps)
    p.add_argument("--object-size", type=int, default=d_geo.object_size)
    p.add_argument("--travel", type=int, default=d_geo.travel, help="pixels an object moves in its event")
    p.add_argument("--ego-fps", type=int, default=d_geo.ego_fps)
    p.add_argument(
        "--ego-chunk-seconds",
        type=float,
        default=d_geo.ego_chunk_seconds,
        help="write ego videos as <uid>/<k>.mp4 chunks of this length; 0 for one file per video",
    )
    p.add_argument(
        "--ego-nlq-clip-seconds",
        type=float,
        default=d_geo.ego_nlq_clip_seconds,
        help="length of the NLQ clips cut from each ego video; 0 for the whole video",
    )
    p.add_argument("--workers", type=int, default=2, help="encoding threads")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    for name in ("train_videos", "test_videos", "qa_videos", "finetune_videos"):
        value = getattr(args, name)
        if value < 0 or value % 4:
            p.error(
                f"--{name.replace('_', '-')} must be a non-negative multiple of 4 (families of four twins), got {value}"
            )
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    sizes = DemoSizes(
        args.train_videos,
        args.test_videos,
        args.qa_videos,
        args.qa_questions_per_video,
        args.ego_train_videos,
        args.ego_mcq_videos,
        args.ego_mcq_questions,
        args.ego_seconds,
        finetune_videos=args.finetune_videos,
    )
    geometry = DemoGeometry(
        args.size,
        args.frames,
        args.fps,
        args.object_size,
        args.travel,
        args.ego_fps,
        args.ego_chunk_seconds,
        ego_nlq_clip_seconds=args.ego_nlq_clip_seconds,
    )
    try:
        summary = make_demo_corpus(args.out, args.seed, sizes, geometry, args.workers, not args.no_progress)
    except ValueError as exc:
        print(f"make_demo_corpus: error: {exc}", file=sys.stderr)
        return 2
    print(
        json.dumps(
            {
                "out": str(args.out),
                "videos": summary["videos"],
                "ego": summary["ego"]["videos"],
                "vocab_size": summary["vocab_size"],
            }
        ),
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
