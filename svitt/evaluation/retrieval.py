"""Text-video retrieval of a RetrievalDataset (zero-shot or finetuned models)."""
from __future__ import annotations

import torch

from svitt.evaluation.encode import embed_texts, embed_videos, vtm_scores
from svitt.evaluation.metrics import (RERANK_CONVENTIONS, TWIN_NAMES, rerank_candidates, rerank_metrics,
                                      retrieval_metrics, twin_accuracy)

# evaluation.retrieval defaults; vtm_score: svitt.models.svitt.VTM_SCORES
SETTINGS = {"batch_size": 32, "rerank_k": 16, "text_len": 32, "vtm_score": "log_odds"}


def build_dataset(shards, annotations, frames: int, transform):
    from svitt.data.datasets import RetrievalDataset

    return RetrievalDataset(shards, annotations, frames, transform)


def run(model, dataset, collator, settings: dict, device="cpu", progress: bool = True) -> dict:
    settings = {**SETTINGS, **settings}
    return evaluate_retrieval(model, dataset, collator, batch_size=settings["batch_size"],
                              rerank_k=settings["rerank_k"], vtm_score=settings["vtm_score"], device=device,
                              progress=progress)


def evaluate_retrieval(model, dataset, collator, batch_size: int = 16, rerank_k: int = 16,
                       num_workers: int = 0, device="cpu", progress: bool = True,
                       vtm_score: str = "log_odds") -> dict:
    """Retrieval of a RetrievalDataset: recall from the contrastive similarity (`metrics`) and
    after re-ranking each side's top-k by the matching head (`metrics_vtm`, Singularity's
    protocol: svitt.evaluation.metrics.rerank_metrics), plus temporal twin accuracy when the
    annotation defines twins (`twins` by contrastive score, `twins_vtm` by matching score)."""
    model = model.to(device).eval()
    video_emb, video_tokens = embed_videos(model, dataset, batch_size, num_workers, device,
                                           keep_tokens=rerank_k > 0, progress=progress)
    text_emb, text_hidden, text_mask = embed_texts(model, collator, dataset.texts, device=device)
    sim = text_emb @ video_emb.T  # [Nt, Nv]
    metrics = retrieval_metrics(sim, dataset.text_to_video)
    metrics["r_mean"] = (metrics["t2v_mean"] + metrics["v2t_mean"]) / 2
    result = {"num_videos": len(dataset), "num_texts": len(dataset.texts),
              "chance_r1": 100.0 / len(dataset), "metrics": metrics}
    first_text = [texts[0] for texts in dataset.video_to_texts]
    pairs_by_kind = dataset.twin_pairs
    if pairs_by_kind:
        video_by_caption = sim[first_text].T  # [Nv, Nv]: video v with caption of video w
        result["twins"] = {TWIN_NAMES.get(k, k): v for k, v in
                           twin_accuracy(video_by_caption, pairs_by_kind).items()}
    if rerank_k > 0:
        score = lambda pairs: vtm_scores(model, text_hidden, text_mask, video_tokens, pairs,  # noqa: E731
                                         device=device, kind=vtm_score)
        t2v_top, v2t_top = rerank_candidates(sim, rerank_k)
        vtm_t2v = score([(i, int(j)) for i in range(len(t2v_top)) for j in t2v_top[i]]).view(t2v_top.shape)
        vtm_v2t = score([(int(t), v) for v in range(len(v2t_top)) for t in v2t_top[v]]).view(v2t_top.shape)
        result["metrics_vtm"] = rerank_metrics(sim, vtm_t2v, vtm_v2t, dataset.text_to_video, rerank_k)
        result["rerank"] = {"k": rerank_k, "vtm_score": vtm_score, **RERANK_CONVENTIONS}
        if pairs_by_kind:
            twin_pairs = [(first_text[v], w) for a, b, _ in pairs_by_kind for v, w in
                          ((a, a), (a, b), (b, b), (b, a))]
            twin = score(twin_pairs)
            matrix = torch.full((len(dataset), len(dataset)), float("nan"))
            for (t, w), s in zip(twin_pairs, twin):
                matrix[w, dataset.text_to_video[t]] = s
            result["twins_vtm"] = {TWIN_NAMES.get(k, k): v for k, v in
                                   twin_accuracy(torch.nan_to_num(matrix, nan=0.0), pairs_by_kind).items()}
    return result
