"""Every key of a training config, documented once, and its validation: pretraining stages and
finetuning jobs alike (svitt.training.loop trains what resolve_train_config returns).

    cfg = resolve_train_config(stage_config)   # defaults filled in, every key checked
    cfg = finetune_config(entry, init_model)   # a finetuning job's entry -> a stage config
"""

from __future__ import annotations

import copy

from svitt.models import objectives as registry
from svitt.models.objectives import OBJECTIVES
from svitt.models.svitt import resolve_model_config
from svitt.training.precision import PRECISIONS
from svitt.training.tasks import TASKS, with_vocab
from svitt.workflow.stages import VOCABULARY as STAGE_VOCABULARY

# OBJECTIVES are the pairs task's (svitt.models.objectives); the qa task's one loss is "qa".
_NUMBER = (int, float)
REQUIRED = object()
# Every key of a stage config, documented here once: key: (accepted types, default or REQUIRED).
TRAIN_KEYS = {
    "name": (str, REQUIRED),  # stage name (metrics, exported model.json)
    "task": (str, "pairs"),  # pairs (pretraining, retrieval finetuning) | qa (TASKS)
    "model": (dict, REQUIRED),  # the model section (svitt.models.svitt.MODEL_DEFAULTS)
    "objectives": (dict, REQUIRED),  # {vtc|egonce, vtm, mlm: loss weight}; paper: equal weights
    "epochs": (int, REQUIRED),
    "batch_size": (int, REQUIRED),  # global: over all ranks and grad_accum micro-batches
    "lr": (_NUMBER, REQUIRED),  # peak learning rate (after warm-up)
    "data": (dict, {}),  # DATA_KEYS
    "mlm_prob": (_NUMBER, 0.15),  # share of text tokens masked for MLM (80/10/10 replacement)
    "egonce_temperature": (_NUMBER, 0.05),
    "vtm_hard_fraction": (_NUMBER, 1.0),  # VTM negatives: share drawn by similarity, rest uniform (1: ALBEF)
    "max_steps": ((int, type(None)), None),  # cap on optimiser steps
    "grad_accum": (int, 1),  # micro-batches per optimiser step; the contrastive batch stays the whole step's
    "min_lr_ratio": (_NUMBER, 0.0),  # end of the cosine schedule as a fraction of lr (released SViTT: 0.01)
    "warmup_epochs": (_NUMBER, 1.0),  # linear warm-up
    "weight_decay": (_NUMBER, 0.02),  # AdamW; not on biases, norms, layer scales, tables, temperature
    "betas": (list, [0.9, 0.999]),
    "clip_grad_norm": ((int, float, type(None)), None),
    "precision": (str, "auto"),  # auto (bf16 if supported, else fp16 on CUDA; fp32 on CPU) | fp32 | bf16 | fp16
    "compile": (bool, False),  # torch.compile the model
    "device": (str, "auto"),  # auto | cpu | cuda
    "seed": (int, 0),  # model init, masking, sampling and augmentation
    "deterministic": ((bool, type(None)), None),  # torch deterministic algorithms; None: on the CPU only
    "checkpoint_every": (int, 200),  # optimiser steps between resumable checkpoints
    "log_every": (int, 10),  # optimiser steps between metrics.jsonl rows
    "keep_checkpoint": (bool, True),  # keep a finished run's checkpoint.pt (model only: a re-export needs no more)
}
DATA_KEYS = {
    "kind": (str, "webvid"),  # webvid (video-text pairs) | egoclip (with tags + scene negatives)
    "text_len": (int, 32),  # max caption tokens
    "flip": (bool, True),  # horizontal flip (off when captions say left/right)
    "scale": (list, [0.5, 1.0]),  # random-resized-crop area range
    "mean": (list, [0.5, 0.5, 0.5]),  # normalisation (BEiT's)
    "std": (list, [0.5, 0.5, 0.5]),
    "twin_batches": (bool, False),  # keep the annotation's `family` groups (demo twins) in one batch
    "paragraph": (bool, False),  # a JSON caption list is one text, its sentences joined (DiDeMo)
    "num_workers": (int, 2),  # DataLoader processes per rank (results do not depend on it)
    "num_nouns": (int, 582),  # EgoClip tag vocabulary sizes (Ego4D taxonomy as in EgoVLP)
    "num_verbs": (int, 118),
}

# Keys only the qa task has, and the qa task's own defaults (Table 9: question 25, answer 5 tokens).
QA_KEYS = {
    "objectives": (dict, {"qa": 1.0}),
    "decoder_layers": ((int, type(None)), None),  # answer decoder depth (None: the model's fusion layers)
}
QA_DATA_KEYS = {
    "text_len": (int, 25),  # question tokens
    "answer_len": (int, 5),  # answer tokens, [CLS] and [SEP] included
}

# Finetuning jobs: the workflow's task name -> the training task, and the keys of a job's entry
# that set the model of the job (a curriculum stage's sparsity vocabulary) rather than training.
FINETUNE_TASKS = {"retrieval": "pairs", "qa": "qa"}
MODEL_STAGE_KEYS = {
    section: tuple(k for k, part in STAGE_VOCABULARY.items() if part == section) for section in ("video", "text")
}  # as a pretraining stage's (svitt.workflow.stages)

# How a stage runs, not what it learns (augmentation is seeded per sample, so the number of
# loader processes does not matter either): a checkpoint stays resumable when these change, and
# the workflow keeps them out of the params that decide reruns.
IO_KEYS = ("checkpoint_every", "log_every", "num_workers", "keep_checkpoint")


def with_io_settings(cfg: dict, **settings) -> dict:
    """A copy of a stage config with IO_KEYS replaced where a value is given (None: keep)."""
    out = copy.deepcopy(cfg)
    for key, value in settings.items():
        if key not in IO_KEYS:
            raise ValueError(f"{key!r} is not an io setting; expected one of {IO_KEYS}")
        if value is not None:
            (out.setdefault("data", {}) if key == "num_workers" else out)[key] = value
    return out


def learning_config(cfg: dict) -> dict:
    """A resolved stage config without IO_KEYS: what a resumed checkpoint must agree with."""
    out = {k: v for k, v in cfg.items() if k not in IO_KEYS}
    out["data"] = {k: v for k, v in cfg["data"].items() if k not in IO_KEYS}
    return out


def _check_section(cfg: dict, spec: dict, section: str) -> dict:
    unknown = sorted(set(cfg) - set(spec))
    if unknown:
        raise ValueError(f"unknown {section} key(s) {unknown}; expected some of {sorted(spec)}")
    out = {}
    for key, (types, default) in spec.items():
        if key not in cfg:
            if default is REQUIRED:
                raise ValueError(f"{section} config is missing the required key '{key}'")
            out[key] = copy.deepcopy(default)
            continue
        value = cfg[key]
        if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
            raise ValueError(f"{section}.{key} must be {_type_names(types)}, got {value!r}")
        if not isinstance(value, types):
            raise ValueError(f"{section}.{key} must be {_type_names(types)}, got {value!r} ({type(value).__name__})")
        out[key] = copy.deepcopy(value)
    return out


def _type_names(types) -> str:
    types = types if isinstance(types, tuple) else (types,)
    return " or ".join("null" if t is type(None) else t.__name__ for t in types)


def resolve_train_config(cfg: dict) -> dict:
    """Defaults and validation of a stage config; raises ValueError naming the key."""
    task = cfg.get("task", "pairs")
    if task not in TASKS:
        raise ValueError(f"stage.task must be one of {sorted(TASKS)}, got {task!r}")
    qa = task == "qa"  # the qa task has keys of its own (QA_KEYS, QA_DATA_KEYS)
    out = _check_section(cfg, {**TRAIN_KEYS, **QA_KEYS} if qa else TRAIN_KEYS, "stage")
    out["data"] = _check_section(out["data"], {**DATA_KEYS, **QA_DATA_KEYS} if qa else DATA_KEYS, "stage.data")
    resolve_model_config(with_vocab(out["model"], 1))  # validates every model key now
    for key in ("epochs", "batch_size", "grad_accum", "checkpoint_every", "log_every"):
        if out[key] < 1:
            raise ValueError(f"stage.{key} must be >= 1, got {out[key]}")
    if out["precision"] not in PRECISIONS:
        raise ValueError(f"stage.precision must be one of {PRECISIONS}, got {out['precision']!r}")
    if not 0 <= out["min_lr_ratio"] <= 1:
        raise ValueError(f"stage.min_lr_ratio must be in [0, 1] (a fraction of lr), got {out['min_lr_ratio']}")
    if not 0 <= out["vtm_hard_fraction"] <= 1:
        raise ValueError(
            f"stage.vtm_hard_fraction must be in [0, 1] (a share of the VTM negatives), got {out['vtm_hard_fraction']}"
        )
    _check_task_keys(out)
    return out


def _check_task_keys(cfg: dict):
    objectives = cfg["objectives"]
    if cfg["task"] == "qa":
        if set(objectives) != {"qa"}:
            raise ValueError(f"stage.objectives of task 'qa' must be {{'qa': weight}}, got {objectives}")
        if cfg["decoder_layers"] is not None and cfg["decoder_layers"] < 1:
            raise ValueError(f"stage.decoder_layers must be >= 1, got {cfg['decoder_layers']}")
        return
    if registry.unknown_objectives(objectives) or not objectives:
        raise ValueError(
            f"stage.objectives {sorted(objectives)} must be a non-empty mapping of {OBJECTIVES} to loss weights"
        )
    pair = registry.conflicting_objectives(objectives)
    if pair:
        raise ValueError(f"stage.objectives: use either {pair[0]!r} or {pair[1]!r}, not both")
    for name in objectives:
        objective = registry.REGISTRY[name]
        if objective.data_kind is not None and cfg["data"]["kind"] != objective.data_kind:
            raise ValueError(
                f"stage.objectives {name!r} needs data.kind {objective.data_kind!r} "
                f"(its {' and '.join(objective.needs)})"
            )
    if cfg["data"]["kind"] not in ("webvid", "egoclip"):
        raise ValueError(f"stage.data.kind must be 'webvid' or 'egoclip', got {cfg['data']['kind']!r}")
    if not 0 < cfg["mlm_prob"] < 1:
        raise ValueError(f"stage.mlm_prob must be in (0, 1), got {cfg['mlm_prob']}")


def finetune_config(entry: dict, init_model: dict) -> dict:
    """A finetuning job's stage config from its entry and the model it starts from.

    entry: the job's settings as the workflow merges them (finetune.<task>.defaults, then the stage's
    and the dataset's entries): "task" ("retrieval" or "qa", FINETUNE_TASKS), training keys, and the
    sparsity keys of MODEL_STAGE_KEYS (frames, keep rates, ...) side by side, as in a curriculum
    stage. init_model: the model_config of the init's model.json (the architecture of the weights).
    Retrieval jobs train VTC + VTM unless the entry names objectives."""
    entry = copy.deepcopy(entry)
    task = entry.pop("task", None)
    if task not in FINETUNE_TASKS:
        raise ValueError(f"finetuning task must be one of {sorted(FINETUNE_TASKS)}, got {task!r}")
    model = copy.deepcopy(init_model)
    model["video_weights"] = model["text_weights"] = None  # the init's weights replace them
    for section, keys in MODEL_STAGE_KEYS.items():
        for key in keys:
            if key in entry:
                model[section][key] = entry.pop(key)
    if task == "retrieval":
        entry.setdefault("objectives", {"vtc": 1.0, "vtm": 1.0})
    return {**entry, "task": FINETUNE_TASKS[task], "model": model}
