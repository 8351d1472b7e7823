"""Ego4D Natural Language Queries annotations (nlq_train.json / nlq_val.json, v1 and v2).

    {"version": ..., "videos": [{"video_uid", "clips": [{"clip_uid", "video_start_sec", "video_end_sec",
        "annotations": [{"annotation_uid", "language_queries": [{"clip_start_sec", "clip_end_sec",
            "video_start_sec", "video_end_sec", "query", ...}]}]}]}]}

A query's window (clip_start_sec, clip_end_sec) is in seconds from its clip's start; the clip is
[video_start_sec, video_end_sec] of its video (8 minutes in Ego4D). query_idx is the position
in its annotation's language_queries, as the official evaluation keys predictions
(clip_uid, annotation_uid, query_idx). Queries without text are skipped, as VSLNet's and
GroundNLQ's preparation scripts do, but counted (NLQSplit.skipped).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

LAYOUT = "videos[].clips[].annotations[].language_queries[]"


@dataclass(frozen=True)
class NLQClip:
    clip_uid: str
    video_uid: str
    video_start_sec: float  # the clip inside its video
    video_end_sec: float

    @property
    def duration(self) -> float:
        return self.video_end_sec - self.video_start_sec


@dataclass(frozen=True)
class NLQQuery:
    clip: NLQClip
    annotation_uid: str
    query_idx: int
    query: str
    start: float  # clip_start_sec: the answer window, seconds from the clip start
    end: float  # clip_end_sec

    @property
    def key(self) -> dict:
        """What the official evaluation matches a prediction by."""
        return {"clip_uid": self.clip.clip_uid, "annotation_uid": self.annotation_uid, "query_idx": self.query_idx}

    def window_problem(self) -> str | None:
        """Why the window cannot be grounded in its clip (None when it can)."""
        if self.end < self.start:
            return f"window [{self.start:g}, {self.end:g}] s ends before it starts"
        if self.start >= self.clip.duration or self.end <= 0:
            return f"window [{self.start:g}, {self.end:g}] s lies outside its clip (0 to {self.clip.duration:.3f} s)"
        return None

    def sticks_out(self) -> bool:
        """The window overlaps its clip but reaches past an end (Ego4D has a few by tens of ms)."""
        return self.start < 0 or self.end > self.clip.duration


@dataclass
class NLQSplit:
    path: str
    version: str
    clips: dict[str, NLQClip]
    queries: list[NLQQuery]
    skipped: list[dict] = field(default_factory=list)  # {clip_uid, annotation_uid, query_idx, reason}

    @property
    def video_uids(self) -> list[str]:
        return sorted({c.video_uid for c in self.clips.values()})


def _get(obj, key: str, where: str, path):
    if not isinstance(obj, dict) or key not in obj:
        found = sorted(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(f"{path}: {where} has no {key!r} (found {found}); expected the Ego4D NLQ layout {LAYOUT}")
    return obj[key]


def _list(obj, key: str, where: str, path) -> list:
    value = _get(obj, key, where, path)
    if not isinstance(value, list):
        raise ValueError(f"{path}: {where}.{key} must be a list, got {type(value).__name__}")
    return value


def _seconds(obj, key: str, where: str, path) -> float:
    value = _get(obj, key, where, path)
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{path}: {where}.{key} must be a number of seconds, got {value!r}") from None


def read_nlq(path: str | Path) -> NLQSplit:
    """One Ego4D NLQ annotation file. Raises ValueError naming the missing key when the file has
    another layout (e.g. egomcq.json or a retrieval list)."""
    path = Path(path)
    with open(path, encoding="utf-8") as handle:
        try:
            data = json.load(handle)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not JSON ({error}); expected the Ego4D NLQ layout {LAYOUT}") from None
    clips, queries, skipped = {}, [], []
    for v, video in enumerate(_list(data, "videos", "the top level", path)):
        video_uid = str(_get(video, "video_uid", f"videos[{v}]", path))
        for c, clip_datum in enumerate(_list(video, "clips", f"videos[{v}]", path)):
            where = f"videos[{v}].clips[{c}]"
            clip = NLQClip(
                str(_get(clip_datum, "clip_uid", where, path)),
                video_uid,
                _seconds(clip_datum, "video_start_sec", where, path),
                _seconds(clip_datum, "video_end_sec", where, path),
            )
            if clip.duration <= 0:
                raise ValueError(
                    f"{path}: {where} (clip {clip.clip_uid}) spans [{clip.video_start_sec:g}, "
                    f"{clip.video_end_sec:g}] s of its video; expected video_end_sec > video_start_sec"
                )
            clips[clip.clip_uid] = clip
            for a, ann in enumerate(_list(clip_datum, "annotations", where, path)):
                ann_where = f"{where}.annotations[{a}]"
                annotation_uid = str(_get(ann, "annotation_uid", ann_where, path))
                for i, datum in enumerate(_list(ann, "language_queries", ann_where, path)):
                    q_where = f"{ann_where}.language_queries[{i}]"
                    if not isinstance(datum, dict) or not datum.get("query"):
                        skipped.append(
                            {
                                "clip_uid": clip.clip_uid,
                                "annotation_uid": annotation_uid,
                                "query_idx": i,
                                "reason": "no query text",
                            }
                        )
                        continue
                    queries.append(
                        NLQQuery(
                            clip,
                            annotation_uid,
                            i,
                            str(datum["query"]),
                            _seconds(datum, "clip_start_sec", q_where, path),
                            _seconds(datum, "clip_end_sec", q_where, path),
                        )
                    )
    return NLQSplit(str(path), str(data.get("version", "")), clips, queries, skipped)


def write_video_list(path: str | Path, splits: dict[str, NLQSplit]) -> int:
    """video_uid<TAB>split (the first split naming a video wins), the list download.py reads."""
    rows = {}
    for name, split in splits.items():
        for uid in split.video_uids:
            rows.setdefault(uid, name)
    from svitt.io import atomic_path

    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
        writer.writerow(["video_uid", "split"])
        writer.writerows(sorted(rows.items()))
    return len(rows)
