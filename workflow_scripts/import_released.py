#!/usr/bin/env python
"""Import a checkpoint saved by the released SViTT training code (github JerryYLi/svitt).

    python workflow_scripts/import_released.py CHECKPOINT OUT_DIR

CHECKPOINT is a pretraining, retrieval or QA checkpoint of the released scripts
(`{"model", "config", "optimizer", ...}`, e.g. ckpt_09.pth or ckpt_best.pth). It is read with
torch.load(weights_only=True) and an allow-list for the stored OmegaConf config (OmegaConf is not
needed). OUT_DIR receives model.safetensors and model.json: svitt.training.checkpoint.load_exported loads
them (a QA checkpoint as a VideoQA model, which svitt.evaluation.qa also reads), and a pretraining or
retrieval import can start a stage (`train.py --init OUT_DIR/model.safetensors`). model.json records
the settings the stored config translates to (the released model's behaviour where it differs from
this project's defaults, docs/fidelity.md) and, under "released", the stored config, notes, the
tensors verified rather than copied and those the released model does not have.
The mapping lives in svitt/models/released.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # svitt from this repository


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path, help="a checkpoint saved by the released SViTT code")
    p.add_argument("out_dir", type=Path, help="receives model.safetensors and model.json")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from svitt.models.released import ReleasedCheckpointError, import_released

    try:
        info = import_released(args.checkpoint, args.out_dir)
    except ReleasedCheckpointError as error:
        print(f"error: {args.checkpoint}: {error}", file=sys.stderr)
        return 1
    released = info["released"]
    summary = {
        "out": str(args.out_dir),
        "kind": released["kind"],
        "epoch": released["epoch"],
        "frames": info["frames"],
        "notes": released["notes"],
        "initialised": sorted(released["initialised"]),
    }
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
