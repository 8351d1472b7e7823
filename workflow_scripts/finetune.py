#!/usr/bin/env python
"""Finetune a pretraining stage's model on a downstream task with the one training loop (svitt.training.loop).

Run by the workflow (rules/downstream.smk), or by hand:
    python workflow_scripts/finetune.py --config-json '{"task": "retrieval", "name": "ft", "epochs": 5,
        "batch_size": 32, "lr": 1e-4}' --init results/pretrain/stage3/model.safetensors \\
        --shards resources/frames/demo_retrieval/*.h5 --annotations resources/demo/retrieval_train.json \\
        --test-annotations resources/demo/retrieval_test.json --tokenizer resources/demo/tokenizer \\
        --out results/finetune/retrieval/demo_retrieval/stage3

The config is the job's entry (svitt.training.keys.finetune_config): "task" (retrieval: VTC + VTM on caption
pairs; qa: the answer generation loss of a 3-layer decoder initialised from the fusion layers),
the training keys of svitt.training.keys.TRAIN_KEYS (qa adds QA_KEYS and QA_DATA_KEYS) and the sparsity keys
of MODEL_STAGE_KEYS (frames, local_blocks, ..., multimodal_keep) applied to the init's model.
Annotations are Singularity's JSON layout: [{"video", "caption"}] (retrieval) or
[{"video", "question", "answer"}] (QA). Before training, the videos of the train split are checked
against the test split's: --overlap error stops naming them (the demo corpus, where an overlap is a
bug), --overlap warn prints their count (real data, where you decide).
Resumes from OUT/checkpoint.pt like train.py; exit code 75 means preempted after saving: rerun.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # svitt from this repository

from svitt.config import add_io_arguments

MAX_LISTED = 50  # overlapping videos named in the error


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", type=Path, help="job config (YAML)")
    src.add_argument("--config-json", help="job config as a JSON string (what the workflow passes)")
    p.add_argument(
        "--init", required=True, type=Path, help="the pretraining stage's model.safetensors (model.json beside it)"
    )
    p.add_argument("--shards", nargs="+", required=True, help="HDF5 frame shards with the train split's videos")
    p.add_argument("--annotations", required=True, help="the train split (JSON)")
    p.add_argument("--test-annotations", help="the test split, checked for videos shared with the train split")
    p.add_argument(
        "--overlap",
        choices=["error", "warn"],
        default="error",
        help="what a train/test video overlap gets (default: error)",
    )
    p.add_argument("--tokenizer", required=True, help="folder with the BERT tokenizer (vocab.txt)")
    p.add_argument("--out", type=Path, required=True, help="job folder: checkpoint, metrics, model")
    add_io_arguments(p, "job")
    p.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def check_overlap(train: str, test: str, mode: str) -> None:
    """Raise (mode error) or warn (mode warn) when the two splits share videos."""
    from svitt.data.datasets import annotation_videos, split_overlap

    shared = split_overlap(train, test)
    if not shared:
        return
    if mode == "error":
        listed = ", ".join(shared[:MAX_LISTED]) + (
            f", ... ({len(shared) - MAX_LISTED} more)" if len(shared) > MAX_LISTED else ""
        )
        raise ValueError(
            f"the finetuning split {train} and the test split {test} share {len(shared)} video(s): {listed}"
        )
    if os.environ.get("RANK", "0") == "0":
        print(
            f"warning: {len(shared)} of {len(annotation_videos(train))} videos of the finetuning split {train} "
            f"are also in the test split {test}; results on it are not held out",
            file=sys.stderr,
        )


def main(argv=None) -> int:
    args = parse_args(argv)
    entry = yaml.safe_load(args.config.read_text()) if args.config else json.loads(args.config_json)
    from svitt.training.keys import finetune_config
    from svitt.training.loop import run_cli

    if args.test_annotations:
        try:
            check_overlap(args.annotations, args.test_annotations, args.overlap)
        except ValueError as error:
            print(f"finetune: error: {error}", file=sys.stderr)
            return 2
    info_path = args.init.with_name("model.json")
    if not info_path.exists():
        print(f"finetune: error: {info_path} is missing: it holds the config of {args.init}", file=sys.stderr)
        return 2
    cfg = finetune_config(entry, json.loads(info_path.read_text())["model_config"])
    return run_cli(cfg, args, init=str(args.init))


if __name__ == "__main__":
    sys.exit(main())
