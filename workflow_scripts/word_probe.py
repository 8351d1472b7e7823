#!/usr/bin/env python
"""Which caption words the fusion layers can read from the clip: masked-word accuracy per word group.

    python workflow_scripts/word_probe.py --model results/pretrain/stage3/model.safetensors \\
        --shards resources/frames/demo_retrieval/shard-000-of-001.h5 \\
        --annotations resources/demo/retrieval_test.json --tokenizer resources/demo/tokenizer \\
        --groups '{"colour": ["red", "green", "blue", "yellow", "purple", "white"],
                   "shape": ["circle", "square", "triangle"], "direction": ["left", "right", "up", "down"]}' \\
        --out results/diagnostics/word_probe/stage3.json

A diagnostic (docs/analysis.md, "Why the twins stay at chance"), not a rule of the DAG. For every
caption and every word of a group in it, the word is replaced by [MASK] and the MLM head, through
the fusion layers, picks one word of the group; accuracy is reported per group and per occurrence
(the group's first and second word in the caption), with the video tokens of
- `own`: the caption's clip;
- `other`: the clip of the caption half the list away (another family on the demo);
- `reverse_twin`: the clip's time-reversed twin, where the annotations name one (a model that reads
  the direction from the clip scores below chance here: the twin moves the other way).
Chance is 100 / group size. `own` near `other` means the word is guessed from the text alone.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # svitt from this repository


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, type=Path)
    p.add_argument("--shards", nargs="+", required=True)
    p.add_argument("--annotations", required=True, type=Path, help="a retrieval annotation list (video, caption)")
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--groups", required=True, help="JSON {group: [word, ...]}, each word one token")
    p.add_argument("--text-len", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--out", required=True, type=Path)
    return p.parse_args(argv)


def group_token_ids(tokenizer, groups: dict[str, list[str]]) -> dict[str, list[int]]:
    """{group: token ids}; a word that is not one token of the vocabulary is an error naming it."""
    out = {}
    for name, words in groups.items():
        ids = []
        for word in words:
            pieces = tokenizer.tokenize(word)
            if len(pieces) != 1 or tokenizer.convert_tokens_to_ids(pieces[0]) == tokenizer.unk_token_id:
                raise ValueError(
                    f"--groups: {word!r} of group {name!r} is not one token of the vocabulary (tokenized as {pieces})"
                )
            ids.append(tokenizer.convert_tokens_to_ids(pieces[0]))
        out[name] = ids
    return out


def masked_word_accuracy(model, input_ids, attention_mask, video_tokens: dict, group_ids: dict, mask_id: int):
    """{group: {video: {occurrence: [correct, total]}}} over every group word of every caption.

    input_ids / attention_mask [N, L]; video_tokens {name: [N, 1 + N', D] (row i for caption i)}."""
    import torch

    group_of = {tok: name for name, ids in group_ids.items() for tok in ids}
    counts = {name: {video: {} for video in video_tokens} for name in group_ids}
    seen = torch.zeros(input_ids.shape, dtype=torch.long)  # occurrence index of each group word
    for name, ids in group_ids.items():
        in_group = torch.isin(input_ids, torch.tensor(ids))
        seen[in_group] = (in_group.cumsum(1) - 1)[in_group]
    with torch.no_grad():
        for pos in range(input_ids.shape[1]):
            rows = [i for i in range(len(input_ids)) if int(input_ids[i, pos]) in group_of]
            if not rows:
                continue
            masked = input_ids[rows].clone()
            masked[:, pos] = mask_id
            hidden = model.text_encoder.encode(masked, attention_mask[rows])
            for video, tokens in video_tokens.items():
                logits = model.mlm_logits(model.fuse(hidden, attention_mask[rows], tokens[rows]))[:, pos]
                for j, i in enumerate(rows):
                    truth = int(input_ids[i, pos])
                    ids = group_ids[group_of[truth]]
                    pick = ids[int(logits[j, ids].argmax())]
                    slot = counts[group_of[truth]][video].setdefault(int(seen[i, pos]), [0, 0])
                    slot[0] += int(pick == truth)
                    slot[1] += 1
    return counts


def summarise(counts: dict, group_ids: dict) -> dict:
    out = {}
    for name, by_video in counts.items():
        out[name] = {"chance": 100.0 / len(group_ids[name])}
        for video, by_occurrence in by_video.items():
            correct = sum(c for c, _ in by_occurrence.values())
            total = sum(n for _, n in by_occurrence.values())
            out[name][video] = {
                "all": 100.0 * correct / total if total else None,
                "count": total,
                **{f"occurrence_{k + 1}": 100.0 * c / n for k, (c, n) in sorted(by_occurrence.items())},
            }
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from svitt.data.pipeline import PairCollator
    from svitt.evaluation import retrieval
    from svitt.evaluation.encode import embed_videos
    from svitt.evaluation.loading import load_for_evaluation
    from svitt.io import atomic_write_json

    groups = json.loads(args.groups)
    # on the CPU, where this diagnostic has always run (it has no --device)
    loaded = load_for_evaluation(args.model, "cpu", tokenizer=args.tokenizer)
    model, info = loaded.model, loaded.info
    video_cfg = model.cfg["video"]
    transform = loaded.transform()
    dataset = retrieval.build_dataset(args.shards, args.annotations, video_cfg["frames"], transform)
    items = json.loads(args.annotations.read_text())
    tokenizer = loaded.tokenizer
    group_ids = group_token_ids(tokenizer, groups)
    _, tokens = embed_videos(model, dataset, args.batch_size, keep_tokens=True, progress=False)
    n = len(items)
    videos = {"own": tokens, "other": tokens.roll(n // 2, dims=0)}
    index = {item["video"]: i for i, item in enumerate(items)}
    if all(item.get("reverse_twin") in index for item in items):
        videos["reverse_twin"] = tokens[torch.tensor([index[item["reverse_twin"]] for item in items])]
    text = PairCollator(tokenizer, args.text_len).tokenize([item["caption"] for item in items])
    counts = masked_word_accuracy(
        model,
        text["input_ids"],
        text["attention_mask"],
        videos,
        group_ids,
        tokenizer.convert_tokens_to_ids(tokenizer.mask_token),
    )
    result = {
        "model": str(args.model),
        "stage": info["name"],
        "annotations": str(args.annotations),
        "groups": groups,
        "accuracy": summarise(counts, group_ids),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, result)
    for name, row in result["accuracy"].items():
        print(name, {k: (round(v["all"], 1) if isinstance(v, dict) else round(v, 1)) for k, v in row.items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
