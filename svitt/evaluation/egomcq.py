"""EgoMCQ (EgoVLP's multiple-choice benchmark) with the dual encoder."""

from __future__ import annotations

import torch
from tqdm import tqdm

from svitt.evaluation.encode import FRAME_ORDERS, embed_texts, encode_clips, video_loader
from svitt.evaluation.metrics import egomcq_accuracy
from svitt.evaluation.probing import combine, over_frame_orders

SETTINGS = {
    "frames": 4,
    "text_len": 32,  # SViTT-Ego evaluates EgoMCQ with 4 frames
    "frame_orders": list(FRAME_ORDERS),
    "shuffle_seed": 0,
}


def build_dataset(shards, annotations, frames: int, transform, settings: dict | None = None):
    from svitt.data.datasets import EgoMCQDataset

    return EgoMCQDataset(shards, annotations, frames, transform)


def run(model, dataset, collator, settings: dict, device="cpu", progress: bool = True) -> dict:
    """EgoMCQ under each of settings["frame_orders"] (svitt.evaluation.probing)."""
    settings = {**SETTINGS, **settings}
    seed = settings["shuffle_seed"]
    results = over_frame_orders(
        model,
        settings["frame_orders"],
        lambda order: evaluate_egomcq(
            model, dataset, collator, device=device, progress=progress, frame_order=order, shuffle_seed=seed
        ),
    )
    return combine(results, model.video_encoder.cfg["frames"], seed)


def evaluate_egomcq(
    model,
    dataset,
    collator,
    num_workers: int = 0,
    device="cpu",
    progress: bool = True,
    frame_order: str = "normal",
    shuffle_seed: int = 0,
) -> dict:
    """EgoMCQ with the dual encoder: each query text against its 5 candidate clips, their frames
    in `frame_order`."""
    model = model.to(device).eval()
    scores, answers, types = [], [], []
    with torch.no_grad():
        for batch in tqdm(video_loader(dataset, 1, num_workers), desc=f"EgoMCQ ({frame_order})", disable=not progress):
            choices = batch["choices"][0].to(device)  # [5, T, 3, H, W]
            _, video_emb = encode_clips(model, choices, frame_order, shuffle_seed)
            text_emb = embed_texts(model, collator, list(batch["query"]), device=device)[0]
            scores.append((text_emb.to(device) @ video_emb.T)[0].float().cpu())
            answers.append(int(batch["answer"][0]))
            types.append(int(batch["type"][0]))
    scores = torch.stack(scores)
    metrics = egomcq_accuracy(scores, answers, types)
    return {
        "num_questions": len(answers),
        "metrics": metrics,
        "frame_order": frame_order,
        "counts": {"inter": types.count(1), "intra": types.count(2)},
    }
