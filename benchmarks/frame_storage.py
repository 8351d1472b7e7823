#!/usr/bin/env python
"""Frames stored per video: HDF5 bytes per 1,000 WebVid-like videos, and extraction time, for
several `frames.frames` values. Not a test; writes JSON (default benchmarks/results/frame_storage.json).

- webvid: WebVid-like sources (596x336 H.264 at 25 fps, 10, 20 and 30 s, a keyframe every 2 s), a
  slow camera pan over two synthetic contents: `blocks`, random 16-pixel colour blocks with grain
  of standard deviation 6 (the dataloader benchmark's content), and `natural`, a luminance texture
  with the 1/f amplitude spectrum of natural images, weaker smoother colour and light grain (2).
  Both are detailed everywhere; stock footage with defocused or flat regions compresses further,
  so read the sizes as upper-end estimates. Stored at short side 256, JPEG quality 90, as the
  paper configuration does. The stored size depends on the frame count and content, not
  on the duration (a fixed count is spread over the video).
- demo: the embedded demo corpus at config.yaml's size (64x64, 32 frames), extracted as the
  workflow does (webvid, retrieval, egoclip and egomcq datasets; short side 40) with
  frames.frames = 16 and 32 in alternation, in one process, timed in CPU seconds (robust on a
  shared machine; the rules spread the same work over two worker processes).
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
import numpy as np
from common import write_report

from svitt.data import frames as fr
from svitt.data.demo import corpus as demo_corpus
from svitt.data.demo import scene as demo_scene

GIB = 1024**3


def texture(kind: str, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """float32 [H, W, 3] in 0..255: random 16-pixel colour blocks, or a natural-image spectrum."""
    if kind == "blocks":
        coarse = rng.integers(0, 255, (height // 16 + 1, width // 16 + 1, 3)).astype(np.float32)
        return np.kron(coarse, np.ones((16, 16, 1), np.float32))[:height, :width]
    fy, fx = np.fft.fftfreq(height)[:, None], np.fft.rfftfreq(width)[None, :]
    radius = np.maximum(np.hypot(fy, fx), 1.0 / max(height, width))

    def field(exponent: float) -> np.ndarray:
        phase = np.exp(2j * np.pi * rng.random(radius.shape))
        values = np.fft.irfft2(phase / radius**exponent, s=(height, width))
        return (values - values.mean()) / values.std()

    # luminance with the 1/f amplitude of natural images; smoother, weaker colour (as in photographs)
    luma, red, blue = field(1.0), field(2.0), field(2.0)
    rgb = np.stack([luma + 0.3 * red, luma - 0.15 * (red + blue), luma + 0.3 * blue], -1)
    return np.clip(128 + 40 * rgb, 0, 255).astype(np.float32)


def write_webvid_like(
    path: Path, rng: np.random.Generator, seconds: int, content: str, noise: float, fps=25, size=(336, 596)
) -> None:
    """A slow camera pan (0.5 px per frame, a vertical sway) over `content`, plus per-pixel grain."""
    h, w = size
    scene = texture(content, h + 128, w + seconds * fps // 2 + 16, rng)
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"preset": "veryfast", "crf": "23", "g": str(2 * fps), "threads": "1"}
        stream.time_base = Fraction(1, fps)
        for t in range(seconds * fps):
            dx, dy = int(t * 0.5), int(40 * np.sin(t / 30))
            frame = scene[64 + dy : 64 + dy + h, dx : dx + w]
            if noise:
                frame = frame + rng.normal(0, noise, (h, w, 3))
            video_frame = av.VideoFrame.from_ndarray(np.clip(frame, 0, 255).astype(np.uint8), format="rgb24")
            video_frame.pts = t
            for packet in stream.encode(video_frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def webvid_sizes(workdir: Path, count: int, counts: list[int]) -> list[dict]:
    runs = []
    for content, noise in (("blocks", 6.0), ("natural", 2.0)):
        rng = np.random.default_rng(0)
        folder = workdir / f"webvid_{content}"
        folder.mkdir()
        paths = []
        for i in range(count):
            paths.append(folder / f"v{i:03d}.mp4")
            write_webvid_like(paths[-1], rng, seconds=(10, 20, 30)[i % 3], content=content, noise=noise)
        jobs = [fr.VideoJob(p.stem, p) for p in paths]
        for frames in counts:
            shard = folder / f"frames{frames}.h5"
            cpu = time.process_time()
            written, failures = fr.extract_to_shard(
                jobs, shard, fr.ExtractConfig(frames, None, 256, 90), workers=1, progress=False
            )
            cpu = time.process_time() - cpu
            assert written == count and not failures, failures
            per_video = shard.stat().st_size / count
            runs.append(
                {
                    "content": content,
                    "noise_std": noise,
                    "frames": frames,
                    "videos": count,
                    "mean_source_bytes": int(np.mean([p.stat().st_size for p in paths])),
                    "hdf5_bytes_per_video": int(per_video),
                    "hdf5_bytes_per_frame": int(per_video / frames),
                    "hdf5_gib_per_1000_videos": round(1000 * per_video / GIB, 3),
                    "extract_cpu_seconds_per_video": round(cpu / count, 3),
                }
            )
            print(runs[-1], flush=True)
    return runs


def demo_times(workdir: Path, repeats: int) -> dict:
    corpus = workdir / "demo"
    sizes = demo_scene.DemoSizes(
        train_videos=1024,
        test_videos=200,
        qa_videos=8,
        ego_train_videos=16,
        ego_mcq_videos=5,
        ego_mcq_questions=100,
        ego_seconds=90,
    )
    demo_corpus.make_demo_corpus(corpus, seed=0, sizes=sizes, workers=2, progress=False)
    videos = sorted((corpus / "videos").glob("*.mp4"))
    whole = [fr.VideoJob(p.stem, p) for p in videos]
    ego = {uid: corpus / "ego_videos" / uid for uid in os.listdir(corpus / "ego_videos")}
    clips = fr.read_egoclip_clips(corpus / "egoclip.csv")
    for uid, items in fr.read_egomcq_clips(corpus / "egomcq.json").items():
        clips.setdefault(uid, []).extend(items)
    clip_jobs, missing = fr.build_jobs(ego, clips)
    assert not missing, missing[:3]
    cpu: dict[int, list[float]] = {16: [], 32: []}
    stored: dict[int, int] = {}
    for _ in range(repeats):
        for frames in (16, 32):
            start = time.process_time()
            for name, jobs in (("whole", whole), ("clips", clip_jobs)):
                fr.extract_to_shard(
                    jobs,
                    workdir / f"demo_{name}_{frames}.h5",
                    fr.ExtractConfig(frames, None, 40, 90),
                    workers=1,
                    progress=False,
                )
            cpu[frames].append(round(time.process_time() - start, 2))
            stored[frames] = sum((workdir / f"demo_{n}_{frames}.h5").stat().st_size for n in ("whole", "clips"))
    best = {k: min(v) for k, v in cpu.items()}
    return {
        "videos": len(whole),
        "clips": sum(len(j.clips) for j in clip_jobs),
        "cpu_seconds_all": cpu,
        "cpu_seconds_best": best,
        "hdf5_bytes": stored,
        "ratio_32_over_16": round(best[32] / best[16], 3),
        "extra_cpu_seconds": round(best[32] - best[16], 2),
        "extra_wall_seconds_on_2_workers": round((best[32] - best[16]) / 2, 2),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/frame_storage.json"))
    parser.add_argument("--webvid-videos", type=int, default=6, help="per content kind (durations 10, 20, 30 s)")
    parser.add_argument("--frames", type=int, nargs="+", default=[16, 32, 48, 64])
    parser.add_argument("--demo-repeats", type=int, default=2)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="svitt-bench-") as tmp:
        webvid = webvid_sizes(Path(tmp), args.webvid_videos, args.frames)
        demo = demo_times(Path(tmp), args.demo_repeats)
    report = {
        "benchmark": "frame_storage: HDF5 bytes per 1,000 WebVid-like videos by frames stored; demo extraction time",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "note": "shared machine; compare ratios"},
        "webvid": webvid,
        "demo": demo,
    }
    write_report(args.out, report)
    for run in webvid:
        print(f"{run['content']}, {run['frames']} frames: {run['hdf5_gib_per_1000_videos']} GiB per 1,000 videos")
    print(
        f"demo extraction: 16 frames {demo['cpu_seconds_best'][16]:.1f} CPU s, "
        f"32 frames {demo['cpu_seconds_best'][32]:.1f} CPU s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
