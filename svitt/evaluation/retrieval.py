"""Text-video retrieval of a RetrievalDataset (zero-shot or finetuned models)."""

from __future__ import annotations

import torch

from svitt.evaluation.encode import FRAME_ORDERS, embed_texts, embed_videos, vtm_scores
from svitt.evaluation.metrics import (
    RERANK_CONVENTIONS,
    TWIN_NAMES,
    fused_rerank_scores,
    rerank_candidates,
    rerank_metrics,
    retrieval_metrics,
    reversal_twin_accuracy,
    twin_accuracy,
)
from svitt.evaluation.probing import combine, over_frame_orders

# evaluation.retrieval defaults; vtm_score: svitt.models.svitt.VTM_SCORES; paragraph: a caption
# list is one text (DiDeMo)
SETTINGS = {
    "batch_size": 32,
    "rerank_k": 16,
    "text_len": 32,
    "vtm_score": "log_odds",
    "paragraph": False,
    "frame_orders": list(FRAME_ORDERS),
    "shuffle_seed": 0,
}


FUSED_RULE = (
    "the top-k ranked by the matching score plus the contrastive logit sim / temperature "
    "(ALBEF and BLIP add the similarity to the matching logit)"
)


def ground_truth_convention(dataset) -> str:
    """How the result's recall counts a text with several ground-truth videos (stated in every result)."""
    per_text = max(len(videos) for videos in dataset.text_videos)
    if per_text == 1:
        return "one ground-truth video per text"
    return (
        f"several ground-truth videos per text (up to {per_text}; Singularity's has_multi_vision_gt): "
        "each side counts its best-ranked ground-truth item"
    )


def build_dataset(shards, annotations, frames: int, transform, settings: dict | None = None):
    from svitt.data.datasets import RetrievalDataset

    settings = {**SETTINGS, **(settings or {})}
    return RetrievalDataset(shards, annotations, frames, transform, paragraph=settings["paragraph"])


def run(model, dataset, collator, settings: dict, device="cpu", progress: bool = True) -> dict:
    """Retrieval under each of settings["frame_orders"] (svitt.evaluation.probing); with the
    reversed order and time-reversed twins also `twins_exact_reversal` (per head, itc / vtm)."""
    settings = {**SETTINGS, **settings}
    seed = settings["shuffle_seed"]

    def one_order(order):
        return _retrieval_pass(
            model,
            dataset,
            collator,
            settings["batch_size"],
            settings["rerank_k"],
            device=device,
            progress=progress,
            frame_order=order,
            shuffle_seed=seed,
            vtm_score=settings["vtm_score"],
        )

    passes = over_frame_orders(model, settings["frame_orders"], one_order)
    results = {order: result for order, (result, _) in passes.items()}
    if "reversed" in passes and any(kind == "reverse" for *_, kind in dataset.twin_pairs):
        normal, reversed_ = passes["normal"][1], passes["reversed"][1]
        results["normal"]["twins_exact_reversal"] = {
            head: reversal_twin_accuracy(normal[head], reversed_[head], dataset.twin_pairs) for head in normal
        }
    return combine(results, model.video_encoder.cfg["frames"], seed)


def evaluate_retrieval(
    model,
    dataset,
    collator,
    batch_size: int = 16,
    rerank_k: int = 16,
    num_workers: int = 0,
    device="cpu",
    progress: bool = True,
    frame_order: str = "normal",
    shuffle_seed: int = 0,
    vtm_score: str = "log_odds",
) -> dict:
    """Retrieval of a RetrievalDataset: recall from the contrastive similarity (`metrics`) and
    after re-ranking each side's top-k by the matching head (`metrics_vtm`, Singularity's
    protocol: svitt.evaluation.metrics.rerank_metrics) and by the matching score plus the
    contrastive logit (`metrics_vtm_itc`, FUSED_RULE), plus temporal twin accuracy when the
    annotation defines twins (`twins` by contrastive score, `twins_vtm` by matching score).
    frame_order: the order the model sees each clip's frames in (encode.FRAME_ORDERS)."""
    return _retrieval_pass(
        model,
        dataset,
        collator,
        batch_size,
        rerank_k,
        num_workers,
        device,
        progress,
        frame_order,
        shuffle_seed,
        vtm_score,
    )[0]


def _retrieval_pass(
    model,
    dataset,
    collator,
    batch_size,
    rerank_k,
    num_workers=0,
    device="cpu",
    progress=True,
    frame_order="normal",
    shuffle_seed=0,
    vtm_score="log_odds",
):
    """One evaluation -> (result, {head: twin score matrix [Nv, Nv]} with video v's score for the
    caption of video w; empty without twins)."""
    model = model.to(device).eval()
    video_emb, video_tokens = embed_videos(
        model,
        dataset,
        batch_size,
        num_workers,
        device,
        keep_tokens=rerank_k > 0,
        progress=progress,
        frame_order=frame_order,
        shuffle_seed=shuffle_seed,
    )
    text_emb, text_hidden, text_mask = embed_texts(model, collator, dataset.texts, device=device)
    sim = text_emb @ video_emb.T  # [Nt, Nv]
    gt = dataset.text_videos
    metrics = retrieval_metrics(sim, gt)
    metrics["r_mean"] = (metrics["t2v_mean"] + metrics["v2t_mean"]) / 2
    result = {
        "num_videos": len(dataset),
        "num_texts": len(dataset.texts),
        "chance_r1": 100.0 / len(dataset),
        "metrics": metrics,
        "frame_order": frame_order,
        "ground_truth": ground_truth_convention(dataset),
    }
    first_text = [texts[0] for texts in dataset.video_to_texts]
    pairs_by_kind = dataset.twin_pairs
    twin_scores = {}
    if pairs_by_kind:
        twin_scores["itc"] = sim[first_text].T  # [Nv, Nv]: video v with caption of video w
        result["twins"] = {TWIN_NAMES.get(k, k): v for k, v in twin_accuracy(twin_scores["itc"], pairs_by_kind).items()}
    if rerank_k > 0:

        def score(pairs):
            return vtm_scores(model, text_hidden, text_mask, video_tokens, pairs, device=device, kind=vtm_score)

        t2v_top, v2t_top = rerank_candidates(sim, rerank_k)
        vtm_t2v = score([(i, int(j)) for i in range(len(t2v_top)) for j in t2v_top[i]]).view(t2v_top.shape)
        vtm_v2t = score([(int(t), v) for v in range(len(v2t_top)) for t in v2t_top[v]]).view(v2t_top.shape)
        result["metrics_vtm"] = rerank_metrics(sim, vtm_t2v, vtm_v2t, gt, rerank_k)
        temperature = float(model.temperature().detach())
        result["metrics_vtm_itc"] = rerank_metrics(
            sim,
            fused_rerank_scores(sim, t2v_top, vtm_t2v, temperature),
            fused_rerank_scores(sim.T, v2t_top, vtm_v2t, temperature),
            gt,
            rerank_k,
        )
        result["rerank"] = {
            "k": rerank_k,
            "vtm_score": vtm_score,
            **RERANK_CONVENTIONS,
            "metrics_vtm": "the top-k ranked by the matching score alone (Singularity)",
            "metrics_vtm_itc": FUSED_RULE,
            "temperature": temperature,
        }
        if pairs_by_kind:
            twin_pairs = [(first_text[v], w) for a, b, _ in pairs_by_kind for v, w in ((a, a), (a, b), (b, b), (b, a))]
            twin = score(twin_pairs)
            matrix = torch.full((len(dataset), len(dataset)), float("nan"))
            for (t, w), s in zip(twin_pairs, twin):
                matrix[w, dataset.text_to_video[t]] = s
            twin_scores["vtm"] = torch.nan_to_num(matrix, nan=0.0)
            result["twins_vtm"] = {
                TWIN_NAMES.get(k, k): v for k, v in twin_accuracy(twin_scores["vtm"], pairs_by_kind).items()
            }
    return result, twin_scores
