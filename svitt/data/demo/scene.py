"""What both synthetic worlds of the demo corpus share: its sizes and frame geometry, the palette
and shapes, and drawing a shape into a frame."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

COLORS = {
    "red": (225, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 220, 40),
    "purple": (165, 60, 210),
    "white": (240, 240, 240),
}
SHAPES = ("circle", "square", "triangle")


@dataclass
class DemoSizes:
    train_videos: int = 1024
    test_videos: int = 200
    qa_videos: int = 200
    qa_questions_per_video: int = 3
    ego_train_videos: int = 6
    ego_mcq_videos: int = 5
    ego_mcq_questions: int = 40
    ego_seconds: float = 90.0
    finetune_videos: int = 0  # retrieval finetuning split


@dataclass
class DemoGeometry:
    size: int = 64  # square frames; 64 decodes with decord (some small widths such as 48 do not)
    frames: int = 32
    fps: int = 8
    object_size: int = 16
    travel: int = 20  # pixels an object moves during its event
    ego_fps: int = 10
    ego_chunk_seconds: float = 25.0  # 0: one file per ego video; else EgoVLP-style <uid>/<k>.mp4 chunks
    ego_narration_every: float = 2.0
    ego_nlq_clip_seconds: float = 30.0  # NLQ clips cut from each ego video (0: the whole video)


@functools.lru_cache(maxsize=None)
def shape_mask(shape: str, size: int) -> np.ndarray:
    """Boolean [size, size] mask of a shape filling most of its box (cached, read-only)."""
    mask = _shape_mask(shape, size)
    mask.flags.writeable = False
    return mask


def _shape_mask(shape: str, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    c = size / 2
    if shape == "circle":
        return (yy - c) ** 2 + (xx - c) ** 2 <= (0.48 * size) ** 2
    if shape == "square":
        m = max(1, size // 8)
        box = np.zeros((size, size), bool)
        box[m : size - m, m : size - m] = True
        return box
    if shape == "triangle":  # apex up, base at the bottom
        half_width = 0.5 * size * (yy / size)
        return np.abs(xx - c) <= half_width
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def draw(frame: np.ndarray, mask: np.ndarray, color, x: float, y: float) -> None:
    """Paint `mask` at top-left (x, y), clipped to the frame."""
    h, w = frame.shape[:2]
    s = mask.shape[0]
    x0, y0 = int(round(x)), int(round(y))
    fx0, fy0, fx1, fy1 = max(x0, 0), max(y0, 0), min(x0 + s, w), min(y0 + s, h)
    if fx0 >= fx1 or fy0 >= fy1:
        return
    sub = mask[fy0 - y0 : fy1 - y0, fx0 - x0 : fx1 - x0]
    frame[fy0:fy1, fx0:fx1][sub] = color
