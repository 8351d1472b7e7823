"""Ego4D NLQ: clip features of long videos, as SViTT-Ego feeds grounding models."""
from __future__ import annotations

import torch
from tqdm import tqdm


def window_starts(num_frames: int, window: int, stride: int) -> list[int]:
    """First frame of each window; a video shorter than one window gives one (padded) window."""
    if window < 1 or stride < 1:
        raise ValueError(f"window and stride must be >= 1, got {window} and {stride}")
    return list(range(0, max(1, num_frames - window + 1), stride))


def extract_window_features(model, store, video_ids, transform, window: int = 4, stride: int = 4,
                            batch_size: int = 32, device="cpu", progress: bool = True):
    """Clip features over long videos, as SViTT-Ego feeds Ego4D NLQ grounding (GroundNLQ):
    windows of `window` consecutive stored frames every `stride` frames, each encoded as one
    clip; the feature is the video [CLS] after the final norm, [num_windows, D].

    store: a svitt.data.datasets.FrameStore of videos extracted at a fixed fps.
    Yields (video_id, features float32 [num_windows, D], starts [num_windows])."""
    model = model.to(device).eval()
    for video_id in tqdm(video_ids, desc="NLQ features", disable=not progress):
        total = store.num_frames(video_id)
        starts = window_starts(total, window, stride)
        feats = []
        with torch.no_grad():
            for first in range(0, len(starts), batch_size):
                clips = [transform(store.read(video_id, [min(s + k, total - 1) for k in range(window)]))
                         for s in starts[first:first + batch_size]]
                tokens = model.video_encoder.norm(model.video_encoder(torch.stack(clips).to(device)))
                feats.append(tokens[:, 0].float().cpu())
        yield video_id, torch.cat(feats), torch.tensor(starts)
