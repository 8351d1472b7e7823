#!/usr/bin/env python
"""Train one SViTT pretraining stage (curriculum stage or EgoClip/EgoNCE).

Run by the workflow (rules/pretrain.smk), or by hand:
    python workflow_scripts/train.py --config stage.yaml --shards resources/frames/webvid/*.h5 \\
        --annotations resources/demo/webvid_train.csv --tokenizer resources/demo/tokenizer \\
        --out results/pretrain/stage1
Multi-GPU: torchrun --nproc_per_node N workflow_scripts/train.py ...
Resumes from OUT/checkpoint.pt when one written for the same config exists. Exit code 75 means
the run was preempted (SIGTERM/SIGUSR1) after saving: run the same command again to continue.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # svitt from this repository

from svitt.config import add_io_arguments


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", type=Path, help="stage config (YAML)")
    src.add_argument("--config-json", help="stage config as a JSON string (what the workflow passes)")
    p.add_argument("--shards", nargs="+", required=True, help="HDF5 frame shards")
    p.add_argument("--annotations", required=True, help="captions: WebVid-style CSV or egoclip.csv")
    p.add_argument("--tokenizer", required=True, help="folder with the BERT tokenizer (vocab.txt)")
    p.add_argument("--init", help="previous stage's model.safetensors (temporal bias resized)")
    p.add_argument("--out", type=Path, required=True, help="stage folder: checkpoint, metrics, model")
    add_io_arguments(p, "stage")
    p.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = yaml.safe_load(args.config.read_text()) if args.config else json.loads(args.config_json)
    from svitt.training.loop import run_cli

    return run_cli(cfg, args, init=args.init)


if __name__ == "__main__":
    sys.exit(main())
