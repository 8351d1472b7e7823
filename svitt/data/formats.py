"""One reader per published annotation layout, and the sniffer that tells them apart.

Every part that reads an annotation file (download, frame extraction, datasets, the workflow's
parse-time check) calls this module; nothing else parses these layouts. Pure Python (no torch), so
the workflow imports it when it parses the config.

Layouts (LAYOUTS; docs/data.md gives where each comes from):

    webvid_csv      m-bain/webvid results_*.csv: videoid, contentUrl, duration, page_dir, name
                    (the official download script saves videos/<page_dir>/<videoid>.mp4)
    generic_csv     id, url and/or caption
    retrieval_json  Singularity's retrieval list [{"video": str | [str], "caption": str | [str]}]
                    (a caption list: several texts of one video, or DiDeMo's paragraph; a video list:
                    several ground-truth videos of one caption, SSv2's has_multi_vision_gt files)
    qa_json         Singularity's QA list [{"video": str, "question": str, "answer": str, ...}]
    answer_list     a JSON list of answer strings
    egoclip_tsv     EgoVLP's egoclip.csv, tab-separated
    egomcq_json     EgoVLP's egomcq.json {"<i>": {"query": clip, "choices": {"0".."4": clip},
                    "answer": k, "types": 1 | 2}}
    uid_table       any CSV / TSV with a video_uid column (nlq_videos.tsv)
    nlq_json        Ego4D episodic-memory NLQ annotations, v1 or v2 (svitt.data.nlq reads them)

`sniff(path)` names a file's layout from its header or its first entry (never the whole file: the
workflow sniffs every annotation file each time it starts, and AGQA's or WebVid's lists are large).
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path

LAYOUTS = {
    "webvid_csv": "WebVid CSV (videoid, contentUrl, duration, page_dir, name)",
    "generic_csv": "CSV with id and url and/or caption columns",
    "retrieval_json": 'retrieval JSON list [{"video": ..., "caption": ...}] (Singularity)',
    "qa_json": 'QA JSON list [{"video": ..., "question": ..., "answer": ...}] (Singularity)',
    "answer_list": 'answer list JSON ["answer", ...] (Singularity)',
    "egoclip_tsv": "tab-separated egoclip.csv (EgoVLP)",
    "egomcq_json": 'egomcq.json {"0": {"query", "choices", "answer", "types"}} (EgoVLP)',
    "uid_table": "CSV / TSV with a video_uid column (e.g. nlq_videos.tsv)",
    "nlq_json": "Ego4D NLQ JSON {videos: [{video_uid, clips: [...]}]} (v1 or v2)",
}
# Layouts that name videos (what a folder dataset extracts, what download.py reads).
VIDEO_LIST_LAYOUTS = (
    "webvid_csv",
    "generic_csv",
    "retrieval_json",
    "qa_json",
    "egoclip_tsv",
    "egomcq_json",
    "uid_table",
)
CAPTION_LAYOUTS = ("webvid_csv", "generic_csv", "retrieval_json")  # video-text pairs for training
EGOCLIP_COLUMNS = ("video_uid", "narration_time", "clip_start", "clip_end", "clip_text", "tag_verb", "tag_noun")
# egoclip.csv's whole header as EgoVLP publishes it (the writers of the demo corpus and the miniatures)
EGOCLIP_HEADER = (
    "clip_idx",
    "video_uid",
    "video_dur",
    "narration_source",
    "narration_ind",
    "narration_time",
    "clip_start",
    "clip_end",
    "clip_text",
    "tag_verb",
    "tag_noun",
)
# Containers of the published videos (DiDeMo's Flickr originals come in most of them).
VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".mov", ".avi", ".m4v", ".3gp", ".mpg", ".mpeg", ".wmv", ".flv")
_SNIFF_BYTES = 1 << 16


class InputError(ValueError):
    """An input file that cannot be read as what it should be; the message names the file, what was
    found and what is accepted."""


class UnknownLayout(InputError):
    """A file in none of the layouts: `found` says what it holds."""

    def __init__(self, path, found: str, accepted=tuple(LAYOUTS)):
        self.path, self.found = Path(path), found
        super().__init__(f"{path}: {found} is none of the accepted layouts: {_describe(accepted)}")


# ----------------------------------------------------------------------------------------------
# Sniffing
# ----------------------------------------------------------------------------------------------
def sniff(path: str | Path) -> str:
    """The layout of an annotation file (a key of LAYOUTS), from its header or first entry."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"annotation file {path} does not exist")
    if path.suffix.lower() == ".json":
        return _sniff_json(path)
    return _sniff_table(path)


def check_layout(path: str | Path, accepted: tuple[str, ...], role: str) -> str:
    """sniff(path), or an error naming the file, the layout found and the layouts `role` accepts."""
    try:
        layout = sniff(path)
    except UnknownLayout as error:
        raise UnknownLayout(path, error.found, accepted) from None
    if layout not in accepted:
        raise InputError(f"{path}: found a {LAYOUTS[layout]}; as {role} it must be one of: {_describe(accepted)}")
    return layout


def _describe(layouts) -> str:
    return "; ".join(LAYOUTS[name] for name in layouts)


def table_header(path: Path) -> tuple[list[str], str]:
    """(column names, delimiter) of a CSV / TSV: tab-separated when the header line has a tab."""
    with open(path, newline="", encoding="utf-8") as handle:
        first_line = handle.readline()
    delimiter = "\t" if "\t" in first_line else ","
    return [name.strip() for name in next(csv.reader([first_line], delimiter=delimiter), [])], delimiter


def _sniff_table(path: Path) -> str:
    header, delimiter = table_header(path)
    names = set(header)
    if delimiter == "\t" and set(EGOCLIP_COLUMNS) <= names:
        return "egoclip_tsv"
    if "video_uid" in names:
        return "uid_table"
    if {"videoid", "name"} <= names or {"videoid", "contentUrl"} <= names:
        return "webvid_csv"
    if "id" in names and names & {"url", "caption"}:
        return "generic_csv"
    raise UnknownLayout(
        path,
        f"a table with the unrecognised header {header}",
        ("webvid_csv", "generic_csv", "egoclip_tsv", "uid_table"),
    )


def _sniff_json(path: Path) -> str:
    kind, sample = _json_sample(path)
    found = _json_shape(kind, sample)
    if kind == "list":
        if isinstance(sample, str):
            return "answer_list"
        if isinstance(sample, dict) and "video" in sample and "question" in sample:
            return "qa_json"
        if isinstance(sample, dict) and "video" in sample and "caption" in sample:
            return "retrieval_json"
    elif kind == "object":
        first = next(iter(sample.values()), None)
        if isinstance(first, dict) and {"query", "choices"} <= set(first):
            return "egomcq_json"
        videos = sample.get("videos")
        if isinstance(videos, dict) and "video_uid" in videos:
            return "nlq_json"
    raise UnknownLayout(path, found, ("retrieval_json", "qa_json", "answer_list", "egomcq_json", "nlq_json"))


def _json_shape(kind: str, sample) -> str:
    if kind == "list":
        if isinstance(sample, dict):
            return f"a list of objects with keys {sorted(sample)[:8]}"
        return f"a list of {type(sample).__name__}" if sample is not None else "an empty list"
    if kind == "object":
        return f"an object with keys {list(sample)[:8]}"
    return f"a JSON {kind}"


def _json_sample(path: Path):
    """("list", first element) or ("object", {key: value, ...}) of a JSON file, decoded from a
    prefix (doubled until the needed part is complete). An object's list values are replaced by
    their first element and end the sample."""
    size = path.stat().st_size
    limit = _SNIFF_BYTES
    while True:
        with open(path, encoding="utf-8", errors="replace") as handle:
            text = handle.read(limit)
        try:
            return _decode_sample(text)
        except json.JSONDecodeError as error:
            if limit >= size:
                raise InputError(f"{path} is not valid JSON ({error})") from None
            limit *= 2


def _decode_sample(text: str):
    decoder = json.JSONDecoder()
    pos = _skip(text, 0)
    if pos >= len(text):
        raise json.JSONDecodeError("empty document", text, pos)
    if text[pos] == "[":
        pos = _skip(text, pos + 1)
        if pos < len(text) and text[pos] == "]":
            return "list", None
        return "list", decoder.raw_decode(text, pos)[0]
    if text[pos] != "{":
        value = decoder.raw_decode(text, pos)[0]
        return type(value).__name__, value
    sample, pos = {}, _skip(text, pos + 1)
    while pos < len(text) and text[pos] != "}" and len(sample) < 8:
        key, pos = decoder.raw_decode(text, pos)
        pos = _skip(text, pos)
        if pos >= len(text) or text[pos] != ":":
            raise json.JSONDecodeError("expected ':'", text, pos)
        pos = _skip(text, pos + 1)
        if pos < len(text) and text[pos] == "[":  # a long list: its first element stands for it
            first = _skip(text, pos + 1)
            sample[key] = None if first < len(text) and text[first] == "]" else decoder.raw_decode(text, first)[0]
            return "object", sample
        sample[key], pos = decoder.raw_decode(text, pos)
        pos = _skip(text, pos)
        if pos < len(text) and text[pos] == ",":
            pos = _skip(text, pos + 1)
    if pos >= len(text) and len(sample) < 8:
        raise json.JSONDecodeError("truncated", text, pos)
    return "object", sample


def _skip(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


# ----------------------------------------------------------------------------------------------
# Video lists
# ----------------------------------------------------------------------------------------------
@dataclass
class VideoRef:
    """One video an annotation names: `id` exactly as written there, `url` where the list has one,
    `hint` a path relative to the videos folder where the layout says where the file lives
    (WebVid: <page_dir>/<videoid>.mp4)."""

    row: int
    id: str
    url: str | None = None
    caption: str = ""
    hint: str | None = None


def read_video_list(path: str | Path) -> list[VideoRef]:
    """The videos a file names. WebVid / generic CSV: one per row (repeats kept: the downloader
    reports them). Every other layout: one per distinct video, in order of first mention."""
    path = Path(path)
    layout = check_layout(path, VIDEO_LIST_LAYOUTS, "a video list")
    if layout in ("webvid_csv", "generic_csv"):
        return _read_url_table(path, layout)
    if layout == "egomcq_json":
        uids = [clip["video_uid"] for clip in egomcq_clips(read_egomcq(path))]
    elif layout in ("egoclip_tsv", "uid_table"):
        uids = [row["video_uid"] for row in _read_table(path)]
    else:
        uids = [video for entry in _read_json_list(path) for video in _as_list(entry["video"])]
    distinct = dict.fromkeys(str(uid).strip() for uid in uids)
    return [VideoRef(i, uid) for i, uid in enumerate(distinct)]


def _read_url_table(path: Path, layout: str) -> list[VideoRef]:
    id_col, url_col, cap_col = ("videoid", "contentUrl", "name") if layout == "webvid_csv" else ("id", "url", "caption")
    refs = []
    for i, row in enumerate(_read_table(path)):
        video_id = (row.get(id_col) or "").strip()
        page_dir = (row.get("page_dir") or "").strip() if layout == "webvid_csv" else ""
        refs.append(
            VideoRef(
                i,
                video_id,
                (row.get(url_col) or "").strip() or None,
                row.get(cap_col) or "",
                f"{page_dir}/{video_id}.mp4" if page_dir else None,
            )
        )
    return refs


def _read_table(path: Path) -> list[dict]:
    _, delimiter = table_header(path)
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle, delimiter=delimiter)
        reader.fieldnames = [name.strip() for name in reader.fieldnames or []]
        return list(reader)


def _as_list(value) -> list:
    return list(value) if isinstance(value, list) else [value]


def video_stem(video_id: str) -> str:
    """'video7010.mp4' -> 'video7010'; ids without a video extension are kept."""
    stem, ext = os.path.splitext(video_id)
    return stem if ext.lower() in VIDEO_EXTENSIONS else video_id


# ----------------------------------------------------------------------------------------------
# Singularity's JSON lists
# ----------------------------------------------------------------------------------------------
def _read_json_list(path: Path, required: tuple[str, ...] = ("video",)) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        items = json.load(handle)
    if not isinstance(items, list):
        raise InputError(
            f"{path}: expected a JSON list of entries with keys {list(required)}, got a {type(items).__name__}"
        )
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            raise InputError(
                f"{path}: entry {index} is a {type(item).__name__}, expected an object with keys {list(required)}"
            )
        missing = [key for key in required if key not in item]
        if missing:
            raise InputError(
                f"{path}: entry {index} has no '{missing[0]}' key (has {sorted(item)}; every entry "
                f"needs {list(required)})"
            )
        for key in ("video", "caption"):
            if key in required and not all(isinstance(v, str) and v for v in _as_list(item[key])):
                raise InputError(
                    f"{path}: entry {index}: '{key}' must be a string or a list of strings, got {item[key]!r}"
                )
    return items


@dataclass
class RetrievalEntry:
    """One entry of a retrieval list: its ground-truth videos (several in SSv2's evaluation files)
    and its texts (several captions of the videos, or one paragraph); `extra` the other keys."""

    videos: list[str]
    texts: list[str]
    extra: dict


def read_retrieval(path: str | Path, paragraph: bool = False) -> list[RetrievalEntry]:
    """Singularity's retrieval layout. A caption list is one text per sentence, or with `paragraph`
    the sentences joined by spaces (DiDeMo paragraph retrieval, as Singularity's
    preprocess_para_retrieval_data). An entry may list several videos and several captions, not
    both (no published file does, and the ground truth would be ambiguous)."""
    entries = []
    for index, item in enumerate(_read_json_list(Path(path), ("video", "caption"))):
        videos, texts = [str(v) for v in _as_list(item["video"])], [str(c) for c in _as_list(item["caption"])]
        if paragraph:
            texts = [" ".join(texts)]
        if len(videos) > 1 and len(texts) > 1:
            raise InputError(
                f"{path}: entry {index} lists {len(videos)} videos and {len(texts)} captions; an "
                "entry has several ground-truth videos (one caption) or several captions (one video)"
            )
        entries.append(RetrievalEntry(videos, texts, {k: v for k, v in item.items() if k not in ("video", "caption")}))
    return entries


@dataclass
class CaptionRow:
    """One video-text training pair."""

    id: str
    caption: str
    group: str | None = None


def read_pairs(path: str | Path, group_column: str | None = None, paragraph: bool = False) -> list[CaptionRow]:
    """Video-text pairs of a WebVid CSV, a generic id,caption CSV or a retrieval list (one pair per
    (video, text) of each entry). `group_column`: a column or key that groups rows (the demo's
    twin families), None elsewhere."""
    path = Path(path)
    layout = check_layout(path, CAPTION_LAYOUTS, "video-text pairs")
    if layout == "retrieval_json":
        return [
            CaptionRow(video, text, entry.extra.get(group_column or ""))
            for entry in read_retrieval(path, paragraph)
            for video in entry.videos
            for text in entry.texts
        ]
    id_col, cap_col = ("videoid", "name") if layout == "webvid_csv" else ("id", "caption")
    rows = _read_table(path)
    if rows and cap_col not in rows[0]:
        raise InputError(f"{path}: a {LAYOUTS[layout]} without its caption column {cap_col!r}")
    return [
        CaptionRow(row[id_col].strip(), row[cap_col], row.get(group_column) if group_column else None) for row in rows
    ]


def read_qa(path: str | Path) -> list[dict]:
    """Singularity's QA layout: entries with video, question and answer (a string; answer lists,
    VQA's weighted answers, are not part of any video QA set here and are refused)."""
    items = _read_json_list(Path(path), ("video", "question", "answer"))
    for index, item in enumerate(items):
        if isinstance(item["answer"], (list, dict)):
            raise InputError(
                f"{path}: entry {index} has an answer list {item['answer']!r}; the video QA "
                "layout has one answer string per question"
            )
        if isinstance(item["video"], list):
            raise InputError(f"{path}: entry {index} lists several videos {item['video']!r}; a question has one")
    return items


def read_answer_list(path: str | Path) -> list[str]:
    with open(path, encoding="utf-8") as handle:
        answers = json.load(handle)
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
        raise InputError(f"{path}: expected a non-empty {LAYOUTS['answer_list']}")
    return answers


def annotation_videos(path: str | Path) -> set[str]:
    """The videos an annotation file names, file extensions dropped."""
    return {video_stem(ref.id) for ref in read_video_list(path)}


# ----------------------------------------------------------------------------------------------
# EgoVLP: egoclip.csv and egomcq.json
# ----------------------------------------------------------------------------------------------
def read_egoclip(path: str | Path) -> list[dict]:
    """Rows of a tab-separated egoclip.csv (every column as a string), with their line numbers
    under "_line"."""
    path = Path(path)
    check_layout(path, ("egoclip_tsv",), "EgoClip clips")
    rows = []
    with open(path, newline="", encoding="utf-8") as handle:
        for line, row in enumerate(csv.DictReader(handle, delimiter="\t"), start=2):
            row["_line"] = line
            rows.append(row)
    return rows


def read_egomcq(path: str | Path) -> dict:
    """egomcq.json: {question id: {"query": clip, "choices": {"0".."4": clip}, "answer", "types"}}."""
    path = Path(path)
    check_layout(path, ("egomcq_json",), "EgoMCQ questions")
    with open(path, encoding="utf-8") as handle:
        questions = json.load(handle)
    for qid, question in questions.items():
        missing = [k for k in ("query", "choices", "answer", "types") if k not in question]
        if missing:
            raise InputError(f"{path}: question {qid!r} has no {missing[0]!r} (has {sorted(question)})")
    return questions


def egomcq_order(key: str):
    """Question and choice ids in numeric order ("2" before "10")."""
    return (0, int(key), "") if key.isdigit() else (1, 0, key)


def egomcq_clips(questions: dict) -> list[dict]:
    """Every clip of every question (query, then choices), in question and choice order."""
    clips = []
    for qid in sorted(questions, key=egomcq_order):
        question = questions[qid]
        clips.append(question["query"])
        clips += [question["choices"][c] for c in sorted(question["choices"], key=egomcq_order)]
    return clips


# ----------------------------------------------------------------------------------------------
# What each use of a dataset reads (checked when the workflow starts)
# ----------------------------------------------------------------------------------------------
# use -> [(dataset key, accepted layouts, what the file is for)]
USES = {
    "pretraining": [("annotations", CAPTION_LAYOUTS, "pretraining pairs")],
    "egoclip": [("annotations", ("egoclip_tsv",), "EgoClip pretraining clips")],
    "retrieval": [("annotations", ("retrieval_json",), "a retrieval test split")],
    "retrieval_finetuning": [
        ("annotations", ("retrieval_json",), "a retrieval test split"),
        ("train_annotations", CAPTION_LAYOUTS, "a retrieval finetuning split"),
    ],
    "qa": [
        ("annotations", ("qa_json",), "a QA test split"),
        ("train_annotations", ("qa_json",), "a QA training split"),
        ("answer_list", ("answer_list",), "a QA answer list"),
    ],
    "egomcq": [("annotations", ("egomcq_json",), "EgoMCQ questions")],
    "videos": [("videos", VIDEO_LIST_LAYOUTS, "a video list to download")],
    "folder": [("annotations", VIDEO_LIST_LAYOUTS, "the list of videos to extract")],
}


def check_dataset(name: str, entry: dict, uses: list[str], made_under: str = "resources/") -> None:
    """Check the layout of every existing file a dataset's uses read. Files the workflow makes
    itself (under `made_under`: the demo corpus, the NLQ video list) and files not there yet are
    left to the rules. Raises InputError naming the dataset, the file, the layout found and the
    layouts accepted."""
    for use in uses:
        for key, accepted, role in USES[use]:
            path = entry.get(key)
            if not path or str(path).startswith(made_under) or not Path(path).is_file():
                continue
            try:
                check_layout(path, accepted, role)
            except InputError as error:
                raise InputError(f"dataset {name!r}, {key}: {error}") from None
