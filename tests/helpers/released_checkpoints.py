"""Writes checkpoints as the released SViTT training scripts save them, for
tests/test_released_import.py: tiny models of the three kinds in the released naming
(tests/helpers/released.py) with a config pickled by OmegaConf 2.1.1 itself (the released
environment's; a test-only dependency of this project):
{"model", "optimizer", "scheduler", "scaler", "config", "epoch", "global_step"}.

The tests run it in a subprocess, so that their own process never imports OmegaConf (the importer
must read these files without it):

    python -m tests.helpers.released_checkpoints OUT_DIR    # OUT_DIR/{pretrain,retrieval,qa}.pth
"""

import copy
import os
import sys
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from svitt.models.answer_decoder import VideoQA
from svitt.models.svitt import SViTT
from tests.helpers.released import RELEASED_CONFIG, TINY_RELEASED_MODEL, perturbed, released_state_dict

# What the released YAMLs hold besides the model's keys, interpolations unresolved as stored.
EXTRA = {
    "data_root": "${oc.env:SL_DATA_DIR}",
    "train_corpus": "webvid",
    "available_corpus": {"webvid": ["${data_root}/webvid_train.json", "${data_root}/webvid_videos", "video"]},
    "train_file": "${available_corpus[${train_corpus}]}",
    "vit_zoo": {"beit": "microsoft/beit-base-patch16-224-pt22k-ft22k"},
    "vit_name_or_pretrained_path": "${vit_zoo[${vit_type}]}",
    "optimizer": {"opt": "adamW", "lr": 3e-5, "opt_betas": [0.9, 0.999], "weight_decay": 0.02},
    "scheduler": {"sched": "cosine", "epochs": 10, "min_lr_multi": 0.01, "warmup_epochs": 1},
    "output_dir": "None",
    "pretrained_path": "None",
    "resume": False,
    "fp16": True,
    "seed": 42,
}


def convert_types(config: DictConfig) -> DictConfig:
    """The released utils/config_utils.convert_types: "None" / "none" strings -> None, in dicts."""
    for key, value in config.items():
        if isinstance(value, DictConfig):
            convert_types(value)
        elif value in ("None", "none"):
            setattr(config, key, None)
    return config


def save(out_dir: Path, kind: str, model, config: dict):
    state = released_state_dict(model, kind)
    checkpoint = {
        "model": state,
        "optimizer": {"state": {}, "param_groups": [{"lr": 3e-5, "params": [0, 1]}]},
        "scheduler": {"base_lrs": [3e-5], "last_epoch": 99, "lr_lambdas": [None]},
        "scaler": {"scale": 65536.0, "growth_factor": 2.0, "_growth_tracker": 7},
        "config": convert_types(OmegaConf.create({**config, **EXTRA})),
        "epoch": 4,
        "global_step": 100,
    }
    torch.save(checkpoint, out_dir / f"{kind}.pth")


def main(out_dir: Path):
    out_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("SL_DATA_DIR", "/data")  # convert_types reads resolved values, as the released run did
    torch.manual_seed(0)
    model = perturbed(SViTT(TINY_RELEASED_MODEL), seed=1)
    save(out_dir, "pretrain", model, RELEASED_CONFIG)
    save(out_dir, "retrieval", model, RELEASED_CONFIG)
    qa = perturbed(VideoQA(TINY_RELEASED_MODEL, decoder_layers=2), seed=2)
    config = copy.deepcopy(RELEASED_CONFIG)
    config["text_decoder"] = "bert-base-uncased"
    save(out_dir, "qa", qa, config)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
