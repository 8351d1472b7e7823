"""Evaluation metrics from score matrices: retrieval recall, EgoMCQ accuracy, twin accuracy, QA
accuracy, and NLQ recall at temporal IoU (from predicted windows).

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
NLQ_KS = (1, 5)  # Ego4D NLQ: recall of the top-1 and top-5 predicted windows
NLQ_IOUS = (0.3, 0.5)  # ... at these temporal IoU thresholds


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


def ground_truth_matrix(text_to_video, num_texts: int, num_videos: int) -> np.ndarray:
    """Bool [num_texts, num_videos]: which videos are text i's ground truth.

    text_to_video: one video index per text (a vector), or a list of indices per text (several
    ground-truth videos: SSv2's evaluation files, Singularity's has_multi_vision_gt). Every text
    needs at least one video, every video at least one text."""
    is_gt = np.zeros((num_texts, num_videos), dtype=bool)
    if len(text_to_video) and all(isinstance(v, (list, tuple, np.ndarray)) for v in text_to_video):
        if len(text_to_video) != num_texts:
            raise ValueError(f"text_to_video must have one entry per text ({num_texts}), got {len(text_to_video)}")
        for i, videos in enumerate(text_to_video):
            idx = _check_index_vector(np.asarray(videos), f"text_to_video[{i}]", len(videos), num_videos)
            if idx.size == 0:
                raise ValueError(f"text_to_video[{i}] is empty; every text needs a ground-truth video")
            is_gt[i, idx] = True
    else:
        gt_video = _check_index_vector(
            _to_numpy(text_to_video, "text_to_video"), "text_to_video", num_texts, num_videos
        )
        is_gt[np.arange(num_texts), gt_video] = True
    without_text = np.flatnonzero(~is_gt.any(axis=0))
    if without_text.size:
        raise ValueError(
            f"{without_text.size} of {num_videos} videos have no ground-truth text (e.g. video indices "
            f"{without_text[:5].tolist()}); every video needs at least one text in text_to_video"
        )
    return is_gt


def retrieval_metrics(sim, text_to_video) -> dict[str, float]:
    """Recall@1/5/10 and their mean, text-to-video and video-to-text, in percent.

    sim: [num_texts, num_videos] scores (tensor or ndarray); text_to_video: the ground-truth video
    index of each text, or a list of them per text (ground_truth_matrix). Several texts may share a
    video; every video needs at least one text.
    t2v rank of text i (0-based) = rank of its best-ranked ground-truth video = number of videos
    that are not its ground truth scoring >= the best ground-truth video's score (Singularity's
    itm_eval with several ground-truth videos: the minimum rank over them).
    v2t rank of video v = rank of its best-ranked ground-truth text, likewise.
    Returns t2v_r1, t2v_r5, t2v_r10, t2v_mean, v2t_r1, v2t_r5, v2t_r10, v2t_mean (floats).
    """
    sim = _to_numpy(sim, "sim").astype(np.float64)
    if sim.ndim != 2 or 0 in sim.shape:
        raise ValueError(f"sim must be a non-empty [num_texts, num_videos] matrix, got shape {sim.shape}")
    _check_finite(sim, "sim")
    is_gt = ground_truth_matrix(text_to_video, *sim.shape)

    best_gt_video = np.where(is_gt, sim, -np.inf).max(axis=1)  # [num_texts]
    t2v_ranks = np.sum((sim >= best_gt_video[:, None]) & ~is_gt, axis=1)

    best_gt_score = np.where(is_gt, sim, -np.inf).max(axis=0)  # [num_videos]
    v2t_ranks = np.sum((sim >= best_gt_score[None, :]) & ~is_gt, axis=0)

    return {**_recalls(t2v_ranks, "t2v"), **_recalls(v2t_ranks, "v2t")}


RERANK_CONVENTIONS = {
    "candidates": "each text's top-k videos and each video's top-k texts by the contrastive score "
    "(stable order: on equal scores the lower index first), as Singularity's evaluation()",
    "below_top_k": "items outside a query's top-k rank below every re-ranked item, in contrastive-score "
    "order (Singularity scores them -100 and breaks the ties by argsort order; both agree "
    "for R@K with K <= k)",
    "ties": "a ground truth ranks below every wrong item scoring the same or higher",
}


def rerank_candidates(itc_sim, k: int):
    """Top-k candidates to re-rank: ([num_texts, k_t] video indices per text,
    [num_videos, k_v] text indices per video), k_t = min(k, num_videos), k_v = min(k, num_texts),
    best first; equal scores keep the lower index first."""
    sim = _to_numpy(itc_sim, "itc_sim").astype(np.float64)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    t2v = np.argsort(-sim, axis=1, kind="stable")[:, : min(k, sim.shape[1])]
    v2t = np.argsort(-sim.T, axis=1, kind="stable")[:, : min(k, sim.shape[0])]
    return t2v, v2t


def fused_rerank_scores(itc_sim, candidates, vtm, temperature: float) -> np.ndarray:
    """Matching score plus the contrastive logit at each candidate: vtm[q, j] +
    itc_sim[q, candidates[q, j]] / temperature, [Q, k] (rows: queries of either side; pass
    itc_sim.T for video-to-text). ALBEF and BLIP add the similarity to the matching logit before
    ranking; dividing by the temperature puts it on the logit scale the contrastive loss trained."""
    sim = _to_numpy(itc_sim, "itc_sim").astype(np.float64)
    candidates = np.asarray(candidates)
    vtm = _to_numpy(vtm, "vtm").astype(np.float64)
    if vtm.shape != candidates.shape:
        raise ValueError(
            f"vtm must have shape {list(candidates.shape)} (one score per candidate), got {list(vtm.shape)}"
        )
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return vtm + np.take_along_axis(sim, candidates, axis=1) / temperature


def _two_key_ranks(in_top, value, is_gt) -> np.ndarray:
    """Per query row: wrong candidates whose (in_top, value) key is >= the best ground truth's."""
    tier = in_top.astype(np.int8)
    best = np.lexsort((np.where(is_gt, value, -np.inf), np.where(is_gt, tier, -1)), axis=1)[:, -1]
    rows = np.arange(value.shape[0])
    best_tier, best_value = tier[rows, best][:, None], value[rows, best][:, None]
    at_least = (tier > best_tier) | ((tier == best_tier) & (value >= best_value))
    return np.sum(at_least & ~is_gt, axis=1)


def _reranked_values(itc: np.ndarray, candidates: np.ndarray, scores: np.ndarray, name: str):
    """(in_top [Q, C], value [Q, C]): matching scores at the candidates, contrastive elsewhere."""
    scores = _to_numpy(scores, name).astype(np.float64)
    if scores.shape != candidates.shape:
        raise ValueError(
            f"{name} must have shape {list(candidates.shape)} (one score per top-k candidate), got {list(scores.shape)}"
        )
    _check_finite(scores, name)
    rows = np.arange(itc.shape[0])[:, None]
    in_top = np.zeros(itc.shape, dtype=bool)
    in_top[rows, candidates] = True
    value = itc.copy()
    value[rows, candidates] = scores
    return in_top, value


def rerank_metrics(itc_sim, vtm_t2v, vtm_v2t, text_to_video, k: int) -> dict[str, float]:
    """Recall after re-ranking by the matching head, as Singularity's evaluation() computes it.

    itc_sim [num_texts, num_videos] contrastive scores; vtm_t2v[i, j] the matching score of text i
    with its j-th ranked video and vtm_v2t[v, j] that of video v with its j-th ranked text (the
    order of `rerank_candidates(itc_sim, k)`). Text-to-video recall ranks each text's own top-k by
    vtm_t2v, video-to-text recall each video's own top-k texts by vtm_v2t (not the transpose of the
    text-side matrix). Several texts may share a video, and a text may have several ground-truth
    videos (ground_truth_matrix: its best-ranked one counts). Conventions: RERANK_CONVENTIONS.
    Returns the keys of `retrieval_metrics` plus r_mean = (t2v_mean + v2t_mean) / 2.
    """
    sim = _to_numpy(itc_sim, "itc_sim").astype(np.float64)
    if sim.ndim != 2 or 0 in sim.shape:
        raise ValueError(f"itc_sim must be a non-empty [num_texts, num_videos] matrix, got shape {sim.shape}")
    _check_finite(sim, "itc_sim")
    is_gt = ground_truth_matrix(text_to_video, *sim.shape)
    t2v_top, v2t_top = rerank_candidates(sim, k)
    t2v_in, t2v_value = _reranked_values(sim, t2v_top, vtm_t2v, "vtm_t2v")
    v2t_in, v2t_value = _reranked_values(sim.T, v2t_top, vtm_v2t, "vtm_v2t")
    out = {
        **_recalls(_two_key_ranks(t2v_in, t2v_value, is_gt), "t2v"),
        **_recalls(_two_key_ranks(v2t_in, v2t_value, is_gt.T), "v2t"),
    }
    out["r_mean"] = (out["t2v_mean"] + out["v2t_mean"]) / 2
    return out


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


def qa_accuracy(predictions, answers, types=None) -> dict[str, float]:
    """Open-ended QA accuracy in percent, exact string match (Singularity's eval_simple_qa_acc).

    predictions, answers: lists of strings, one per question; types: optional list of question
    type names (None entries count overall only). Returns {"overall": pct, "<type>": pct, ...}
    with the types in sorted order. An answer the model could never produce (absent from the
    answer list) still counts, as wrong, in every accuracy it belongs to.
    """
    predictions, answers = list(predictions), list(answers)
    if len(predictions) != len(answers) or not answers:
        raise ValueError(
            f"predictions and answers must be non-empty lists of one length, got {len(predictions)} and {len(answers)}"
        )
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


def temporal_iou(windows, target) -> np.ndarray:
    """IoU of each window [P, 2] (start, end) with one target window (start, end): [P].
    A zero-length union (two identical points) counts as IoU 0."""
    windows = np.asarray(windows, dtype=np.float64).reshape(-1, 2)
    start, end = float(target[0]), float(target[1])
    inter = np.clip(np.minimum(windows[:, 1], end) - np.maximum(windows[:, 0], start), 0.0, None)
    union = np.maximum(windows[:, 1], end) - np.minimum(windows[:, 0], start)
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def nlq_metric_names(ks=NLQ_KS, ious=NLQ_IOUS) -> list[str]:
    """["r1_iou0.3", "r5_iou0.3", "r1_iou0.5", "r5_iou0.5"] for the defaults, in Ego4D's table order."""
    return [f"r{k}_iou{iou:g}" for iou in ious for k in ks]


def nlq_recall(predictions, ground_truth, ks=NLQ_KS, ious=NLQ_IOUS) -> dict[str, float]:
    """Ego4D NLQ recall, in percent, as the episodic-memory benchmark's evaluate_nlq_performance
    computes it: query q counts as found at (k, IoU t) when one of its first k predicted windows
    has temporal IoU strictly above t with its ground-truth window; recall is averaged over queries.

    predictions: per query, its predicted (start, end) windows best first (any number; fewer than
    k simply means fewer chances, none is a miss); ground_truth: per query one (start, end).
    Times in seconds from the clip start. Returns {"r1_iou0.3": pct, ..., "miou": pct}; miou is
    Ego4D's: per query the mean IoU of its (up to) 3 best-overlapping windows, averaged.
    """
    ground_truth = _to_numpy(ground_truth, "ground_truth").astype(np.float64)
    if ground_truth.ndim != 2 or ground_truth.shape[1] != 2 or ground_truth.shape[0] == 0:
        raise ValueError(
            f"ground_truth must be a non-empty [num_queries, 2] array of (start, end), got shape {ground_truth.shape}"
        )
    if len(predictions) != len(ground_truth):
        raise ValueError(f"{len(predictions)} prediction lists for {len(ground_truth)} queries")
    _check_finite(ground_truth, "ground_truth")
    bad = np.flatnonzero(ground_truth[:, 1] < ground_truth[:, 0])
    if bad.size:
        raise ValueError(
            f"ground-truth windows must have end >= start; query {int(bad[0])} is {ground_truth[bad[0]].tolist()}"
        )
    found = {(k, iou): np.zeros(len(ground_truth), bool) for k in ks for iou in ious}
    best3 = np.zeros(len(ground_truth))
    for q, (windows, target) in enumerate(zip(predictions, ground_truth)):
        windows = _to_numpy(windows, f"predictions[{q}]").astype(np.float64).reshape(-1, 2)
        _check_finite(windows, f"predictions[{q}]")
        if (windows[:, 1] < windows[:, 0]).any():
            raise ValueError(
                f"predicted windows must have end >= start; query {q} has "
                f"{windows[windows[:, 1] < windows[:, 0]][0].tolist()}"
            )
        overlap = temporal_iou(windows, target)
        best3[q] = np.sort(overlap)[-3:].mean() if overlap.size else 0.0
        for k, iou in found:
            found[k, iou][q] = bool((overlap[:k] > iou).any())
    out = {f"r{k}_iou{iou:g}": float(100.0 * found[k, iou].mean()) for iou in ious for k in ks}
    out["miou"] = float(100.0 * best3.mean())
    return out


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
