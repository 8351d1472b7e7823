"""Evaluation metrics from score matrices: retrieval recall, EgoMCQ accuracy, twin accuracy.

Importable without torch (numpy only); tensors are accepted and converted.

Ties are counted against the ground truth everywhere: an item ranks below every wrong item that
scores the same or higher, so a constant score matrix never gives perfect recall.
"""

from __future__ import annotations

import math

import numpy as np

RECALL_KS = (1, 5, 10)
TWIN_NAMES = {"reverse": "time_reversed", "order": "event_order"}
EGOMCQ_TYPES = {1: "inter", 2: "intra"}  # EgoVLP / LaViLa print these two swapped; keep 1 = inter


def _to_numpy(array, name: str) -> np.ndarray:
    """Tensor (any device) or array-like -> numpy array."""
    if hasattr(array, "detach"):  # torch.Tensor, without importing torch
        array = array.detach().float().cpu().numpy() if array.is_floating_point() else array.detach().cpu().numpy()
    try:
        return np.asarray(array)
    except Exception as error:  # pragma: no cover - exotic inputs
        raise TypeError(f"{name} must be a tensor or array, got {type(array).__name__}") from error


def _check_finite(scores: np.ndarray, name: str) -> None:
    # NaN compares false with everything, so it would silently rank a ground truth first
    if not np.isfinite(scores).all():
        raise ValueError(f"{name} contains {int((~np.isfinite(scores)).sum())} NaN or inf entries")


def _check_index_vector(values: np.ndarray, name: str, length: int, upper: int) -> np.ndarray:
    if values.ndim != 1 or values.shape[0] != length:
        raise ValueError(f"{name} must be a vector of length {length}, got shape {values.shape}")
    if values.size and not np.issubdtype(values.dtype, np.integer):
        if not np.all(values == np.round(values)):
            raise ValueError(f"{name} must hold integer indices, got dtype {values.dtype}")
    values = values.astype(np.int64)
    bad = values[(values < 0) | (values >= upper)]
    if bad.size:
        raise ValueError(f"{name} entries must be in [0, {upper}), got {bad[:5].tolist()}")
    return values


def _recalls(ranks: np.ndarray, prefix: str) -> dict[str, float]:
    """0-based ranks -> {prefix_r1, prefix_r5, prefix_r10, prefix_mean} in percent."""
    out = {f"{prefix}_r{k}": float(100.0 * np.mean(ranks < k)) for k in RECALL_KS}
    out[f"{prefix}_mean"] = float(np.mean([out[f"{prefix}_r{k}"] for k in RECALL_KS]))
    return out


def retrieval_metrics(sim, text_to_video) -> dict[str, float]:
    """Recall@1/5/10 and their mean, text-to-video and video-to-text, in percent.

    sim: [num_texts, num_videos] scores (tensor or ndarray); text_to_video: [num_texts] ground-truth
    video index of each text. Several texts may share a video; every video needs at least one text.
    t2v rank of text i (0-based) = number of other videos scoring >= its ground-truth video.
    v2t rank of video v = rank of its best-ranked ground-truth text = number of texts that are not
    its ground truth scoring >= the best ground-truth text's score.
    Returns t2v_r1, t2v_r5, t2v_r10, t2v_mean, v2t_r1, v2t_r5, v2t_r10, v2t_mean (floats).
    """
    sim = _to_numpy(sim, "sim").astype(np.float64)
    if sim.ndim != 2 or 0 in sim.shape:
        raise ValueError(f"sim must be a non-empty [num_texts, num_videos] matrix, got shape {sim.shape}")
    _check_finite(sim, "sim")
    num_texts, num_videos = sim.shape
    gt_video = _check_index_vector(_to_numpy(text_to_video, "text_to_video"), "text_to_video", num_texts, num_videos)

    is_gt = np.zeros_like(sim, dtype=bool)  # [num_texts, num_videos]
    is_gt[np.arange(num_texts), gt_video] = True
    without_text = np.flatnonzero(~is_gt.any(axis=0))
    if without_text.size:
        raise ValueError(
            f"{without_text.size} of {num_videos} videos have no ground-truth text (e.g. video indices "
            f"{without_text[:5].tolist()}); every video needs at least one text in text_to_video"
        )

    gt_score = sim[np.arange(num_texts), gt_video]  # [num_texts]
    t2v_ranks = np.sum((sim >= gt_score[:, None]) & ~is_gt, axis=1)

    best_gt_score = np.where(is_gt, sim, -np.inf).max(axis=0)  # [num_videos]
    v2t_ranks = np.sum((sim >= best_gt_score[None, :]) & ~is_gt, axis=0)

    return {**_recalls(t2v_ranks, "t2v"), **_recalls(v2t_ranks, "v2t")}


def egomcq_accuracy(scores, answers, types) -> dict[str, float]:
    """EgoMCQ accuracy in percent per question type: {"inter": pct, "intra": pct}.

    scores: [Q, C] (C = 5 in EgoMCQ) score of each candidate clip; answers: [Q] index of the
    correct candidate; types: [Q], 1 = inter-video, 2 = intra-video. A question counts as correct
    only if its answer scores strictly above every other candidate (ties count as wrong).
    A type with no questions gets NaN.
    """
    scores = _to_numpy(scores, "scores").astype(np.float64)
    if scores.ndim != 2 or scores.shape[1] < 2:
        raise ValueError(f"scores must be [num_questions, num_candidates >= 2], got shape {scores.shape}")
    _check_finite(scores, "scores")
    num_questions, num_candidates = scores.shape
    answers = _check_index_vector(_to_numpy(answers, "answers"), "answers", num_questions, num_candidates)
    types = _to_numpy(types, "types")
    if types.ndim != 1 or types.shape[0] != num_questions:
        raise ValueError(f"types must be a vector of length {num_questions}, got shape {types.shape}")
    unknown = sorted(set(types.tolist()) - set(EGOMCQ_TYPES))
    if unknown:
        raise ValueError(f"types must be 1 (inter-video) or 2 (intra-video), got {unknown[:5]}")

    answer_score = scores[np.arange(num_questions), answers]
    others = scores.copy()
    others[np.arange(num_questions), answers] = -np.inf
    correct = answer_score > others.max(axis=1)

    out = {}
    for type_id, name in EGOMCQ_TYPES.items():
        selected = types == type_id
        out[name] = float(100.0 * correct[selected].mean()) if selected.any() else math.nan
    return out


def twin_accuracy(sim, pairs) -> dict[str, float]:
    """Temporal twins: does each video score its own caption above its twin's? In percent.

    sim: [num_videos, num_videos], sim[v, w] = score of video v with the caption of video w;
    pairs: [(a, b, kind)] video indices of twins, kind e.g. "reverse" (time-reversed twins: same
    frames in reverse order) or "order" (the same two events in the other order). Each pair gives
    two decisions (a between captions a and b, and b likewise); ties count as wrong.
    A model whose video embeddings of a and b are identical gets exactly one of a pair's two
    decisions right (sim[a, .] == sim[b, .]), or none when the two captions also tie: 50% at most.
    Returns {kind: accuracy} for each kind present.
    """
    sim = _to_numpy(sim, "sim").astype(np.float64)
    _check_finite(sim, "sim")
    correct: dict[str, list[bool]] = {}
    for a, b, kind in pairs:
        correct.setdefault(kind, []).extend([sim[a, a] > sim[a, b], sim[b, b] > sim[b, a]])
    return {kind: float(100.0 * np.mean(hits)) for kind, hits in correct.items()}


def reversal_twin_accuracy(normal, reversed_, pairs) -> float:
    """Time-reversed twins against the exact reversal of each clip's own frames, in percent.

    normal[v, w] / reversed_[v, w]: score of video v's frames as sampled / in reverse order with
    the caption of video w; pairs: [(a, b, kind)], only kind "reverse" is used. Four decisions per
    pair: clip a prefers caption a over b, reversed clip a prefers caption b over a, and likewise
    for b; ties count as wrong. Unlike `twin_accuracy` on the twin's own file (re-encoded by the
    video codec and sampled at other stored frames), the reversed clip holds exactly the same
    frames: a model blind to frame order has reversed_ == normal, so of each clip's two decisions
    exactly one is right (none on a caption tie), and it scores 50% by construction.
    """
    normal = _to_numpy(normal, "normal").astype(np.float64)
    reversed_ = _to_numpy(reversed_, "reversed_").astype(np.float64)
    if normal.shape != reversed_.shape:
        raise ValueError(f"normal {normal.shape} and reversed_ {reversed_.shape} score matrices differ in shape")
    _check_finite(normal, "normal")
    _check_finite(reversed_, "reversed_")
    hits = []
    for a, b, kind in pairs:
        if kind != "reverse":
            continue
        for v, w in ((a, b), (b, a)):
            hits += [normal[v, v] > normal[v, w], reversed_[v, w] > reversed_[v, v]]
    if not hits:
        raise ValueError("no time-reversed ('reverse') pairs to score")
    return float(100.0 * np.mean(hits))
