"""Text-video retrieval of a RetrievalDataset (zero-shot or finetuned models)."""
from __future__ import annotations

import torch

from svitt.evaluation.encode import embed_texts, embed_videos, vtm_scores
from svitt.evaluation.metrics import TWIN_NAMES, retrieval_metrics, twin_accuracy

# evaluation.retrieval defaults; paragraph: a caption list is one text (DiDeMo)
SETTINGS = {"batch_size": 32, "rerank_k": 16, "text_len": 32, "paragraph": False}


def build_dataset(shards, annotations, frames: int, transform, settings: dict | None = None):
    from svitt.data.datasets import RetrievalDataset

    settings = {**SETTINGS, **(settings or {})}
    return RetrievalDataset(shards, annotations, frames, transform, paragraph=settings["paragraph"])


def run(model, dataset, collator, settings: dict, device="cpu", progress: bool = True) -> dict:
    settings = {**SETTINGS, **settings}
    return evaluate_retrieval(model, dataset, collator, batch_size=settings["batch_size"],
                              rerank_k=settings["rerank_k"], device=device, progress=progress)


def evaluate_retrieval(model, dataset, collator, batch_size: int = 16, rerank_k: int = 16,
                       num_workers: int = 0, device="cpu", progress: bool = True) -> dict:
    """Zero-shot retrieval of a RetrievalDataset: recall from the contrastive similarity (itc)
    and after re-ranking each text's top-k videos by the matching head (vtm, as Singularity does),
    plus temporal twin accuracy when the annotation defines twins."""
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
