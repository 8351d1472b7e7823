"""Ego4D NLQ: window features of long videos, as SViTT-Ego feeds grounding models.

Features come in the layout VSLNet's and GroundNLQ's Ego4D preparation reads: one
`{video_uid}.pt` float32 tensor [N, D] per whole video, feature i covering video time
[i / rate, (i + 1) / rate) with rate = fps / stride features per second (7.5 fps and windows of 4
every 4 frames: 1.875 per second, Ego4D's canonical 30 fps / 16). The preparation script slices
clips out of these and writes `{clip_uid}.pt` and `feature_shapes.json` itself; the folder here
holds `feature_shapes.json` of the videos too, and `features.json` naming the feature kind.

Feature kinds: "cls" is the clip summary the contrastive embedding projects (the encoder's width
D): the video [CLS] token after the final norm, or with video.pooling "mean" the normed mean token;
"projected" is that summary through the model's vision projection, unnormalised (embed_dim), as
EgoVLP's NLQ extractor saves its 256-d embedding.

The grounding task (ground_nlq) is the evaluation of those features: a grounding model
(svitt.evaluation.grounding.GROUNDERS) trained on the train split's queries, evaluated on val,
beside a query-independent baseline; workflow_scripts/ground.py is its CLI.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

FEATURE_KINDS = ("cls", "projected")
_EPS = 1e-6  # seconds: a clip boundary on a feature boundary belongs to the later feature


def window_starts(num_frames: int, window: int, stride: int) -> list[int]:
    """First frame of each window; a video shorter than one window gives one (padded) window.
    Frames after the last full window are not covered (3600 frames, 4 / 4: 900 windows)."""
    if window < 1 or stride < 1:
        raise ValueError(f"window and stride must be >= 1, got {window} and {stride}")
    return list(range(0, max(1, num_frames - window + 1), stride))


def extract_window_features(
    model,
    store,
    video_ids,
    transform,
    window: int = 4,
    stride: int = 4,
    batch_size: int = 32,
    device="cpu",
    progress: bool = True,
    kind: str = "cls",
):
    """Clip features over long videos, as SViTT-Ego feeds Ego4D NLQ grounding (GroundNLQ):
    windows of `window` consecutive stored frames every `stride` frames, each encoded as one
    clip; the feature is the clip summary (the normed video [CLS], or the normed mean token with
    video.pooling "mean": "cls", [num_windows, D]) or its vision projection ("projected",
    [num_windows, embed_dim]). Every window is encoded, the last
    partial batch included.

    store: a svitt.data.datasets.FrameStore of videos extracted at a fixed fps.
    Yields (video_id, features float32 [num_windows, D], starts [num_windows])."""
    if kind not in FEATURE_KINDS:
        raise ValueError(f"unknown feature kind {kind!r}; expected one of {FEATURE_KINDS}")
    model = model.to(device).eval()
    for video_id in tqdm(video_ids, desc="NLQ features", disable=not progress):
        total = store.num_frames(video_id)
        starts = window_starts(total, window, stride)
        feats = []
        with torch.no_grad():
            for first in range(0, len(starts), batch_size):
                clips = [
                    transform(store.read(video_id, [min(s + k, total - 1) for k in range(window)]))
                    for s in starts[first : first + batch_size]
                ]
                cls = model.video_summary(torch.stack(clips).to(device))
                feats.append((model.vision_proj(cls) if kind == "projected" else cls).float().cpu())
        yield video_id, torch.cat(feats), torch.tensor(starts)


# ---------------------------------------------------------------------------- the .pt layout
class VideoFeatureWriter:
    """Writes the .pt layout one video at a time (Ego4D's NLQ videos hold ~10 GB of features):
    `{video_uid}.pt` (float32 [N, D], contiguous) per add(), then on close() `feature_shapes.json`
    {uid: N} and `features.json` (info: kind, fps, window, stride, features_per_second, dim, ...),
    features.json last, so its presence marks a complete folder. Every file is written atomically."""

    def __init__(self, folder: str | Path, info: dict):
        self.folder, self.info, self.shapes, self.dim = Path(folder), dict(info), {}, None
        self.folder.mkdir(parents=True, exist_ok=True)

    def add(self, uid: str, feats: torch.Tensor) -> None:
        from svitt.training.checkpoint import atomic_torch_save

        if "/" in uid or uid.startswith(".") or not uid:
            raise ValueError(f"video uid {uid!r} cannot name a file {uid}.pt")
        atomic_torch_save(feats.detach().to(torch.float32).contiguous().cpu(), self.folder / f"{uid}.pt")
        self.shapes[uid], self.dim = int(feats.shape[0]), int(feats.shape[1])

    def close(self) -> None:
        from svitt.io import atomic_write_json

        atomic_write_json(self.folder / "feature_shapes.json", self.shapes)
        atomic_write_json(self.folder / "features.json", {**self.info, "dim": self.dim, "videos": len(self.shapes)})


def write_video_features(folder: str | Path, features: dict[str, torch.Tensor], info: dict) -> None:
    """The whole .pt layout of `features` {video_uid: [N, D]} at once (VideoFeatureWriter)."""
    writer = VideoFeatureWriter(folder, info)
    for uid, feats in features.items():
        writer.add(uid, feats)
    writer.close()


def read_feature_info(folder: str | Path) -> dict:
    path = Path(folder) / "features.json"
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing: {folder} is not a complete NLQ feature folder "
            "(workflow_scripts/nlq_features.py --pt-dir writes one)"
        )
    return json.loads(path.read_text())


def load_video_features(folder: str | Path, video_uid: str) -> torch.Tensor | None:
    """[N, D] float32 features of one video, None when the folder has none for it."""
    path = Path(folder) / f"{video_uid}.pt"
    return torch.load(path, map_location="cpu", weights_only=True) if path.exists() else None


def clip_feature_span(video_start_sec: float, video_end_sec: float, rate: float, available: int):
    """(first, stop, offset) of the features covering a clip: features first..stop-1 of the video
    (clipped to the `available` ones), feature first + j starting at clip time offset + j / rate.
    Exact times, unlike VSLNet's preparation, which keeps int(start * rate) .. int(end * rate)
    inclusive and then spreads that count evenly over the clip."""
    first = max(0, math.floor(video_start_sec * rate + _EPS))
    stop = min(available, math.ceil(video_end_sec * rate - _EPS))
    return first, stop, first / rate - video_start_sec


# ------------------------------------------------------------------------- the grounding task
# What the numbers of a grounding result mean (recorded in every result JSON).
GROUNDING_CONVENTIONS = {
    "recall": "share of evaluated queries (percent) with a top-k window of IoU > threshold (strict), "
    "as Ego4D's evaluate_nlq_performance",
    "miou": "per query the mean IoU of its 3 best-overlapping windows, averaged (Ego4D's mIoU)",
    "windows": "seconds from the clip start; ground truth as annotated (clip_start_sec, clip_end_sec)",
    "decoding": "top-k (start <= end) feature pairs of the start x end probability (VSLNet on Ego4D); with "
    "settings.nms_iou, a pair whose IoU with a better kept one is >= nms_iou is skipped",
    "baseline": "the k feature spans training windows fall on most often, the same for every query",
    "skipped": "queries left out of every number here, with the reason",
}


def encode_queries(model, tokenizer, texts: list[str], text_len: int, device) -> list:
    """Token states [L_i, Dt] of each query from the frozen text encoder (padding removed)."""
    from svitt.data.pipeline import PairCollator
    from svitt.evaluation.encode import embed_texts

    collator = PairCollator(tokenizer, text_len)
    out = []
    for first in range(0, len(texts), 1024):  # bounded memory on Ego4D's ~14k train queries
        _, hidden, mask = embed_texts(model, collator, texts[first : first + 1024], device=device)
        out += [h[m.bool()] for h, m in zip(hidden, mask)]
    return out


class NothingToGround(ValueError):
    """A split none of whose queries can be grounded (the message names it and why)."""


@dataclass
class GroundingRun:
    """What ground_nlq returns; the caller writes it (workflow_scripts/ground.py, atomically)."""

    result: dict  # the result JSON: metrics, baseline, features, annotations, counts, skipped, settings, conventions
    rows: list[dict]  # one per epoch: mean losses and val recall (metrics.jsonl)
    grounder: torch.nn.Module  # trained, on the device
    metadata: dict[str, str]  # of grounder.safetensors: settings, video_dim, text_dim
    predictions: dict  # val predictions in the Ego4D NLQ challenge format (predictions_val.json)

    def grounder_state(self) -> dict[str, torch.Tensor]:
        """The grounder's tensors as saved: contiguous, on the CPU."""
        return {k: v.detach().contiguous().cpu() for k, v in self.grounder.state_dict().items()}


def ground_nlq(
    splits: dict,
    features: str | Path,
    model: str | Path,
    tokenizer,
    settings: dict | None = None,
    device="auto",
    progress: bool = True,
) -> GroundingRun:
    """Ego4D NLQ grounding, the evaluation of an SViTT-Ego model's window features (paper 4.4):
    a grounder (svitt.evaluation.grounding.GROUNDERS, settings["model"]) is trained on the
    "train" split and evaluated on "val" (R@1 / R@5 at IoU 0.3 / 0.5, mIoU), beside the baseline
    that predicts the query-independent most frequent windows.

    splits: {"train": NLQSplit, "val": NLQSplit} (svitt.data.nlq.read_nlq); features: a folder of
    nlq_features.py --pt-dir ({video_uid}.pt + features.json); model: the exported SViTT model
    whose (frozen) text encoder encodes the queries; tokenizer: its tokenizer (or folder);
    settings: evaluation.nlq.grounder (GROUNDER_DEFAULTS where not given); device: as
    svitt.evaluation.loading.pick_device. Queries whose window lies outside their clip, or whose
    clip has no features, are left out and listed under result["skipped"] with the reason.
    Seeded by settings["seed"]: the same seed on the same machine gives the same numbers."""
    from svitt.evaluation.grounding import (
        baseline_windows,
        build_grounder,
        build_items,
        most_frequent_spans,
        predict_windows,
        resolve_grounder_config,
        train_grounder,
    )
    from svitt.evaluation.loading import load_for_evaluation, pick_device
    from svitt.evaluation.metrics import nlq_recall

    settings = resolve_grounder_config(settings)
    device = pick_device(device)
    info = read_feature_info(features)
    loaded = load_for_evaluation(model, device)
    encoder, stage = loaded.model, loaded.info["name"]
    if isinstance(tokenizer, (str, Path)):
        from svitt.data.pipeline import load_tokenizer

        tokenizer = load_tokenizer(tokenizer)
    built = {}
    for name, split in splits.items():
        texts = encode_queries(encoder, tokenizer, [q.query for q in split.queries], settings["text_len"], device)
        built[name] = build_items(split, features, info["features_per_second"], texts)
    del encoder, loaded
    (train, train_skipped, train_clamped), (val, val_skipped, val_clamped) = built["train"], built["val"]
    for name, (items, _, _) in built.items():
        if not items:
            raise NothingToGround(
                f"no {name} query can be grounded ({splits[name].path}); skipped: {built[name][1][:3]}"
            )
    val_truth = [list(item.window) for item in val]

    torch.manual_seed(settings["seed"])
    video_dim, text_dim = train[0].video.shape[1], train[0].text.shape[1]
    grounder = build_grounder(settings, video_dim, text_dim)

    def on_epoch(epoch):
        windows = predict_windows(grounder, val, settings["top_k"], settings["nms_iou"], device=device)
        metrics = nlq_recall(windows, val_truth)
        return {f"val_{k}": v for k, v in metrics.items()}

    rows = train_grounder(grounder, train, settings, device, progress, on_epoch)
    predictions = predict_windows(grounder, val, settings["top_k"], settings["nms_iou"], device=device)
    metrics = nlq_recall(predictions, val_truth)
    spans = most_frequent_spans(train, settings["top_k"])
    baseline = nlq_recall(baseline_windows(spans, val), val_truth)

    challenge = {
        "version": "1.0",
        "challenge": "ego4d_nlq_challenge",
        "results": [
            {**splits["val"].queries[item.query_index].key, "predicted_times": windows}
            for item, windows in zip(val, predictions)
        ],
    }
    result = {
        "task": "nlq",
        "stage": stage,
        "model": str(model),
        "metrics": metrics,
        "baseline": {
            "name": "most frequent window",
            "metrics": baseline,
            "spans": [list(s) for s in spans],  # feature indices; in seconds from the first feature:
            "seconds": [[s / info["features_per_second"], (e + 1) / info["features_per_second"]] for s, e in spans],
        },
        "features": {
            **{k: info[k] for k in ("kind", "fps", "window", "stride", "features_per_second", "dim")},
            "folder": str(features),
        },
        "annotations": {name: split.path for name, split in splits.items()},
        "queries": {name: len(split.queries) + len(split.skipped) for name, split in splits.items()},
        "evaluated": {"train": len(train), "val": len(val)},
        "skipped": {"train": train_skipped, "val": val_skipped},
        "clamped": {"train": train_clamped, "val": val_clamped},
        "settings": settings,
        "conventions": GROUNDING_CONVENTIONS,
    }
    metadata = {"settings": json.dumps(settings), "video_dim": str(video_dim), "text_dim": str(text_dim)}
    return GroundingRun(result, rows, grounder, metadata, challenge)
