"""What a training task supplies to the one loop (svitt.training.loop): its model, its batches
and its losses.

    pairs  video-text pairs: pretraining (VTC or EgoNCE, VTM, MLM), and retrieval finetuning
           (VTC + VTM on a downstream train split, from a stage's model.safetensors)
    qa     open-ended video QA: the answer generation loss of an answer decoder (VideoQA)
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from svitt.models import objectives as registry
from svitt.models.losses import mask_tokens
from svitt.models.objectives import LossSettings
from svitt.models.svitt import SViTT
from svitt.training.grad_cache import cached_step


@dataclass
class TrainData:
    """Where the stage's data comes from (the workflow passes these as file inputs)."""

    shards: list
    annotations: str
    tokenizer: str
    init: str | None = None  # previous stage's model.safetensors (temporal bias resized)
    extra: dict = field(default_factory=dict)


def with_vocab(model_cfg: dict, vocab_size: int) -> dict:
    """model.text.vocab_size: null means "the tokenizer's size"; fill it in."""
    model_cfg = copy.deepcopy(model_cfg)
    text = model_cfg.setdefault("text", {})
    if "vocab_size" in text and text["vocab_size"] is None:
        text["vocab_size"] = vocab_size
    return model_cfg


def build_stage_model(cfg: dict, data: TrainData, tokenizer) -> SViTT:
    """The stage's model: fresh (optionally from image/text weights) or from the previous stage."""
    model = SViTT(with_vocab(cfg["model"], len(tokenizer)))
    if len(tokenizer) > model.cfg["text"]["vocab_size"]:
        raise ValueError(
            f"tokenizer has {len(tokenizer)} tokens but model.text.vocab_size is {model.cfg['text']['vocab_size']}"
        )
    if data.init:
        from safetensors.torch import load_file

        model.load_stage_checkpoint(load_file(str(data.init)))
    else:
        model.load_pretrained_weights()
    return model


class PairsTask:
    """Video-text pairs (WebVid / EgoClip / a downstream retrieval split): SViTT.forward's losses."""

    def build_model(self, cfg: dict, data: TrainData, tokenizer) -> torch.nn.Module:
        return build_stage_model(cfg, data, tokenizer)

    def build_loader(self, cfg: dict, data: TrainData, tokenizer, per_step: int, rank: int, world: int):
        from svitt.data.pipeline import build_train_loader

        return build_train_loader(cfg, data, tokenizer, per_step, rank, world)

    def find_unused_parameters(self, cfg: dict) -> bool:
        """DDP must look for unused parameters unless the objectives train every part of the model."""
        return registry.leaves_parts_untrained(cfg["objectives"])

    # grad_accum > 1: svitt.training.grad_cache computes every objective over the whole step's batch: the
    # contrastive ones and VTM's negatives compare each clip with the others, and MLM alone
    # accumulated plainly would average the micro-batches' means, not the step's mean over its masked tokens.
    cached = True

    def inputs(self, batch: dict, cfg: dict, tokenizer, device) -> dict:
        """One micro-batch on the device, with its MLM masks (drawn from torch's RNG here)."""
        inputs = to_device(batch, device)
        if "mlm" in cfg["objectives"]:  # mlm_prob: a data setting, not a LossSettings field
            inputs["mlm_ids"], inputs["mlm_labels"] = mask_tokens(
                inputs["input_ids"],
                inputs["attention_mask"],
                len(tokenizer),
                tokenizer.mask_token_id,
                tokenizer.all_special_ids,
                cfg["mlm_prob"],
            )
        return inputs

    def losses(self, net, inputs: dict, cfg: dict) -> dict:
        """{objective: loss} of one micro-batch (SViTT.forward: features() then losses())."""
        return net(objectives=tuple(cfg["objectives"]), settings=LossSettings.from_config(cfg), **inputs)

    def cached_step(self, model, micro: list[dict], cfg: dict, scaler, autocast_fn) -> dict:
        """The losses of the whole step's batch over grad_accum micro-batches (GradCache)."""
        return cached_step(
            model,
            micro,
            tuple(cfg["objectives"]),
            cfg["objectives"],
            scaler,
            autocast_fn,
            LossSettings.from_config(cfg),
        )


class QATask:
    """Video QA: VideoQA (a stage's encoders + an answer decoder from its fusion layers), trained
    on (video, question, answer) with the answer generation loss."""

    def build_model(self, cfg: dict, data: TrainData, tokenizer) -> torch.nn.Module:
        from svitt.models.answer_decoder import VideoQA

        return VideoQA.from_svitt(build_stage_model(cfg, data, tokenizer), cfg["decoder_layers"])

    def build_loader(self, cfg: dict, data: TrainData, tokenizer, per_step: int, rank: int, world: int):
        from svitt.data.pipeline import build_qa_loader

        return build_qa_loader(cfg, data, tokenizer, per_step, rank, world)

    def find_unused_parameters(self, cfg: dict) -> bool:
        return False  # VideoQA holds no head the answer loss does not reach

    # The answer loss is a mean of per-question terms: grad_accum > 1 accumulates micro-batches
    # plainly (exact for equal micro-batches), under the DDP wrapper's no_sync.
    cached = False

    def inputs(self, batch: dict, cfg: dict, tokenizer, device) -> dict:
        return to_device(batch, device)

    def losses(self, net, inputs: dict, cfg: dict) -> dict:
        return net(**inputs)


TASKS = {"pairs": PairsTask(), "qa": QATask()}


def to_device(batch: dict, device) -> dict:
    keys = ("video", "input_ids", "attention_mask", "nouns", "verbs", "answer_ids", "answer_mask")
    return {k: batch[k].to(device, non_blocking=True) for k in keys if k in batch}
