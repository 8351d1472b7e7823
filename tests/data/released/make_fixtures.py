"""Writes the released-format checkpoints tests/test_released_import.py reads: tiny models of the
three kinds in the released naming (tests/helpers/released.py) with a config pickled by OmegaConf
itself, as the released training scripts save them:
{"model", "optimizer", "scheduler", "scaler", "config", "epoch", "global_step"}.

OmegaConf is not a dependency of this project; the released code pinned omegaconf 2.1.1. To
regenerate (from the repository root):

    pip install --target /tmp/omegaconf211 omegaconf==2.1.1
    PYTHONPATH=/tmp/omegaconf211:. python tests/data/released/make_fixtures.py
"""
import copy
import os
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from svitt.models.answer_decoder import VideoQA
from svitt.models.svitt import SViTT
from tests.helpers.released import RELEASED_CONFIG, TINY_RELEASED_MODEL, perturbed, released_state_dict

HERE = Path(__file__).parent
# What the released YAMLs hold besides the model's keys, interpolations unresolved as stored.
EXTRA = {
    "data_root": "${oc.env:SL_DATA_DIR}", "train_corpus": "webvid",
    "available_corpus": {"webvid": ["${data_root}/webvid_train.json", "${data_root}/webvid_videos", "video"]},
    "train_file": "${available_corpus[${train_corpus}]}",
    "vit_zoo": {"beit": "microsoft/beit-base-patch16-224-pt22k-ft22k"},
    "vit_name_or_pretrained_path": "${vit_zoo[${vit_type}]}",
    "optimizer": {"opt": "adamW", "lr": 3e-5, "opt_betas": [0.9, 0.999], "weight_decay": 0.02},
    "scheduler": {"sched": "cosine", "epochs": 10, "min_lr_multi": 0.01, "warmup_epochs": 1},
    "output_dir": "None", "pretrained_path": "None", "resume": False, "fp16": True, "seed": 42,
}


def convert_types(config: DictConfig) -> DictConfig:
    """The released utils/config_utils.convert_types: "None" / "none" strings -> None, in dicts."""
    for key, value in config.items():
        if isinstance(value, DictConfig):
            convert_types(value)
        elif value in ("None", "none"):
            setattr(config, key, None)
    return config


def save(kind: str, model, config: dict):
    state = released_state_dict(model, kind)
    checkpoint = {"model": state, "optimizer": {"state": {}, "param_groups": [{"lr": 3e-5, "params": [0, 1]}]},
                  "scheduler": {"base_lrs": [3e-5], "last_epoch": 99, "lr_lambdas": [None]},
                  "scaler": {"scale": 65536.0, "growth_factor": 2.0, "_growth_tracker": 7},
                  "config": convert_types(OmegaConf.create({**config, **EXTRA})), "epoch": 4, "global_step": 100}
    torch.save(checkpoint, HERE / f"{kind}.pth")


def main():
    os.environ.setdefault("SL_DATA_DIR", "/data")  # convert_types reads resolved values, as the released run did
    torch.manual_seed(0)
    model = perturbed(SViTT(TINY_RELEASED_MODEL), seed=1)
    save("pretrain", model, RELEASED_CONFIG)
    save("retrieval", model, RELEASED_CONFIG)
    qa = perturbed(VideoQA(TINY_RELEASED_MODEL, decoder_layers=2), seed=2)
    config = copy.deepcopy(RELEASED_CONFIG)
    config["text_decoder"] = "bert-base-uncased"
    save("qa", qa, config)


if __name__ == "__main__":
    main()
