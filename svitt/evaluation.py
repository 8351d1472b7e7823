"""Evaluation metrics: text-video retrieval recall and EgoMCQ accuracy.

Importable without torch (numpy only); tensors are accepted and converted.

Ties are counted against the ground truth everywhere: an item ranks below every wrong item that
scores the same or higher, so a constant score matrix never gives perfect recall.
"""

from __future__ import annotations

import math

import numpy as np

RECALL_KS = (1, 5, 10)
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


# ----------------------------------------------------------------------------- model-driven

TWIN_NAMES = {"reverse": "time_reversed", "order": "event_order"}


def _video_loader(dataset, batch_size: int, num_workers: int):
    from torch.utils.data import DataLoader

    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)


def embed_videos(model, dataset, batch_size: int = 16, num_workers: int = 0, device="cpu",
                 keep_tokens: bool = False, progress: bool = True):
    """Video embeddings [Nv, E] (and, with keep_tokens, the fusion tokens [Nv, 1 + N', D])."""
    import torch
    from tqdm import tqdm

    embs, tokens = [], []
    with torch.no_grad():
        for batch in tqdm(_video_loader(dataset, batch_size, num_workers), desc="videos",
                          disable=not progress):
            tok, emb = model.encode_video(batch["video"].to(device))
            embs.append(emb.float().cpu())
            if keep_tokens:
                tokens.append(tok.float().cpu())
    return torch.cat(embs), (torch.cat(tokens) if keep_tokens else None)


def embed_texts(model, collator, texts: list[str], batch_size: int = 64, device="cpu"):
    """Text embeddings [Nt, E], text hidden states [Nt, L, D] and masks [Nt, L] (padded to the
    longest text of all)."""
    import torch

    tokens = collator.tokenize(texts)
    embs, hidden = [], []
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            ids = tokens["input_ids"][start:start + batch_size].to(device)
            mask = tokens["attention_mask"][start:start + batch_size].to(device)
            h, emb = model.encode_text(ids, mask)
            embs.append(emb.float().cpu())
            hidden.append(h.float().cpu())
    return torch.cat(embs), torch.cat(hidden), tokens["attention_mask"]


def vtm_scores(model, text_hidden, text_mask, video_tokens, pairs, batch_size: int = 64, device="cpu"):
    """Matching scores of (text i, video j) pairs [(i, j), ...] through the fusion layers."""
    import torch

    out = []
    with torch.no_grad():
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start:start + batch_size]
            t = torch.tensor([p[0] for p in chunk])
            v = torch.tensor([p[1] for p in chunk])
            out.append(model.vtm_score(text_hidden[t].to(device), text_mask[t].to(device),
                                       video_tokens[v].to(device)).float().cpu())
    return torch.cat(out) if out else torch.zeros(0)


def evaluate_retrieval(model, dataset, collator, batch_size: int = 16, rerank_k: int = 16,
                       num_workers: int = 0, device="cpu", progress: bool = True) -> dict:
    """Zero-shot retrieval of a RetrievalDataset: recall from the contrastive similarity (itc)
    and after re-ranking each text's top-k videos by the matching head (vtm, as Singularity does),
    plus temporal twin accuracy when the annotation defines twins."""
    import torch

    model = model.to(device).eval()
    video_emb, video_tokens = embed_videos(model, dataset, batch_size, num_workers, device,
                                           keep_tokens=rerank_k > 0, progress=progress)
    text_emb, text_hidden, text_mask = embed_texts(model, collator, dataset.texts, device=device)
    sim = text_emb @ video_emb.T  # [Nt, Nv]
    result = {"num_videos": len(dataset), "num_texts": len(dataset.texts),
              "chance_r1": 100.0 / len(dataset), "metrics": retrieval_metrics(sim, dataset.text_to_video)}
    first_text = [texts[0] for texts in dataset.video_to_texts]
    pairs_by_kind = dataset.twin_pairs
    if pairs_by_kind:
        video_by_caption = sim[first_text].T  # [Nv, Nv]: video v with caption of video w
        result["twins"] = {TWIN_NAMES.get(k, k): v for k, v in
                           twin_accuracy(video_by_caption, pairs_by_kind).items()}
    if rerank_k > 0:
        k = min(rerank_k, sim.shape[1])
        top = sim.topk(k, dim=1).indices
        pairs = [(i, int(j)) for i in range(sim.shape[0]) for j in top[i]]
        scores = vtm_scores(model, text_hidden, text_mask, video_tokens, pairs, device=device)
        reranked = sim.clone()
        offset = 1e4  # re-ranked top-k above every other video
        reranked[[p[0] for p in pairs], [p[1] for p in pairs]] = scores + offset
        result["metrics_vtm"] = retrieval_metrics(reranked, dataset.text_to_video)
        result["rerank_k"] = k
        if pairs_by_kind:
            twin_pairs = [(first_text[v], w) for a, b, _ in pairs_by_kind for v, w in
                          ((a, a), (a, b), (b, b), (b, a))]
            twin = vtm_scores(model, text_hidden, text_mask, video_tokens, twin_pairs, device=device)
            matrix = torch.full((len(dataset), len(dataset)), float("nan"))
            for (t, w), s in zip(twin_pairs, twin):
                matrix[w, dataset.text_to_video[t]] = s
            result["twins_vtm"] = {TWIN_NAMES.get(k, k): v for k, v in
                                   twin_accuracy(torch.nan_to_num(matrix, nan=0.0), pairs_by_kind).items()}
    return result


def evaluate_egomcq(model, dataset, collator, num_workers: int = 0, device="cpu",
                    progress: bool = True) -> dict:
    """EgoMCQ with the dual encoder: each query text against its 5 candidate clips."""
    import torch
    from tqdm import tqdm

    model = model.to(device).eval()
    scores, answers, types = [], [], []
    with torch.no_grad():
        for batch in tqdm(_video_loader(dataset, 1, num_workers), desc="EgoMCQ", disable=not progress):
            choices = batch["choices"][0].to(device)  # [5, T, 3, H, W]
            _, video_emb = model.encode_video(choices)
            text_emb = embed_texts(model, collator, list(batch["query"]), device=device)[0]
            scores.append((text_emb.to(device) @ video_emb.T)[0].float().cpu())
            answers.append(int(batch["answer"][0]))
            types.append(int(batch["type"][0]))
    scores = torch.stack(scores)
    metrics = egomcq_accuracy(scores, answers, types)
    return {"num_questions": len(answers), "metrics": metrics,
            "counts": {"inter": types.count(1), "intra": types.count(2)}}


def window_starts(num_frames: int, window: int, stride: int) -> list[int]:
    """First frame of each window; a video shorter than one window gives one (padded) window."""
    if window < 1 or stride < 1:
        raise ValueError(f"window and stride must be >= 1, got {window} and {stride}")
    return list(range(0, max(1, num_frames - window + 1), stride))


def extract_window_features(model, store, video_ids, transform, window: int = 4, stride: int = 4,
                            batch_size: int = 32, device="cpu", progress: bool = True):
    """Clip features over long videos, as SViTT-Ego feeds Ego4D NLQ grounding (GroundNLQ):
    windows of `window` consecutive stored frames every `stride` frames, each encoded as one
    clip; the feature is the video [CLS] after the final norm, [num_windows, D].

    store: a svitt.data.datasets.FrameStore of videos extracted at a fixed fps.
    Yields (video_id, features float32 [num_windows, D], starts [num_windows])."""
    import torch
    from tqdm import tqdm

    model = model.to(device).eval()
    for video_id in tqdm(video_ids, desc="NLQ features", disable=not progress):
        total = store.num_frames(video_id)
        starts = window_starts(total, window, stride)
        feats = []
        with torch.no_grad():
            for first in range(0, len(starts), batch_size):
                clips = [transform(store.read(video_id, [min(s + k, total - 1) for k in range(window)]))
                         for s in starts[first:first + batch_size]]
                tokens = model.video_encoder.norm(model.video_encoder(torch.stack(clips).to(device)))
                feats.append(tokens[:, 0].float().cpu())
        yield video_id, torch.cat(feats), torch.tensor(starts)
