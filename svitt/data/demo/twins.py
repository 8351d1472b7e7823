"""The third-person world: clips of two coloured shapes moving one after the other, in families
of four order twins (fwd, rev, swap, swaprev; see svitt.data.demo), their captions and the QA
questions whose answers need the order of events."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from svitt.data.demo.scene import (
    COLORS,
    SHAPES,
    DemoGeometry,
    DemoSizes,
    draw,
    shape_mask,
)

DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}
VARIANTS = ("fwd", "rev", "swap", "swaprev")


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


def render_two_events(
    first: tuple[Event, tuple], second: tuple[Event, tuple], background, geo: DemoGeometry
) -> np.ndarray:
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
    counts = {
        "train": _family_count(sizes.train_videos, "--train-videos"),
        "test": _family_count(sizes.test_videos, "--test-videos"),
        "qa": _family_count(sizes.qa_videos, "--qa-videos"),
        "finetune": _family_count(sizes.finetune_videos, "--finetune-videos"),
    }
    families = all_families()
    needed = sum(counts.values())
    if needed > len(families):
        raise ValueError(
            f"{needed} families requested but only {len(families)} distinct ones exist ({4 * len(families)} videos)"
        )
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


QA_TYPES = ("first", "second", "direction", "before")


def qa_pairs(clip: Clip, count: int, rng: np.random.Generator) -> list[dict]:
    """`count` of the four question types (QA_TYPES), MSRVTT-QA style with a `type` field.

    Each needs the order of events: the clip's event-order twin swaps what moves first and second
    and whether one object moves before the other, its time-reversed twin flips both directions,
    and every twin shows the same two objects. So a model blind to frame order answers at chance
    (one of two objects, one of two directions along the axis of motion, yes or no)."""
    f, s = clip.first, clip.second
    asked_first = rng.random() < 0.5  # which object the direction / before questions name
    asked, other = (f, s) if asked_first else (s, f)
    candidates = [
        ("first", "what moves first?", f"{f.color} {f.shape}"),
        ("second", "what moves second?", f"{s.color} {s.shape}"),
        ("direction", f"which way does {asked.noun_phrase} move?", asked.direction),
        ("before", f"does {asked.noun_phrase} move before {other.noun_phrase}?", "yes" if asked_first else "no"),
    ]
    chosen = sorted(rng.choice(len(candidates), size=min(count, len(candidates)), replace=False))
    return [
        {"video": clip.id, "question": candidates[i][1], "answer": candidates[i][2], "type": candidates[i][0]}
        for i in chosen
    ]
