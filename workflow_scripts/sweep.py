#!/usr/bin/env python
"""One point of a test-time sparsity sweep (SViTT Figures 4, 5, 7): evaluate a trained checkpoint
with other edge sparsity (K_l, K_r, G) or keep rates (q_v, q_m), without retraining.

    python workflow_scripts/sweep.py --model results/pretrain/stage1/model.safetensors \\
        --shards S.h5 --annotations retrieval_test.json --tokenizer DIR --point edge_1_3_8 \\
        --local-blocks 1 --random-blocks 3 --block-size 8 --out results/analysis/sweep/stage1/edge_1_3_8.json
    ... --point keep_0.7_0.1 --visual-keep 0.7 --multimodal-keep 0.1 ...

Settings not given keep the checkpoint's. The JSON holds the retrieval metrics (the `metric` field
names the headline one), the attention edges and sparsity S (eq. 17-19) and the inference GFLOPs
of one video-text pair at this point. A point the sparse kernel cannot run (K_l even, G larger than
the clip's token count, a keep rate outside (0, 1]) writes a JSON with valid: false and the reason
instead, and exits 0, so the other points of the grid still run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # svitt from this repository

from svitt.evaluation.loading import read_model_info
from svitt.io import atomic_write_json

METRIC = "t2v_mean"  # of the contrastive scores, as the paper's Figures 4 and 5 (mean recall)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, type=Path, help="model.safetensors (model.json beside it)")
    p.add_argument("--shards", nargs="+", required=True)
    p.add_argument("--annotations", required=True)
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--point", required=True, help="the point's name, recorded in the JSON")
    p.add_argument("--local-blocks", type=int)
    p.add_argument("--random-blocks", type=int)
    p.add_argument("--block-size", type=int)
    p.add_argument("--visual-keep", type=float)
    p.add_argument("--multimodal-keep", type=float)
    p.add_argument("--config-json", default="{}", help="retrieval settings as JSON (batch_size, rerank_k, text_len)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def point_overrides(args) -> dict:
    video = {
        k: getattr(args, k)
        for k in ("local_blocks", "random_blocks", "block_size", "visual_keep")
        if getattr(args, k) is not None
    }
    text = {"multimodal_keep": args.multimodal_keep} if args.multimodal_keep is not None else {}
    return {"video": video, "text": text}


def why_not(overrides: dict, model_config: dict) -> str | None:
    """The reason the sparse kernel cannot run this point, or None. model_config: the
    checkpoint's resolved `model` section (model.json)."""
    video = {**model_config["video"], **overrides["video"]}
    k_l, k_r, g = video["local_blocks"], video["random_blocks"], video["block_size"]
    if (k_l, k_r, g) != (None, None, None):
        if None in (k_l, k_r, g):
            return f"K_l, K_r and G must be all set or all dense, got ({k_l}, {k_r}, {g})"
        if k_l < 1 or k_l % 2 == 0:
            return f"K_l = {k_l}: the local window needs an odd number of blocks centred on the query's block"
        if k_r < 0:
            return f"K_r = {k_r} random blocks: must be >= 0"
        side = video["image_size"] // video["patch_size"]
        tokens = (video["frames"] // video["tubelet_frames"]) * side * side
        if g < 1 or g > tokens:
            return f"G = {g} tokens per block: the clip has {tokens} tokens, so G must be in 1..{tokens}"
    rates = video["visual_keep"] if isinstance(video["visual_keep"], list) else [video["visual_keep"]]
    rates = rates + [{**model_config["text"], **overrides["text"]}["multimodal_keep"]]
    if any(not 0 < q <= 1 for q in rates):
        return f"keep rates {rates} must be in (0, 1]"
    return None


def main(argv=None) -> int:
    args = parse_args(argv)
    info = read_model_info(args.model)
    overrides = point_overrides(args)
    record = {
        "point": args.point,
        "stage": info["name"],
        "model": str(args.model),
        "frames": info["frames"],
        "settings": {
            **{
                k: info["model_config"]["video"][k]
                for k in ("local_blocks", "random_blocks", "block_size", "visual_keep")
            },
            "multimodal_keep": info["model_config"]["text"]["multimodal_keep"],
            **overrides["video"],
            **overrides["text"],
        },
    }
    reason = why_not(overrides, info["model_config"])
    if reason:
        atomic_write_json(args.out, {**record, "valid": False, "reason": reason})
        print(f"point {args.point} not run: {reason}")
        return 0

    from svitt.analysis import efficiency
    from svitt.data.pipeline import PairCollator
    from svitt.evaluation import task
    from svitt.evaluation.loading import load_for_evaluation
    from svitt.evaluation.probing import reset_layouts

    module = task("retrieval")
    settings = {
        k: v
        for k, v in {**module.SETTINGS, **json.loads(args.config_json)}.items()
        if k not in ("frame_orders", "shuffle_seed")
    }  # one pass, frames as sampled
    loaded = load_for_evaluation(args.model, args.device, overrides=overrides, tokenizer=args.tokenizer)
    model, info, device = loaded.model, loaded.info, loaded.device
    video = model.cfg["video"]
    transform = loaded.transform()
    collator = PairCollator(loaded.tokenizer, settings["text_len"])
    dataset = module.build_dataset(args.shards, args.annotations, video["frames"], transform)
    reset_layouts(model)
    result = module.evaluate_retrieval(
        model,
        dataset,
        collator,
        batch_size=settings["batch_size"],
        rerank_k=settings["rerank_k"],
        device=device,
        progress=not args.no_progress,
    )
    counts = efficiency.edges(model.cfg, settings["text_len"])
    flops = efficiency.inference_flops(model.to(device).eval(), settings["text_len"])
    record.update(
        {
            "valid": True,
            **{
                k: result[k]
                for k in ("metrics", "metrics_vtm", "twins", "twins_vtm", "num_videos", "chance_r1")
                if k in result
            },
            "metric": {"name": METRIC, "value": result["metrics"][METRIC]},
            "edges": counts["edges"],
            "sparsity": counts["sparsity"],
            "gflops": flops["total"] / 1e9,
            "gflops_video": flops["video"] / 1e9,
            "eval_settings": settings,
        }
    )
    atomic_write_json(args.out, record)
    print(json.dumps({k: record[k] for k in ("point", "metric", "edges", "sparsity", "gflops")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
