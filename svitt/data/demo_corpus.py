"""The embedded demo corpus: small synthetic videos whose captions depend on the order of events.

Every clip shows two coloured shapes; first one moves, then the other ("the red circle moves
left, then the blue square moves up"). Clips come in families of four built from two events
A = (object a, direction dA) and B = (object b, direction dB), all with the same start layout:

    fwd      A then B                          "the a moves dA, then the b moves dB"
    rev      fwd's frames in reverse order     "the b moves -dB, then the a moves -dA"
    swap     B then A (event-order twin)       "the b moves dB, then the a moves dA"
    swaprev  swap's frames in reverse order    "the a moves -dA, then the b moves -dB"

fwd/rev and swap/swaprev are time-reversed twins (identical frames, reversed), fwd/swap and
rev/swaprev are event-order twins. A model that ignores frame order scores exactly chance on the
time-reversed twins. The event of each half spans half the clip, so with T = 4 frames and
2-frame tubelets each tubelet sees one event's motion.

The egocentric part: long videos of a scene with three objects and the camera wearer's hand,
narrated every couple of seconds ("#C C lifts the red ball"), written as egoclip.csv and
egomcq.json in the official layouts, and Ego4D NLQ queries over clips of the same videos ("when
did I lift the red ball?", the answer window being that action) as nlq_train.json (the EgoClip
videos) and nlq_val.json (the held-out EgoMCQ videos).

Everything is deterministic from the seed (numpy Generator; libx264 single-threaded).
"""
from __future__ import annotations

import csv
import functools
import itertools
import multiprocessing
import json
import os
import re
import shutil
import uuid
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import av
import numpy as np
from tqdm import tqdm

FORMAT_VERSION = 1

COLORS = {
    "red": (225, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 220, 40),
    "purple": (165, 60, 210),
    "white": (240, 240, 240),
}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}
VARIANTS = ("fwd", "rev", "swap", "swaprev")

# Egocentric vocabulary: shape -> noun, and the Ego4D-style verb classes.
EGO_NOUNS = {"circle": "ball", "square": "cube", "triangle": "cone"}
EGO_NOUN_LIST = sorted(EGO_NOUNS.values())  # ["ball", "cone", "cube"]
EGO_VERB_LIST = ["lift", "lower", "move", "shake"]
HAND_COLOR = (230, 180, 140)
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


@dataclass(frozen=True)
class Event:
    color: str
    shape: str
    direction: str

    @property
    def noun_phrase(self) -> str:
        return f"the {self.color} {self.shape}"

    def reversed(self) -> "Event":
        return Event(self.color, self.shape, OPPOSITE[self.direction])

    def sentence(self) -> str:
        return f"{self.noun_phrase} moves {self.direction}"


def caption(first: Event, second: Event) -> str:
    return f"{first.sentence()}, then {second.sentence()}"


def family_variants(a: Event, b: Event) -> dict[str, tuple[Event, Event]]:
    """The (first, second) events each variant's caption describes."""
    return {
        "fwd": (a, b),
        "rev": (b.reversed(), a.reversed()),
        "swap": (b, a),
        "swaprev": (a.reversed(), b.reversed()),
    }


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


# ----------------------------------------------------------------------------------------------
# Video writing
# ----------------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------
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
        box[m:size - m, m:size - m] = True
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
    sub = mask[fy0 - y0:fy1 - y0, fx0 - x0:fx1 - x0]
    frame[fy0:fy1, fx0:fx1][sub] = color


def place_pair(a: Event, b: Event, geo: DemoGeometry, rng: np.random.Generator):
    """Start positions (top-left) for two objects whose swept boxes never overlap."""
    s, span = geo.object_size, geo.size - geo.object_size
    for _ in range(10_000):
        positions = []
        for event in (a, b):
            dx, dy = DIRECTIONS[event.direction]
            lo_x, hi_x = max(0, -dx * geo.travel), span - max(0, dx * geo.travel)
            lo_y, hi_y = max(0, -dy * geo.travel), span - max(0, dy * geo.travel)
            positions.append((rng.integers(lo_x, hi_x + 1), rng.integers(lo_y, hi_y + 1)))
        boxes = [_swept_box(p, e, geo) for p, e in zip(positions, (a, b))]
        if not _overlap(boxes[0], boxes[1], margin=2):
            return positions
    raise RuntimeError(f"cannot place two {s}px objects travelling {geo.travel}px in {geo.size}px frames")


def _swept_box(pos, event: Event, geo: DemoGeometry):
    dx, dy = DIRECTIONS[event.direction]
    x1, y1 = pos[0] + dx * geo.travel, pos[1] + dy * geo.travel
    s = geo.object_size
    return min(pos[0], x1), min(pos[1], y1), max(pos[0], x1) + s, max(pos[1], y1) + s


def _overlap(p, q, margin: int) -> bool:
    return not (p[2] + margin <= q[0] or q[2] + margin <= p[0] or p[3] + margin <= q[1] or q[3] + margin <= p[1])


def render_two_events(first: tuple[Event, tuple], second: tuple[Event, tuple], background,
                      geo: DemoGeometry) -> np.ndarray:
    """Frames [N, H, W, 3]: `first` object moves during the first half, `second` during the second.

    Each argument is (event, start position). The mover of a half goes from its start to
    start + direction * travel over that half's frames; the other object stands still.
    """
    n, half = geo.frames, geo.frames // 2
    frames = np.empty((n, geo.size, geo.size, 3), np.uint8)
    frames[:] = background
    for t in range(n):
        for k, (event, start) in enumerate((first, second)):
            progress = np.clip(t / (half - 1), 0, 1) if k == 0 else np.clip((t - half) / (n - half - 1), 0, 1)
            dx, dy = DIRECTIONS[event.direction]
            x = start[0] + dx * geo.travel * progress
            y = start[1] + dy * geo.travel * progress
            draw(frames[t], shape_mask(event.shape, geo.object_size), COLORS[event.color], x, y)
    return frames


def render_family(a: Event, b: Event, geo: DemoGeometry, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The four variants' frames; rev/swaprev are exactly fwd/swap reversed in time."""
    pa, pb = place_pair(a, b, geo, rng)
    background = rng.integers(0, 70, size=3).astype(np.uint8)
    fwd = render_two_events((a, pa), (b, pb), background, geo)
    swap = render_two_events((b, pb), (a, pa), background, geo)
    return {"fwd": fwd, "rev": fwd[::-1].copy(), "swap": swap, "swaprev": swap[::-1].copy()}


# ----------------------------------------------------------------------------------------------
# Families and splits
# ----------------------------------------------------------------------------------------------
def all_families() -> list[tuple[Event, Event]]:
    """One (A, B) per family of four captions; objects of a pair differ in colour or shape."""
    events = [Event(c, s, d) for c in COLORS for s in SHAPES for d in DIRECTIONS]
    seen, families = set(), []
    for a, b in itertools.permutations(events, 2):
        if (a.color, a.shape) == (b.color, b.shape):
            continue
        key = frozenset(family_variants(a, b).values())
        if key not in seen:
            seen.add(key)
            families.append((a, b))
    return families


def _family_count(videos: int, flag: str) -> int:
    if videos < 0 or videos % 4:
        raise ValueError(f"{flag} must be a non-negative multiple of 4 (families of four twins), got {videos}")
    return videos // 4


@dataclass
class Clip:
    id: str
    split: str
    family: int
    variant: str
    first: Event
    second: Event

    @property
    def caption(self) -> str:
        return caption(self.first, self.second)


def plan_clips(sizes: DemoSizes, rng: np.random.Generator) -> tuple[list[Clip], dict[tuple[str, int], tuple]]:
    """Clips of every split (disjoint families) and the (A, B) events of each family."""
    counts = {"train": _family_count(sizes.train_videos, "--train-videos"),
              "test": _family_count(sizes.test_videos, "--test-videos"),
              "qa": _family_count(sizes.qa_videos, "--qa-videos")}
    families = all_families()
    needed = sum(counts.values())
    if needed > len(families):
        raise ValueError(f"{needed} families requested but only {len(families)} distinct ones exist "
                         f"({4 * len(families)} videos)")
    order = rng.permutation(len(families))
    clips, events, cursor = [], {}, 0
    for split, count in counts.items():
        for family in range(count):
            a, b = families[order[cursor]]
            cursor += 1
            events[(split, family)] = (a, b)
            for variant, (first, second) in family_variants(a, b).items():
                clips.append(Clip(f"{split}_{family:05d}_{variant}", split, family, variant, first, second))
    return clips, events


# ----------------------------------------------------------------------------------------------
# QA
# ----------------------------------------------------------------------------------------------
def qa_pairs(clip: Clip, count: int, rng: np.random.Generator) -> list[dict]:
    """MSRVTT-QA style one-word questions about order and direction."""
    f, s = clip.first, clip.second
    before = (rng.random() < 0.5)
    candidates = [
        ("what color is the shape that moves first?", f.color),
        ("what shape moves second?", s.shape),
        (f"which way does {f.noun_phrase} move?", f.direction),
        (f"which way does {s.noun_phrase} move?", s.direction),
        ((f"does {f.noun_phrase} move before {s.noun_phrase}?", "yes") if before else
         (f"does {s.noun_phrase} move before {f.noun_phrase}?", "no")),
    ]
    chosen = rng.choice(len(candidates), size=min(count, len(candidates)), replace=False)
    return [{"video": clip.id, "question": candidates[i][0], "answer": candidates[i][1]} for i in sorted(chosen)]


# ----------------------------------------------------------------------------------------------
# Egocentric videos
# ----------------------------------------------------------------------------------------------
@dataclass
class EgoAction:
    start: float
    end: float
    obj: int
    verb: str
    side: str = ""  # left/right for "move"
    noun: str = ""
    text: str = ""


def _ego_uid(rng: np.random.Generator) -> str:
    return str(uuid.UUID(bytes=rng.bytes(16), version=4))


def plan_ego_video(duration: float, geo: DemoGeometry, rng: np.random.Generator):
    """Scene (background, objects, start positions) and one action per narration slot."""
    s, span = geo.object_size, geo.size - geo.object_size
    kinds = rng.choice(len(COLORS) * len(SHAPES), size=3, replace=False)
    objects = [(list(COLORS)[k // len(SHAPES)], SHAPES[k % len(SHAPES)]) for k in kinds]
    positions = [np.array([4 + i * (span - 8) / 2, rng.integers(14, span - 18)], float) for i in range(3)]
    background = rng.integers(0, 90, size=3).astype(np.uint8)
    actions, pos = [], [p.copy() for p in positions]
    slot = 0.0
    while slot + geo.ego_narration_every <= duration + 1e-9:
        obj = int(rng.integers(3))
        options = ["shake"]
        if pos[obj][1] - 8 >= 4:
            options.append("lift")
        if pos[obj][1] + 8 <= span - 4:
            options.append("lower")
        for side, dx in (("left", -12), ("right", 12)):
            if 0 <= pos[obj][0] + dx <= span and not _collides(pos, obj, dx, s):
                options.append(f"move-{side}")
        choice = options[int(rng.integers(len(options)))]
        verb, _, side = choice.partition("-")
        color, shape = objects[obj]
        noun = EGO_NOUNS[shape]
        text = {"move": f"#C C moves the {color} {noun} to the {side}", "lift": f"#C C lifts the {color} {noun}",
                "lower": f"#C C lowers the {color} {noun}", "shake": f"#C C shakes the {color} {noun}"}[verb]
        action = EgoAction(round(slot + 0.2, 3), round(slot + geo.ego_narration_every - 0.2, 3), obj, verb, side,
                           noun, text)
        actions.append(action)
        pos[obj] = pos[obj] + _displacement(action)
        slot += geo.ego_narration_every
    return {"objects": objects, "positions": positions, "background": background, "actions": actions}


def _collides(pos, obj: int, dx: float, s: int) -> bool:
    x = pos[obj][0] + dx
    return any(abs(x - p[0]) < s + 2 and abs(pos[obj][1] - p[1]) < s + 2 for k, p in enumerate(pos) if k != obj)


def _displacement(action: EgoAction) -> np.ndarray:
    return {"lift": np.array([0, -8.0]), "lower": np.array([0, 8.0]), "shake": np.array([0, 0.0]),
            "move": np.array([-12.0 if action.side == "left" else 12.0, 0])}[action.verb]


def render_ego_video(plan: dict, duration: float, geo: DemoGeometry) -> np.ndarray:
    """Frames [N, H, W, 3] of a narrated egocentric scene."""
    n = int(round(duration * geo.ego_fps))
    s = geo.object_size
    masks = [shape_mask(shape, s) for _, shape in plan["objects"]]
    hand = shape_mask("circle", s // 2 + 2)
    frames = np.empty((n, geo.size, geo.size, 3), np.uint8)
    frames[:] = plan["background"]
    frames[:, geo.size * 3 // 4:] = np.clip(plan["background"].astype(int) + 40, 0, 255)  # table edge
    pos = [p.copy() for p in plan["positions"]]
    actions = iter(plan["actions"])
    current = next(actions, None)
    for t in range(n):
        time_s = t / geo.ego_fps
        while current is not None and time_s >= current.end:
            pos[current.obj] = pos[current.obj] + _displacement(current)
            current = next(actions, None)
        shown = [p.copy() for p in pos]
        hand_at = np.array([geo.size / 2 - hand.shape[0] / 2, geo.size - hand.shape[0] / 2])
        if current is not None and current.start <= time_s < current.end:
            phase = (time_s - current.start) / (current.end - current.start)
            offset = _displacement(current) * phase
            if current.verb == "shake":
                offset = np.array([4 * np.sin(2 * np.pi * 2 * phase), 0.0])
            shown[current.obj] = pos[current.obj] + offset
            hand_at = shown[current.obj] + np.array([s / 2 - hand.shape[0] / 2, s - 2])
        for (color, _), mask, p in zip(plan["objects"], masks, shown):
            draw(frames[t], mask, COLORS[color], p[0], p[1])
        draw(frames[t], hand, HAND_COLOR, hand_at[0], hand_at[1])
    return frames


def ego_rows(uid: str, duration: float, actions: list[EgoAction]) -> list[dict]:
    """egoclip.csv-style rows (without clip_idx) of one video."""
    rows = []
    for k, a in enumerate(actions):
        rows.append({
            "video_uid": uid, "video_dur": f"{duration:.3f}", "narration_source": "narration_pass_1",
            "narration_ind": k, "narration_time": round((a.start + a.end) / 2, 3),
            "clip_start": a.start, "clip_end": a.end, "clip_text": a.text,
            "tag_verb": f"[{EGO_VERB_LIST.index(a.verb)}]", "tag_noun": f"[{EGO_NOUN_LIST.index(a.noun)}]",
        })
    return rows


EGOCLIP_COLUMNS = ["clip_idx", "video_uid", "video_dur", "narration_source", "narration_ind", "narration_time",
                   "clip_start", "clip_end", "clip_text", "tag_verb", "tag_noun"]


def make_egomcq(mcq_rows: dict[str, list[dict]], questions: int, rng: np.random.Generator) -> dict:
    """EgoMCQ: {"0": {"query": clip, "choices": {"0".."4": clip}, "answer": k, "types": 1|2}}.

    types 1 (inter-video): the other four choices come from four other videos;
    types 2 (intra-video): the other four are clips of the same video with other narrations.
    """
    uids = sorted(mcq_rows)
    if questions and len(uids) < 5:
        raise ValueError(f"EgoMCQ inter-video questions need at least 5 held-out ego videos, got {len(uids)} "
                         "(--ego-mcq-videos)")
    out = {}
    for q in range(questions):
        kind = 1 if q % 2 == 0 else 2
        uid = uids[int(rng.integers(len(uids)))]
        query = mcq_rows[uid][int(rng.integers(len(mcq_rows[uid])))]
        if kind == 1:
            others = rng.choice([u for u in uids if u != uid], size=4, replace=False)
            distractors = [mcq_rows[u][int(rng.integers(len(mcq_rows[u])))] for u in others]
        else:
            pool = [r for r in mcq_rows[uid] if r["clip_text"] != query["clip_text"]]
            if len(pool) < 4:
                raise ValueError(f"ego video {uid} has fewer than 4 clips with other narrations; "
                                 "use longer --ego-seconds")
            distractors = [pool[i] for i in rng.choice(len(pool), size=4, replace=False)]
        answer = int(rng.integers(5))
        choices = distractors[:answer] + [query] + distractors[answer:]
        out[str(q)] = {"query": dict(query), "choices": {str(i): dict(c) for i, c in enumerate(choices)},
                       "answer": answer, "types": kind}
    return out


def nlq_query_text(action: EgoAction, color: str) -> str:
    """The Ego4D-style question whose answer is this action's window."""
    where = f" to the {action.side}" if action.verb == "move" else ""
    return f"when did I {action.verb} the {color} {action.noun}{where}?"


def nlq_clip_spans(duration: float, geo: DemoGeometry) -> list[tuple[float, float]]:
    """[start, end) of the NLQ clips cut from a video: consecutive ego_nlq_clip_seconds pieces,
    the last one shorter (0: the whole video is one clip)."""
    length = geo.ego_nlq_clip_seconds if geo.ego_nlq_clip_seconds > 0 else duration
    starts = np.arange(0.0, duration - 1e-9, length)
    return [(float(s), float(min(s + length, duration))) for s in starts]


def make_nlq(plans: dict[str, dict], split: str, duration: float, geo: DemoGeometry) -> dict:
    """Ego4D NLQ annotations (v1 layout) over clips of the videos in `plans` {uid: plan}.

    A clip's queries ask for the actions that happen exactly once in it (each query has one
    answer, as in Ego4D); the answer window is the action's [start, end], in seconds from the clip
    start. clip / annotation uids are uuid5 of the video uid, so no random draw is spent here."""
    videos = []
    for uid, plan in plans.items():
        clips = []
        for k, (c0, c1) in enumerate(nlq_clip_spans(duration, geo)):
            inside = [a for a in plan["actions"] if a.start >= c0 and a.end <= c1]
            kinds = Counter((a.obj, a.verb, a.side) for a in inside)
            queries = []
            for a in inside:
                if kinds[(a.obj, a.verb, a.side)] != 1:
                    continue
                color = plan["objects"][a.obj][0]
                queries.append({
                    "clip_start_sec": round(a.start - c0, 3), "clip_end_sec": round(a.end - c0, 3),
                    "video_start_sec": a.start, "video_end_sec": a.end,
                    "video_start_frame": int(round(a.start * geo.ego_fps)),
                    "video_end_frame": int(round(a.end * geo.ego_fps)),
                    "template": "Objects: When did I Y X?", "query": nlq_query_text(a, color),
                    "slot_x": f"{color} {a.noun}", "verb_x": a.verb})
            clips.append({
                "clip_uid": str(uuid.uuid5(uuid.UUID(uid), f"nlq-clip-{k}")),
                "video_start_sec": c0, "video_end_sec": c1,
                "video_start_frame": int(round(c0 * geo.ego_fps)), "video_end_frame": int(round(c1 * geo.ego_fps)),
                "clip_start_sec": 0.0, "clip_end_sec": c1 - c0,
                "annotations": [{"annotation_uid": str(uuid.uuid5(uuid.UUID(uid), f"nlq-annotation-{k}")),
                                 "language_queries": queries}]})
        videos.append({"video_uid": uid, "split": split, "clips": clips})
    return {"version": "1", "description": f"NLQ Annotations ({split}) of the demo corpus", "videos": videos}


# ----------------------------------------------------------------------------------------------
# Vocabulary
# ----------------------------------------------------------------------------------------------
def basic_tokens(text: str) -> list[str]:
    """Lower-cased words and single punctuation marks, as BERT's basic tokenizer splits them."""
    return re.findall(r"[a-z0-9]+|[^\sa-z0-9]", text.lower())


def write_vocab(folder: Path, texts) -> Path:
    """A WordPiece vocab ([PAD]=0, [UNK], [CLS], [SEP], [MASK], then every word) + tokenizer config.

    Load with `BertTokenizerFast.from_pretrained(folder)` or `BertTokenizerFast(vocab=str(vocab))`.
    (transformers 5 silently ignores `vocab_file=`: every token becomes [UNK].)
    """
    words = {"#", "c"}
    for text in texts:
        words.update(basic_tokens(text))
    folder.mkdir(parents=True, exist_ok=True)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(SPECIAL_TOKENS + sorted(words)) + "\n", encoding="utf-8")
    config = {"tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": 32,
              "pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]",
              "mask_token": "[MASK]"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return vocab


def load_tokenizer(folder: str | Path):
    """The demo corpus's BERT WordPiece tokenizer, offline."""
    from transformers import BertTokenizerFast

    return BertTokenizerFast.from_pretrained(str(folder), local_files_only=True)


# ----------------------------------------------------------------------------------------------
# The whole corpus
# ----------------------------------------------------------------------------------------------
def parallel_map(fn, jobs: list, workers: int, desc: str, progress: bool) -> list:
    """fn over jobs in worker processes (PyAV encoding holds the GIL, threads do not scale)."""
    bar = tqdm(total=len(jobs), desc=desc, disable=not progress)
    try:
        if workers <= 1 or len(jobs) <= 1:
            out = []
            for job in jobs:
                out.append(fn(job))
                bar.update(1)
            return out
        context = multiprocessing.get_context("forkserver")
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            out = []
            for result in pool.map(fn, jobs, chunksize=max(1, len(jobs) // (8 * workers))):
                out.append(result)
                bar.update(1)
            return out
    finally:
        bar.close()


def _render_family_job(job) -> None:
    prefix, a, b, seed, geo = job
    for variant, frames in render_family(a, b, geo, np.random.default_rng(seed)).items():
        write_mp4(f"{prefix}_{variant}.mp4", frames, geo.fps)


def _render_ego_job(job) -> None:
    """One ego video: a single mp4, or EgoVLP-style chunks <uid>/<k>.mp4 of ego_chunk_seconds."""
    target, plan, seconds, geo = job
    frames = render_ego_video(plan, seconds, geo)
    if geo.ego_chunk_seconds and geo.ego_chunk_seconds > 0:
        per_chunk = int(round(geo.ego_chunk_seconds * geo.ego_fps))
        target.mkdir()
        for c, start in enumerate(range(0, len(frames), per_chunk)):
            write_mp4(target / f"{c}.mp4", frames[start:start + per_chunk], geo.ego_fps)
    else:
        write_mp4(target.with_suffix(".mp4"), frames, geo.ego_fps)


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=1) + "\n", encoding="utf-8")


def _write_csv(path: Path, header: list[str], rows, delimiter: str = ",") -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, delimiter=delimiter, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def _iso_duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"PT{s // 3600:02d}H{s % 3600 // 60:02d}M{s % 60:02d}S"


def make_demo_corpus(out_dir: str | Path, seed: int = 0, sizes: DemoSizes | None = None,
                     geometry: DemoGeometry | None = None, workers: int = 1, progress: bool = True) -> dict:
    """Generate the corpus into `out_dir` (built under a temporary name, then renamed).

    Returns the summary also written to `corpus.json`. See docs/data.md for the layout.
    """
    sizes, geo = sizes or DemoSizes(), geometry or DemoGeometry()
    _check_geometry(geo)
    final = Path(out_dir).resolve()
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "videos").mkdir(parents=True)
    (tmp / "ego_videos").mkdir()
    rng = np.random.default_rng(seed)
    try:
        summary = _generate(tmp, final, seed, sizes, geo, rng, workers, progress)
        _write_json(tmp / "corpus.json", summary)
        _swap_in(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary


def _check_geometry(geo: DemoGeometry) -> None:
    if geo.frames < 4 or geo.frames % 2:
        raise ValueError(f"--frames must be an even number >= 4, got {geo.frames}")
    if geo.size % 2 or geo.size < geo.object_size * 2 + geo.travel:
        raise ValueError(f"--size {geo.size} must be even and >= 2 * object size + travel "
                         f"({2 * geo.object_size + geo.travel})")


def _swap_in(tmp: Path, final: Path) -> None:
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def _generate(tmp: Path, final: Path, seed: int, sizes: DemoSizes, geo: DemoGeometry,
              rng: np.random.Generator, workers: int, progress: bool) -> dict:
    clips, events = plan_clips(sizes, rng)
    family_seeds = {key: int(rng.integers(2**63)) for key in events}

    jobs = [(tmp / "videos" / f"{split}_{family:05d}", *events[(split, family)], family_seeds[(split, family)], geo)
            for split, family in events]
    parallel_map(_render_family_job, jobs, workers, "demo clips (families of 4)", progress)
    url = {c.id: (final / "videos" / f"{c.id}.mp4").as_uri() for c in clips}
    duration = _iso_duration(geo.frames / geo.fps)

    train = [c for c in clips if c.split == "train"]
    _write_csv(tmp / "webvid_train.csv", ["videoid", "contentUrl", "duration", "page_dir", "name", "family", "variant"],
               [[c.id, url[c.id], duration, "demo", c.caption, f"train_{c.family:05d}", c.variant] for c in train])
    downstream = [c for c in clips if c.split in ("test", "qa")]
    _write_csv(tmp / "downstream_videos.csv", ["id", "url", "caption"],
               [[c.id, url[c.id], c.caption] for c in downstream])
    _write_retrieval(tmp, [c for c in clips if c.split == "test"], train)
    texts = [c.caption for c in clips]
    texts += _write_qa(tmp, [c for c in clips if c.split == "qa"], sizes, rng)
    ego_texts, ego_summary = _write_ego(tmp, final, sizes, geo, rng, workers, progress)
    texts += ego_texts
    vocab = write_vocab(tmp / "tokenizer", texts)
    return {
        "format_version": FORMAT_VERSION, "seed": seed, "sizes": asdict(sizes), "geometry": asdict(geo),
        "videos": {split: sum(c.split == split for c in clips) for split in ("train", "test", "qa")},
        "ego": ego_summary, "vocab_size": len(vocab.read_text().split("\n")) - 1,
        "variants": {"fwd": "A then B", "rev": "fwd reversed in time", "swap": "B then A",
                     "swaprev": "swap reversed in time"},
    }


def _write_retrieval(tmp: Path, test: list[Clip], train: list[Clip]) -> None:
    twin = {"fwd": ("rev", "swap"), "rev": ("fwd", "swaprev"), "swap": ("swaprev", "fwd"),
            "swaprev": ("swap", "rev")}
    items, pairs, paragraphs = [], [], []
    for c in test:
        rev_id = f"test_{c.family:05d}_{twin[c.variant][0]}"
        order_id = f"test_{c.family:05d}_{twin[c.variant][1]}"
        items.append({"video": c.id, "caption": c.caption, "family": f"test_{c.family:05d}",
                      "variant": c.variant, "reverse_twin": rev_id, "order_twin": order_id})
        paragraphs.append({"video": c.id, "caption": [c.first.sentence() + ".", "then " + c.second.sentence() + "."]})
        if c.variant in ("fwd", "swap"):
            pairs.append({"a": c.id, "b": rev_id, "kind": "reverse"})
        if c.variant in ("fwd", "rev"):
            pairs.append({"a": c.id, "b": order_id, "kind": "order"})
    _write_json(tmp / "retrieval_test.json", items)
    _write_json(tmp / "retrieval_test_didemo.json", paragraphs)
    _write_json(tmp / "twins_test.json", pairs)
    _write_json(tmp / "retrieval_train.json", [{"video": c.id, "caption": c.caption} for c in train])


def _write_qa(tmp: Path, qa_clips: list[Clip], sizes: DemoSizes, rng: np.random.Generator) -> list[str]:
    families = sorted({c.family for c in qa_clips})
    n_test = max(1, len(families) // 4) if len(families) > 1 else 0
    test_families = set(families[len(families) - n_test:])
    splits = {"train": [], "test": []}
    for c in qa_clips:
        splits["test" if c.family in test_families else "train"] += qa_pairs(c, sizes.qa_questions_per_video, rng)
    answers = sorted({q["answer"] for qs in splits.values() for q in qs})
    _write_json(tmp / "qa_train.json", splits["train"])
    _write_json(tmp / "qa_test.json", splits["test"])
    _write_json(tmp / "qa_answers.json", answers)
    return [q["question"] for qs in splits.values() for q in qs] + answers


def _write_ego(tmp: Path, final: Path, sizes: DemoSizes, geo: DemoGeometry, rng: np.random.Generator,
               workers: int, progress: bool):
    n_videos = sizes.ego_train_videos + sizes.ego_mcq_videos
    if n_videos == 0:
        _write_csv(tmp / "egoclip.csv", EGOCLIP_COLUMNS, [], delimiter="\t")
        _write_json(tmp / "egomcq.json", {})
        _write_json(tmp / "ego_taxonomy.json", {"nouns": EGO_NOUN_LIST, "verbs": EGO_VERB_LIST})
        for split in ("train", "val"):
            _write_json(tmp / f"nlq_{split}.json", make_nlq({}, split, sizes.ego_seconds, geo))
        return [], {"videos": 0}
    uids = [_ego_uid(rng) for _ in range(n_videos)]
    plans = [plan_ego_video(sizes.ego_seconds, geo, rng) for _ in uids]

    jobs = [(tmp / "ego_videos" / uid, plan, sizes.ego_seconds, geo) for uid, plan in zip(uids, plans)]
    parallel_map(_render_ego_job, jobs, workers, "ego videos", progress)
    rows = {uid: ego_rows(uid, sizes.ego_seconds, plan["actions"]) for uid, plan in zip(uids, plans)}
    train_uids, mcq_uids = uids[:sizes.ego_train_videos], uids[sizes.ego_train_videos:]
    egoclip = [r for uid in train_uids for r in rows[uid]]
    _write_csv(tmp / "egoclip.csv", EGOCLIP_COLUMNS,
               [[i] + [r[c] for c in EGOCLIP_COLUMNS[1:]] for i, r in enumerate(egoclip)], delimiter="\t")
    mcq = make_egomcq({u: rows[u] for u in mcq_uids}, sizes.ego_mcq_questions, rng)
    _write_json(tmp / "egomcq.json", mcq)
    _write_json(tmp / "ego_taxonomy.json", {"nouns": EGO_NOUN_LIST, "verbs": EGO_VERB_LIST})
    texts = [r["clip_text"] for uid in uids for r in rows[uid]]
    nlq_queries = {}
    for split, split_uids in (("train", train_uids), ("val", mcq_uids)):
        nlq = make_nlq({u: p for u, p in zip(uids, plans) if u in split_uids}, split, sizes.ego_seconds, geo)
        _write_json(tmp / f"nlq_{split}.json", nlq)
        nlq_queries[split] = [q["query"] for v in nlq["videos"] for c in v["clips"] for a in c["annotations"]
                              for q in a["language_queries"]]
        texts += nlq_queries[split]
    summary = {"videos": n_videos, "train_videos": train_uids, "mcq_videos": mcq_uids,
               "egoclip_rows": len(egoclip), "egomcq_questions": len(mcq),
               "nlq_queries": {k: len(v) for k, v in nlq_queries.items()},
               "chunk_seconds": geo.ego_chunk_seconds, "folder": str(final / "ego_videos")}
    return texts, summary
