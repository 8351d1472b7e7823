"""The one training loop (open_clip style): pretraining stages of SViTT's curriculum and of
SViTT-Ego, and downstream finetuning. A task supplies the model, the batches and the loss:

    pairs  video-text pairs: pretraining (VTC or EgoNCE, VTM, MLM), and retrieval finetuning
           (VTC + VTM on a downstream train split, from a stage's model.safetensors)
    qa     open-ended video QA: the answer generation loss of an answer decoder (VideoQA)

    cfg = resolve_train_config(stage_config)        # every key checked before any data loads
    train(cfg, data=TrainData(...), out_dir=...)    # resumes from out_dir/checkpoint.pt

Single process on a CPU, or one process per GPU under torchrun (DDP; contrastive embeddings are
gathered across ranks in svitt.models.losses). Writes out_dir/metrics.jsonl while training and, at the
end, model.safetensors + model.json. Resume is exact: the checkpoint holds every RNG the run draws
from and the position inside the epoch, and data augmentation is seeded per (epoch, sample).
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from svitt import distributed as dist
from svitt.training.checkpoint import (atomic_torch_save, capture_rng, config_digest, export_model,
                              load_training_state, restore_rng)
from svitt.training.grad_cache import cached_step
from svitt.io import atomic_write_bytes
from svitt.models.losses import mask_tokens
from svitt.models import objectives as registry
from svitt.models.objectives import OBJECTIVES, LossSettings
from svitt.models.svitt import SViTT, resolve_model_config
from svitt.training.optim import param_groups
from svitt.training.precision import PRECISIONS, autocast, autocast_dtype, grad_scaler, resolve_precision
from svitt.training.scheduler import cosine_lr, set_lr
from svitt.workflow.stages import VOCABULARY as STAGE_VOCABULARY

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: saved on SIGTERM/SIGUSR1/SVITT_STOP_AT, rerun to continue
# OBJECTIVES (imported above) are the pairs task's, svitt.models.objectives; the qa task's one loss is "qa".

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
MODEL_STAGE_KEYS = {section: tuple(k for k, part in STAGE_VOCABULARY.items() if part == section)
                    for section in ("video", "text")}  # as a pretraining stage's (svitt.workflow.stages)

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


def run_cli(cfg: dict, args, init: str | None) -> int:
    """The common tail of the training CLIs (train.py, finetune.py): their io flags into the
    config, train, the summary on stdout; the exit code (PREEMPTED_EXIT_CODE when preempted)."""
    cfg = with_io_settings(cfg, checkpoint_every=args.checkpoint_every, log_every=args.log_every,
                           num_workers=args.num_workers, keep_checkpoint=args.keep_checkpoint)
    data = TrainData(shards=args.shards, annotations=args.annotations, tokenizer=args.tokenizer, init=init)
    try:
        summary = train(cfg, data, args.out, resume=not args.no_resume, progress=not args.no_progress)
    except Preempted as stop:
        print(stop, file=sys.stderr)
        return PREEMPTED_EXIT_CODE
    print(json.dumps(summary))
    return 0


def _learning_config(cfg: dict) -> dict:
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
            raise ValueError(f"{section}.{key} must be {_type_names(types)}, got {value!r} "
                             f"({type(value).__name__})")
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
    resolve_model_config(_with_vocab(out["model"], 1))  # validates every model key now
    for key in ("epochs", "batch_size", "grad_accum", "checkpoint_every", "log_every"):
        if out[key] < 1:
            raise ValueError(f"stage.{key} must be >= 1, got {out[key]}")
    if out["precision"] not in PRECISIONS:
        raise ValueError(f"stage.precision must be one of {PRECISIONS}, got {out['precision']!r}")
    if not 0 <= out["min_lr_ratio"] <= 1:
        raise ValueError(f"stage.min_lr_ratio must be in [0, 1] (a fraction of lr), got {out['min_lr_ratio']}")
    if not 0 <= out["vtm_hard_fraction"] <= 1:
        raise ValueError(f"stage.vtm_hard_fraction must be in [0, 1] (a share of the VTM negatives), "
                         f"got {out['vtm_hard_fraction']}")
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
        raise ValueError(f"stage.objectives {sorted(objectives)} must be a non-empty mapping "
                         f"of {OBJECTIVES} to loss weights")
    pair = registry.conflicting_objectives(objectives)
    if pair:
        raise ValueError(f"stage.objectives: use either {pair[0]!r} or {pair[1]!r}, not both")
    for name in objectives:
        objective = registry.REGISTRY[name]
        if objective.data_kind is not None and cfg["data"]["kind"] != objective.data_kind:
            raise ValueError(f"stage.objectives {name!r} needs data.kind {objective.data_kind!r} "
                             f"(its {' and '.join(objective.needs)})")
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


@dataclass
class TrainData:
    """Where the stage's data comes from (the workflow passes these as file inputs)."""
    shards: list
    annotations: str
    tokenizer: str
    init: str | None = None  # previous stage's model.safetensors (temporal bias resized)
    extra: dict = field(default_factory=dict)


class _StopFlag:
    """SIGTERM / SIGUSR1 (Slurm preemption) ask the loop to save and exit at the next step, and so
    does the clock passing SVITT_STOP_AT (seconds since the epoch): workflow_scripts/launch.py sets
    it to a Slurm job's time limit less a margin. A time rather than a signal reaches every rank on
    every node, torchrun's agents in between having no say."""

    def __init__(self):
        self.signalled = False
        self.stop_at = float(os.environ.get("SVITT_STOP_AT") or "inf")
        self._previous = {}

    @property
    def requested(self) -> bool:
        return self.signalled or time.time() >= self.stop_at

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def _handler(self, signum, frame):
        self.signalled = True

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Preempted(Exception):
    """Raised after saving a checkpoint on SIGTERM/SIGUSR1."""


class NonFiniteLoss(RuntimeError):
    pass


def _set_deterministic(requested: bool | None, device: torch.device):
    """Same seed, same numbers: deterministic kernels on the CPU by default (they cost little
    there); on CUDA only when asked, as they slow training and need CUBLAS_WORKSPACE_CONFIG."""
    on = device.type == "cpu" if requested is None else requested
    torch.use_deterministic_algorithms(on, warn_only=True)


def _with_vocab(model_cfg: dict, vocab_size: int) -> dict:
    """model.text.vocab_size: null means "the tokenizer's size"; fill it in."""
    model_cfg = copy.deepcopy(model_cfg)
    text = model_cfg.setdefault("text", {})
    if "vocab_size" in text and text["vocab_size"] is None:
        text["vocab_size"] = vocab_size
    return model_cfg


def build_stage_model(cfg: dict, data: TrainData, tokenizer) -> SViTT:
    """The stage's model: fresh (optionally from image/text weights) or from the previous stage."""
    model = SViTT(_with_vocab(cfg["model"], len(tokenizer)))
    if len(tokenizer) > model.cfg["text"]["vocab_size"]:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens but model.text.vocab_size is "
                         f"{model.cfg['text']['vocab_size']}")
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
        inputs = _to_device(batch, device)
        if "mlm" in cfg["objectives"]:  # mlm_prob: a data setting, not a LossSettings field
            inputs["mlm_ids"], inputs["mlm_labels"] = mask_tokens(
                inputs["input_ids"], inputs["attention_mask"], len(tokenizer), tokenizer.mask_token_id,
                tokenizer.all_special_ids, cfg["mlm_prob"])
        return inputs

    def losses(self, net, inputs: dict, cfg: dict) -> dict:
        """{objective: loss} of one micro-batch (SViTT.forward: features() then losses())."""
        return net(objectives=tuple(cfg["objectives"]), settings=LossSettings.from_config(cfg), **inputs)

    def cached_step(self, model, micro: list[dict], cfg: dict, scaler, autocast_fn) -> dict:
        """The losses of the whole step's batch over grad_accum micro-batches (GradCache)."""
        return cached_step(model, micro, tuple(cfg["objectives"]), cfg["objectives"], scaler, autocast_fn,
                           LossSettings.from_config(cfg))


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
        return _to_device(batch, device)

    def losses(self, net, inputs: dict, cfg: dict) -> dict:
        return net(**inputs)


TASKS = {"pairs": PairsTask(), "qa": QATask()}


def train(cfg: dict, data: TrainData, out_dir: str | Path, resume: bool = True,
          progress: bool = True) -> dict:
    """Run (or continue) one stage. Returns a summary dict; raises Preempted on SIGTERM/SIGUSR1."""
    from svitt.data.pipeline import load_tokenizer

    cfg = resolve_train_config(cfg)
    task = TASKS[cfg["task"]]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rank, world, device = dist.init_distributed(cfg["device"])
    _set_deterministic(cfg["deterministic"], device)
    torch.manual_seed(cfg["seed"])
    precision = resolve_precision(cfg["precision"], device)

    tokenizer = load_tokenizer(data.tokenizer)
    model = task.build_model(cfg, data, tokenizer).to(device)
    cfg["model"] = model.cfg  # fully resolved (vocab size filled in), stored with the weights
    digest = config_digest(_learning_config(cfg))

    per_step = cfg["batch_size"] // (world * cfg["grad_accum"])
    if per_step < 2 or per_step * world * cfg["grad_accum"] != cfg["batch_size"]:
        raise ValueError(f"stage.batch_size {cfg['batch_size']} must split evenly into at least 2 "
                         f"clips per step over {world} rank(s) x grad_accum {cfg['grad_accum']}")
    loaders = task.build_loader(cfg, data, tokenizer, per_step, rank, world)
    steps_per_epoch = loaders.batches_per_epoch // cfg["grad_accum"]
    if steps_per_epoch < 1:
        raise ValueError(f"the dataset gives {loaders.batches_per_epoch} batches of {per_step} per "
                         f"rank: too few for one optimiser step (grad_accum {cfg['grad_accum']})")
    total = steps_per_epoch * cfg["epochs"]
    if cfg["max_steps"]:
        total = min(total, cfg["max_steps"])
    warmup = int(round(cfg["warmup_epochs"] * steps_per_epoch))

    optimizer = torch.optim.AdamW(param_groups(model, cfg["weight_decay"]), lr=cfg["lr"],
                                  betas=tuple(cfg["betas"]))
    scaler = grad_scaler(precision, device)
    ckpt_path = out_dir / "checkpoint.pt"
    generator = model.video_encoder.layout_generator
    step, logged = 0, None
    if resume and ckpt_path.exists():
        step, logged = _resume(ckpt_path, digest, world, model, optimizer, scaler, generator)
        _log(rank, f"resumed {cfg['name']} from {ckpt_path} at step {step}/{total}" if step else
             f"ignoring {ckpt_path}: it was written for another config or world size")
    logged = _restore_metrics(out_dir / "metrics.jsonl", step, rank, logged)

    net = model
    cached = _cached(cfg, task)  # svitt.training.grad_cache: the contrastive batch of the whole step
    if world > 1 and cached:
        dist.broadcast_parameters(model)  # what the DDP wrapper would do; gradients are averaged by hand
    if world > 1 and not cached:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=task.find_unused_parameters(cfg))
    if cfg["compile"]:
        net = torch.compile(net)

    def save(finished: bool = False):
        """A resumable checkpoint; a finished run's holds no optimiser state (two thirds of the
        bytes at BEiT-B + BERT-base): resuming it only exports the model again."""
        if rank == 0:
            atomic_torch_save({
                "model": model.state_dict(), "optimizer": None if finished else optimizer.state_dict(),
                "scaler": scaler.state_dict(), "step": step, "rng": capture_rng(generator),
                "config": cfg, "config_digest": digest, "world_size": world,
                "metrics": logged}, ckpt_path)
        dist.barrier()

    bar = tqdm(total=total, initial=step, desc=cfg["name"], disable=not progress or rank != 0,
               dynamic_ncols=True)
    metrics_file = open(out_dir / "metrics.jsonl", "a") if rank == 0 else None
    last = {}
    try:
        with _StopFlag() as stop:
            while step < total:
                epoch, skip = divmod(step, steps_per_epoch)
                batches = iter(loaders.epoch(epoch, skip_batches=skip * cfg["grad_accum"]))
                for _ in range(skip, steps_per_epoch):
                    if step >= total:
                        break
                    start = time.perf_counter()
                    lr = cosine_lr(step, total, warmup, cfg["lr"], cfg["lr"] * cfg["min_lr_ratio"])
                    set_lr(optimizer, lr)
                    parts, clips = _optimizer_step(net, model, optimizer, scaler, batches, cfg,
                                                   task, tokenizer, device, precision)
                    flags = torch.tensor([float(not all(math.isfinite(v) for v in parts.values())),
                                          float(stop.requested)], device=device)
                    dist.all_reduce_(flags)
                    if flags[0] > 0:
                        raise NonFiniteLoss(
                            f"non-finite loss at step {step} of stage {cfg['name']} ({parts}); "
                            f"the last good checkpoint {ckpt_path} is kept")
                    step += 1
                    seconds = time.perf_counter() - start
                    last = _record(parts, step, epoch, lr, clips * world / seconds, metrics_file, cfg, total,
                                   logged)
                    bar.update(1)
                    bar.set_postfix(loss=f"{last['loss']:.3f}", clips_s=f"{last['clips_per_s']:.1f}")
                    if flags[1] > 0 and step < total:  # at the last step: finish instead
                        save()
                        raise Preempted(f"stage {cfg['name']} stopped (signal or time limit) at step {step}; "
                                        f"checkpoint saved to {ckpt_path}")
                    if step % cfg["checkpoint_every"] == 0 and step < total:
                        save()
        save(finished=True)
        if rank == 0:
            dtype = autocast_dtype(precision, device)
            export_model(model, out_dir, {**_model_info(cfg, step, last), "init": data.init,
                                          "autocast": str(dtype).replace("torch.", "") if dtype else "none"})
            if not cfg["keep_checkpoint"]:
                ckpt_path.unlink(missing_ok=True)
        dist.barrier()
    finally:
        bar.close()
        if metrics_file:
            metrics_file.close()
    return {"name": cfg["name"], "steps": step, **last}


def _resume(path, digest, world, model, optimizer, scaler, generator):
    """Restore a checkpoint written for this config and world size: (step, metric rows);
    (0, None) for one of another run."""
    state = load_training_state(path)
    if state["config_digest"] != digest or state["world_size"] != world:
        return 0, None
    model.load_state_dict(state["model"])
    if state["optimizer"] is not None:  # None: a finished run, which takes no further step
        optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    restore_rng(state["rng"], generator)
    return state["step"], state.get("metrics")


def _cached(cfg: dict, task) -> bool:
    """Whether a step runs through svitt.training.grad_cache (no DDP wrapper, gradients averaged by hand)."""
    return cfg["grad_accum"] > 1 and task.cached


def _optimizer_step(net, model, optimizer, scaler, batches, cfg, task, tokenizer, device, precision):
    """Forward/backward over grad_accum micro-batches and one optimiser step; the task prepares each
    micro-batch's inputs and computes its losses, weighted here by cfg["objectives"].
    Returns ({loss name: value}, clips seen by this rank). With grad_accum > 1 a task with
    cross-sample losses (pairs: VTC / EgoNCE, VTM's hard negatives) runs svitt.training.grad_cache, so the
    losses are those of the whole step's batch, as if it were one micro-batch; a task whose loss is
    a mean of per-sample terms (qa) accumulates plainly, which is exact for equal micro-batches."""
    weights = cfg["objectives"]
    optimizer.zero_grad(set_to_none=True)
    n = cfg["grad_accum"]
    if _cached(cfg, task):
        micro = [task.inputs(next(batches), cfg, tokenizer, device) for _ in range(n)]
        sums = task.cached_step(model, micro, cfg, scaler, lambda: autocast(precision, device))
        dist.average_gradients(model)
        clips = sum(m["video"].shape[0] for m in micro)
    else:
        sums, clips = {}, 0
        for index in range(n):
            inputs = task.inputs(next(batches), cfg, tokenizer, device)
            sync = index == n - 1 or not hasattr(net, "no_sync")
            ctx = contextlib.nullcontext() if sync else net.no_sync()  # all-reduce once per step
            with ctx, autocast(precision, device):
                losses = task.losses(net, inputs, cfg)
                loss = sum(weights[k] * losses[k] for k in weights)
            scaler.scale(loss / n).backward()
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + v.item() / n
            sums["loss"] = sums.get("loss", 0.0) + loss.item() / n
            clips += inputs["video"].shape[0]
    return _clip_and_step(model, optimizer, scaler, cfg, sums), clips


def _clip_and_step(model, optimizer, scaler, cfg, losses: dict) -> dict:
    if cfg["clip_grad_norm"]:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["clip_grad_norm"])
    if all(math.isfinite(v) for v in losses.values()):
        scaler.step(optimizer)
        scaler.update()
    return losses


def _to_device(batch: dict, device) -> dict:
    keys = ("video", "input_ids", "attention_mask", "nouns", "verbs", "answer_ids", "answer_mask")
    return {k: batch[k].to(device, non_blocking=True) for k in keys if k in batch}


def _record(parts, step, epoch, lr, clips_per_s, metrics_file, cfg, total, logged: list) -> dict:
    row = {"stage": cfg["name"], "step": step, "epoch": epoch, "lr": lr,
           "clips_per_s": clips_per_s, **{k: float(v) for k, v in parts.items()}}
    if metrics_file and (step % cfg["log_every"] == 0 or step == total or step == 1):
        metrics_file.write(json.dumps(row) + "\n")
        metrics_file.flush()
        logged.append(row)
    return row


def _restore_metrics(path: Path, step: int, rank: int, logged: list | None) -> list:
    """metrics.jsonl as of the resumed step; returns its rows (kept and checkpointed from now on).

    The rows come from the checkpoint when it has them: Snakemake deletes a failed job's outputs,
    metrics.jsonl included, so after a kill the file may be gone while the checkpoint survives.
    Older checkpoints: keep the file's rows up to the step (later ones belong to the run cut off)."""
    if rank != 0:
        return []
    if logged is None:
        logged = [json.loads(line) for line in path.read_text().splitlines()
                  if line.strip()] if step > 0 and path.exists() else []
    logged = [row for row in logged if row["step"] <= step]
    atomic_write_bytes(path, "".join(json.dumps(row) + "\n" for row in logged).encode())
    return logged


def _model_info(cfg: dict, step: int, last: dict) -> dict:
    from svitt.models.text_encoder import multimodal_keep_rates
    from svitt.models.sparsity import edge_count

    video, text = cfg["model"]["video"], cfg["model"]["text"]
    sparse = video["block_size"] is not None
    counts = edge_count(
        frames=video["frames"], local_blocks=video["local_blocks"] if sparse else None,
        random_blocks=video["random_blocks"] if sparse else None,
        block_size=video["block_size"] if sparse else None, visual_keep=video["visual_keep"],
        multimodal_keep=multimodal_keep_rates(text), text_len=cfg["data"]["text_len"],
        image_size=video["image_size"], patch_size=video["patch_size"], depth=video["depth"],
        fusion_layers=text["fusion_layers"], prune_layers=tuple(video["prune_layers"]),
        tubelet_frames=video["tubelet_frames"])
    return {"name": cfg["name"], "steps": step, "frames": video["frames"],
            "final": {k: v for k, v in last.items() if isinstance(v, float)},
            "edges": counts["edges"], "sparsity": counts["sparsity"],
            "model_config": cfg["model"], "train_config": {k: v for k, v in cfg.items() if k != "model"}}


def _log(rank: int, message: str):
    if rank == 0:
        tqdm.write(message)
