"""One pretraining stage: the loop of SViTT's curriculum and of SViTT-Ego (open_clip style).

    cfg = resolve_train_config(stage_config)        # every key checked before any data loads
    train(cfg, data=TrainData(...), out_dir=...)    # resumes from out_dir/checkpoint.pt

Single process on a CPU, or one process per GPU under torchrun (DDP; contrastive embeddings are
gathered across ranks in svitt.losses). Writes out_dir/metrics.jsonl while training and, at the
end, model.safetensors + model.json. Resume is exact: the checkpoint holds every RNG the run draws
from and the position inside the epoch, and data augmentation is seeded per (epoch, sample).
"""
from __future__ import annotations

import copy
import json
import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from svitt import distributed as dist
from svitt.grad_cache import cached_step
from svitt.checkpoint import (atomic_torch_save, capture_rng, config_digest, export_model,
                              load_training_state, restore_rng)
from svitt.io import atomic_write_bytes
from svitt.losses import mask_tokens
from svitt.models.svitt import SViTT, resolve_model_config
from svitt.precision import PRECISIONS, autocast, grad_scaler, resolve_precision
from svitt.scheduler import cosine_lr, set_lr

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: saved on SIGTERM/SIGUSR1/SVITT_STOP_AT, rerun to continue
OBJECTIVES = ("vtc", "egonce", "vtm", "mlm")

_NUMBER = (int, float)
REQUIRED = object()
# Every key of a stage config, documented here once: key: (accepted types, default or REQUIRED).
TRAIN_KEYS = {
    "name": (str, REQUIRED),  # stage name (metrics, exported model.json)
    "model": (dict, REQUIRED),  # the model section (svitt.models.svitt.MODEL_DEFAULTS)
    "objectives": (dict, REQUIRED),  # {vtc|egonce, vtm, mlm: loss weight}; paper: equal weights
    "epochs": (int, REQUIRED),
    "batch_size": (int, REQUIRED),  # global: over all ranks and grad_accum micro-batches
    "lr": (_NUMBER, REQUIRED),  # peak learning rate (after warm-up)
    "data": (dict, {}),  # DATA_KEYS
    "mlm_prob": (_NUMBER, 0.15),  # share of text tokens masked for MLM (80/10/10 replacement)
    "egonce_temperature": (_NUMBER, 0.05),
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
}
DATA_KEYS = {
    "kind": (str, "webvid"),  # webvid (video-text pairs) | egoclip (with tags + scene negatives)
    "text_len": (int, 32),  # max caption tokens
    "flip": (bool, True),  # horizontal flip (off when captions say left/right)
    "scale": (list, [0.5, 1.0]),  # random-resized-crop area range
    "mean": (list, [0.5, 0.5, 0.5]),  # normalisation (BEiT's)
    "std": (list, [0.5, 0.5, 0.5]),
    "twin_batches": (bool, False),  # keep the annotation's `family` groups (demo twins) in one batch
    "num_workers": (int, 2),  # DataLoader processes per rank (results do not depend on it)
    "num_nouns": (int, 582),  # EgoClip tag vocabulary sizes (Ego4D taxonomy as in EgoVLP)
    "num_verbs": (int, 118),
}


# How a stage runs, not what it learns (augmentation is seeded per sample, so the number of
# loader processes does not matter either): a checkpoint stays resumable when these change, and
# the workflow keeps them out of the params that decide reruns.
IO_KEYS = ("checkpoint_every", "log_every", "num_workers")


def with_io_settings(cfg: dict, **settings) -> dict:
    """A copy of a stage config with IO_KEYS replaced where a value is given (None: keep)."""
    out = copy.deepcopy(cfg)
    for key, value in settings.items():
        if key not in IO_KEYS:
            raise ValueError(f"{key!r} is not an io setting; expected one of {IO_KEYS}")
        if value is not None:
            (out.setdefault("data", {}) if key == "num_workers" else out)[key] = value
    return out


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
    out = _check_section(cfg, TRAIN_KEYS, "stage")
    out["data"] = _check_section(out["data"], DATA_KEYS, "stage.data")
    resolve_model_config(_with_vocab(out["model"], 1))  # validates every model key now
    for key in ("epochs", "batch_size", "grad_accum", "checkpoint_every", "log_every"):
        if out[key] < 1:
            raise ValueError(f"stage.{key} must be >= 1, got {out[key]}")
    if out["precision"] not in PRECISIONS:
        raise ValueError(f"stage.precision must be one of {PRECISIONS}, got {out['precision']!r}")
    unknown = sorted(set(out["objectives"]) - set(OBJECTIVES))
    if unknown or not out["objectives"]:
        raise ValueError(f"stage.objectives {sorted(out['objectives'])} must be a non-empty mapping "
                         f"of {OBJECTIVES} to loss weights")
    if "vtc" in out["objectives"] and "egonce" in out["objectives"]:
        raise ValueError("stage.objectives: use either 'vtc' (InfoNCE) or 'egonce', not both")
    if "egonce" in out["objectives"] and out["data"]["kind"] != "egoclip":
        raise ValueError("stage.objectives 'egonce' needs data.kind 'egoclip' (noun/verb tags)")
    if out["data"]["kind"] not in ("webvid", "egoclip"):
        raise ValueError(f"stage.data.kind must be 'webvid' or 'egoclip', got {out['data']['kind']!r}")
    if not 0 <= out["min_lr_ratio"] <= 1:
        raise ValueError(f"stage.min_lr_ratio must be in [0, 1] (a fraction of lr), got {out['min_lr_ratio']}")
    if not 0 < out["mlm_prob"] < 1:
        raise ValueError(f"stage.mlm_prob must be in (0, 1), got {out['mlm_prob']}")
    return out


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


def _param_groups(model: torch.nn.Module, weight_decay: float):
    """No weight decay on biases, norms, layer scales, tokens, bias tables and the temperature."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim < 2 or name.endswith(("cls_token", "relative_position_bias_table", "temp"))
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


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


def train(cfg: dict, data: TrainData, out_dir: str | Path, resume: bool = True,
          progress: bool = True) -> dict:
    """Run (or continue) one stage. Returns a summary dict; raises Preempted on SIGTERM/SIGUSR1."""
    from svitt.data.pipeline import build_train_loader, load_tokenizer

    cfg = resolve_train_config(cfg)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rank, world, device = dist.init_distributed(cfg["device"])
    _set_deterministic(cfg["deterministic"], device)
    torch.manual_seed(cfg["seed"])
    precision = resolve_precision(cfg["precision"], device)

    tokenizer = load_tokenizer(data.tokenizer)
    model = build_stage_model(cfg, data, tokenizer).to(device)
    cfg["model"] = model.cfg  # fully resolved (vocab size filled in), stored with the weights
    digest = config_digest(_learning_config(cfg))

    per_step = cfg["batch_size"] // (world * cfg["grad_accum"])
    if per_step < 2 or per_step * world * cfg["grad_accum"] != cfg["batch_size"]:
        raise ValueError(f"stage.batch_size {cfg['batch_size']} must split evenly into at least 2 "
                         f"clips per step over {world} rank(s) x grad_accum {cfg['grad_accum']}")
    loaders = build_train_loader(cfg, data, tokenizer, per_step, rank, world)
    steps_per_epoch = loaders.batches_per_epoch // cfg["grad_accum"]
    if steps_per_epoch < 1:
        raise ValueError(f"the dataset gives {loaders.batches_per_epoch} batches of {per_step} per "
                         f"rank: too few for one optimiser step (grad_accum {cfg['grad_accum']})")
    total = steps_per_epoch * cfg["epochs"]
    if cfg["max_steps"]:
        total = min(total, cfg["max_steps"])
    warmup = int(round(cfg["warmup_epochs"] * steps_per_epoch))

    optimizer = torch.optim.AdamW(_param_groups(model, cfg["weight_decay"]), lr=cfg["lr"],
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
    cached = cfg["grad_accum"] > 1  # svitt.grad_cache: the contrastive batch of the whole step
    if world > 1 and cached:
        dist.broadcast_parameters(model)  # what the DDP wrapper would do; gradients are averaged by hand
    if world > 1 and not cached:
        unused = set(cfg["objectives"]) != {"vtc", "vtm", "mlm"} and \
            set(cfg["objectives"]) != {"egonce", "vtm", "mlm"}
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=unused)
    if cfg["compile"]:
        net = torch.compile(net)

    def save():
        if rank == 0:
            atomic_torch_save({
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(), "step": step, "rng": capture_rng(generator),
                "config": cfg, "config_digest": digest, "world_size": world,
                "metrics": logged}, ckpt_path)
        dist.barrier()

    objectives = tuple(cfg["objectives"])
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
                                                   objectives, tokenizer, device, precision)
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
        save()
        if rank == 0:
            export_model(model, out_dir, _model_info(cfg, step, last))
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
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    restore_rng(state["rng"], generator)
    return state["step"], state.get("metrics")


def _inputs(batch, cfg, objectives, tokenizer, device) -> dict:
    inputs = _to_device(batch, device)
    if "mlm" in objectives:
        inputs["mlm_ids"], inputs["mlm_labels"] = mask_tokens(
            inputs["input_ids"], inputs["attention_mask"], len(tokenizer), tokenizer.mask_token_id,
            tokenizer.all_special_ids, cfg["mlm_prob"])
    return inputs


def _optimizer_step(net, model, optimizer, scaler, batches, cfg, objectives, tokenizer, device,
                    precision):
    """Forward/backward over grad_accum micro-batches and one optimiser step.
    Returns ({loss name: value}, clips seen by this rank). With grad_accum > 1 the losses are those
    of the whole step's batch (svitt.grad_cache), as if it were one micro-batch."""
    weights = cfg["objectives"]
    optimizer.zero_grad(set_to_none=True)
    if cfg["grad_accum"] > 1:
        micro = [_inputs(next(batches), cfg, objectives, tokenizer, device) for _ in range(cfg["grad_accum"])]
        sums = cached_step(model, micro, objectives, weights, scaler, lambda: autocast(precision, device),
                           cfg["egonce_temperature"])
        dist.average_gradients(model)
        clips = sum(m["video"].shape[0] for m in micro)
    else:
        inputs = _inputs(next(batches), cfg, objectives, tokenizer, device)
        with autocast(precision, device):
            losses = net(objectives=objectives, egonce_temperature=cfg["egonce_temperature"], **inputs)
            loss = sum(weights[k] * losses[k] for k in objectives)
        scaler.scale(loss).backward()
        sums = {**{k: v.item() for k, v in losses.items()}, "loss": loss.item()}
        clips = inputs["video"].shape[0]
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
    keys = ("video", "input_ids", "attention_mask", "nouns", "verbs")
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
    from svitt.sparsity import edge_count

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
