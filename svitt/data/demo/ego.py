"""The egocentric world: long videos of a scene with three objects and the camera wearer's hand,
narrated every couple of seconds (EgoClip rows, EgoMCQ questions) and queried in Ego4D NLQ's
layout ("when did I lift the red ball?")."""

from __future__ import annotations

import uuid
from collections import Counter
from dataclasses import dataclass

import numpy as np

from svitt.data.demo.scene import (
    COLORS,
    SHAPES,
    DemoGeometry,
    draw,
    shape_mask,
)

# Egocentric vocabulary: shape -> noun, and the Ego4D-style verb classes.
EGO_NOUNS = {"circle": "ball", "square": "cube", "triangle": "cone"}
EGO_NOUN_LIST = sorted(EGO_NOUNS.values())  # ["ball", "cone", "cube"]
EGO_VERB_LIST = ["lift", "lower", "move", "shake"]
HAND_COLOR = (230, 180, 140)


@dataclass
class EgoAction:
    start: float
    end: float
    obj: int
    verb: str
    side: str = ""  # left/right for "move"
    noun: str = ""
    text: str = ""


def ego_uid(rng: np.random.Generator) -> str:
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
        text = {
            "move": f"#C C moves the {color} {noun} to the {side}",
            "lift": f"#C C lifts the {color} {noun}",
            "lower": f"#C C lowers the {color} {noun}",
            "shake": f"#C C shakes the {color} {noun}",
        }[verb]
        action = EgoAction(
            round(slot + 0.2, 3), round(slot + geo.ego_narration_every - 0.2, 3), obj, verb, side, noun, text
        )
        actions.append(action)
        pos[obj] = pos[obj] + _displacement(action)
        slot += geo.ego_narration_every
    return {"objects": objects, "positions": positions, "background": background, "actions": actions}


def _collides(pos, obj: int, dx: float, s: int) -> bool:
    x = pos[obj][0] + dx
    return any(abs(x - p[0]) < s + 2 and abs(pos[obj][1] - p[1]) < s + 2 for k, p in enumerate(pos) if k != obj)


def _displacement(action: EgoAction) -> np.ndarray:
    return {
        "lift": np.array([0, -8.0]),
        "lower": np.array([0, 8.0]),
        "shake": np.array([0, 0.0]),
        "move": np.array([-12.0 if action.side == "left" else 12.0, 0]),
    }[action.verb]


def render_ego_video(plan: dict, duration: float, geo: DemoGeometry) -> np.ndarray:
    """Frames [N, H, W, 3] of a narrated egocentric scene."""
    n = int(round(duration * geo.ego_fps))
    s = geo.object_size
    masks = [shape_mask(shape, s) for _, shape in plan["objects"]]
    hand = shape_mask("circle", s // 2 + 2)
    frames = np.empty((n, geo.size, geo.size, 3), np.uint8)
    frames[:] = plan["background"]
    frames[:, geo.size * 3 // 4 :] = np.clip(plan["background"].astype(int) + 40, 0, 255)  # table edge
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
        rows.append(
            {
                "video_uid": uid,
                "video_dur": f"{duration:.3f}",
                "narration_source": "narration_pass_1",
                "narration_ind": k,
                "narration_time": round((a.start + a.end) / 2, 3),
                "clip_start": a.start,
                "clip_end": a.end,
                "clip_text": a.text,
                "tag_verb": f"[{EGO_VERB_LIST.index(a.verb)}]",
                "tag_noun": f"[{EGO_NOUN_LIST.index(a.noun)}]",
            }
        )
    return rows


def make_egomcq(mcq_rows: dict[str, list[dict]], questions: int, rng: np.random.Generator) -> dict:
    """EgoMCQ: {"0": {"query": clip, "choices": {"0".."4": clip}, "answer": k, "types": 1|2}}.

    types 1 (inter-video): the other four choices come from four other videos;
    types 2 (intra-video): the other four are clips of the same video with other narrations.
    """
    uids = sorted(mcq_rows)
    if questions and len(uids) < 5:
        raise ValueError(
            f"EgoMCQ inter-video questions need at least 5 held-out ego videos, got {len(uids)} (--ego-mcq-videos)"
        )
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
                raise ValueError(
                    f"ego video {uid} has fewer than 4 clips with other narrations; use longer --ego-seconds"
                )
            distractors = [pool[i] for i in rng.choice(len(pool), size=4, replace=False)]
        answer = int(rng.integers(5))
        choices = distractors[:answer] + [query] + distractors[answer:]
        out[str(q)] = {
            "query": dict(query),
            "choices": {str(i): dict(c) for i, c in enumerate(choices)},
            "answer": answer,
            "types": kind,
        }
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
                queries.append(
                    {
                        "clip_start_sec": round(a.start - c0, 3),
                        "clip_end_sec": round(a.end - c0, 3),
                        "video_start_sec": a.start,
                        "video_end_sec": a.end,
                        "video_start_frame": int(round(a.start * geo.ego_fps)),
                        "video_end_frame": int(round(a.end * geo.ego_fps)),
                        "template": "Objects: When did I Y X?",
                        "query": nlq_query_text(a, color),
                        "slot_x": f"{color} {a.noun}",
                        "verb_x": a.verb,
                    }
                )
            clips.append(
                {
                    "clip_uid": str(uuid.uuid5(uuid.UUID(uid), f"nlq-clip-{k}")),
                    "video_start_sec": c0,
                    "video_end_sec": c1,
                    "video_start_frame": int(round(c0 * geo.ego_fps)),
                    "video_end_frame": int(round(c1 * geo.ego_fps)),
                    "clip_start_sec": 0.0,
                    "clip_end_sec": c1 - c0,
                    "annotations": [
                        {
                            "annotation_uid": str(uuid.uuid5(uuid.UUID(uid), f"nlq-annotation-{k}")),
                            "language_queries": queries,
                        }
                    ],
                }
            )
        videos.append({"video_uid": uid, "split": split, "clips": clips})
    return {"version": "1", "description": f"NLQ Annotations ({split}) of the demo corpus", "videos": videos}
