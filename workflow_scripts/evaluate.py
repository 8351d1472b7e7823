#!/usr/bin/env python
"""Evaluate an exported SViTT model (results/pretrain/<stage>/model.safetensors).

    python workflow_scripts/evaluate.py retrieval --model M --shards S.h5 ... --annotations A.json \\
        --tokenizer DIR --out results/eval/retrieval/<dataset>/<stage>.json
    python workflow_scripts/evaluate.py egomcq --model M --shards ... --annotations egomcq.json \\
        --tokenizer DIR --out results/eval/egomcq/<stage>.json
    python workflow_scripts/evaluate.py qa --model results/finetune/qa/<dataset>/<stage>/model.safetensors \\
        --shards ... --annotations qa_test.json --answer-list answers.json --tokenizer DIR --out ...

Settings (JSON, what the workflow passes): each task's SETTINGS in svitt/evaluation/<task>.py
(retrieval: batch_size, rerank_k, text_len, vtm_score, paragraph; egomcq: frames, text_len; qa: batch_size,
rerank_k, scoring). `frames` evaluates the model at another clip length; a setting given as null
takes the model's training value (QA's question and answer lengths). The JSON written holds the
metrics (percent) and the settings used.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # svitt from this repository

from svitt.evaluation import TASKS, task


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("task", choices=TASKS)
    p.add_argument("--model", required=True, type=Path, help="model.safetensors (model.json beside it)")
    p.add_argument("--shards", nargs="+", required=True)
    p.add_argument("--annotations", required=True)
    p.add_argument("--answer-list", help="QA: the dataset's answer list (JSON list of strings)")
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--config-json", default="{}", help="task settings as JSON")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    module = task(args.task)
    settings = {**module.SETTINGS, **json.loads(args.config_json)}
    from svitt.data.pipeline import PairCollator
    from svitt.evaluation.loading import load_for_evaluation
    from svitt.io import atomic_write_json

    loaded = load_for_evaluation(
        args.model,
        args.device,
        frames=settings.get("frames"),
        kind=getattr(module, "MODEL_KIND", "svitt"),
        tokenizer=args.tokenizer,
    )
    model, info, device = loaded.model, loaded.info, loaded.device
    video = model.cfg["video"]
    data_cfg = loaded.data_config  # normalise as in training
    settings.update({k: data_cfg[k] for k, v in settings.items() if v is None and k in data_cfg})
    transform = loaded.transform()
    collator = PairCollator(loaded.tokenizer, settings["text_len"])
    files = {"answer_list": args.answer_list} if args.answer_list else {}
    dataset = module.build_dataset(args.shards, args.annotations, video["frames"], transform, settings, **files)
    result = module.run(model, dataset, collator, settings, device=device, progress=not args.no_progress)
    result.update(
        {
            "task": args.task,
            "model": str(args.model),
            "stage": info["name"],
            "frames": video["frames"],
            "settings": settings,
            **files,
        }
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, result)
    print(json.dumps(result.get("metrics")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
