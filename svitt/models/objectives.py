"""The pretraining objectives of the pairs task in one table (VTC or EgoNCE, VTM, MLM; paper appendix A.3).

A row says what an objective computes (a function of the model, the encoders' features of the whole
batch, the batch's other inputs and LossSettings), what it needs, which parts of the model it trains
and what it cannot be combined with. SViTT.losses, the stage config's validation (svitt.training.keys), DDP's
find_unused_parameters, the plots' labels and the meta-device step of svitt.analysis.efficiency are read from
here. Adding an objective: its loss in svitt/models/losses.py, its row in OBJECTIVE_TABLE, its weight key in
schemas/config.schema.yaml (docs/training.md).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from svitt.models import losses


@dataclass(frozen=True)
class LossSettings:
    """What the losses are computed with (the stage config keys of the same names)."""

    egonce_temperature: float = 0.05  # EgoNCE's fixed temperature (VTC learns its own)
    vtm_hard_fraction: float = 1.0  # losses.vtm_hard_negatives: share drawn by similarity (1.0: ALBEF)

    @classmethod
    def from_config(cls, cfg: dict) -> LossSettings:
        """The settings of a resolved stage config (values as given: no conversion, same numbers)."""
        return cls(**{f.name: cfg[f.name] for f in dataclasses.fields(cls)})


DEFAULT_SETTINGS = LossSettings()  # frozen: one shared default is safe


# Parts of SViTT that only some objectives train; the encoders below them every objective trains.
PARTS = {
    "projections": "vision_proj and text_proj (the joint embedding space)",
    "temperature": "the learnable temperature temp",
    "fusion": "the text encoder's fusion (cross-attention) layers",
    "vtm_head": "the matching head",
    "mlm_head": "the masked-LM head",
}


@dataclass(frozen=True)
class Objective:
    name: str  # the key of stage.objectives and of the losses' dict
    label: str  # plot label (svitt.analysis.plots.LOSS_NAMES)
    loss: Callable[..., torch.Tensor]  # (model, feats, batch, settings, objectives) -> 0-dim loss
    # The same tensors on the meta device, where the loss's value checks and random draws cannot run:
    # (model, step, clip, ids, mask) -> 0-dim loss; svitt.analysis.efficiency counts a training step's memory with it.
    meta_loss: Callable[..., torch.Tensor]
    trains: frozenset[str]  # PARTS it gives a gradient to
    needs: tuple[str, ...] = ()  # batch keys beyond video / input_ids / attention_mask
    needs_note: str = ""  # what the needed inputs are, for the error message
    data_kind: str | None = None  # the stage's data.kind it needs (its dataset has what `needs` names)
    excludes: tuple[str, ...] = ()  # objectives it cannot be trained with


def _vtc(model, feats: dict, batch: dict, settings: LossSettings, objectives) -> torch.Tensor:
    return losses.info_nce(feats["video_emb"], feats["text_emb"], model.temperature())


def _egonce(model, feats: dict, batch: dict, settings: LossSettings, objectives) -> torch.Tensor:
    return losses.egonce(
        feats["video_emb"], feats["text_emb"], batch["nouns"], batch["verbs"], settings.egonce_temperature
    )


def _vtm(model, feats: dict, batch: dict, settings: LossSettings, objectives) -> torch.Tensor:
    # Under EgoNCE the clips that share a noun and a verb are positives: not drawn as negatives.
    positives = losses.action_positives(batch["nouns"], batch["verbs"]) if "egonce" in objectives else None
    return model._vtm_loss(
        feats["video_tokens"],
        feats["video_emb"],
        feats["text_hidden"],
        feats["text_emb"],
        batch["attention_mask"],
        positives,
        settings.vtm_hard_fraction,
    )


def _mlm(model, feats: dict, batch: dict, settings: LossSettings, objectives) -> torch.Tensor:
    fused = model.fuse(feats["masked_hidden"], batch["attention_mask"], feats["video_tokens"])
    return losses.mlm_loss(model.mlm_logits(fused), batch["mlm_labels"])


# ---- meta-device stand-ins (svitt.analysis.efficiency.training_step): step holds the encoders' outputs of
# the batch (video_tokens, video_emb, text_hidden, text_emb); the negatives are the batch rolled by one.
def _target(step: dict, clip) -> torch.Tensor:
    """The batch's diagonal labels, made once per step where the first objective needs them."""
    if "target" not in step:
        step["target"] = torch.arange(clip.shape[0], device=clip.device)
    return step["target"]


def _meta_vtc(model, step: dict, clip, ids, mask) -> torch.Tensor:
    logits = step["video_emb"] @ step["text_emb"].T / model.temperature()
    target = _target(step, clip)
    return F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)


def _meta_egonce(model, step: dict, clip, ids, mask) -> torch.Tensor:
    """losses.egonce with the diagonal as the only positives (the meta device has no tags)."""
    logits = step["text_emb"] @ step["video_emb"].T / DEFAULT_SETTINGS.egonce_temperature
    positives = torch.eye(clip.shape[0], dtype=torch.bool, device=clip.device)
    return -losses.log_positive_mass(logits, positives).mean() - losses.log_positive_mass(logits.T, positives).mean()


def _meta_vtm(model, step: dict, clip, ids, mask) -> torch.Tensor:
    target = _target(step, clip)
    neg = target.roll(1)
    texts = torch.cat([step["text_hidden"], step["text_hidden"][neg], step["text_hidden"]])
    masks = torch.cat([mask, mask[neg], mask])
    videos = torch.cat([step["video_tokens"], step["video_tokens"], step["video_tokens"][neg]])
    logits = model.vtm_head(model.fuse(texts, masks, videos)[:, 0])
    labels = torch.cat([torch.ones_like(target), torch.zeros_like(target), torch.zeros_like(target)])
    return F.cross_entropy(logits, labels)


def _meta_mlm(model, step: dict, clip, ids, mask) -> torch.Tensor:
    """Every token predicted (the most the loss can hold)."""
    fused = model.fuse(model.text_encoder.encode(ids, mask), mask, step["video_tokens"])
    logits = model.mlm_logits(fused)
    return F.cross_entropy(logits.flatten(0, 1), ids.flatten(), ignore_index=losses.IGNORE_INDEX)


# In the order the losses are computed (VTM after EgoNCE, as before: the same random draws) and plotted.
OBJECTIVE_TABLE = (
    Objective("vtc", "VTC (InfoNCE)", _vtc, _meta_vtc, frozenset({"projections", "temperature"}), excludes=("egonce",)),
    Objective(
        "egonce",
        "EgoNCE",
        _egonce,
        _meta_egonce,
        frozenset({"projections"}),
        needs=("nouns", "verbs"),
        needs_note="multi-hot tensors",
        data_kind="egoclip",
        excludes=("vtc",),
    ),
    Objective("vtm", "VTM", _vtm, _meta_vtm, frozenset({"fusion", "vtm_head"})),
    Objective("mlm", "MLM", _mlm, _meta_mlm, frozenset({"fusion", "mlm_head"}), needs=("mlm_ids", "mlm_labels")),
)
REGISTRY = {o.name: o for o in OBJECTIVE_TABLE}
OBJECTIVES = tuple(REGISTRY)  # the names, in table order
LOSS_INPUTS = ("attention_mask",) + tuple(
    dict.fromkeys(k for o in OBJECTIVE_TABLE for k in o.needs if k != "mlm_ids")
)  # mlm_ids become features


def unknown_objectives(objectives: Iterable[str]) -> list[str]:
    return sorted(set(objectives) - set(OBJECTIVES))


def conflicting_objectives(objectives: Iterable[str]) -> tuple[str, str] | None:
    """The first pair of objectives that exclude each other, in table order; None if there is none."""
    chosen = [name for name in OBJECTIVES if name in set(objectives)]
    for name in chosen:
        for other in REGISTRY[name].excludes:
            if other in chosen:
                return name, other
    return None


def check_objectives(objectives: Iterable[str]):
    """Known names that can be trained together (ValueError naming the offending ones)."""
    objectives = tuple(objectives)
    unknown = unknown_objectives(objectives)
    if unknown:
        raise ValueError(f"unknown objectives {unknown}; expected some of {OBJECTIVES}")
    pair = conflicting_objectives(objectives)
    if pair:
        raise ValueError(f"objectives {pair[0]!r} and {pair[1]!r} exclude each other; use one of them")


def check_inputs(name: str, available: Iterable[str]):
    """ValueError if the batch lacks an input objective `name` needs."""
    objective = REGISTRY[name]
    if not set(objective.needs) <= set(available):
        note = f" {objective.needs_note}" if objective.needs_note else ""
        raise ValueError(f"objective {name!r} needs {' and '.join(objective.needs)}{note}")


def trained_parts(objectives: Iterable[str]) -> frozenset[str]:
    return frozenset().union(*(REGISTRY[name].trains for name in objectives))


def leaves_parts_untrained(objectives: Iterable[str]) -> bool:
    """Whether some part of the model gets no gradient (DDP must then look for unused parameters)."""
    return trained_parts(objectives) != frozenset(PARTS)


def compute_losses(model, feats: dict, batch: dict, objectives, settings: LossSettings) -> dict:
    """{name: loss} of the objectives, in table order, from the features of one whole batch."""
    check_objectives(objectives)
    available = {k for k, v in batch.items() if v is not None} | ({"mlm_ids"} if "masked_hidden" in feats else set())
    out = {}
    for objective in OBJECTIVE_TABLE:
        if objective.name in objectives:
            check_inputs(objective.name, available)
            out[objective.name] = objective.loss(model, feats, batch, settings, objectives)
    return out
