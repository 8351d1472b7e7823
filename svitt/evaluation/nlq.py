"""Ego4D NLQ: window features of long videos, as SViTT-Ego feeds grounding models.

Features come in the layout VSLNet's and GroundNLQ's Ego4D preparation reads: one
`{video_uid}.pt` float32 tensor [N, D] per whole video, feature i covering video time
[i / rate, (i + 1) / rate) with rate = fps / stride features per second (7.5 fps and windows of 4
every 4 frames: 1.875 per second, Ego4D's canonical 30 fps / 16). The preparation script slices
clips out of these and writes `{clip_uid}.pt` and `feature_shapes.json` itself; the folder here
holds `feature_shapes.json` of the videos too, and `features.json` naming the feature kind.

Feature kinds: "cls" is the clip summary the contrastive embedding projects (the encoder's width
D): the video [CLS] token after the final norm, or with video.pooling "mean" the normed mean token;
"projected" is that summary through the model's vision projection, unnormalised (embed_dim), as
EgoVLP's NLQ extractor saves its 256-d embedding.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from tqdm import tqdm

FEATURE_KINDS = ("cls", "projected")
_EPS = 1e-6  # seconds: a clip boundary on a feature boundary belongs to the later feature


def window_starts(num_frames: int, window: int, stride: int) -> list[int]:
    """First frame of each window; a video shorter than one window gives one (padded) window.
    Frames after the last full window are not covered (3600 frames, 4 / 4: 900 windows)."""
    if window < 1 or stride < 1:
        raise ValueError(f"window and stride must be >= 1, got {window} and {stride}")
    return list(range(0, max(1, num_frames - window + 1), stride))


def extract_window_features(model, store, video_ids, transform, window: int = 4, stride: int = 4,
                            batch_size: int = 32, device="cpu", progress: bool = True, kind: str = "cls"):
    """Clip features over long videos, as SViTT-Ego feeds Ego4D NLQ grounding (GroundNLQ):
    windows of `window` consecutive stored frames every `stride` frames, each encoded as one
    clip; the feature is the clip summary (the normed video [CLS], or the normed mean token with
    video.pooling "mean": "cls", [num_windows, D]) or its vision projection ("projected",
    [num_windows, embed_dim]). Every window is encoded, the last
    partial batch included.

    store: a svitt.data.datasets.FrameStore of videos extracted at a fixed fps.
    Yields (video_id, features float32 [num_windows, D], starts [num_windows])."""
    if kind not in FEATURE_KINDS:
        raise ValueError(f"unknown feature kind {kind!r}; expected one of {FEATURE_KINDS}")
    model = model.to(device).eval()
    for video_id in tqdm(video_ids, desc="NLQ features", disable=not progress):
        total = store.num_frames(video_id)
        starts = window_starts(total, window, stride)
        feats = []
        with torch.no_grad():
            for first in range(0, len(starts), batch_size):
                clips = [transform(store.read(video_id, [min(s + k, total - 1) for k in range(window)]))
                         for s in starts[first:first + batch_size]]
                cls = model.video_summary(torch.stack(clips).to(device))
                feats.append((model.vision_proj(cls) if kind == "projected" else cls).float().cpu())
        yield video_id, torch.cat(feats), torch.tensor(starts)


# ---------------------------------------------------------------------------- the .pt layout
class VideoFeatureWriter:
    """Writes the .pt layout one video at a time (Ego4D's NLQ videos hold ~10 GB of features):
    `{video_uid}.pt` (float32 [N, D], contiguous) per add(), then on close() `feature_shapes.json`
    {uid: N} and `features.json` (info: kind, fps, window, stride, features_per_second, dim, ...),
    features.json last, so its presence marks a complete folder. Every file is written atomically."""

    def __init__(self, folder: str | Path, info: dict):
        self.folder, self.info, self.shapes, self.dim = Path(folder), dict(info), {}, None
        self.folder.mkdir(parents=True, exist_ok=True)

    def add(self, uid: str, feats: torch.Tensor) -> None:
        from svitt.training.checkpoint import atomic_torch_save

        if "/" in uid or uid.startswith(".") or not uid:
            raise ValueError(f"video uid {uid!r} cannot name a file {uid}.pt")
        atomic_torch_save(feats.detach().to(torch.float32).contiguous().cpu(), self.folder / f"{uid}.pt")
        self.shapes[uid], self.dim = int(feats.shape[0]), int(feats.shape[1])

    def close(self) -> None:
        from svitt.io import atomic_write_json

        atomic_write_json(self.folder / "feature_shapes.json", self.shapes)
        atomic_write_json(self.folder / "features.json", {**self.info, "dim": self.dim, "videos": len(self.shapes)})


def write_video_features(folder: str | Path, features: dict[str, torch.Tensor], info: dict) -> None:
    """The whole .pt layout of `features` {video_uid: [N, D]} at once (VideoFeatureWriter)."""
    writer = VideoFeatureWriter(folder, info)
    for uid, feats in features.items():
        writer.add(uid, feats)
    writer.close()


def read_feature_info(folder: str | Path) -> dict:
    path = Path(folder) / "features.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: {folder} is not a complete NLQ feature folder "
                                "(workflow_scripts/nlq_features.py --pt-dir writes one)")
    return json.loads(path.read_text())


def load_video_features(folder: str | Path, video_uid: str) -> torch.Tensor | None:
    """[N, D] float32 features of one video, None when the folder has none for it."""
    path = Path(folder) / f"{video_uid}.pt"
    return torch.load(path, map_location="cpu", weights_only=True) if path.exists() else None


def clip_feature_span(video_start_sec: float, video_end_sec: float, rate: float, available: int):
    """(first, stop, offset) of the features covering a clip: features first..stop-1 of the video
    (clipped to the `available` ones), feature first + j starting at clip time offset + j / rate.
    Exact times, unlike VSLNet's preparation, which keeps int(start * rate) .. int(end * rate)
    inclusive and then spreads that count evenly over the clip."""
    first = max(0, math.floor(video_start_sec * rate + _EPS))
    stop = min(available, math.ceil(video_end_sec * rate - _EPS))
    return first, stop, first / rate - video_start_sec
