#!/usr/bin/env python
"""Pruning maps (SViTT Figures 6 and 8): which patches a trained model keeps.

    python workflow_scripts/pruning_maps.py --model results/pretrain/stage3/model.safetensors \\
        --shards S.h5 --annotations retrieval_test.json --tokenizer DIR --clips 3 \\
        --out-figure results/figures/pruning_maps.png --out-json results/analysis/pruning_maps.json
    ... --video my_clip.mp4 --caption "a person opens the door" ...   (any video file)

For each clip: its frames, then the frames with the pruned patches greyed out after each visual
pruning layer (node sparsity by video-CLS attention, eq. 10-11), then the text-guided selection
of the caption (text-CLS cross-attention of the fusion layers, eq. 12-13). --visual-keep and
--multimodal-keep override the checkpoint's keep rates (Figure 8 uses q_v = 0.6, q_m = 0.1).
The JSON lists the kept token positions (p = t' H' W' + h W' + w) at each step.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # svitt from this repository


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, type=Path, help="model.safetensors (model.json beside it)")
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--shards", nargs="*", default=[], help="frame shards of the dataset to take clips from")
    p.add_argument("--annotations", help="retrieval annotation of those clips (their captions)")
    p.add_argument("--clips", type=int, default=3, help="the first N clips of the annotation")
    p.add_argument("--video", nargs="*", default=[], type=Path, help="video files to map as well")
    p.add_argument("--caption", nargs="*", default=[], help="one caption per --video")
    p.add_argument("--visual-keep", type=float, help="q_v at test time (default: the checkpoint's)")
    p.add_argument("--multimodal-keep", type=float, help="q_m at test time (default: the checkpoint's)")
    p.add_argument("--text-len", type=int, default=32)
    p.add_argument("--out-figure", required=True, type=Path)
    p.add_argument("--out-json", required=True, type=Path)
    args = p.parse_args(argv)
    if len(args.caption) != len(args.video):
        p.error(f"give one --caption per --video: {len(args.video)} videos, {len(args.caption)} captions")
    if not args.video and not (args.shards and args.annotations):
        p.error("nothing to map: give --shards and --annotations, or --video files")
    return args


def kept_positions(model, clips, input_ids, attention_mask) -> list[dict]:
    """Per clip {"visual": [[kept positions] after each visual pruning layer], "text": [kept
    positions after the text-guided selection]} (positions sorted, on the tubelet grid)."""
    import torch

    encoder = model.video_encoder
    if encoder.cfg["temporal"] != "joint":
        raise ValueError("pruning maps need joint space-time attention (video.temporal = joint)")
    after_layers = []
    hooks = [
        block.register_forward_hook(lambda module, inputs, output: after_layers.append(output[1]))
        for block in encoder.blocks
        if block.keep_rate < 1
    ]
    try:
        with torch.no_grad():
            hidden, pos = encoder(clips, return_positions=True)
            tokens = encoder.fusion_tokens(hidden)
            text = model.text_encoder.encode(input_ids, attention_mask)
            _, kept = model.text_encoder.fuse(text, attention_mask, tokens, return_kept=True)
    finally:
        for hook in hooks:
            hook.remove()
    pos = pos.expand(clips.shape[0], -1)
    selected = torch.gather(pos, 1, kept)
    return [
        {
            "visual": [sorted(layer.expand(clips.shape[0], -1)[b].tolist()) for layer in after_layers],
            "text": sorted(selected[b].tolist()),
        }
        for b in range(clips.shape[0])
    ]


def load_video(path: Path, frames: int, transform):
    """A video file -> [T, 3, H, W] float, T frames from the middles of T equal segments."""
    import torch

    from svitt.data.frames import VideoSource, uniform_indices

    source = VideoSource(path)
    raw = source.read(uniform_indices(source.num_frames, frames))  # [T, H, W, 3] uint8
    return transform(torch.from_numpy(raw).permute(0, 3, 1, 2).contiguous())


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from svitt.analysis import plots
    from svitt.data.pipeline import PairCollator
    from svitt.evaluation.loading import load_for_evaluation
    from svitt.io import atomic_write_json

    overrides = {"video": {}, "text": {}}
    if args.visual_keep is not None:
        overrides["video"]["visual_keep"] = args.visual_keep
    if args.multimodal_keep is not None:
        overrides["text"]["multimodal_keep"] = args.multimodal_keep
    # on the CPU, where this script has always run (it has no --device)
    loaded = load_for_evaluation(args.model, "cpu", overrides=overrides, tokenizer=args.tokenizer)
    model, info = loaded.model, loaded.info
    video_cfg = model.cfg["video"]
    mean, std = loaded.data_config["mean"], loaded.data_config["std"]
    transform = loaded.transform()
    clips, captions, names = [], [], []
    if args.shards:
        from svitt.data.datasets import RetrievalDataset

        data = RetrievalDataset(args.shards, args.annotations, video_cfg["frames"], transform)
        for index in range(min(args.clips, len(data))):
            clips.append(data[index]["video"])
            captions.append(data.texts[data.video_to_texts[index][0]])
            names.append(data.video_ids[index])
    for path, caption in zip(args.video, args.caption):
        clips.append(load_video(path, video_cfg["frames"], transform))
        captions.append(caption)
        names.append(path.name)
    batch = torch.stack(clips)
    tokens = PairCollator(loaded.tokenizer, args.text_len).tokenize(captions)
    model.video_encoder.layout_generator.manual_seed(int(video_cfg["seed"]))
    maps = kept_positions(model.eval(), batch, tokens["input_ids"], tokens["attention_mask"])
    grid = tuple(model.video_encoder.grid)
    layers = [i + 1 for i, block in enumerate(model.video_encoder.blocks) if block.keep_rate < 1]
    pixels = (batch * torch.tensor(std).view(1, 1, 3, 1, 1) + torch.tensor(mean).view(1, 1, 3, 1, 1)).clamp(0, 1)
    plots.plot_pruning_maps(
        pixels.permute(0, 1, 3, 4, 2).numpy(),
        maps,
        captions,
        names,
        grid,
        video_cfg["tubelet_frames"],
        video_cfg["patch_size"],
        layers,
        {"q_v": video_cfg["visual_keep"], "q_m": model.cfg["text"]["multimodal_keep"], "stage": info["name"]},
        args.out_figure,
    )
    atomic_write_json(
        args.out_json,
        {
            "model": str(args.model),
            "stage": info["name"],
            "grid": list(grid),
            "prune_layers": layers,
            "visual_keep": video_cfg["visual_keep"],
            "multimodal_keep": model.cfg["text"]["multimodal_keep"],
            "clips": [{"name": n, "caption": c, **m} for n, c, m in zip(names, captions, maps)],
        },
    )
    print(json.dumps({"clips": names, "kept_after_text": [len(m["text"]) for m in maps]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
