"""EgoMCQ (EgoVLP's multiple-choice benchmark) with the dual encoder."""
from __future__ import annotations

import torch
from tqdm import tqdm

from svitt.evaluation.encode import embed_texts, video_loader
from svitt.evaluation.metrics import egomcq_accuracy

SETTINGS = {"frames": 4, "text_len": 32}  # SViTT-Ego evaluates EgoMCQ with 4 frames


def build_dataset(shards, annotations, frames: int, transform):
    from svitt.data.datasets import EgoMCQDataset

    return EgoMCQDataset(shards, annotations, frames, transform)


def run(model, dataset, collator, settings: dict, device="cpu", progress: bool = True) -> dict:
    return evaluate_egomcq(model, dataset, collator, device=device, progress=progress)


def evaluate_egomcq(model, dataset, collator, num_workers: int = 0, device="cpu",
                    progress: bool = True) -> dict:
    """EgoMCQ with the dual encoder: each query text against its 5 candidate clips."""
    model = model.to(device).eval()
    scores, answers, types = [], [], []
    with torch.no_grad():
        for batch in tqdm(video_loader(dataset, 1, num_workers), desc="EgoMCQ", disable=not progress):
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
