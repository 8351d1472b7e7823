"""AdamW's parameter groups: one weight-decay convention for every model the workflow trains
(SViTT stages, finetuned models, NLQ grounders)."""

from __future__ import annotations

import torch


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """[decayed, undecayed]: no decay on parameters of under 2 dimensions (biases, norms, layer
    scales) nor on those the model's `no_weight_decay()` names (timm's convention: tokens,
    position tables, the temperature). Frozen parameters are left out."""
    declared = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or name in declared else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
