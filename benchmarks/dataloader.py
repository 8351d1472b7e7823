#!/usr/bin/env python
"""Clips per second per core: 16-frame clips from HDF5 JPEG shards vs decoding the same clips from
mp4 with decord. Not a test; writes JSON (default benchmarks/results/dataloader.json).

Both paths produce the same clip: the HDF5 path samples 16 of the stored frames (random frame per
segment), the decord path decodes exactly those frames' source indices from the mp4 (the stored
frames carry their source `frame_indices`), and both apply the same TrainTransform. One process,
torch.set_num_threads(1), decord num_threads=1: the numbers are per core.

Two geometries:
- demo: the embedded demo corpus (64x64, 32 frames at 8 fps; stored 32 frames at short side 40;
  crops of 32);
- webvid: WebVid-like 596x336 videos, 10 s at 25 fps, keyframe every 2 s, textured moving content
  (stored 32 frames at short side 256; crops of 224).
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import av
import decord
import numpy as np
import torch
from common import write_report

from svitt.data import frames as fr
from svitt.data.datasets import FrameStore, segment_indices
from svitt.data.demo.scene import DemoGeometry
from svitt.data.demo.twins import Event, render_family
from svitt.data.mp4 import write_mp4
from svitt.data.transforms import TrainTransform

CLIP_FRAMES = 16


def write_webvid_like(path: Path, rng: np.random.Generator, seconds=10, fps=25, size=(336, 596)) -> None:
    """A panning view over a smooth random texture with mild per-frame noise (a realistic bitrate)."""
    h, w = size
    coarse = rng.integers(0, 255, (h // 16 + 8, w // 16 + 16, 3)).astype(np.float32)
    texture = np.kron(coarse, np.ones((16, 16, 1), np.float32))
    n = seconds * fps
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"preset": "veryfast", "crf": "23", "g": str(2 * fps), "threads": "1"}
        stream.time_base = Fraction(1, fps)
        for t in range(n):
            dx, dy = int(t * 0.5), int(40 * np.sin(t / 30))
            frame = texture[64 + dy : 64 + dy + h, dx : dx + w] + rng.normal(0, 6, (h, w, 3))
            video_frame = av.VideoFrame.from_ndarray(np.clip(frame, 0, 255).astype(np.uint8), format="rgb24")
            video_frame.pts = t
            for packet in stream.encode(video_frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def make_videos(kind: str, folder: Path, count: int) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        path = folder / f"{kind}_{i:03d}.mp4"
        if kind == "demo":
            a, b = Event("red", "circle", "left"), Event("blue", "square", "up")
            write_mp4(path, render_family(a, b, DemoGeometry(), rng)["fwd"], 8)
        else:
            write_webvid_like(path, rng)
        paths.append(path)
    return paths


def bench(fn, items, min_seconds: float, min_clips: int) -> dict:
    fn(items[0])  # warm-up (imports, first file open)
    count, start = 0, time.perf_counter()
    while True:
        for item in items:
            fn(item)
            count += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds and count >= min_clips:
            return {"clips": count, "seconds": round(elapsed, 3), "clips_per_second": round(count / elapsed, 2)}


def run_setting(kind: str, workdir: Path, count: int, short_side: int, crop: int, min_seconds: float) -> dict:
    folder = workdir / kind
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    paths = make_videos(kind, folder, count)
    made = time.perf_counter() - t0
    shard = folder / "shard.h5"
    cfg = fr.ExtractConfig(frames=32, short_side=short_side, jpeg_quality=90)
    t0 = time.perf_counter()
    written, failures = fr.extract_to_shard(
        [fr.VideoJob(p.stem, p) for p in paths], shard, cfg, workers=1, progress=False
    )
    extracted = time.perf_counter() - t0
    assert written == count and not failures, failures
    store = FrameStore(shard)
    transform = TrainTransform(crop, flip=True)
    source_indices = {p.stem: store.attrs(p.stem)["frame_indices"] for p in paths}
    rng = np.random.default_rng(0)
    plans = [(p, segment_indices(32, CLIP_FRAMES, rng)) for p in paths]  # identical clips for both paths

    def from_hdf5(plan):
        path, stored = plan
        return transform(store.read(path.stem, stored), rng)

    def from_mp4(plan):
        path, stored = plan
        reader = decord.VideoReader(str(path), num_threads=1)
        frames = reader.get_batch(source_indices[path.stem][stored].tolist()).asnumpy()
        return transform(torch.from_numpy(frames).permute(0, 3, 1, 2), rng)

    assert from_hdf5(plans[0]).shape == from_mp4(plans[0]).shape == (CLIP_FRAMES, 3, crop, crop)
    hdf5 = bench(from_hdf5, plans, min_seconds, 2 * count)
    mp4 = bench(from_mp4, plans, min_seconds, count)
    probe = decord.VideoReader(str(paths[0]), num_threads=1)
    height, width = probe[0].shape[:2]
    return {
        "setting": kind,
        "videos": count,
        "source": {
            "height": int(height),
            "width": int(width),
            "frames": len(probe),
            "fps": probe.get_avg_fps(),
            "mean_bytes": int(np.mean([p.stat().st_size for p in paths])),
        },
        "stored": {
            "frames": 32,
            "short_side": short_side,
            "jpeg_quality": 90,
            "mean_bytes_per_video": int(shard.stat().st_size / count),
        },
        "clip": {"frames": CLIP_FRAMES, "crop": crop, "transform": repr(transform)},
        "hdf5": hdf5,
        "decord_mp4": mp4,
        "speedup_per_core": round(hdf5["clips_per_second"] / mp4["clips_per_second"], 2),
        "setup_seconds": {"generate": round(made, 2), "extract_one_process": round(extracted, 2)},
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/dataloader.json"))
    parser.add_argument("--demo-videos", type=int, default=64)
    parser.add_argument("--webvid-videos", type=int, default=8)
    parser.add_argument("--min-seconds", type=float, default=4.0, help="minimum timed seconds per path")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="svitt-bench-") as tmp:
        settings = [
            run_setting("demo", Path(tmp), args.demo_videos, 40, 32, args.min_seconds),
            run_setting("webvid", Path(tmp), args.webvid_videos, 256, 224, args.min_seconds),
        ]
    result = {
        "benchmark": "dataloader: 16-frame clips per second per core, HDF5 JPEG shards vs decord on mp4",
        "target": "HDF5 at least 5x faster per core",
        "target_met": all(s["speedup_per_core"] >= 5 for s in settings),
        "machine": {"cpus": os.cpu_count(), "processor": _cpu_model(), "platform": platform.platform()},
        "versions": {"torch": torch.__version__, "decord": decord.__version__, "av": av.__version__},
        "settings": settings,
    }
    write_report(args.out, result)
    for s in settings:
        print(
            f"{s['setting']}: HDF5 {s['hdf5']['clips_per_second']} clips/s, decord {s['decord_mp4']['clips_per_second']}"
            f" clips/s, {s['speedup_per_core']}x per core"
        )
    return 0


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    raise SystemExit(main())
