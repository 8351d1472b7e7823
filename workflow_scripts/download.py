#!/usr/bin/env python
"""Download the videos of a video list (or of one shard of it) into one folder and write a manifest.

Inputs: a WebVid CSV (videoid, contentUrl, name, ...), a generic id,url,caption CSV, or for Ego4D a
tab-separated egoclip.csv / an egomcq.json (one row per distinct video_uid; use --local-dir or
--ego4d-cli, they carry no URLs). Output: videos in --out, and --manifest, a CSV with header
id,status,reason,bytes,sha256,path (path relative to the manifest's folder).
--num-shards N --shard-index i keeps the rows whose id hashes to shard i (the hash extract_frames.py
uses), so shard i's download feeds shard i's extraction.

Exit status: 0 when the failed fraction is at most --max-failed-fraction (failures are listed on
stderr and in the manifest), 1 when it is above, 2 for unusable arguments or input files.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # svitt from this repository

from svitt.data import download as dl


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--csv",
        action="append",
        required=True,
        metavar="FILE",
        help="video list (repeatable; rows are concatenated in order)",
    )
    parser.add_argument("--out", required=True, type=Path, help="folder the videos are written to")
    parser.add_argument("--manifest", required=True, type=Path, help="manifest CSV to write")
    parser.add_argument(
        "--workers", type=int, default=8, help="parallel downloads, or parallel checks of --local-dir files (default 8)"
    )
    parser.add_argument("--num-shards", type=int, default=1, help="split the video list into this many shards")
    parser.add_argument("--shard-index", type=int, default=0, help="which shard this call downloads")
    parser.add_argument(
        "--max-failed-fraction",
        type=float,
        default=0.05,
        help="fail the stage when more than this fraction of videos failed (default 0.05)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=120.0,
        help="seconds for one attempt at one file, connect to last byte (default 120)",
    )
    parser.add_argument("--retries", type=int, default=3, help="retries on 5xx/timeouts (default 3)")
    parser.add_argument(
        "--backoff", type=float, default=1.0, help="first retry delay in seconds, doubled per retry (default 1)"
    )
    parser.add_argument("--max-bytes", type=int, default=2 * 1024**3, help="size cap per file (default 2 GiB)")
    parser.add_argument(
        "--verify",
        choices=["sha256", "quick"],
        default="sha256",
        help="rerun check of files already on disk: sha256 (default) or quick (size and container structure)",
    )
    parser.add_argument(
        "--local-dir",
        type=Path,
        help="videos already on disk: <dir>/<id>.mp4 or <dir>/<id>/<k>.mp4 chunks; nothing "
        "is downloaded or copied, the manifest points at these files",
    )
    parser.add_argument(
        "--ego4d-cli",
        action="store_true",
        help="download with the official Ego4D CLI into --out (licence and AWS credentials needed)",
    )
    parser.add_argument("--ego4d-executable", default="ego4d", help="name or path of the Ego4D CLI")
    parser.add_argument("--ego4d-datasets", default="full_scale", help="Ego4D --datasets value")
    parser.add_argument("--ego4d-aws-profile", default=None, help="Ego4D --aws_profile_name value")
    parser.add_argument("--ego4d-version", default=None, help="Ego4D --version value")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}")
    if not 0.0 <= args.max_failed_fraction <= 1.0:
        parser.error(f"--max-failed-fraction must be in [0, 1], got {args.max_failed_fraction}")
    if args.timeout <= 0:
        parser.error(f"--timeout must be > 0 seconds, got {args.timeout}")
    if args.retries < 0 or args.max_bytes <= 0:
        parser.error(f"--retries must be >= 0 and --max-bytes > 0, got {args.retries} and {args.max_bytes}")
    if args.num_shards < 1 or not 0 <= args.shard_index < args.num_shards:
        parser.error(f"--shard-index must be in [0, --num-shards {args.num_shards}), got {args.shard_index}")
    if args.local_dir and args.ego4d_cli:
        parser.error("use either --local-dir or --ego4d-cli, not both")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        items = []
        for path in args.csv:
            items += dl.read_video_list(path)
        for row, item in enumerate(items):
            item.row = row
        if not items:
            raise dl.InputError(f"no rows in {', '.join(args.csv)}")
        items = dl.select_items(items, args.shard_index, args.num_shards)
        progress = not args.no_progress
        if args.local_dir:
            results = dl.register_local(items, args.local_dir, args.verify, progress, args.workers)
        elif args.ego4d_cli:
            results = dl.run_ego4d_cli(
                items,
                args.out,
                args.ego4d_executable,
                args.ego4d_datasets,
                args.ego4d_aws_profile,
                args.ego4d_version,
                args.verify,
                progress,
                args.workers,
            )
        else:
            options = dl.DownloadOptions(
                timeout=args.timeout,
                retries=args.retries,
                backoff=args.backoff,
                max_bytes=args.max_bytes,
                verify=args.verify,
            )
            previous = dl.previous_records(args.manifest)
            results = dl.download_all(items, args.out, options, args.workers, previous, progress)
    except (dl.InputError, dl.Ego4DCliMissing, RuntimeError) as exc:
        print(f"download: error: {exc}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    dl.write_manifest(args.manifest, results)
    return report(results, args.max_failed_fraction, args.manifest)


def report(results, max_fraction: float, manifest: Path) -> int:
    failed, attempted, fraction = dl.failed_fraction(results)
    ok = sum(r.status == "ok" for r in results)
    skipped = sum(r.status == "skipped" for r in results)
    for r in results:
        if r.status != "ok":
            print(f"  {r.status}: {r.id!r}: {r.reason}", file=sys.stderr)
    summary = (
        f"download: {ok} ok, {failed} failed, {skipped} skipped of {len(results)} rows; "
        f"failed fraction {fraction:.3f} (limit {max_fraction:g}); manifest {manifest}"
    )
    if fraction > max_fraction:
        print(
            f"{summary}\ndownload: error: {failed} of {attempted} videos failed, more than "
            f"--max-failed-fraction {max_fraction:g}",
            file=sys.stderr,
        )
        return 1
    print(summary, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
