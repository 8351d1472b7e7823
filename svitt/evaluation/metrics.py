"""Evaluation metrics from score matrices: retrieval recall, EgoMCQ accuracy, twin accuracy, QA accuracy.

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
    two decisions (a between captions a and b, and b likewise); ties count as wrong, so a model
    blind to frame order scores 0% on exact ties and ~50% otherwise.
    Returns {kind: accuracy} for each kind present.
    """
    sim = _to_numpy(sim, "sim").astype(np.float64)
    _check_finite(sim, "sim")
    correct: dict[str, list[bool]] = {}
    for a, b, kind in pairs:
        correct.setdefault(kind, []).extend([sim[a, a] > sim[a, b], sim[b, b] > sim[b, a]])
    return {kind: float(100.0 * np.mean(hits)) for kind, hits in correct.items()}


def qa_accuracy(predictions, answers, types=None) -> dict[str, float]:
    """Open-ended QA accuracy in percent, exact string match (Singularity's eval_simple_qa_acc).

    predictions, answers: lists of strings, one per question; types: optional list of question
    type names (None entries count overall only). Returns {"overall": pct, "<type>": pct, ...}
    with the types in sorted order. An answer the model could never produce (absent from the
    answer list) still counts, as wrong, in every accuracy it belongs to.
    """
    predictions, answers = list(predictions), list(answers)
    if len(predictions) != len(answers) or not answers:
        raise ValueError(f"predictions and answers must be non-empty lists of one length, got "
                         f"{len(predictions)} and {len(answers)}")
    bad = [x for x in predictions + answers if not isinstance(x, str)][:3]
    if bad:
        raise ValueError(f"predictions and answers must be strings, got {bad!r}")
    correct = np.array([p == a for p, a in zip(predictions, answers)], dtype=np.float64)
    out = {"overall": float(100.0 * correct.mean())}
    if types is not None:
        types = list(types)
        if len(types) != len(answers):
            raise ValueError(f"types must have one entry per question ({len(answers)}), got {len(types)}")
        for name in sorted({t for t in types if t is not None}):
            if name == "overall":
                raise ValueError("a question type may not be named 'overall'")
            selected = np.array([t == name for t in types])
            out[str(name)] = float(100.0 * correct[selected].mean())
    return out
