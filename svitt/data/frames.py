"""Frame extraction: videos (or EgoClip clips of long videos) -> JPEG frames in one HDF5 shard.

Shard layout (format "svitt-frames", version 1):
- each video / clip is a top-level 1-D dataset named `h5_key(id)`, dtype vlen uint8, one JPEG per
  element, in time order;
- dataset attributes: id, source, decoder, source_fps, source_num_frames, duration, frame_indices,
  timestamps, height, width (+ video_uid, clip_start, clip_end for clips);
- file attributes: format, version, frames, fps, short_side, jpeg_quality.

Frames are sampled uniformly over the whole video (segment middles), or over [clip_start,
clip_end) for clips; EgoVLP-style chunked videos (`<uid>/<k>.mp4`) are read as one timeline, so a
clip that crosses a chunk boundary takes frames from both chunks. decord reads; PyAV opens every
file first (clear reasons for corrupt / audio-only input) and reads when decord cannot.
"""

from __future__ import annotations

import functools
import io
import math
import multiprocessing
import re
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import av
import h5py
import numpy as np
from PIL import Image
from tqdm import tqdm

from svitt.data import formats
from svitt.data.download import (
    VIDEO_EXTENSIONS,
    VideoCheckError,
    find_local_video,
    list_chunks,
    not_found_reason,
    read_manifest,
    sniff_video,
)
from svitt.io import atomic_path, atomic_write_csv

FORMAT = "svitt-frames"
VERSION = 1
FAILURE_COLUMNS = ["id", "reason"]


# ----------------------------------------------------------------------------------------------
# Names
# ----------------------------------------------------------------------------------------------
def h5_key(video_id: str) -> str:
    """HDF5 dataset name of an id: '/' would create groups and a leading '.' is special."""
    key = video_id.replace("%", "%25").replace("/", "%2F")
    return "%2E" + key[1:] if key.startswith(".") else key


def h5_id(key: str) -> str:
    """Inverse of h5_key."""
    return re.sub(r"%(25|2F|2E)", lambda m: {"25": "%", "2F": "/", "2E": "."}[m.group(1)], key)


def clip_key(video_uid: str, start, end) -> str:
    """Id of an EgoClip / EgoMCQ clip: its video and its time span in milliseconds precision."""
    return f"{video_uid}_{float(start):.3f}_{float(end):.3f}"


# ----------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------
def uniform_indices(num_available: int, count: int) -> np.ndarray:
    """`count` indices spread over range(num_available): the middle of each of `count` segments.

    All frames when there are no more than `count`.
    """
    if num_available <= count:
        return np.arange(num_available)
    return np.floor((np.arange(count) + 0.5) * num_available / count).astype(np.int64)


def span_indices(fps: float, total: int, start: float, end: float) -> np.ndarray:
    """Global frame indices whose timestamps i / fps fall in [start, end), clipped to the video."""
    eps = 1e-6
    first = max(0, math.ceil(start * fps - eps))
    last = min(total, math.ceil(end * fps - eps))
    if last <= first:  # a span shorter than one frame: the frame nearest its middle
        mid = min(total - 1, max(0, int(round((start + end) / 2 * fps))))
        return np.array([mid])
    return np.arange(first, last)


# ----------------------------------------------------------------------------------------------
# Reading videos
# ----------------------------------------------------------------------------------------------
class VideoError(Exception):
    """A video that cannot be read; the message is the failure-report reason."""


@dataclass
class _Part:
    path: Path
    num_frames: int
    fps: float
    reader: object = None  # the decord VideoReader when decord could open the file


class VideoSource:
    """A video file, or a folder of chunk files `0.mp4, 1.mp4, ...` read as one timeline."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        files = list_chunks(self.path) if self.path.is_dir() else [self.path]
        if not files:
            raise VideoError(f"no chunk files <k>.mp4 in folder {self.path}")
        self.parts = [self._probe(f) for f in files]
        self.fps = self.parts[0].fps
        self.offsets = np.cumsum([0] + [p.num_frames for p in self.parts])
        self.num_frames = int(self.offsets[-1])
        self.duration = self.num_frames / self.fps
        self.decoder = "decord"

    @staticmethod
    def _probe(path: Path) -> _Part:
        if not path.exists():
            raise VideoError(f"file not found: {path}")
        try:
            sniff_video(path)
        except VideoCheckError as exc:
            raise VideoError(f"{path.name}: {exc}") from None
        try:
            with av.open(str(path)) as container:
                if not container.streams.video:
                    kinds = [s.type for s in container.streams]
                    what = (
                        f"audio-only: {kinds.count('audio')} audio stream(s)"
                        if "audio" in kinds
                        else f"streams: {kinds or 'none'}"
                    )
                    raise VideoError(f"{path.name}: no video stream ({what})")
                stream = container.streams.video[0]
                rate = stream.average_rate or stream.guessed_rate
        except av.FFmpegError as exc:
            raise VideoError(f"{path.name}: undecodable ({type(exc).__name__}: {exc})") from None
        reader = None
        try:
            import decord

            reader = decord.VideoReader(str(path), num_threads=1)
            num, fps = len(reader), float(reader.get_avg_fps())
        except Exception:  # decord refuses some valid files (see _read_part); count with PyAV
            reader = None
            try:
                num, fps = _count_frames_pyav(path), float(rate or 0)
            except av.FFmpegError as exc:
                raise VideoError(f"{path.name}: undecodable ({type(exc).__name__}: {exc})") from None
        if num <= 0 or not fps > 0:
            raise VideoError(f"{path.name}: no decodable video frames (frames={num}, fps={fps})")
        return _Part(path, num, fps, reader)

    def read(self, indices: np.ndarray) -> np.ndarray:
        """Frames [N, H, W, 3] uint8 at global `indices` (any order, repeats allowed)."""
        indices = np.asarray(indices, dtype=np.int64)
        out: list[np.ndarray | None] = [None] * len(indices)
        for k, part in enumerate(self.parts):
            lo, hi = self.offsets[k], self.offsets[k + 1]
            mine = [(j, int(i - lo)) for j, i in enumerate(indices) if lo <= i < hi]
            if not mine:
                continue
            local = sorted({i for _, i in mine})
            frames = self._read_part(part, local)
            lookup = dict(zip(local, frames))
            for j, i in mine:
                out[j] = lookup[i]
        missing = [int(indices[j]) for j, f in enumerate(out) if f is None]
        if missing:
            raise VideoError(f"frame indices {missing[:5]} outside the video ({self.num_frames} frames)")
        return np.stack(out)

    def _read_part(self, part: _Part, local: list[int]) -> list[np.ndarray]:
        try:
            if part.reader is None:
                raise VideoError("decord could not open the file")
            return list(part.reader.get_batch(local).asnumpy())
        except Exception as decord_error:  # decord fails on some small widths (16, 24, 48, 72 px)
            try:
                frames = _read_pyav(part.path, local)
            except Exception as exc:
                raise VideoError(
                    f"{part.path.name}: undecodable (decord: {_short(decord_error)}; PyAV: {_short(exc)})"
                ) from None
            self.decoder = "pyav"
            return frames


def _short(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {(text[-1] if text else '')[:160]}"


def _count_frames_pyav(path: Path) -> int:
    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))


def _read_pyav(path: Path, wanted: list[int]) -> list[np.ndarray]:
    """Decode sequentially and keep the wanted frame numbers (the fallback reader)."""
    want, found = set(wanted), {}
    with av.open(str(path)) as container:
        for number, frame in enumerate(container.decode(video=0)):
            if number in want:
                found[number] = frame.to_ndarray(format="rgb24")
            if number >= wanted[-1]:
                break
    if len(found) != len(want):
        raise VideoError(f"{path.name}: only {len(found)} of {len(want)} wanted frames decoded")
    return [found[i] for i in wanted]


# ----------------------------------------------------------------------------------------------
# Encoding
# ----------------------------------------------------------------------------------------------
@dataclass
class ExtractConfig:
    frames: int = 32  # frames stored per video or clip (at most)
    fps: float | None = None  # when set: round(span * fps) frames, capped by `frames`
    short_side: int = 40
    jpeg_quality: int = 90

    def count(self, span_seconds: float, available: int) -> int:
        count = self.frames
        if self.fps:
            count = min(count, max(1, int(round(span_seconds * self.fps))))
        return min(count, available)


def resize_short_side(frame: np.ndarray, short_side: int) -> Image.Image:
    image = Image.fromarray(frame)
    w, h = image.size
    scale = short_side / min(w, h)
    size = (max(1, int(round(w * scale))), max(1, int(round(h * scale))))
    return image if size == (w, h) else image.resize(size, Image.BICUBIC)


def encode_jpegs(frames: np.ndarray, cfg: ExtractConfig) -> tuple[list[bytes], tuple[int, int]]:
    out, size = [], (0, 0)
    for frame in frames:
        image = resize_short_side(frame, cfg.short_side)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=cfg.jpeg_quality)
        out.append(buffer.getvalue())
        size = (image.height, image.width)
    return out, size


# ----------------------------------------------------------------------------------------------
# Jobs
# ----------------------------------------------------------------------------------------------
@dataclass
class Clip:
    key: str
    start: float
    end: float
    attrs: dict = field(default_factory=dict)


@dataclass
class VideoJob:
    """One source video; `clips` None means the whole video is one item named `id`."""

    id: str
    source: Path
    clips: list[Clip] | None = None


@dataclass
class Extracted:
    key: str
    jpegs: list[bytes] | None
    attrs: dict
    reason: str = ""


def source_stamp(path: Path) -> str:
    """Size and modification time of a video file (of every chunk of a chunk folder): what a kept
    partial shard's item must match to be reused instead of extracted again."""
    path = Path(path)
    files = list_chunks(path) if path.is_dir() else [path]
    return ";".join(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)


def run_job(job: VideoJob, cfg: ExtractConfig) -> list[Extracted]:
    """Extract one job; failures come back as Extracted with `reason`, never raised."""
    try:
        return _run_job(job, cfg)
    except Exception as exc:  # a decoder or codec surprise: report it, let the other videos proceed
        keys = [job.id] if job.clips is None else [c.key for c in job.clips]
        return [Extracted(k, None, {}, f"unexpected error: {_short(exc)}") for k in keys]


def _run_job(job: VideoJob, cfg: ExtractConfig) -> list[Extracted]:
    keys = [job.id] if job.clips is None else [c.key for c in job.clips]
    try:
        video = VideoSource(job.source)
    except VideoError as exc:
        return [Extracted(k, None, {}, str(exc)) for k in keys]
    base = {
        "source": str(job.source),
        "source_fps": video.fps,
        "source_num_frames": video.num_frames,
        "duration": video.duration,
        "source_stamp": source_stamp(job.source),
    }
    if job.clips is None:
        spans = [(job.id, np.arange(video.num_frames), video.duration, {})]
    else:
        spans = []
        for clip in job.clips:
            if clip.start >= video.duration or clip.end <= 0 or clip.end < clip.start:
                spans.append(
                    (
                        clip.key,
                        None,
                        0.0,
                        {
                            "reason": f"clip [{clip.start:g}, {clip.end:g}] s lies "
                            f"outside the video (0 to {video.duration:.3f} s)"
                        },
                    )
                )
                continue
            available = span_indices(video.fps, video.num_frames, clip.start, clip.end)
            spans.append(
                (
                    clip.key,
                    available,
                    clip.end - clip.start,
                    {**clip.attrs, "clip_start": clip.start, "clip_end": clip.end},
                )
            )
    plan = []
    for key, available, seconds, extra in spans:
        if available is None:
            plan.append((key, None, extra))
            continue
        chosen = available[uniform_indices(len(available), cfg.count(seconds, len(available)))]
        plan.append((key, chosen, extra))
    wanted = np.unique(np.concatenate([c for _, c, _ in plan if c is not None] or [np.zeros(0, np.int64)]))
    try:
        decoded = dict(zip(wanted.tolist(), video.read(wanted))) if len(wanted) else {}
    except VideoError as exc:
        return [Extracted(k, None, {}, str(exc)) for k in keys]
    results = []
    for key, chosen, extra in plan:
        if chosen is None:
            results.append(Extracted(key, None, {}, extra["reason"]))
            continue
        jpegs, (height, width) = encode_jpegs(np.stack([decoded[i] for i in chosen.tolist()]), cfg)
        attrs = {
            **base,
            **extra,
            "id": key,
            "decoder": video.decoder,
            "frame_indices": chosen,
            "timestamps": chosen / video.fps,
            "height": height,
            "width": width,
        }
        results.append(Extracted(key, jpegs, attrs))
    return results


# ----------------------------------------------------------------------------------------------
# Input discovery
# ----------------------------------------------------------------------------------------------
def discover_videos(videos: str | Path) -> dict[str, Path]:
    """id -> path from a download manifest (status ok rows) or a folder (files and chunk folders)."""
    videos = Path(videos)
    if videos.is_file():
        rows = read_manifest(videos)
        return {r["id"]: Path(r["path"]) for r in rows if r["status"] == "ok"}
    if not videos.is_dir():
        raise FileNotFoundError(f"--videos {videos} is neither a download manifest nor a folder")
    found: dict[str, Path] = {}
    for entry in sorted(videos.iterdir()):
        if entry.is_file() and entry.suffix.lower() in VIDEO_EXTENSIONS:
            found.setdefault(entry.stem, entry)
        elif entry.is_dir() and list_chunks(entry):
            found.setdefault(entry.name, entry)
    return found


def read_egoclip_clips(path: str | Path) -> dict[str, list[Clip]]:
    """video_uid -> clips of a tab-separated egoclip.csv."""
    clips: dict[str, list[Clip]] = {}
    for row in formats.read_egoclip(path):
        _add_clip(clips, row)
    return clips


def read_egomcq_clips(path: str | Path) -> dict[str, list[Clip]]:
    """video_uid -> clips of every query and choice of an egomcq.json."""
    clips: dict[str, list[Clip]] = {}
    for clip in formats.egomcq_clips(formats.read_egomcq(path)):
        _add_clip(clips, clip)
    return clips


def _add_clip(clips: dict[str, list[Clip]], row: dict) -> None:
    """EgoVLP reads a clip as [max(clip_start, 0), max(clip_end, 0)] (EgoClip has negative starts);
    its id keeps the published numbers."""
    uid = str(row["video_uid"]).strip()
    start, end = max(float(row["clip_start"]), 0.0), max(float(row["clip_end"]), 0.0)
    clips.setdefault(uid, []).append(
        Clip(clip_key(uid, row["clip_start"], row["clip_end"]), start, end, {"video_uid": uid})
    )


def build_jobs(
    sources: dict[str, Path], clips: dict[str, list[Clip]] | None = None
) -> tuple[list[VideoJob], list[tuple[str, str]]]:
    """Jobs for whole videos, or for the clips of each video; plus (id, reason) of clips whose
    video is missing from the sources."""
    if clips is None:
        return [VideoJob(i, p) for i, p in sources.items()], []
    jobs, missing = [], []
    for uid in sorted(clips):
        unique = list({c.key: c for c in clips[uid]}.values())
        if uid in sources:
            jobs.append(VideoJob(uid, sources[uid], unique))
        else:
            missing += [(c.key, f"video_uid {uid} not found in --videos") for c in unique]
    return jobs, missing


def local_sources(folder: str | Path, refs: list) -> tuple[dict[str, Path], list[tuple[str, str]]]:
    """id -> path of the listed videos (svitt.data.formats.VideoRef, or plain ids) in a folder,
    read in place (nothing copied or hashed; the extraction's decoding is the check), plus
    (id, reason) of those not there, naming what was looked for and the closest names found."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"--videos {folder} is not a folder")
    found, missing = {}, []
    for ref in refs:
        video_id, hint = (ref, None) if isinstance(ref, str) else (ref.id, ref.hint)
        path = find_local_video(folder, video_id, hint)
        if path is None:
            missing.append((video_id, not_found_reason(folder, video_id, hint)))
        else:
            found[video_id] = path
    return found, missing


# ----------------------------------------------------------------------------------------------
# Writing a shard
# ----------------------------------------------------------------------------------------------
def _bounded_map(fn, items, workers: int):
    """map(fn, items) in order over worker processes, with at most 4 * workers items in flight.

    Processes, not threads: PIL and PyAV hold the GIL long enough that threads gave ~1.2x on 2
    cores. forkserver: workers start clean (no inherited h5py/decord state or locks).
    """
    if workers <= 1:
        yield from map(fn, items)
        return
    context = multiprocessing.get_context("forkserver")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        pending = []
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 4 * workers:
                yield pending.pop(0).result()
        for future in pending:
            yield future.result()


SHARD_SETTINGS = ("format", "version", "frames", "fps", "short_side", "jpeg_quality")


def shard_settings(cfg: ExtractConfig) -> dict:
    return {
        "format": FORMAT,
        "version": VERSION,
        "frames": cfg.frames,
        "fps": cfg.fps or 0.0,
        "short_side": cfg.short_side,
        "jpeg_quality": cfg.jpeg_quality,
    }


def partial_path(shard: str | Path) -> Path:
    """Where a shard whose extraction failed keeps what it extracted (never matched by *.h5)."""
    shard = Path(shard)
    return shard.with_name(shard.name + ".partial")


class _Reuse:
    """Items of a kept partial shard (same settings) that a job may copy instead of extracting:
    every item of the job present, from the same source file, unchanged since (source_stamp)."""

    def __init__(self, path: Path | None, cfg: ExtractConfig):
        self.file = None
        if path is not None and path.exists():
            handle = h5py.File(path, "r")
            if all(_same(handle.attrs.get(k), v) for k, v in shard_settings(cfg).items()):
                self.file = handle
            else:
                handle.close()

    def items(self, job: VideoJob) -> list[str] | None:
        if self.file is None:
            return None
        keys = [job.id] if job.clips is None else [c.key for c in job.clips]
        try:
            stamp = source_stamp(job.source)
        except OSError:
            return None
        for key in keys:
            item = self.file.get(h5_key(key))
            if item is None or item.attrs.get("source") != str(job.source) or item.attrs.get("source_stamp") != stamp:
                return None
        return keys

    def close(self):
        if self.file is not None:
            self.file.close()


def _same(stored, value) -> bool:
    if isinstance(value, float):
        return stored is not None and float(stored) == value
    return stored == value or (isinstance(stored, bytes) and stored.decode() == value)


def extract_to_shard(
    jobs: list[VideoJob],
    out: str | Path,
    cfg: ExtractConfig,
    workers: int = 1,
    progress: bool = True,
    reuse: str | Path | None = None,
) -> tuple[int, list[tuple[str, str]]]:
    """Write one HDF5 shard atomically; returns (items written, [(id, reason) of failures]).

    reuse: a partial shard a failed run kept (partial_path); its items whose source is unchanged are
    copied, not extracted again."""
    out = Path(out)
    written, failures = 0, []
    vlen = h5py.vlen_dtype(np.dtype("uint8"))
    kept = _Reuse(Path(reuse) if reuse else None, cfg)
    try:
        with atomic_path(out) as tmp:
            with h5py.File(tmp, "w") as f:
                f.attrs.update(shard_settings(cfg))
                bar = tqdm(total=len(jobs), desc=f"extract {out.name}", unit="video", disable=not progress)
                todo = []
                for job in jobs:
                    keys = kept.items(job)
                    if keys is None:
                        todo.append(job)
                        continue
                    for key in keys:
                        kept.file.copy(kept.file[h5_key(key)], f, name=h5_key(key))
                        written += 1
                    bar.update(1)
                work = functools.partial(run_job, cfg=cfg) if workers > 1 else (lambda job: run_job(job, cfg))
                for results in _bounded_map(work, todo, workers):
                    for item in results:
                        if item.jpegs is None:
                            failures.append((item.key, item.reason))
                            continue
                        key = h5_key(item.key)
                        if key in f:
                            failures.append((item.key, "duplicate id (already in this shard)"))
                            continue
                        data = np.empty(len(item.jpegs), dtype=object)
                        for i, jpeg in enumerate(item.jpegs):  # element-wise: equal lengths must not become 2-D
                            data[i] = np.frombuffer(jpeg, np.uint8)
                        dataset = f.create_dataset(key, data=data, dtype=vlen)
                        dataset.attrs.update(item.attrs)
                        written += 1
                    bar.update(1)
                bar.close()
    finally:
        kept.close()
    return written, failures


def write_failures(path: str | Path, failures: list[tuple[str, str]]) -> None:
    atomic_write_csv(path, FAILURE_COLUMNS, failures)


def read_frames(h5: h5py.File, video_id: str, indices) -> list[bytes]:
    """JPEG bytes of stored frames `indices` of `video_id` (a small helper for tools and tests)."""
    dataset = h5[h5_key(video_id)]
    return [dataset[int(i)].tobytes() for i in indices]
