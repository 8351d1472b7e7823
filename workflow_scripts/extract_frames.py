#!/usr/bin/env python
"""Extract frames of videos (or of EgoClip / EgoMCQ clips of long videos) into one HDF5 shard.

--videos is a download manifest (rows with status ok) or a folder of videos (<id>.mp4, or chunk
folders <id>/<k>.mp4), read in place (nothing is copied or hashed). Without --clips/--mcq every
video becomes one item named by its id (of a folder: the videos --ids lists, else all of them);
with them every clip becomes one item named <video_uid>_<clip_start>_<clip_end> (3 decimals).
--num-shards N --shard-index i keeps the videos whose id hashes to shard i (download.py's hash).
Frames are sampled uniformly over the video or clip, resized to --short-side, JPEG-encoded.
The shard is written under a temporary name and renamed when complete; --failures lists
id,reason of everything that could not be extracted. Above --max-failed-fraction the shard is kept
as <out>.partial instead, and the next run copies its items (those whose source file is unchanged)
and extracts only the rest. Layout: docs/data.md.

Exit status: 0 when the failed fraction is at most --max-failed-fraction, 1 above it, 2 for
unusable arguments or inputs (also when there is nothing to extract).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # svitt from this repository

from svitt.data import download as dl
from svitt.data import frames as fr


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--videos", required=True, type=Path, help="download manifest CSV or folder of videos")
    p.add_argument("--out", required=True, type=Path, help="HDF5 shard to write")
    p.add_argument("--failures", required=True, type=Path, help="failure report CSV (id,reason) to write")
    p.add_argument("--frames", type=int, default=32, help="frames stored per video or clip (default 32)")
    p.add_argument("--fps", type=float, default=None, help="sample at this rate instead (capped by --frames)")
    p.add_argument("--short-side", type=int, default=40, help="resize so the short side has this many pixels")
    p.add_argument("--jpeg-quality", type=int, default=90)
    p.add_argument("--workers", type=int, default=1, help="decoding processes (the rule's `threads`)")
    p.add_argument("--max-failed-fraction", type=float, default=0.05)
    p.add_argument("--clips", type=Path, help="tab-separated egoclip.csv: extract its clips")
    p.add_argument("--mcq", type=Path, help="egomcq.json: extract the clips of its queries and choices")
    p.add_argument(
        "--ids",
        type=Path,
        nargs="+",
        help="with a --videos folder: the videos to extract, from video lists or annotation files "
        "(nlq_videos.tsv, egomcq.json, retrieval / QA JSON lists: a test and a finetuning "
        "split); default every video there",
    )
    p.add_argument("--num-shards", type=int, default=1, help="split the videos into this many shards")
    p.add_argument("--shard-index", type=int, default=0, help="which shard this call writes")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.frames < 1 or args.short_side < 1 or args.workers < 1:
        p.error(
            f"--frames, --short-side and --workers must be >= 1, got {args.frames}, {args.short_side}, {args.workers}"
        )
    if args.fps is not None and args.fps <= 0:
        p.error(f"--fps must be > 0, got {args.fps}")
    if not 1 <= args.jpeg_quality <= 100:
        p.error(f"--jpeg-quality must be in [1, 100], got {args.jpeg_quality}")
    if not 0.0 <= args.max_failed_fraction <= 1.0:
        p.error(f"--max-failed-fraction must be in [0, 1], got {args.max_failed_fraction}")
    if args.num_shards < 1 or not 0 <= args.shard_index < args.num_shards:
        p.error(f"--shard-index must be in [0, --num-shards {args.num_shards}), got {args.shard_index}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        jobs, missing = plan_jobs(args)
    except (OSError, ValueError, KeyError) as exc:
        print(f"extract_frames: error: {exc}", file=sys.stderr)
        return 2
    if not jobs and not missing and args.num_shards == 1:
        print(f"extract_frames: error: no videos to extract from {args.videos}", file=sys.stderr)
        return 2
    cfg = fr.ExtractConfig(args.frames, args.fps, args.short_side, args.jpeg_quality)
    partial = fr.partial_path(args.out)
    written, failures = fr.extract_to_shard(
        jobs, args.out, cfg, args.workers, not args.no_progress, reuse=partial if partial.exists() else None
    )
    failures = missing + failures
    fr.write_failures(args.failures, failures)
    total = written + len(failures)
    fraction = len(failures) / max(1, total)
    for key, reason in failures:
        print(f"  failed: {key!r}: {reason}", file=sys.stderr)
    summary = (
        f"extract_frames: {written} written, {len(failures)} failed of {total}; failed fraction "
        f"{fraction:.3f} (limit {args.max_failed_fraction:g}); shard {args.out}"
    )
    print(summary, file=sys.stderr)
    if fraction > args.max_failed_fraction:
        # The job fails (and Snakemake removes its outputs), but what was extracted is kept: a rerun
        # copies those items and decodes only the failed ones.
        args.out.replace(partial)
        print(
            f"extract_frames: error: {len(failures)} of {total} items failed, more than "
            f"--max-failed-fraction {args.max_failed_fraction:g}; the {written} extracted items are kept in "
            f"{partial} and reused by the next run",
            file=sys.stderr,
        )
        return 1
    partial.unlink(missing_ok=True)
    return 0


def plan_jobs(args) -> tuple[list, list[tuple[str, str]]]:
    """This shard's jobs, and (id, reason) of its items whose video is not there."""

    def mine(video_id: str) -> bool:
        return dl.shard_of(video_id, args.num_shards) == args.shard_index

    clips = None
    if args.clips or args.mcq:
        clips = {}
        for reader, path in ((fr.read_egoclip_clips, args.clips), (fr.read_egomcq_clips, args.mcq)):
            if path:
                for uid, items in reader(path).items():
                    clips.setdefault(uid, []).extend(items)
        clips = {uid: items for uid, items in clips.items() if mine(uid)}
    not_found = []
    if args.videos.is_dir() and (clips is not None or args.ids):
        if clips is not None:
            wanted = {uid: uid for uid in clips}
        else:  # the first mention of a video wins (its layout's hint: WebVid's page_dir)
            wanted = {}
            for path in args.ids:
                for ref in dl.read_video_list(path):
                    wanted.setdefault(ref.id, ref)
        sources, not_found = fr.local_sources(
            args.videos, [ref for video_id, ref in wanted.items() if video_id and mine(video_id)]
        )
    else:
        if args.ids:
            raise ValueError(f"--ids selects videos of a folder; --videos {args.videos} is a manifest")
        sources = {k: v for k, v in fr.discover_videos(args.videos).items() if mine(k)}
    jobs, missing = fr.build_jobs(sources, clips)
    return jobs, (missing if clips is not None else not_found)


if __name__ == "__main__":
    sys.exit(main())
