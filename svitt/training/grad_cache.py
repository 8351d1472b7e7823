"""One optimiser step over grad_accum micro-batches with the contrastive batch of the whole step.

Plain gradient accumulation computes each micro-batch's losses alone, so VTC / EgoNCE would see
the micro-batch's negatives (64 where the paper's 512-clip batch has 511) and VTM would draw its
hard negatives from the micro-batch. Here (GradCache, Gao et al. 2021; open_clip accumulates the
same way) the loss is the one of the whole configured batch, and the gradients are exact:

1. every micro-batch's encoder features (svitt.models.svitt.SViTT.features), without autograd;
2. the losses of the whole batch from those features, held as leaf tensors: backward gives the
   heads' gradients (fusion layers, projections' consumers, temperature) and d loss / d features;
3. every micro-batch's features again, with autograd and the same randomness (dropout, random
   attention blocks), backpropagating its slice of d loss / d features into the encoders.

The encoders, where the memory is, run one micro-batch at a time; the fusion layers and heads see
the whole accumulated batch at once. Under DDP the contrastive losses gather the accumulated
batches of every rank, and the caller averages the gradients over ranks (no DDP wrapper: its hooks
expect a forward through the wrapper).
"""

from __future__ import annotations

import contextlib

import torch

from svitt.models.objectives import DEFAULT_SETTINGS, LOSS_INPUTS, LossSettings


def _rng_state(model) -> dict:
    state = {"torch": torch.get_rng_state(), "layout": model.video_encoder.layout_generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(model, state: dict):
    torch.set_rng_state(state["torch"])
    model.video_encoder.layout_generator.set_state(state["layout"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def _features(model, batch: dict, objectives) -> dict:
    mlm_ids = batch.get("mlm_ids") if "mlm" in objectives else None
    return model.features(batch["video"], batch["input_ids"], batch["attention_mask"], mlm_ids)


def cached_step(
    model,
    micro_batches: list[dict],
    objectives,
    weights: dict,
    scaler=None,
    autocast=contextlib.nullcontext,
    settings: LossSettings = DEFAULT_SETTINGS,
) -> dict[str, float]:
    """Forward/backward of one optimiser step; gradients accumulate into model's parameters.

    micro_batches: inputs of SViTT.forward (video, input_ids, attention_mask, and as the objectives
    need: mlm_ids, mlm_labels, nouns, verbs); their texts may have different lengths (each is padded
    to the longest of the step, as one collated batch would be). Returns {objective: loss of the
    whole batch, "loss": weighted sum} as floats.
    """
    length = max(b["input_ids"].shape[1] for b in micro_batches)
    states, cached = [], []
    for batch in micro_batches:
        states.append(_rng_state(model))
        with torch.no_grad(), autocast():
            cached.append(_features(model, batch, objectives))
    leaves = {k: torch.cat([_pad_text(f[k], length, k) for f in cached]).detach().requires_grad_() for k in cached[0]}
    inputs = {
        k: torch.cat([_pad_text(b[k], length, k) for b in micro_batches]) for k in LOSS_INPUTS if k in micro_batches[0]
    }
    with autocast():
        losses = model.losses(leaves, inputs, objectives, settings)
        total = sum(weights[k] * losses[k] for k in objectives)
    (scaler.scale(total) if scaler is not None else total).backward()
    after = _rng_state(model)

    start = 0
    for batch, state in zip(micro_batches, states):
        _set_rng_state(model, state)
        with autocast():
            live = _features(model, batch, objectives)
        rows = slice(start, start + batch["video"].shape[0])
        pairs = [
            (value, _unpad_text(leaves[k].grad[rows], value, k))
            for k, value in live.items()
            if leaves[k].grad is not None
        ]
        if pairs:
            torch.autograd.backward([p[0] for p in pairs], [p[1] for p in pairs])
        start = rows.stop
    _set_rng_state(model, after)
    return {**{k: float(v.detach()) for k, v in losses.items()}, "loss": float(total.detach())}


# Per-token tensors of the text, padded to the step's longest text: the padding gets no
# attention and no MLM label.
_TEXT_PAD = {"text_hidden": 0.0, "masked_hidden": 0.0, "attention_mask": 0, "mlm_labels": -100}


def _pad_text(x: torch.Tensor, length: int, key: str) -> torch.Tensor:
    if key not in _TEXT_PAD or x.shape[1] == length:
        return x
    pad = x.new_full((x.shape[0], length - x.shape[1]) + tuple(x.shape[2:]), _TEXT_PAD[key])
    return torch.cat([x, pad], dim=1)


def _unpad_text(grad: torch.Tensor, live: torch.Tensor, key: str) -> torch.Tensor:
    return grad[:, : live.shape[1]] if key in _TEXT_PAD else grad
