"""Miniatures of every dataset configs/paper.yaml reads, in the layouts they are published in:
the data of the rehearsal (workflow_scripts/rehearsal.py, `make rehearsal`).

Each file is written the way its reference loader reads it (docs/data.md names them), with the
awkward cases of the real releases on purpose:

    data/webvid/results_2M_train.csv     m-bain/webvid's columns; contentUrl served by a loopback
                                         HTTP server from webvid_server/<page_dir>/<videoid>.mp4
    data/anno/*.json                     Singularity's downstream layout (jayleicn/singularity,
                                         JerryYLi/svitt): MSR-VTT, DiDeMo (ids with '@', paragraph
                                         captions), Charades, SSv2 (.webm videos; val_small entries
                                         with a list of ground-truth videos), MSRVTT-QA, ANet-QA,
                                         AGQA, answer lists
    data/<dataset>/videos/               the videos under the names the annotations use
    data/ego4d/videos/<uid>/<k>.mp4      EgoVLP's chunked Ego4D videos
    data/ego4d/egoclip.csv, egomcq.json  EgoVLP's layouts (a negative clip_start included)
    data/ego4d/nlq_train.json            Ego4D NLQ v1 (a query without text included)
    data/ego4d/nlq_val.json              Ego4D NLQ v2

Videos are small synthetic clips (a coloured square moving over a gradient). Deterministic from
the seed. Weights are written by svitt.models.published (random values in the published layouts).
"""

from __future__ import annotations

import csv
import json
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from svitt.data.formats import EGOCLIP_HEADER
from svitt.data.mp4 import write_mp4

WORDS = ("a person", "a dog", "a red ball", "a blue car", "a woman", "a man", "the camera", "a child")
ACTIONS = (
    "walks left",
    "runs right",
    "jumps",
    "turns around",
    "picks up a cup",
    "opens a door",
    "moves up",
    "falls down",
)
SSV2_LABELS = ("spinning cube that quickly stops spinning", "pushing pen from left to right", "putting cup onto table")
SSV2_TEMPLATES = (
    "Spinning [something] that quickly stops spinning",
    "Pushing [something] from left to right",
    "Putting [something] onto [something]",
)
QA_ANSWERS = ("dog", "car", "ball", "cup", "door")
FRAME_SIZE = (48, 64)  # H, W of every video (even: H.264 / VP9 with yuv420p)


@dataclass(frozen=True)
class MiniatureSizes:
    """Videos per split. Defaults: the fewest that fill the rehearsal's batches of 2 on every split."""

    webvid: int = 8
    per_split: int = 4  # test and train videos of each downstream dataset
    ego_videos: int = 3


# ----------------------------------------------------------------------------------------------
# Videos
# ----------------------------------------------------------------------------------------------
def synthetic_frames(rng: np.random.Generator, count: int, size=FRAME_SIZE) -> np.ndarray:
    """[count, H, W, 3] uint8: a gradient background and a square moving in a random direction."""
    h, w = size
    base = rng.integers(0, 256, 3)
    ramp = np.linspace(0, 1, w)[None, :, None] * rng.integers(-80, 80, 3)[None, None, :]
    background = np.broadcast_to(np.clip(base[None, None, :] + ramp, 0, 255), (h, w, 3)).astype(np.uint8)
    frames = np.repeat(background[None], count, axis=0)
    colour = rng.integers(0, 256, 3).astype(np.uint8)
    start, step = rng.integers(0, [h - 12, w - 12]), rng.integers(-2, 3, 2)
    for t in range(count):
        y, x = np.clip(start + t * step, 0, [h - 12, w - 12])
        frames[t, y : y + 12, x : x + 12] = colour
    return frames


def write_webm(path: str | Path, frames: np.ndarray, fps: int) -> None:
    """Frames [N, H, W, 3] uint8 as VP9 WebM (Something-Something v2's container)."""
    import av

    with av.open(str(path), "w", format="webm") as container:
        stream = container.add_stream("libvpx-vp9", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"deadline": "realtime", "cpu-used": "8", "threads": "1"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_video(path: Path, rng: np.random.Generator, frames: int = 32, fps: int = 8) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = synthetic_frames(rng, frames)
    (write_webm if path.suffix == ".webm" else write_mp4)(path, pixels, fps)


# ----------------------------------------------------------------------------------------------
# Ids in the forms of the real releases
# ----------------------------------------------------------------------------------------------
def didemo_id(rng) -> str:
    """A Flickr-style DiDeMo video name: '<owner>@N<nn>_<photo id>_<secret>.mp4'."""
    return (
        f"{rng.integers(10**7, 10**8)}@N{rng.integers(0, 100):02d}_{rng.integers(10**9, 10**10)}_"
        f"{rng.integers(0, 16**10):010x}.mp4"
    )


def charades_id(rng) -> str:
    return "".join(rng.choice(list("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"), 5))


def anet_id(rng) -> str:
    alphabet = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")
    return "v_" + "".join(rng.choice(alphabet, 11))


def _uuid(rng) -> str:
    """A random version-4 UUID string (Ego4D's video, clip and annotation ids)."""
    return str(uuid.UUID(int=int(rng.integers(0, 2**63)) << 64 | int(rng.integers(0, 2**63)), version=4))


def caption(rng) -> str:
    return f"{rng.choice(WORDS)} {rng.choice(ACTIONS)}"


def _json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1) + "\n", encoding="utf-8")


def _table(path: Path, header, rows, delimiter=",") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, delimiter=delimiter, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


# ----------------------------------------------------------------------------------------------
# Datasets
# ----------------------------------------------------------------------------------------------
def write_webvid(root: Path, rng, count: int, base_url: str, videos: bool) -> list[str]:
    """results_2M_train.csv with URLs under base_url; the files under root/webvid_server/."""
    rows, texts = [], []
    for i in range(count):
        video_id, page_dir = str(rng.integers(10**9, 2 * 10**9)), f"{(i // 4) * 50 + 1:06d}_{(i // 4) * 50 + 50:06d}"
        text = caption(rng)
        rows.append((video_id, f"{base_url}/{page_dir}/{video_id}.mp4", "PT00H00M04S", page_dir, text))
        texts.append(text)
        if videos:
            write_video(root / "webvid_server" / page_dir / f"{video_id}.mp4", rng)
    _table(root / "data/webvid/results_2M_train.csv", ["videoid", "contentUrl", "duration", "page_dir", "name"], rows)
    return texts


def write_retrieval(
    root: Path,
    rng,
    name: str,
    folder: str,
    ids: list[str],
    captions_per_video: int,
    videos: bool,
    paragraph: bool = False,
) -> list[str]:
    """Singularity's retrieval list over `ids` in root/data/<folder>/videos: one caption (string),
    several (a list: several texts of one video), or a DiDeMo paragraph (a list of sentences)."""
    entries, texts = [], []
    for video_id in ids:
        sentences = [caption(rng) for _ in range(captions_per_video)]
        texts += sentences
        entry = {"video": video_id, "caption": sentences if (paragraph or captions_per_video > 1) else sentences[0]}
        if paragraph:
            entry["duration"] = 30.0
        entries.append(entry)
        if videos:
            write_video(root / "data" / folder / "videos" / video_id, rng)
    _json(root / "data/anno" / f"{name}.json", entries)
    return texts


def write_ssv2(root: Path, rng, per_split: int, videos: bool) -> list[str]:
    """SSv2 label and template retrieval: training entries one video each; val_small entries one
    caption with the list of its ground-truth videos (has_multi_vision_gt)."""
    train_ids = [f"{rng.integers(1, 220847)}.webm" for _ in range(per_split + 2)]
    val_ids = [f"{rng.integers(1, 220847)}.webm" for _ in range(per_split)]
    labels = [int(rng.integers(len(SSV2_LABELS))) for _ in train_ids]
    val_labels = [k % 2 for k in range(len(val_ids))]  # two captions, each with several videos
    texts = []
    for kind, names in (("label", SSV2_LABELS), ("template", SSV2_TEMPLATES)):
        _json(
            root / f"data/anno/ssv2_ret_{kind}_train.json",
            [{"video": v, "caption": names[k]} for v, k in zip(train_ids, labels)],
        )
        _json(
            root / f"data/anno/ssv2_ret_{kind}_val_small.json",
            [
                {"video": [v for v, k in zip(val_ids, val_labels) if k == label], "caption": names[label]}
                for label in sorted(set(val_labels))
            ],
        )
        texts += list(names)
    if videos:
        for video_id in dict.fromkeys(train_ids + val_ids):
            write_video(root / "data/ssv2/videos" / video_id, rng)
    return texts


def write_qa(root: Path, rng, name: str, ids_train: list[str], ids_test: list[str], suffix: str = "") -> list[str]:
    """Singularity's QA list [{"video", "question", "answer", "question_id"}] and its answer list
    (<name>_<split><suffix>.json: AGQA's released files end in _balanced)."""
    texts = []
    for split, ids in (("train", ids_train), ("test", ids_test)):
        entries = []
        for k, video_id in enumerate(ids):
            answer = str(rng.choice(QA_ANSWERS))
            question = f"what is {rng.choice(ACTIONS)} in the video ?"
            entries.append({"video": video_id, "question": question, "answer": answer, "question_id": f"{split}_{k}"})
            texts.append(question)
        _json(root / f"data/anno/{name}_{split}{suffix}.json", entries)
    _json(root / f"data/anno/{name}_answer_list.json", list(QA_ANSWERS))
    return texts + list(QA_ANSWERS)


def write_ego4d(root: Path, rng, count: int, videos: bool) -> list[str]:
    """EgoVLP-chunked Ego4D videos, egoclip.csv, egomcq.json and NLQ annotations (v1 train, v2 val)."""
    uids = [_uuid(rng) for _ in range(count)]
    fps, chunks = 30, (12, 8)  # Ego4D's 30 fps; seconds per chunk: one 20 s timeline in two files
    duration = float(sum(chunks))
    if videos:
        for uid in uids:
            for k, seconds in enumerate(chunks):
                write_video(root / "data/ego4d/videos" / uid / f"{k}.mp4", rng, frames=seconds * fps, fps=fps)
    rows, texts = [], []
    for uid in uids:
        for n in range(6):
            time = 0.3 + 3.0 * n  # the first clip starts before the video: EgoClip has negative starts
            text = f"#C C {rng.choice(['picks', 'drops', 'opens', 'holds'])} the {rng.choice(['cup', 'door', 'knife'])}"
            rows.append(
                [
                    len(rows),
                    uid,
                    duration,
                    "narration_pass_1",
                    n,
                    round(time, 3),
                    round(time - 1.0, 3),
                    round(time + 1.0, 3),
                    text,
                    f"[{int(rng.integers(0, 118))}]",
                    f"[{int(rng.integers(0, 582))}, {int(rng.integers(0, 582))}]",
                ]
            )
            texts.append(text)
    _table(root / "data/ego4d/egoclip.csv", EGOCLIP_HEADER, rows, delimiter="\t")
    clip = lambda row: dict(zip(EGOCLIP_HEADER, row))  # noqa: E731
    by_video = [[r for r in rows if r[1] == uid] for uid in uids]
    questions = {}
    for q, kind in enumerate((1, 2)):  # inter-video, then intra-video
        query = by_video[0][q + 1]
        if kind == 1:
            others = [by_video[(v % (count - 1)) + 1][v % 6] for v in range(4)]
        else:
            others = [r for r in by_video[0] if r is not query][:4]
        answer = q + 1
        choices = others[:answer] + [query] + others[answer:]
        questions[str(q)] = {
            "query": clip(query),
            "choices": {str(i): clip(c) for i, c in enumerate(choices)},
            "answer": answer,
            "types": kind,
        }
    _json(root / "data/ego4d/egomcq.json", questions)
    texts += _write_nlq(root / "data/ego4d/nlq_train.json", rng, uids[:2], "v1", duration, with_empty=True)
    texts += _write_nlq(root / "data/ego4d/nlq_val.json", rng, uids[2:], "2.0", duration)
    return texts


def _write_nlq(path: Path, rng, uids: list[str], version: str, duration: float, with_empty: bool = False) -> list[str]:
    """Ego4D NLQ annotations: videos -> clips (two 10 s clips per video) -> annotations ->
    language_queries with windows in seconds from the clip start."""
    texts, videos = [], []
    for uid in uids:
        clips = []
        for c, start in enumerate((0.0, duration / 2)):
            queries = []
            for q in range(3):
                s = float(rng.uniform(0, 7))
                query = f"where did i put the {rng.choice(['cup', 'knife', 'phone'])} ?"
                entry = {
                    "clip_start_sec": round(s, 3),
                    "clip_end_sec": round(s + 2.0, 3),
                    "video_start_sec": round(start + s, 3),
                    "video_end_sec": round(start + s + 2.0, 3),
                    "video_start_frame": int((start + s) * 30),
                    "video_end_frame": int((start + s + 2) * 30),
                    "template": "Objects: Where is object X?",
                    "query": query,
                    "slot_x": "cup",
                    "verb_x": "put",
                    "raw_tags": ["Objects: Where is object X?", query, "cup", "put"],
                }
                if with_empty and c == 0 and q == 2:
                    entry["query"] = None  # Ego4D has queries without text; readers skip them
                else:
                    texts.append(query)
                queries.append(entry)
            clips.append(
                {
                    "clip_uid": _uuid(rng),
                    "video_start_sec": start - (4e-7 if version != "v1" else 0.0),
                    "video_end_sec": start + duration / 2,
                    "video_start_frame": int(start * 30),
                    "video_end_frame": int((start + duration / 2) * 30),
                    "clip_start_sec": 0,
                    "clip_end_sec": duration / 2,
                    "source_clip_uid": uid,
                    "annotations": [{"language_queries": queries, "annotation_uid": _uuid(rng)}],
                }
            )
        videos.append({"video_uid": uid, "clips": clips, "split": "train" if version == "v1" else "val"})
    header = {
        "version": version,
        "date": "211209" if version == "v1" else "230105",
        "description": f"NLQ Annotations ({'train' if version == 'v1' else 'val'})",
    }
    header["manifest" if version == "v1" else "metadata"] = "s3://ego4d-consortium-sharing/public/manifest.csv"
    _json(path, {**header, "videos": videos})
    return texts


def make_miniatures(
    root: str | Path, base_url: str, seed: int = 0, sizes: MiniatureSizes = MiniatureSizes(), videos: bool = True
) -> list[str]:
    """Every dataset of configs/paper.yaml under root/data (and WebVid's served files under
    root/webvid_server); returns every text written (for the tokenizer's vocabulary).
    videos=False writes the annotation files only (enough for a dry run)."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    n = sizes.per_split
    texts = write_webvid(root, rng, sizes.webvid, base_url, videos)
    msrvtt_test = [f"video{7000 + i}.mp4" for i in range(n)]
    msrvtt_train = [f"video{i}.mp4" for i in range(n)]
    texts += write_retrieval(root, rng, "msrvtt_ret_test1k", "msrvtt", msrvtt_test, 1, videos)
    texts += write_retrieval(root, rng, "msrvtt_ret_train9k", "msrvtt", msrvtt_train, 2, videos)
    texts += write_retrieval(
        root, rng, "didemo_ret_test", "didemo", [didemo_id(rng) for _ in range(n)], 3, videos, paragraph=True
    )
    texts += write_retrieval(
        root, rng, "didemo_ret_train", "didemo", [didemo_id(rng) for _ in range(n)], 3, videos, paragraph=True
    )
    charades_test = [f"{charades_id(rng)}.mp4" for _ in range(n)]
    charades_train = [f"{charades_id(rng)}.mp4" for _ in range(n)]
    texts += write_retrieval(root, rng, "charades-script_test", "charades", charades_test, 1, videos)
    texts += write_retrieval(root, rng, "charades-script_train", "charades", charades_train, 1, videos)
    texts += write_ssv2(root, rng, n, videos)
    texts += write_qa(root, rng, "msrvtt_qa", msrvtt_train, msrvtt_test)
    anet_train, anet_test = [f"{anet_id(rng)}.mp4" for _ in range(n)], [f"{anet_id(rng)}.mp4" for _ in range(n)]
    texts += write_qa(root, rng, "anet_qa", anet_train, anet_test)
    if videos:
        for video_id in anet_train + anet_test:
            write_video(root / "data/activitynet/videos" / video_id, rng)
    texts += write_qa(root, rng, "agqa", charades_train, charades_test, suffix="_balanced")
    texts += write_ego4d(root, rng, sizes.ego_videos, videos)
    return texts
