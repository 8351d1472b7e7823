"""Writing frames as H.264 mp4, deterministically: the demo corpus, the miniatures, tests and
benchmarks write their videos with it."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np


def write_mp4(path: str | Path, frames: np.ndarray, fps: int, crf: int = 18) -> None:
    """Write frames [N, H, W, 3] uint8 as H.264 mp4 (yuv420p, single-threaded for determinism)."""
    frames = np.ascontiguousarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 [N, H, W, 3], got {frames.dtype} {frames.shape}")
    if frames.shape[1] % 2 or frames.shape[2] % 2:
        raise ValueError(f"H.264 yuv420p needs even height and width, got {frames.shape[1:3]}")
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        # rc-lookahead 0: with the default lookahead libx264 output differs from run to run.
        stream.options = {"preset": "veryfast", "crf": str(crf), "threads": "1", "rc-lookahead": "0"}
        stream.thread_count = 1
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
