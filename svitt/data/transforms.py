"""Clip transforms: one random-resized crop and one flip per clip, applied to all frames alike.

Input: uint8 video [T, 3, H, W] as stored (decoded JPEGs); output: float32 [T, 3, size, size],
normalised with (x / 255 - mean) / std. Randomness comes from the numpy Generator the dataset
passes in, so a clip's augmentation is reproducible from (seed, epoch, index).
"""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

try:  # libjpeg-turbo through torchvision: ~2x faster than PIL for 16 frames at 256 px
    from torchvision.io import decode_jpeg as _tv_decode_jpeg
except ImportError:  # pragma: no cover - torchvision without image IO: PIL below
    _tv_decode_jpeg = None

BEIT_MEAN = (0.5, 0.5, 0.5)
BEIT_STD = (0.5, 0.5, 0.5)


def decode_frames(jpegs: list[np.ndarray]) -> torch.Tensor:
    """JPEG byte arrays -> uint8 [T, 3, H, W]."""
    if _tv_decode_jpeg is not None:
        with warnings.catch_warnings():  # torchvision 0.29 announces a future move to TorchCodec
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.stack(_tv_decode_jpeg([torch.from_numpy(np.asarray(b, dtype=np.uint8)) for b in jpegs]))
    frames = [np.asarray(Image.open(io.BytesIO(b.tobytes())).convert("RGB")) for b in jpegs]
    return torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).contiguous()


def normalize(video: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 or [0, 255] float [T, 3, H, W] -> float32 (x / 255 - mean) / std (in two in-place ops)."""
    scale = torch.tensor([1.0 / (255.0 * s) for s in std], dtype=torch.float32).view(1, 3, 1, 1)
    shift = torch.tensor([-m / s for m, s in zip(mean, std)], dtype=torch.float32).view(1, 3, 1, 1)
    return video.to(torch.float32).mul_(scale).add_(shift)


def _resize(video: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bilinear, antialiased; uint8 in, uint8 out (torch's uint8 kernel is ~2.5x the float one)."""
    if video.shape[-2:] == (height, width):
        return video
    return F.interpolate(video.contiguous(), size=(height, width), mode="bilinear", align_corners=False, antialias=True)


def random_resized_crop_params(height: int, width: int, scale, ratio, rng: np.random.Generator):
    """(top, left, h, w) as torchvision's RandomResizedCrop picks them, from `rng`."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    # fallback: the largest central crop with an aspect ratio inside `ratio`
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class TrainTransform:
    """Random-resized crop (scale 0.5-1 by default) + optional horizontal flip, per clip."""

    def __init__(
        self, size: int = 224, scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3), flip: bool = True, mean=BEIT_MEAN, std=BEIT_STD
    ):
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"crop scale must satisfy 0 < min <= max <= 1, got {scale}")
        self.size, self.scale, self.ratio, self.flip = size, tuple(scale), tuple(ratio), flip
        self.mean, self.std = tuple(mean), tuple(std)

    def __call__(self, video: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        """video uint8 [T, 3, H, W] -> float32 [T, 3, size, size]."""
        top, left, h, w = random_resized_crop_params(video.shape[-2], video.shape[-1], self.scale, self.ratio, rng)
        out = _resize(video[..., top : top + h, left : left + w], self.size, self.size)
        if self.flip and rng.random() < 0.5:  # the demo turns this off: its captions say left/right
            out = out.flip(-1)
        return normalize(out, self.mean, self.std)

    def __repr__(self) -> str:
        return (
            f"TrainTransform(size={self.size}, scale={self.scale}, ratio={self.ratio}, flip={self.flip}, "
            f"mean={self.mean}, std={self.std})"
        )


class EvalTransform:
    """Resize the short side to `size`, centre crop size x size."""

    def __init__(self, size: int = 224, mean=BEIT_MEAN, std=BEIT_STD):
        self.size, self.mean, self.std = size, tuple(mean), tuple(std)

    def __call__(self, video: torch.Tensor, rng=None) -> torch.Tensor:
        """video uint8 [T, 3, H, W] -> float32 [T, 3, size, size]; `rng` is ignored."""
        height, width = video.shape[-2:]
        scale = self.size / min(height, width)
        new_h, new_w = max(self.size, int(round(height * scale))), max(self.size, int(round(width * scale)))
        resized = _resize(video, new_h, new_w)
        top, left = (new_h - self.size) // 2, (new_w - self.size) // 2
        return normalize(resized[..., top : top + self.size, left : left + self.size], self.mean, self.std)

    def __repr__(self) -> str:
        return f"EvalTransform(size={self.size}, mean={self.mean}, std={self.std})"
