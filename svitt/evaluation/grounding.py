"""A compact span-based grounder for Ego4D NLQ, in the spirit of VSLNet (Zhang et al., ACL 2020).

    video features [B, N, Dv] --proj + shared encoder--+
                                                       +-- context-query attention --> query-guided
    query tokens   [B, L, Dt] --proj + shared encoder--+   (VSLNet's CQA + pooled query)  highlighting
                                                                                              |
                               start logits [B, N] <-- start encoder <------------------------+
                               end logits   [B, N] <-- end encoder (conditioned on start) <---+

The video features are an SViTT-Ego model's window features (svitt.evaluation.nlq); the query
tokens are the hidden states of the same model's (frozen) text encoder. Trained with cross-entropy
on the start and end feature of the answer window plus a highlighting loss (binary, per feature:
inside the window or not); decoded as VSLNet does on Ego4D, the top-k (start <= end) pairs of the
outer product of the start and end probabilities, with greedy non-maximum suppression over them
(as ActionFormer / GroundNLQ) so that the k windows are k different guesses.

Why a loop of its own rather than svitt.training.loop: that loop trains SViTT stages (frames from HDF5, the
VTC / EgoNCE / VTM / MLM objectives, DDP, exact resume, exported SViTT weights). The grounder
trains on precomputed features held in memory, for seconds (the demo) to minutes (Ego4D, one GPU),
and none of that machinery applies; putting it there would add a second kind of model to the loop.
Seeded throughout: the same seed on the same machine gives the same numbers.

The grounding models are registered in GROUNDERS, keyed by evaluation.nlq.grounder.model
("span": SpanGrounder, the default); the task that trains and evaluates one is
svitt.evaluation.nlq.ground_nlq. docs/nlq.md, "Adding a grounding model".
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from svitt.config import check_keys
from svitt.training.optim import param_groups
from svitt.training.scheduler import cosine_lr, set_lr

GROUNDER_DEFAULTS = dict(  # every key of evaluation.nlq.grounder, documented here once
    model="span",  # the grounding model: a key of GROUNDERS (below); "span": SpanGrounder
    dim=128,  # hidden width of the grounder
    heads=4,
    dropout=0.1,
    epochs=30,
    batch_size=32,
    lr=1e-3,  # AdamW peak rate, linear warm-up over the first epoch then cosine decay
    weight_decay=0.01,
    highlight_weight=1.0,  # weight of the query-guided highlighting loss (VSLNet)
    text_len=32,  # query tokens kept
    top_k=5,  # windows predicted per query
    nms_iou=0.3,  # drop a window overlapping a better one by IoU >= this (GroundNLQ-style); null: VSLNet's plain top-k
    seed=0,
)
_NEG = -1e30  # masked logit (VSLNet's mask_logits)


def resolve_grounder_config(cfg: dict | None) -> dict:
    check_keys(cfg or {}, GROUNDER_DEFAULTS, "evaluation.nlq.grounder")
    out = {**GROUNDER_DEFAULTS, **(cfg or {})}
    grounder_class(out["model"])  # a clear error for an unknown model, before any work
    for key in ("dim", "heads", "epochs", "batch_size", "text_len", "top_k"):
        if isinstance(out[key], bool) or not isinstance(out[key], int) or out[key] < 1:
            raise ValueError(f"evaluation.nlq.grounder.{key} must be a positive integer, got {out[key]!r}")
    if out["nms_iou"] is not None and not 0 < out["nms_iou"] <= 1:
        raise ValueError(f"evaluation.nlq.grounder.nms_iou must be in (0, 1] or null, got {out['nms_iou']!r}")
    if out["dim"] % out["heads"]:
        raise ValueError(f"grounder dim {out['dim']} must be a multiple of heads {out['heads']}")
    return out


# ------------------------------------------------------------------------------------ the data
@dataclass
class GroundingItem:
    """One query over the features of its clip."""

    video: torch.Tensor  # [n, Dv] features covering the clip
    text: torch.Tensor  # [L, Dt] query token states (padding removed)
    offset: float  # clip time (s) where feature 0 starts (svitt.evaluation.nlq.clip_feature_span)
    rate: float  # features per second
    duration: float  # clip length (s)
    window: tuple[float, float]  # ground truth (clip seconds), as annotated
    query_index: int  # position in the split's query list

    def to_index(self, start: float, end: float) -> tuple[int, int]:
        """Feature indices (first, last) of a window, clamped into the clip's features."""
        n = self.video.shape[0]
        s = math.floor((start - self.offset) * self.rate + 1e-6)
        e = math.ceil((end - self.offset) * self.rate - 1e-6) - 1
        s, e = min(max(s, 0), n - 1), min(max(e, 0), n - 1)
        return s, max(s, e)

    def to_window(self, s: int, e: int) -> list[float]:
        """Clip seconds of features s..e, clamped to the clip."""
        start = self.offset + s / self.rate
        end = self.offset + (e + 1) / self.rate
        return [float(min(max(start, 0.0), self.duration)), float(min(max(end, 0.0), self.duration))]

    @property
    def labels(self) -> tuple[int, int]:
        return self.to_index(*self.window)


def build_items(split, feature_folder, rate: float, texts: list[torch.Tensor]):
    """GroundingItems of an NLQSplit's queries (texts[i]: token states [L, Dt] of query i) over
    the per-video features in feature_folder. A query whose window lies outside its clip, or
    whose clip has no features, is not an item: it is returned in `skipped` with the reason.
    Returns (items, skipped [{clip_uid, annotation_uid, query_idx, reason}], clamped [keys of
    windows that reach past their clip and were clamped for training])."""
    from svitt.evaluation.nlq import load_video_features

    video, clips, items, skipped, clamped = (None, None), {}, [], list(split.skipped), []
    for index, query in enumerate(split.queries):
        reason, uid, clip = query.window_problem(), query.clip.video_uid, query.clip
        if reason is None and clip.clip_uid not in clips:
            if video[0] != uid:  # queries come video by video: hold one video's features at a time
                video = (uid, load_video_features(feature_folder, uid))
            clips[clip.clip_uid] = _clip_features(video[1], uid, clip, rate)
        if reason is None:
            reason = clips[clip.clip_uid] if isinstance(clips[clip.clip_uid], str) else None
        if reason is not None:
            skipped.append({**query.key, "reason": reason})
            continue
        if query.sticks_out():
            clamped.append(query.key)
        feats, offset = clips[clip.clip_uid]
        items.append(GroundingItem(feats, texts[index], offset, rate, clip.duration, (query.start, query.end), index))
    return items, skipped, clamped


def _clip_features(feats, uid: str, clip, rate: float):
    """(features of the clip [n, D] (a copy: the video's tensor is not kept), offset), or why none."""
    from svitt.evaluation.nlq import clip_feature_span

    if feats is None:
        return f"no features for video {uid} (clip {clip.clip_uid})"
    first, stop, offset = clip_feature_span(clip.video_start_sec, clip.video_end_sec, rate, feats.shape[0])
    if stop <= first:
        return (
            f"video {uid} has {feats.shape[0]} features ({feats.shape[0] / rate:.1f} s), none inside clip "
            f"{clip.clip_uid} [{clip.video_start_sec:g}, {clip.video_end_sec:g}] s"
        )
    return feats[first:stop].clone(), offset


def collate(items: list[GroundingItem]) -> dict:
    """Pad to the longest clip / query: video [B, N, Dv], video_mask [B, N] (True = real), text
    [B, L, Dt], text_mask [B, L], start / end labels [B]."""
    n, length = max(i.video.shape[0] for i in items), max(i.text.shape[0] for i in items)
    video = torch.zeros(len(items), n, items[0].video.shape[1])
    text = torch.zeros(len(items), length, items[0].text.shape[1])
    video_mask = torch.zeros(len(items), n, dtype=torch.bool)
    text_mask = torch.zeros(len(items), length, dtype=torch.bool)
    for b, item in enumerate(items):
        video[b, : item.video.shape[0]], video_mask[b, : item.video.shape[0]] = item.video, True
        text[b, : item.text.shape[0]], text_mask[b, : item.text.shape[0]] = item.text, True
    labels = torch.tensor([item.labels for item in items])
    return {
        "video": video,
        "video_mask": video_mask,
        "text": text,
        "text_mask": text_mask,
        "start": labels[:, 0],
        "end": labels[:, 1],
    }


# ----------------------------------------------------------------------------------- the model
def sinusoid_positions(length: int, dim: int, device=None) -> torch.Tensor:
    """[length, dim] Transformer sine/cosine position codes (any clip length)."""
    position = torch.arange(length, device=device, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    out = torch.zeros(length, dim, device=device)
    out[:, 0::2], out[:, 1::2] = torch.sin(position * freq), torch.cos(position * freq[: dim // 2])
    return out


def _layer(dim: int, heads: int, dropout: float) -> nn.TransformerEncoderLayer:
    return nn.TransformerEncoderLayer(
        dim, heads, dim_feedforward=2 * dim, dropout=dropout, batch_first=True, norm_first=True
    )


class ContextQueryAttention(nn.Module):
    """VSLNet's context-query attention: trilinear similarity S [B, N, L] of video (context) and
    query tokens; context-to-query A = softmax_L(S) q and query-to-context B = softmax_L(S)
    softmax_N(S)^T c; out = W [c, A, c*A, c*B]."""

    def __init__(self, dim: int, dropout: float):
        super().__init__()
        self.w_c, self.w_q = nn.Linear(dim, 1, bias=False), nn.Linear(dim, 1, bias=False)
        self.w_cq = nn.Parameter(torch.randn(dim) / math.sqrt(dim))
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(4 * dim, dim)

    def forward(self, c, c_mask, q, q_mask):
        c, q = self.dropout(c), self.dropout(q)
        sim = self.w_c(c) + self.w_q(q).transpose(1, 2) + (c * self.w_cq) @ q.transpose(1, 2)  # [B, N, L]
        s_r = sim.masked_fill(~q_mask[:, None, :], _NEG).softmax(dim=2)
        s_c = sim.masked_fill(~c_mask[:, :, None], _NEG).softmax(dim=1)
        a = s_r @ q  # [B, N, D]
        b = s_r @ (s_c.transpose(1, 2) @ c)  # [B, N, D]
        return self.out(torch.cat([c, a, c * a, c * b], dim=-1))


class SpanGrounder(nn.Module):
    """video [B, N, Dv] + query tokens [B, L, Dt] -> start, end and highlight logits [B, N]."""

    def __init__(self, video_dim: int, text_dim: int, dim: int = 128, heads: int = 4, dropout: float = 0.1):
        super().__init__()
        # per-dimension standardisation of the video features (set_feature_stats): window
        # features of one model share a large constant part that would drown what changes in time
        self.register_buffer("feature_mean", torch.zeros(video_dim))
        self.register_buffer("feature_std", torch.ones(video_dim))
        self.video_proj = nn.Sequential(nn.LayerNorm(video_dim), nn.Dropout(dropout), nn.Linear(video_dim, dim))
        self.text_proj = nn.Sequential(nn.LayerNorm(text_dim), nn.Dropout(dropout), nn.Linear(text_dim, dim))
        self.encoder = _layer(dim, heads, dropout)  # shared by video and query, as in VSLNet
        self.cqa = ContextQueryAttention(dim, dropout)
        self.query_pool = nn.Linear(dim, 1)
        self.concat = nn.Linear(2 * dim, dim)
        self.highlight = nn.Linear(dim, 1)
        self.start_encoder, self.end_encoder = _layer(dim, heads, dropout), _layer(dim, heads, dropout)
        self.start_head = nn.Sequential(nn.Linear(2 * dim, dim), nn.GELU(), nn.Linear(dim, 1))
        self.end_head = nn.Sequential(nn.Linear(2 * dim, dim), nn.GELU(), nn.Linear(dim, 1))

    @classmethod
    def from_settings(cls, video_dim: int, text_dim: int, settings: dict) -> "SpanGrounder":
        """The grounder evaluation.nlq.grounder describes (resolve_grounder_config's output)."""
        return cls(video_dim, text_dim, settings["dim"], settings["heads"], settings["dropout"])

    @torch.no_grad()
    def set_feature_stats(self, items: list["GroundingItem"]) -> None:
        """Mean and std of every video feature dimension over the (training) items."""
        count, total, squares = 0, 0.0, 0.0
        for clip in {id(item.video): item.video for item in items}.values():  # each clip once
            feats = clip.double()
            count, total, squares = count + feats.shape[0], total + feats.sum(0), squares + (feats**2).sum(0)
        mean = total / count
        var = (squares - count * mean**2) / max(1, count - 1)
        self.feature_mean.copy_(mean)
        self.feature_std.copy_(var.clamp_min(0).sqrt().clamp_min(1e-6))

    def _encode(self, x, mask):
        x = x + sinusoid_positions(x.shape[1], x.shape[2], x.device)
        return self.encoder(x, src_key_padding_mask=~mask)

    def forward(self, video, video_mask, text, text_mask) -> dict[str, torch.Tensor]:
        video = (video - self.feature_mean) / self.feature_std
        c = self._encode(self.video_proj(video), video_mask)  # [B, N, D]
        q = self._encode(self.text_proj(text), text_mask)  # [B, L, D]
        x = self.cqa(c, video_mask, q, text_mask)
        weights = self.query_pool(q).squeeze(-1).masked_fill(~text_mask, _NEG).softmax(dim=1)  # [B, L]
        pooled = (weights[:, :, None] * q).sum(1, keepdim=True).expand_as(x)
        x = self.concat(torch.cat([x, pooled], dim=-1))
        highlight = self.highlight(x).squeeze(-1)  # [B, N]
        x = x * torch.sigmoid(highlight)[:, :, None]
        pad = ~video_mask
        start_x = self.start_encoder(x, src_key_padding_mask=pad)
        end_x = self.end_encoder(start_x, src_key_padding_mask=pad)
        start = self.start_head(torch.cat([start_x, x], dim=-1)).squeeze(-1).masked_fill(pad, _NEG)
        end = self.end_head(torch.cat([end_x, x], dim=-1)).squeeze(-1).masked_fill(pad, _NEG)
        return {"start": start, "end": end, "highlight": highlight}


# -------------------------------------------------------------------------- the registry
# evaluation.nlq.grounder.model -> the class. A grounding model is an nn.Module with
#   from_settings(video_dim, text_dim, settings) (a classmethod: settings are
#     resolve_grounder_config's, so its own hyperparameters are keys of GROUNDER_DEFAULTS),
#   set_feature_stats(items) (called once with the training items before training; may do nothing),
#   forward(video, video_mask, text, text_mask) -> {"start", "end", "highlight"} logits [B, N]
#     (padding at _NEG in start / end), what grounding_loss trains and top_spans decodes,
# and optionally no_weight_decay() (svitt.training.optim.param_groups). docs/nlq.md: adding one.
GROUNDERS: dict[str, type[nn.Module]] = {"span": SpanGrounder}


def grounder_class(name: str) -> type[nn.Module]:
    """The grounding model registered under `name` (GROUNDERS)."""
    if not isinstance(name, str) or name not in GROUNDERS:
        raise ValueError(
            f"evaluation.nlq.grounder.model {name!r} is not a known grounding model; known: {sorted(GROUNDERS)}"
        )
    return GROUNDERS[name]


def build_grounder(settings: dict, video_dim: int, text_dim: int) -> nn.Module:
    """The grounding model settings["model"] names, built from the settings (draws its initial
    weights from torch's global generator: seed it first)."""
    return grounder_class(settings["model"]).from_settings(video_dim, text_dim, settings)


def grounding_loss(out: dict, batch: dict, highlight_weight: float) -> dict[str, torch.Tensor]:
    """Cross-entropy of the start and end features, plus BCE of inside-the-window per feature."""
    span = F.cross_entropy(out["start"], batch["start"]) + F.cross_entropy(out["end"], batch["end"])
    position = torch.arange(out["highlight"].shape[1], device=out["highlight"].device)[None]
    inside = ((position >= batch["start"][:, None]) & (position <= batch["end"][:, None])).float()
    mask = batch["video_mask"].float()
    per_feature = F.binary_cross_entropy_with_logits(out["highlight"], inside, reduction="none")
    highlight = (per_feature * mask).sum() / mask.sum()
    return {"loss": span + highlight_weight * highlight, "span": span, "highlight": highlight}


def _span_iou(a: tuple[int, int], b: tuple[int, int]) -> float:
    """IoU of two inclusive feature spans."""
    inter = min(a[1], b[1]) - max(a[0], b[0]) + 1
    return max(0, inter) / (max(a[1], b[1]) - min(a[0], b[0]) + 1)


def top_spans(
    start_logits, end_logits, k: int = 5, nms_iou: float | None = None, candidates: int = 100
) -> list[list[tuple[int, int]]]:
    """Per row, the k (start, end) feature spans (start <= end, no padding) with the highest
    start x end probability, best first: VSLNet's Ego4D decoding. [B, N] logits, padding at _NEG.

    nms_iou: greedy non-maximum suppression as in ActionFormer / GroundNLQ: walking down the best
    candidates * k spans, one is skipped when its IoU with a span already kept is >= nms_iou, so
    the k windows are not k shifts of one guess. None: plain top-k."""
    start_p, end_p = start_logits.softmax(dim=1), end_logits.softmax(dim=1)
    outer = start_p[:, :, None] * end_p[:, None, :]  # [B, N, N]
    valid = torch.ones_like(outer, dtype=torch.bool).triu()  # start <= end, and no padding:
    valid &= (start_p > 0)[:, :, None] & (end_p > 0)[:, None, :]
    outer = outer.masked_fill(~valid, -1.0)
    n = outer.shape[1]
    take = min(k if nms_iou is None else candidates * k, n * (n + 1) // 2)
    values, flat = outer.flatten(1).topk(take, dim=1)
    out = []
    for row_values, row in zip(values.tolist(), flat.tolist()):
        kept = []
        for value, index in zip(row_values, row):
            span = (index // n, index % n)
            if value < 0 or len(kept) == k:
                break
            if nms_iou is None or all(_span_iou(span, other) < nms_iou for other in kept):
                kept.append(span)
        out.append(kept)
    return out


# ----------------------------------------------------------------------------- train, predict
def _to_device(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def train_grounder(
    model: nn.Module, items: list[GroundingItem], settings: dict, device="cpu", progress: bool = True, on_epoch=None
) -> list[dict]:
    """AdamW over shuffled batches for settings["epochs"] epochs (seeded), after fixing the
    feature standardisation from `items`. on_epoch(epoch) may return held-out metrics for that
    epoch's row. Returns one row per epoch (mean losses)."""
    generator = torch.Generator().manual_seed(settings["seed"])
    model.set_feature_stats(items)
    model.to(device).train()
    # the training loop's convention (svitt.training.optim): biases, norms and w_cq (1-d) undecayed
    optimizer = torch.optim.AdamW(param_groups(model, settings["weight_decay"]), lr=settings["lr"])
    per_epoch = math.ceil(len(items) / settings["batch_size"])
    total, step, rows = settings["epochs"] * per_epoch, 0, []
    for epoch in tqdm(range(settings["epochs"]), desc="grounder", disable=not progress):
        model.train()
        order = torch.randperm(len(items), generator=generator).tolist()
        sums = {}
        for first in range(0, len(order), settings["batch_size"]):
            batch = _to_device(collate([items[i] for i in order[first : first + settings["batch_size"]]]), device)
            set_lr(optimizer, cosine_lr(step, total, per_epoch, settings["lr"]))
            losses = grounding_loss(
                model(batch["video"], batch["video_mask"], batch["text"], batch["text_mask"]),
                batch,
                settings["highlight_weight"],
            )
            optimizer.zero_grad(set_to_none=True)
            losses["loss"].backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            step += 1
            for name, value in losses.items():  # summed on the device: one sync per epoch, below
                sums[name] = sums.get(name, 0.0) + value.detach() * batch["start"].shape[0]
        row = {"epoch": epoch + 1, "step": step, **{k: float(v) / len(items) for k, v in sums.items()}}
        if on_epoch is not None:
            row.update(on_epoch(epoch + 1) or {})
        rows.append(row)
    return rows


def predict_windows(
    model: nn.Module,
    items: list[GroundingItem],
    k: int = 5,
    nms_iou: float | None = None,
    batch_size: int = 64,
    device="cpu",
) -> list[list[list[float]]]:
    """Per item its top-k windows [[start, end], ...] in clip seconds, best first (top_spans)."""
    model.to(device).eval()
    out = []
    with torch.no_grad():
        for first in range(0, len(items), batch_size):
            chunk = items[first : first + batch_size]
            batch = _to_device(collate(chunk), device)
            logits = model(batch["video"], batch["video_mask"], batch["text"], batch["text_mask"])
            for item, spans in zip(chunk, top_spans(logits["start"], logits["end"], k, nms_iou)):
                out.append([item.to_window(s, e) for s, e in spans])
    return out


def most_frequent_spans(items: list[GroundingItem], k: int = 5) -> list[tuple[int, int]]:
    """The query-independent baseline: the k (start, end) feature spans that training windows
    fall on most often (ties: the earlier span first)."""
    counts = Counter(item.labels for item in items)
    return sorted(counts, key=lambda span: (-counts[span], span))[:k]


def baseline_windows(spans: list[tuple[int, int]], items: list[GroundingItem]) -> list[list[list[float]]]:
    """The same spans for every query, clamped into each clip's features."""
    out = []
    for item in items:
        n = item.video.shape[0]
        out.append([item.to_window(min(s, n - 1), min(e, n - 1)) for s, e in spans])
    return out
