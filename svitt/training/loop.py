"""The one training loop (open_clip style): pretraining stages of SViTT's curriculum and of
SViTT-Ego, and downstream finetuning. A task (svitt.training.tasks) supplies the model, the batches
and the loss; svitt.training.keys documents and checks every key of the config.

    cfg = resolve_train_config(stage_config)        # every key checked before any data loads
    train(cfg, data=TrainData(...), out_dir=...)    # resumes from out_dir/checkpoint.pt

Single process on a CPU, or one process per GPU under torchrun (DDP; contrastive embeddings are
gathered across ranks in svitt.models.losses). Writes out_dir/metrics.jsonl while training and, at
the end, model.safetensors + model.json. Resume is exact: the checkpoint holds every RNG the run
draws from and the position inside the epoch, and data augmentation is seeded per (epoch, sample).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from svitt import distributed as dist
from svitt.io import atomic_write_bytes
from svitt.training.checkpoint import (
    atomic_torch_save,
    capture_rng,
    config_digest,
    export_model,
    load_training_state,
    restore_rng,
)
from svitt.training.keys import learning_config, resolve_train_config, with_io_settings
from svitt.training.optim import param_groups
from svitt.training.precision import autocast, autocast_dtype, grad_scaler, resolve_precision
from svitt.training.scheduler import cosine_lr, set_lr
from svitt.training.tasks import TASKS, TrainData

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: saved on SIGTERM/SIGUSR1/SVITT_STOP_AT, rerun to continue


@dataclass
class TrainState:
    """What an optimiser step reads and advances (open_clip's TrainState): the resolved config and
    its task, the model and `net` (what runs it: the DDP wrapper or torch.compile, else the model
    itself), optimiser, loss scaler, tokenizer, device and precision, and how far the run is."""

    cfg: dict
    task: object
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: object  # torch.amp.GradScaler (disabled outside fp16)
    tokenizer: object
    device: torch.device | str
    precision: str
    net: torch.nn.Module | None = None  # None: the model itself
    rank: int = 0
    world: int = 1
    step: int = 0  # optimiser steps taken
    logged: list = field(default_factory=list)  # metrics.jsonl rows, checkpointed with the model

    def __post_init__(self):
        if self.net is None:
            self.net = self.model


def run_cli(cfg: dict, args, init: str | None) -> int:
    """The common tail of the training CLIs (train.py, finetune.py): their io flags into the
    config, train, the summary on stdout; the exit code (PREEMPTED_EXIT_CODE when preempted)."""
    cfg = with_io_settings(
        cfg,
        checkpoint_every=args.checkpoint_every,
        log_every=args.log_every,
        num_workers=args.num_workers,
        keep_checkpoint=args.keep_checkpoint,
    )
    data = TrainData(shards=args.shards, annotations=args.annotations, tokenizer=args.tokenizer, init=init)
    try:
        summary = train(cfg, data, args.out, resume=not args.no_resume, progress=not args.no_progress)
    except Preempted as stop:
        print(stop, file=sys.stderr)
        return PREEMPTED_EXIT_CODE
    print(json.dumps(summary))
    return 0


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


def train(cfg: dict, data: TrainData, out_dir: str | Path, resume: bool = True, progress: bool = True) -> dict:
    """Run (or continue) one stage. Returns a summary dict; raises Preempted on SIGTERM/SIGUSR1."""
    from svitt.data.pipeline import load_tokenizer

    cfg = resolve_train_config(cfg)
    task = TASKS[cfg["task"]]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rank, world, device = dist.init_distributed(cfg["device"])
    _set_deterministic(cfg["deterministic"], device)
    torch.manual_seed(cfg["seed"])
    random.seed(cfg["seed"])  # nothing draws from it, but the checkpoint stores its state: same seed, same bytes
    precision = resolve_precision(cfg["precision"], device)

    tokenizer = load_tokenizer(data.tokenizer)
    model = task.build_model(cfg, data, tokenizer).to(device)
    cfg["model"] = model.cfg  # fully resolved (vocab size filled in), stored with the weights
    digest = config_digest(learning_config(cfg))

    per_step = cfg["batch_size"] // (world * cfg["grad_accum"])
    if per_step < 2 or per_step * world * cfg["grad_accum"] != cfg["batch_size"]:
        raise ValueError(
            f"stage.batch_size {cfg['batch_size']} must split evenly into at least 2 "
            f"clips per step over {world} rank(s) x grad_accum {cfg['grad_accum']}"
        )
    loaders = task.build_loader(cfg, data, tokenizer, per_step, rank, world)
    steps_per_epoch = loaders.batches_per_epoch // cfg["grad_accum"]
    if steps_per_epoch < 1:
        raise ValueError(
            f"the dataset gives {loaders.batches_per_epoch} batches of {per_step} per "
            f"rank: too few for one optimiser step (grad_accum {cfg['grad_accum']})"
        )
    total = steps_per_epoch * cfg["epochs"]
    if cfg["max_steps"]:
        total = min(total, cfg["max_steps"])
    warmup = int(round(cfg["warmup_epochs"] * steps_per_epoch))

    optimizer = torch.optim.AdamW(param_groups(model, cfg["weight_decay"]), lr=cfg["lr"], betas=tuple(cfg["betas"]))
    state = TrainState(
        cfg,
        task,
        model,
        optimizer,
        grad_scaler(precision, device),
        tokenizer,
        device,
        precision,
        rank=rank,
        world=world,
    )
    ckpt_path = out_dir / "checkpoint.pt"
    generator = model.video_encoder.layout_generator
    logged = None
    if resume and ckpt_path.exists():
        state.step, logged = _resume(ckpt_path, digest, state, generator)
        _log(
            rank,
            f"resumed {cfg['name']} from {ckpt_path} at step {state.step}/{total}"
            if state.step
            else f"ignoring {ckpt_path}: it was written for another config or world size",
        )
    state.logged = _restore_metrics(out_dir / "metrics.jsonl", state.step, rank, logged)
    state.net = _wrap(state)

    def save(finished: bool = False):
        """A resumable checkpoint; a finished run's holds no optimiser state (two thirds of the
        bytes at BEiT-B + BERT-base): resuming it only exports the model again."""
        if rank == 0:
            atomic_torch_save(
                {
                    "model": model.state_dict(),
                    "optimizer": None if finished else optimizer.state_dict(),
                    "scaler": state.scaler.state_dict(),
                    "step": state.step,
                    "rng": capture_rng(generator),
                    "config": cfg,
                    "config_digest": digest,
                    "world_size": world,
                    "metrics": state.logged,
                },
                ckpt_path,
            )
        dist.barrier()

    bar = tqdm(total=total, initial=state.step, desc=cfg["name"], disable=not progress or rank != 0, dynamic_ncols=True)
    metrics_file = open(out_dir / "metrics.jsonl", "a") if rank == 0 else None
    last = {}
    try:
        with _StopFlag() as stop:
            while state.step < total:
                epoch, skip = divmod(state.step, steps_per_epoch)
                batches = iter(loaders.epoch(epoch, skip_batches=skip * cfg["grad_accum"]))
                for _ in range(skip, steps_per_epoch):
                    if state.step >= total:
                        break
                    start = time.perf_counter()
                    lr = cosine_lr(state.step, total, warmup, cfg["lr"], cfg["lr"] * cfg["min_lr_ratio"])
                    set_lr(optimizer, lr)
                    parts, clips = _optimizer_step(state, batches)
                    # the one GPU sync of a step: finiteness and the stop request, agreed by every rank
                    flags = torch.tensor(
                        [float(not all(math.isfinite(v) for v in parts.values())), float(stop.requested)], device=device
                    )
                    dist.all_reduce_(flags)
                    if flags[0] > 0:
                        raise NonFiniteLoss(
                            f"non-finite loss at step {state.step} of stage {cfg['name']} ({parts}); "
                            f"the last good checkpoint {ckpt_path} is kept"
                        )
                    state.step += 1
                    seconds = time.perf_counter() - start
                    last = _record(state, parts, epoch, lr, clips * world / seconds, metrics_file, total)
                    bar.update(1)
                    bar.set_postfix(loss=f"{last['loss']:.3f}", clips_s=f"{last['clips_per_s']:.1f}")
                    if flags[1] > 0 and state.step < total:  # at the last step: finish instead
                        save()
                        raise Preempted(
                            f"stage {cfg['name']} stopped (signal or time limit) at step "
                            f"{state.step}; checkpoint saved to {ckpt_path}"
                        )
                    if state.step % cfg["checkpoint_every"] == 0 and state.step < total:
                        save()
        save(finished=True)
        if rank == 0:
            dtype = autocast_dtype(precision, device)
            export_model(
                model,
                out_dir,
                {
                    **_model_info(cfg, state.step, last),
                    "init": data.init,
                    "autocast": str(dtype).replace("torch.", "") if dtype else "none",
                },
            )
            if not cfg["keep_checkpoint"]:
                ckpt_path.unlink(missing_ok=True)
        dist.barrier()
    finally:
        bar.close()
        if metrics_file:
            metrics_file.close()
    return {"name": cfg["name"], "steps": state.step, **last}


def _wrap(state: TrainState) -> torch.nn.Module:
    """The module a step runs. Several ranks: the DDP wrapper, unless the step runs through
    svitt.training.grad_cache (parameters broadcast here, gradients averaged by hand); then
    torch.compile when the config asks."""
    net = state.model
    cached = _cached(state.cfg, state.task)
    if state.world > 1 and cached:
        dist.broadcast_parameters(state.model)  # what the DDP wrapper would do
    if state.world > 1 and not cached:
        device = torch.device(state.device)
        net = torch.nn.parallel.DistributedDataParallel(
            state.model,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=state.task.find_unused_parameters(state.cfg),
        )
    if state.cfg["compile"]:
        net = torch.compile(net)
    return net


def _resume(path, digest, state: TrainState, generator):
    """Restore a checkpoint written for this config and world size into the state's model,
    optimiser and scaler: (step, metric rows); (0, None) for one of another run."""
    saved = load_training_state(path)
    if saved["config_digest"] != digest or saved["world_size"] != state.world:
        return 0, None
    state.model.load_state_dict(saved["model"])
    if saved["optimizer"] is not None:  # None: a finished run, which takes no further step
        state.optimizer.load_state_dict(saved["optimizer"])
    state.scaler.load_state_dict(saved["scaler"])
    restore_rng(saved["rng"], generator)
    return saved["step"], saved.get("metrics")


def _cached(cfg: dict, task) -> bool:
    """Whether a step runs through svitt.training.grad_cache (no DDP wrapper, gradients averaged by hand)."""
    return cfg["grad_accum"] > 1 and task.cached


def _optimizer_step(state: TrainState, batches) -> tuple[dict, int]:
    """Forward/backward over grad_accum micro-batches and one optimiser step; the task prepares each
    micro-batch's inputs and computes its losses, weighted here by cfg["objectives"].
    Returns ({loss name: value}, clips seen by this rank). With grad_accum > 1 a task with
    cross-sample losses (pairs: VTC / EgoNCE, VTM's hard negatives) runs svitt.training.grad_cache,
    so the losses are those of the whole step's batch, as if it were one micro-batch; a task whose
    loss is a mean of per-sample terms (qa) accumulates plainly, which is exact for equal micro-batches."""
    cfg, task, device, precision = state.cfg, state.task, state.device, state.precision
    weights = cfg["objectives"]
    state.optimizer.zero_grad(set_to_none=True)
    n = cfg["grad_accum"]
    if _cached(cfg, task):
        micro = [task.inputs(next(batches), cfg, state.tokenizer, device) for _ in range(n)]
        sums = task.cached_step(state.model, micro, cfg, state.scaler, lambda: autocast(precision, device))
        dist.average_gradients(state.model)
        clips = sum(m["video"].shape[0] for m in micro)
    else:
        sums, clips = {}, 0
        for index in range(n):
            inputs = task.inputs(next(batches), cfg, state.tokenizer, device)
            sync = index == n - 1 or not hasattr(state.net, "no_sync")
            ctx = contextlib.nullcontext() if sync else state.net.no_sync()  # all-reduce once per step
            with ctx, autocast(precision, device):
                losses = task.losses(state.net, inputs, cfg)
                loss = sum(weights[k] * losses[k] for k in weights)
            state.scaler.scale(loss / n).backward()
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + v.item() / n
            sums["loss"] = sums.get("loss", 0.0) + loss.item() / n
            clips += inputs["video"].shape[0]
    return _clip_and_step(state, sums), clips


def _clip_and_step(state: TrainState, losses: dict) -> dict:
    if state.cfg["clip_grad_norm"]:
        state.scaler.unscale_(state.optimizer)
        torch.nn.utils.clip_grad_norm_(state.model.parameters(), state.cfg["clip_grad_norm"])
    if all(math.isfinite(v) for v in losses.values()):
        state.scaler.step(state.optimizer)
        state.scaler.update()
    return losses


def _record(
    state: TrainState, parts: dict, epoch: int, lr: float, clips_per_s: float, metrics_file, total: int
) -> dict:
    """The step's metrics row; written (and kept in state.logged) every log_every steps, at the
    first and at the last."""
    step, cfg = state.step, state.cfg
    row = {
        "stage": cfg["name"],
        "step": step,
        "epoch": epoch,
        "lr": lr,
        "clips_per_s": clips_per_s,
        **{k: float(v) for k, v in parts.items()},
    }
    if metrics_file and (step % cfg["log_every"] == 0 or step == total or step == 1):
        metrics_file.write(json.dumps(row) + "\n")
        metrics_file.flush()
        state.logged.append(row)
    return row


def _restore_metrics(path: Path, step: int, rank: int, logged: list | None) -> list:
    """metrics.jsonl as of the resumed step; returns its rows (kept and checkpointed from now on).

    The rows come from the checkpoint when it has them: Snakemake deletes a failed job's outputs,
    metrics.jsonl included, so after a kill the file may be gone while the checkpoint survives.
    Older checkpoints: keep the file's rows up to the step (later ones belong to the run cut off)."""
    if rank != 0:
        return []
    if logged is None:
        logged = (
            [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            if step > 0 and path.exists()
            else []
        )
    logged = [row for row in logged if row["step"] <= step]
    atomic_write_bytes(path, "".join(json.dumps(row) + "\n" for row in logged).encode())
    return logged


def _model_info(cfg: dict, step: int, last: dict) -> dict:
    from svitt.models.sparsity import edge_count
    from svitt.models.text_encoder import multimodal_keep_rates

    video, text = cfg["model"]["video"], cfg["model"]["text"]
    sparse = video["block_size"] is not None
    counts = edge_count(
        frames=video["frames"],
        local_blocks=video["local_blocks"] if sparse else None,
        random_blocks=video["random_blocks"] if sparse else None,
        block_size=video["block_size"] if sparse else None,
        visual_keep=video["visual_keep"],
        multimodal_keep=multimodal_keep_rates(text),
        text_len=cfg["data"]["text_len"],
        image_size=video["image_size"],
        patch_size=video["patch_size"],
        depth=video["depth"],
        fusion_layers=text["fusion_layers"],
        prune_layers=tuple(video["prune_layers"]),
        tubelet_frames=video["tubelet_frames"],
    )
    return {
        "name": cfg["name"],
        "steps": step,
        "frames": video["frames"],
        "final": {k: v for k, v in last.items() if isinstance(v, float)},
        "edges": counts["edges"],
        "sparsity": counts["sparsity"],
        "model_config": cfg["model"],
        "train_config": {k: v for k, v in cfg.items() if k != "model"},
    }


def _log(rank: int, message: str):
    if rank == 0:
        tqdm.write(message)
