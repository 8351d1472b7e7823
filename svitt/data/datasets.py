"""PyTorch datasets over HDF5 frame shards (see svitt.data.frames for the layout).

Every dataset returns float32 videos [T, 3, H, W] (normalised by its transform) and raw strings
(tokenisation happens in the training collate). Training sampling splits a video's stored frames
into T segments and takes a random frame of each; evaluation takes each segment's middle frame.
HDF5 files are opened lazily in the process that reads them (each DataLoader worker, or the main
process with num_workers=0). Ids absent from the shards (failed downloads or extractions) are
skipped; a dataset with nothing left raises.

Randomness: with `seed=None` a dataset draws from torch's RNG (seeded per DataLoader worker by
torch); with an int seed every item's randomness is a function of (seed, epoch, index), so an
epoch replays exactly (call `set_epoch` before each epoch; persistent workers keep the epoch they
were started with).
"""

from __future__ import annotations

import ast
import json
import math
import os
from collections import defaultdict
from pathlib import Path

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset

from svitt.data import formats
from svitt.data.formats import VIDEO_EXTENSIONS
from svitt.data.frames import FORMAT, clip_key, h5_id, h5_key
from svitt.data.transforms import EvalTransform, TrainTransform, decode_frames


class EmptyDatasetError(ValueError):
    pass


# ----------------------------------------------------------------------------------------------
# Frame sampling
# ----------------------------------------------------------------------------------------------
def segment_indices(num_stored: int, num_frames: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """T = num_frames indices into `num_stored` frames: one per equal segment, random (rng) or middle.

    With fewer stored frames than T, segments shorter than one frame repeat frames.
    """
    if num_stored < 1:
        raise ValueError("a video with no stored frames")
    edges = np.arange(num_frames + 1) * num_stored / num_frames
    if rng is None:
        return np.minimum(np.floor((edges[:-1] + edges[1:]) / 2).astype(np.int64), num_stored - 1)
    starts = np.floor(edges[:-1]).astype(np.int64)
    ends = np.maximum(np.ceil(edges[1:]).astype(np.int64), starts + 1)  # exclusive
    picks = starts + np.floor(rng.random(num_frames) * (ends - starts)).astype(np.int64)
    return np.minimum(picks, num_stored - 1)


# ----------------------------------------------------------------------------------------------
# Frame store
# ----------------------------------------------------------------------------------------------
def resolve_shards(shards) -> list[Path]:
    """HDF5 files from a file, a folder (its *.h5) or a list of either."""
    if isinstance(shards, (str, os.PathLike)):
        shards = [shards]
    paths: list[Path] = []
    for entry in shards:
        entry = Path(entry)
        if entry.is_dir():
            paths += sorted(entry.glob("*.h5"))
        elif entry.is_file():
            paths.append(entry)
        else:
            raise FileNotFoundError(f"frame shard {entry} does not exist")
    if not paths:
        raise FileNotFoundError(f"no HDF5 shards (*.h5) in {[str(s) for s in shards]}")
    return paths


class FrameStore:
    """id -> stored JPEG frames across shards; file handles opened lazily per process."""

    def __init__(self, shards):
        self.paths = resolve_shards(shards)
        self.shard_of: dict[str, int] = {}
        for number, path in enumerate(self.paths):
            with h5py.File(path, "r") as handle:
                if handle.attrs.get("format") != FORMAT:
                    raise ValueError(
                        f"{path} is not a frame shard (format attribute "
                        f"{handle.attrs.get('format')!r}, expected {FORMAT!r})"
                    )
                for key in handle.keys():
                    self.shard_of.setdefault(h5_id(key), number)
        self._files: dict[int, h5py.File] = {}
        self._pid: int | None = None

    def __contains__(self, video_id: str) -> bool:
        return video_id in self.shard_of

    def __len__(self) -> int:
        return len(self.shard_of)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_files"], state["_pid"] = {}, None  # never ship open handles to workers
        return state

    def _dataset(self, video_id: str) -> h5py.Dataset:
        if self._pid != os.getpid():  # a fresh process (forked worker): open our own handles
            self._files, self._pid = {}, os.getpid()
        number = self.shard_of[video_id]
        if number not in self._files:
            self._files[number] = h5py.File(self.paths[number], "r")
        return self._files[number][h5_key(video_id)]

    def num_frames(self, video_id: str) -> int:
        return int(self._dataset(video_id).shape[0])

    def attrs(self, video_id: str) -> dict:
        return dict(self._dataset(video_id).attrs)

    def read(self, video_id: str, indices) -> torch.Tensor:
        """uint8 [T, 3, H, W] of the stored frames at `indices` (any order, repeats allowed)."""
        dataset = self._dataset(video_id)
        unique, inverse = np.unique(np.asarray(indices, dtype=np.int64), return_inverse=True)
        blobs = dataset[unique] if len(unique) > 1 else [dataset[int(unique[0])]]  # one read: ~3x 16 reads
        return decode_frames([blobs[i] for i in inverse.reshape(-1)])

    def close(self) -> None:
        for handle in self._files.values():
            handle.close()
        self._files = {}


def _resolve_id(store: FrameStore, video_id: str) -> str:
    """Annotation ids may carry a file extension (MSR-VTT's "video7010.mp4")."""
    if video_id in store:
        return video_id
    stem, ext = os.path.splitext(video_id)
    return stem if ext.lower() in VIDEO_EXTENSIONS and stem in store else video_id


# ----------------------------------------------------------------------------------------------
# Base
# ----------------------------------------------------------------------------------------------
class ClipDataset(Dataset):
    def __init__(self, shards, num_frames: int, transform, train: bool, seed: int | None):
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        self.store = shards if isinstance(shards, FrameStore) else FrameStore(shards)
        self.num_frames, self.train, self.seed, self.epoch = num_frames, train, seed, 0
        self.transform = transform if transform is not None else (TrainTransform() if train else EvalTransform())
        self.missing: list[str] = []

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _rng(self, index: int) -> np.random.Generator:
        if self.seed is None:
            return np.random.default_rng(int(torch.randint(0, 2**62, (1,)).item()))
        return np.random.default_rng([self.seed, self.epoch, index])

    def load_clip(self, video_id: str, rng: np.random.Generator | None) -> torch.Tensor:
        """float32 [T, 3, H, W]; random segment frames and augmentation when training."""
        stored = self.store.num_frames(video_id)
        indices = segment_indices(stored, self.num_frames, rng if self.train else None)
        return self.transform(self.store.read(video_id, indices), rng)

    def _require(self, count: int, what: str, source) -> None:
        if count == 0:
            raise EmptyDatasetError(
                f"no {what} of {source} has frames in {[str(p) for p in self.store.paths]} "
                f"({len(self.missing)} ids missing, e.g. {self.missing[:3]})"
            )


# ----------------------------------------------------------------------------------------------
# Pretraining pairs
# ----------------------------------------------------------------------------------------------
def read_caption_table(path: str | Path, group_column: str | None = "family", paragraph: bool = False) -> list[dict]:
    """Rows {id, caption, group} of a WebVid CSV, a generic id,...,caption CSV or a retrieval list
    (svitt.data.formats.read_pairs: one row per sentence of a caption list, or with `paragraph` one
    row of the sentences joined by spaces; one row per video of a video list)."""
    return [
        {"id": row.id, "caption": row.caption, "group": row.group}
        for row in formats.read_pairs(path, group_column, paragraph)
    ]


def annotation_videos(path: str | Path) -> set[str]:
    """The videos an annotation file names (any layout), file extensions dropped."""
    return formats.annotation_videos(path)


def split_overlap(train_annotations: str | Path, test_annotations: str | Path) -> list[str]:
    """Videos named by both a finetuning split and its test split, sorted."""
    return sorted(annotation_videos(train_annotations) & annotation_videos(test_annotations))


class VideoTextDataset(ClipDataset):
    """Pretraining pairs: {"video": [T,3,H,W], "caption": str, "video_id": str, "index": int}.

    `groups[i]` (the annotation's `family` column when present, else None) feeds TwinBatchSampler.
    `paragraph`: a JSON caption list is one text (read_caption_table).
    """

    def __init__(
        self,
        shards,
        annotations,
        num_frames: int,
        transform=None,
        *,
        train: bool = True,
        seed: int | None = None,
        group_column: str | None = "family",
        paragraph: bool = False,
    ):
        super().__init__(shards, num_frames, transform, train, seed)
        self.rows = []
        for row in read_caption_table(annotations, group_column, paragraph):
            row["id"] = _resolve_id(self.store, row["id"])
            if row["id"] in self.store:
                self.rows.append(row)
            else:
                self.missing.append(row["id"])
        self._require(len(self.rows), "video", annotations)
        self.groups = [r["group"] for r in self.rows]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        row = self.rows[index]
        video = self.load_clip(row["id"], self._rng(index))
        return {"video": video, "caption": row["caption"], "video_id": row["id"], "index": index}


# ----------------------------------------------------------------------------------------------
# Retrieval evaluation
# ----------------------------------------------------------------------------------------------
class RetrievalDataset(ClipDataset):
    """Videos of a retrieval annotation in Singularity's layout [{"video": id | [ids], "caption":
    str | [str]}] (svitt.data.formats.read_retrieval).

    Items: {"video": [T,3,H,W], "video_id": str, "index": int}, deterministic middle-of-segment
    frames. Attributes: `texts` (list of str); `text_videos[i]` the indices of text i's
    ground-truth videos (one, or several where an entry lists several videos: SSv2's evaluation
    files, Singularity's has_multi_vision_gt); `text_to_video[i]` the first of them;
    `video_to_texts[v]`; `video_ids`; `multi_video_gt` (any text with several); `twin_pairs`
    [(video a, video b, "reverse" | "order")] when the annotation carries `reverse_twin` /
    `order_twin` fields (the demo corpus). A caption list is one text per sentence, or with
    `paragraph=True` one text joined by spaces (DiDeMo paragraph retrieval). Videos without frames
    are left out (`missing`), and so is a text none of whose videos has frames.
    """

    def __init__(self, shards, annotation, num_frames: int, transform=None, *, paragraph: bool = False):
        super().__init__(shards, num_frames, transform, train=False, seed=None)
        entries = formats.read_retrieval(annotation, paragraph)
        self.video_ids: list[str] = []
        self.texts: list[str] = []
        self.text_videos: list[list[int]] = []
        self.video_to_texts: list[list[int]] = []
        position: dict[str, int] = {}
        raw_to_id: dict[str, str] = {}
        for entry in entries:
            present = []
            for raw in entry.videos:
                video_id = raw_to_id.setdefault(raw, _resolve_id(self.store, raw))
                if video_id not in self.store:
                    self.missing.append(video_id)
                    continue
                if video_id not in position:
                    position[video_id] = len(self.video_ids)
                    self.video_ids.append(video_id)
                    self.video_to_texts.append([])
                present.append(position[video_id])
            if not present:
                continue
            for text in entry.texts:
                for v in present:
                    self.video_to_texts[v].append(len(self.texts))
                self.text_videos.append(present)
                self.texts.append(text)
        self._require(len(self.video_ids), "video", annotation)
        self.text_to_video = [videos[0] for videos in self.text_videos]
        self.multi_video_gt = any(len(videos) > 1 for videos in self.text_videos)
        self.twin_pairs = self._twins(entries, position, raw_to_id)

    @staticmethod
    def _twins(entries, position, raw_to_id) -> list[tuple[int, int, str]]:
        pairs = set()
        for entry in entries:
            a = position.get(raw_to_id.get(entry.videos[0], ""))
            for field, kind in (("reverse_twin", "reverse"), ("order_twin", "order")):
                other = entry.extra.get(field)
                b = position.get(raw_to_id.get(str(other), str(other))) if other is not None else None
                if a is not None and b is not None:
                    pairs.add((min(a, b), max(a, b), kind))
        return sorted(pairs)

    def __len__(self) -> int:
        return len(self.video_ids)

    def __getitem__(self, index: int) -> dict:
        video_id = self.video_ids[index]
        return {"video": self.load_clip(video_id, None), "video_id": video_id, "index": index}


# ----------------------------------------------------------------------------------------------
# QA
# ----------------------------------------------------------------------------------------------
class QADataset(ClipDataset):
    """Open-ended QA in Singularity's layout [{"video", "question", "answer", "type" (optional)}].

    Items: {"video", "question", "answer", "answer_index" (into `answer_list`, -1 if absent),
    "type" ("" when the entry has none), "video_id", "index"}. `answer_list` is a JSON list file
    or a list (default: the file's own answers, sorted). Questions whose answer is not in the list
    stay in the dataset (an evaluation counts them as wrong): `unanswerable` holds their indices.
    An entry without video, question or answer is an error naming the file, the entry and the key.
    """

    KEYS = ("video", "question", "answer")

    def __init__(
        self,
        shards,
        annotation,
        num_frames: int,
        transform=None,
        *,
        answer_list=None,
        train: bool = False,
        seed: int | None = None,
    ):
        super().__init__(shards, num_frames, transform, train, seed)
        items = formats.read_qa(annotation)
        if isinstance(answer_list, (str, os.PathLike)):
            answer_list = formats.read_answer_list(answer_list)
        self.answer_list = list(answer_list) if answer_list is not None else sorted({str(i["answer"]) for i in items})
        self.answer_index = {a: k for k, a in enumerate(self.answer_list)}
        self.items = []
        for item in items:
            video_id = _resolve_id(self.store, str(item["video"]))
            if video_id in self.store:
                self.items.append(
                    {
                        **item,
                        "video": video_id,
                        "answer": str(item["answer"]),
                        "type": str(item["type"]) if item.get("type") is not None else "",
                    }
                )
            else:
                self.missing.append(video_id)
        self._require(len(self.items), "question", annotation)
        self.unanswerable = [i for i, item in enumerate(self.items) if item["answer"] not in self.answer_index]

    @property
    def answers(self) -> list[str]:
        return [item["answer"] for item in self.items]

    @property
    def types(self) -> list[str | None]:
        return [item["type"] or None for item in self.items]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        item = self.items[index]
        video = self.load_clip(item["video"], self._rng(index) if self.train else None)
        return {
            "video": video,
            "question": item["question"],
            "answer": item["answer"],
            "answer_index": self.answer_index.get(item["answer"], -1),
            "type": item["type"],
            "video_id": item["video"],
            "index": index,
        }


# ----------------------------------------------------------------------------------------------
# EgoClip
# ----------------------------------------------------------------------------------------------
def parse_tags(text: str, size: int, what: str, where: str) -> list[int]:
    """'[3, 17]' -> [3, 17]; every index must be in [0, size)."""
    try:
        tags = ast.literal_eval(text) if isinstance(text, str) else text
        tags = [int(t) for t in (tags if isinstance(tags, (list, tuple)) else [tags])]
    except (ValueError, SyntaxError, TypeError):
        raise ValueError(f"{where}: {what} {text!r} is not a list of indices like '[3, 17]'") from None
    bad = [t for t in tags if not 0 <= t < size]
    if bad:
        raise ValueError(
            f"{where}: {what} {bad} outside [0, {size}); set num_{what.split('_')[-1]}s to the taxonomy size"
        )
    return tags


def multi_hot(tags: list[int], size: int) -> torch.Tensor:
    out = torch.zeros(size, dtype=torch.float32)
    out[tags] = 1.0
    return out


def load_taxonomy(path: str | Path) -> tuple[list[str], list[str]]:
    """(nouns, verbs) of a taxonomy JSON {"nouns": [...], "verbs": [...]} (the demo's ego_taxonomy.json)."""
    with open(path, encoding="utf-8") as handle:
        data = json.load(handle)
    return list(data["nouns"]), list(data["verbs"])


class EgoClipDataset(ClipDataset):
    """EgoClip pairs with noun/verb multi-hots and a scene-aware negative.

    Items: {"video", "caption", "nouns" [num_nouns], "verbs" [num_verbs], "video_id" (video_uid),
    "clip_id", "index"} and, with negatives=True, "neg_video", "neg_caption", "neg_nouns",
    "neg_verbs", "neg_index", "neg_source".

    The negative is another clip of the same video in the same `bucket_seconds` bucket of
    narration time (EgoVLP's segment_id = video_uid + narration_time // 60), preferring clips that
    do not overlap the anchor in time ("bucket"). When the bucket holds no other clip: the clip of
    the same video nearest in narration time ("video"); when the video has no other clip: a
    random clip of another video ("other"); a one-clip dataset uses the clip itself ("self").
    (EgoVLP samples from the bucket including the anchor itself; we exclude it, since a negative
    identical to the positive carries no signal.)
    """

    def __init__(
        self,
        shards,
        egoclip_csv,
        num_frames: int,
        transform=None,
        *,
        num_nouns: int = 582,
        num_verbs: int = 118,
        negatives: bool = True,
        bucket_seconds: float = 60.0,
        train: bool = True,
        seed: int | None = None,
    ):
        super().__init__(shards, num_frames, transform, train, seed)
        self.num_nouns, self.num_verbs, self.negatives = num_nouns, num_verbs, negatives
        self.rows = []
        for row in formats.read_egoclip(egoclip_csv):
            key = clip_key(row["video_uid"], row["clip_start"], row["clip_end"])
            if key not in self.store:
                self.missing.append(key)
                continue
            where = f"{egoclip_csv} line {row['_line']}"
            self.rows.append(
                {
                    "key": key,
                    "uid": row["video_uid"],
                    "text": row["clip_text"],
                    "time": float(row["narration_time"]),
                    "start": float(row["clip_start"]),
                    "end": float(row["clip_end"]),
                    "nouns": parse_tags(row["tag_noun"], num_nouns, "tag_noun", where),
                    "verbs": parse_tags(row["tag_verb"], num_verbs, "tag_verb", where),
                }
            )
        self._require(len(self.rows), "clip", egoclip_csv)
        self.buckets: dict[tuple[str, int], list[int]] = defaultdict(list)
        self.by_video: dict[str, list[int]] = defaultdict(list)
        for index, row in enumerate(self.rows):
            self.buckets[(row["uid"], math.floor(row["time"] / bucket_seconds))].append(index)
            self.by_video[row["uid"]].append(index)
        self.bucket_seconds = bucket_seconds

    def __len__(self) -> int:
        return len(self.rows)

    def negative_index(self, index: int, rng: np.random.Generator) -> tuple[int, str]:
        row = self.rows[index]
        bucket = self.buckets[(row["uid"], math.floor(row["time"] / self.bucket_seconds))]
        others = [i for i in bucket if i != index]
        if others:
            apart = [i for i in others if self.rows[i]["end"] <= row["start"] or self.rows[i]["start"] >= row["end"]]
            pool = apart or others
            return pool[int(rng.integers(len(pool)))], "bucket"
        same_video = [i for i in self.by_video[row["uid"]] if i != index]
        if same_video:
            return min(same_video, key=lambda i: (abs(self.rows[i]["time"] - row["time"]), i)), "video"
        if len(self.rows) > 1:
            choice = int(rng.integers(len(self.rows) - 1))
            return choice + (choice >= index), "other"
        return index, "self"

    def _clip(self, index: int, rng) -> dict:
        row = self.rows[index]
        return {
            "video": self.load_clip(row["key"], rng),
            "caption": row["text"],
            "nouns": multi_hot(row["nouns"], self.num_nouns),
            "verbs": multi_hot(row["verbs"], self.num_verbs),
        }

    def __getitem__(self, index: int) -> dict:
        rng = self._rng(index)
        item = {
            **self._clip(index, rng),
            "video_id": self.rows[index]["uid"],
            "clip_id": self.rows[index]["key"],
            "index": index,
        }
        if self.negatives:
            neg, source = self.negative_index(index, rng)
            negative = self._clip(neg, rng)
            item.update({f"neg_{k}": v for k, v in negative.items()})
            item.update({"neg_index": neg, "neg_source": source})
        return item


# ----------------------------------------------------------------------------------------------
# EgoMCQ
# ----------------------------------------------------------------------------------------------
class EgoMCQDataset(ClipDataset):
    """EgoMCQ questions: {"query": str, "choices": [5,T,3,H,W], "answer": int, "type": int
    (1 inter-video, 2 intra-video), "question_id": str, "index": int}; middle-of-segment frames.
    Questions with any choice clip missing from the shards are skipped."""

    def __init__(self, shards, egomcq_json, num_frames: int, transform=None):
        super().__init__(shards, num_frames, transform, train=False, seed=None)
        questions = formats.read_egomcq(egomcq_json)
        self.questions = []
        for qid in sorted(questions, key=formats.egomcq_order):
            q = questions[qid]
            choice_ids = sorted(q["choices"], key=formats.egomcq_order)
            keys = [
                clip_key(q["choices"][c]["video_uid"], q["choices"][c]["clip_start"], q["choices"][c]["clip_end"])
                for c in choice_ids
            ]
            absent = [k for k in keys if k not in self.store]
            if absent:
                self.missing += absent
                continue
            self.questions.append(
                {
                    "id": qid,
                    "query": q["query"]["clip_text"],
                    "keys": keys,
                    "answer": int(q["answer"]),
                    "type": int(q["types"]),
                }
            )
        self._require(len(self.questions), "question", egomcq_json)

    def __len__(self) -> int:
        return len(self.questions)

    def __getitem__(self, index: int) -> dict:
        q = self.questions[index]
        choices = torch.stack([self.load_clip(k, None) for k in q["keys"]])
        return {
            "query": q["query"],
            "choices": choices,
            "answer": q["answer"],
            "type": q["type"],
            "question_id": q["id"],
            "index": index,
        }
