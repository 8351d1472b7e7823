#!/usr/bin/env python
"""Where the matching head's hard negatives fall on the demo, and which negatives each head can tell.

    python workflow_scripts/vtm_negatives.py --model results/pretrain/stage1/model.safetensors \\
        --shards resources/frames/demo_retrieval/shard-000-of-001.h5 \\
        --annotations resources/demo/retrieval_test.json --tokenizer resources/demo/tokenizer \\
        --out results/diagnostics/vtm_negatives/stage1.json

A diagnostic for the demo corpus (docs/vtm.md), not a rule of the DAG. Over the retrieval test
clips, each caption's other clips fall in three groups: its family (the same two objects and
events, another order or direction), the same object pair from another family, and the rest.
It reports
- `negative_mass`: the share of VTM's hard-negative distribution softmax(sim / temperature) (as
  drawn in training, vtm_hard_fraction = 1) on each group, beside `share_of_clips`;
- `pairwise_acc_itc` / `pairwise_acc_vtm`: per group, how often the caption's own clip scores above
  a clip of that group, by the contrastive similarity and by the matching head (50 = blind;
  null for a group without clips);
- `cosine`: the mean cosine of the time-reversed and event-order twins' embeddings, video side
  and text side (1 = the encoder cannot tell them apart).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # svitt from this repository

GROUPS = {1: "family", 2: "same_objects", 3: "other"}  # 0: the caption's own clip


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, type=Path)
    p.add_argument("--shards", nargs="+", required=True)
    p.add_argument("--annotations", required=True, type=Path, help="the demo's retrieval_test.json")
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--out", required=True, type=Path)
    return p.parse_args(argv)


def clip_groups(items: list[dict]):
    """[N, N] long: 0 same clip, 1 same family, 2 same object pair, 3 other."""
    import torch

    objects = [frozenset(re.findall(r"the (\w+ \w+) moves", item["caption"])) for item in items]
    family = [item["family"] for item in items]
    n = len(items)
    groups = torch.full((n, n), 3, dtype=torch.long)
    for i in range(n):
        for j in range(n):
            groups[i, j] = 0 if i == j else 1 if family[i] == family[j] else 2 if objects[i] == objects[j] else 3
    return groups


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from svitt.data.pipeline import PairCollator
    from svitt.evaluation import retrieval
    from svitt.evaluation.encode import embed_texts, embed_videos, vtm_scores
    from svitt.evaluation.loading import load_for_evaluation
    from svitt.io import atomic_write_json

    # on the CPU, where this diagnostic has always run (it has no --device)
    loaded = load_for_evaluation(args.model, "cpu", tokenizer=args.tokenizer)
    model, info = loaded.model, loaded.info
    transform = loaded.transform()
    dataset = retrieval.build_dataset(args.shards, str(args.annotations), model.cfg["video"]["frames"], transform)
    items = json.loads(args.annotations.read_text())
    if len(items) != len(dataset.texts) or any("family" not in item for item in items):
        raise ValueError(
            f"{args.annotations}: expected the demo's retrieval annotations (one caption per clip, each with a family)"
        )
    with torch.no_grad():
        video_emb, video_tokens = embed_videos(model, dataset, 32, 0, "cpu", keep_tokens=True, progress=False)
        text_emb, text_hidden, text_mask = embed_texts(
            model, PairCollator(loaded.tokenizer, 32), dataset.texts, device="cpu"
        )
        n = len(items)
        vtm = vtm_scores(
            model, text_hidden, text_mask, video_tokens, [(i, j) for i in range(n) for j in range(n)], device="cpu"
        ).view(n, n)
    sim = text_emb @ video_emb.T
    groups = clip_groups(items)
    temperature = model.temperature().detach()
    hard = torch.softmax((sim / temperature).masked_fill(groups == 0, float("-inf")), dim=1)
    result = {
        "model": str(args.model),
        "stage": info["name"],
        "temperature": float(temperature),
        "negative_mass": {name: float(hard[groups == g].sum() / n) for g, name in GROUPS.items()},
        "share_of_clips": {name: float((groups == g).sum() / (n * (n - 1))) for g, name in GROUPS.items()},
    }
    for head, scores in (("itc", sim), ("vtm", vtm)):
        above = scores.diagonal()[:, None] > scores
        result[f"pairwise_acc_{head}"] = {
            name: 100 * float(above[groups == g].float().mean())
            if (groups == g).any()
            else None  # no clip in the group
            for g, name in GROUPS.items()
        }
    index = {item["video"]: i for i, item in enumerate(items)}
    twins = {
        kind: [(i, index[item[key]]) for i, item in enumerate(items)]
        for kind, key in (("time_reversed", "reverse_twin"), ("event_order", "order_twin"))
    }
    result["cosine"] = {
        side: {kind: float(torch.stack([emb[i] @ emb[j] for i, j in pairs]).mean()) for kind, pairs in twins.items()}
        for side, emb in (("video", video_emb), ("text", text_emb))
    }
    atomic_write_json(args.out, result)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
