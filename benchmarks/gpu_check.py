"""One prepared GPU check: every CUDA path of the project and the paper-size costs, in one command.

    PYTHONPATH=. python benchmarks/gpu_check.py --out benchmarks/results/gpu_check.json   (make gpu-check)
    PYTHONPATH=. python benchmarks/gpu_check.py --dry                                    (make gpu-check-dry)

Three parts, each run by one worker process (the parent only schedules, collects and writes), so a
crash, a hung compile or an out-of-memory error costs one item and the rest still run:

1. correctness: FlexAttention forward + backward (values, gradients w.r.t. q, k, v and the bias
   table) and the gather kernel against the masked-dense float64 reference at T = 4, 8, 16, full
   and pruned token counts (not multiples of G); one training step in bf16 autocast and in fp16
   with the GradScaler against fp32; a world-size-1 NCCL process group with a DDP step against the
   plain step; the launcher's GPU lock held by a job that uses the device.
2. attention: one BEiT-B attention layer, forward + backward, T = 4, 8, 16 (N = 785, 1569, 3137):
   dense SDPA with the relative-position bias, SDPA without bias (flash), the gather kernel and
   FlexAttention with the (1, 3, 56) block mask; time and peak CUDA memory, ratios to dense.
3. training: the full training step at paper size (BEiT-B + BERT-base, VTC + VTM + MLM, AdamW,
   bf16), dense and hybrid (Table 9's sparsity) at T = 4, 8, 16 at the largest batch that fits;
   SViTT-Ego (T = 4, (1, 3, 56) and (1, 5, 56), 8 clips, fp16, EgoNCE + VTM + MLM) with its peak
   memory beside the paper's 8.76 / 9.61 GB.

`--dry` runs the same functions on the CPU at a tiny size (gloo instead of NCCL; FlexAttention's
forward eager, its backward reported as skipped where torch has none on the CPU): only the device
and the sizes differ. Every item has a planned time (PLAN: the real run's sums to under 8 minutes
on one H100); an item whose planned time no longer fits before the deadline (--budget) is skipped
and reported. Writes one JSON file and a Markdown table beside it (same name, .md).

The real mode needs only torch (>= 2.5: FlexAttention with learnable score_mod buffers) and this
repository's svitt package: no Snakemake, decord, tokenizer files or network.
"""

from __future__ import annotations

import argparse
import collections
import copy
import gc
import json
import math
import os
import platform
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import attention as attention_bench  # noqa: E402  benchmarks/attention.py
import torch  # noqa: E402
from common import allocated_peak_bytes, measure  # noqa: E402  benchmarks/common.py
from train_step import SIZES as TRAIN_STEP_SIZES  # noqa: E402  benchmarks/train_step.py

from svitt.analysis.efficiency import PAPER_VISUAL_KEEP, TABLE2, mode_overrides, with_overrides  # noqa: E402
from svitt.io import atomic_write_bytes, atomic_write_json  # noqa: E402
from svitt.models import sparse_attention as sa  # noqa: E402
from svitt.models.relative_position import table_size  # noqa: E402
from svitt.models.sparsity import kept_count  # noqa: E402

RESULT_MARK = "GPUCHECK "  # a worker's result lines on stdout start with this
PAPER_EGO_GB = {3: 8.76, 5: 9.61}  # SViTT-Ego: peak GB per GPU at 8 clips, (1, K_r, 56)
GRACE_S = 30  # a worker still running this long after the deadline is stopped
SCALER_TRIES = 30  # fp16: steps the GradScaler may skip (overflow) before the check gives up

# Tolerances: the largest |got - want| over the largest |want| (per tensor).
KERNEL_TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4}
# Mixed precision against fp32, same weights, batch, masks and block layout: each loss relative to
# fp32's, and the gradient of all parameters together (norm of the difference over fp32's norm).
# BEiT-B + BERT-base on the CPU (64 tokens) gave losses within 0.05% / 0.01% and gradients within
# 1.6% / 0.34% (bf16 / fp16): the tolerances leave about 6x for longer sequences and CUDA's kernels.
# Keyed by the dtype autocast computes in: fp16 is float16 on CUDA, bfloat16 on a CPU (svitt.training.precision).
PRECISION_TOLERANCE = {"bfloat16": {"loss": 0.01, "grad": 0.1}, "float16": {"loss": 0.002, "grad": 0.02}}
DDP_TOLERANCE = 1e-5  # world size 1: the all-reduce sums one rank; only CUDA atomics may differ


# ----------------------------------------------------------------------------------- sizes


@dataclass(frozen=True)
class Profile:
    """What differs between the real run and the dry run: the device and the sizes."""

    name: str  # "cuda" | "dry"
    device: str
    layer: attention_bench.LayerSize  # the attention kernels' and layer's size, (K_l, K_r, G)
    model: dict  # the paper model without sparsity (video + text + embed_dim)
    ddp_model: dict
    image_size: int
    vocab_size: int
    layer_autocast: torch.dtype  # the attention layer runs under autocast, as training does
    batches: tuple[int, ...]  # training batch ladder
    memory_cap: int | None  # bytes a step may use where the device cannot say (CPU)
    repeats: int  # timed steps after the warm-up
    frames: tuple[int, ...] = (4, 8, 16)
    kernel_batch: int = 2
    probe_batches: tuple[int, int] = (2, 4)
    ego_batch: int = 8
    text_len: int = 32
    precision: str = "bf16"  # the training part's precision (paper: mixed precision)
    cpu_threads: int | None = None  # torch threads per worker (None: torch's default)

    @property
    def blocks(self) -> tuple[int, int, int]:
        return self.layer.local_blocks, self.layer.random_blocks, self.layer.block_size


TINY_MODEL = {
    "video": {"preset": "tiny", "frames": 4},
    "text": {"preset": "tiny", "vocab_size": 1000},
    "embed_dim": 16,
}  # tests/helpers/ddp_step.py's model

PROFILES = {
    "cuda": Profile(
        name="cuda",
        device="cuda",
        layer=attention_bench.BEIT_B,
        model=TRAIN_STEP_SIZES["base"],
        ddp_model=TINY_MODEL,
        image_size=224,
        vocab_size=30522,
        layer_autocast=torch.bfloat16,
        batches=tuple(range(2, 16, 2))
        + tuple(range(16, 64, 8))
        + tuple(range(64, 256, 16))
        + tuple(range(256, 513, 32)),
        memory_cap=None,
        repeats=2,
    ),
    "dry": Profile(
        name="dry",
        device="cpu",
        layer=attention_bench.LayerSize(heads=2, head_dim=8, side=4, local_blocks=1, random_blocks=3, block_size=8),
        model={
            "video": {"preset": "tiny", "tubelet_frames": 1},
            "text": {"preset": "tiny", "vocab_size": 1000},
            "embed_dim": 16,
        },
        ddp_model=TINY_MODEL,
        image_size=32,
        vocab_size=1000,
        layer_autocast=torch.bfloat16,
        batches=(2, 4, 6, 8),
        memory_cap=64 << 20,
        repeats=1,
        cpu_threads=1,
    ),  # tiny ops: one thread is ~5x faster than two on a loaded 2-core machine
}


def model_config(profile: Profile, mode: str, frames: int, blocks=None) -> dict:
    """The profile's model in a sparsity mode (svitt.analysis.efficiency: Table 9's q_v for T, q_m 0.1)."""
    overrides = mode_overrides(mode, frames, blocks or profile.blocks)
    return with_overrides(profile.model, overrides)


@dataclass(frozen=True)
class BertVocab:
    """What svitt.training.loop reads of a tokenizer for MLM: its size and BERT-base-uncased's special
    ids ([PAD] 0, [UNK] 100, [CLS] 101, [SEP] 102, [MASK] 103); a bare machine has no tokenizer."""

    size: int
    mask_token_id: int = 103
    all_special_ids: tuple = (0, 100, 101, 102, 103)

    def __len__(self):
        return self.size


def make_batch(profile: Profile, cfg: dict, batch: int, seed: int, ego: bool = False) -> dict:
    """A batch of random clips and captions (full length, [CLS] first) made on the device (a
    batch of hundreds of clips is gigabytes: no CPU detour); EgoClip's noun and verb multi-hots
    when `ego` (one or two nouns and one verb from a few, so some pairs share both)."""
    device = profile.device
    g = torch.Generator(device).manual_seed(seed)
    frames, size = cfg["video"]["frames"], profile.image_size
    video = torch.randn(batch, frames, 3, size, size, generator=g, device=device)
    ids = torch.randint(104, profile.vocab_size, (batch, profile.text_len), generator=g, device=device)
    ids[:, 0] = 101
    out = {"video": video, "input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if ego:
        rows = torch.arange(batch, device=device)
        nouns, verbs = torch.zeros(batch, 582, device=device), torch.zeros(batch, 118, device=device)
        nouns[rows, torch.randint(0, 6, (batch,), generator=g, device=device)] = 1
        nouns[rows, torch.randint(0, 582, (batch,), generator=g, device=device)] = 1
        verbs[rows, torch.randint(0, 3, (batch,), generator=g, device=device)] = 1
        out.update(nouns=nouns, verbs=verbs)
    return out


def train_config(objectives=("vtc", "vtm", "mlm")) -> dict:
    """The keys svitt.training.loop._optimizer_step reads (paper: equal weights, MLM probability 0.5)."""
    return {
        "objectives": {name: 1.0 for name in objectives},
        "grad_accum": 1,
        "clip_grad_norm": None,
        "egonce_temperature": 0.05,
        "vtm_hard_fraction": 1.0,
        "mlm_prob": 0.5,
    }


# --------------------------------------------------------------------------------- helpers


def is_oom(error: BaseException) -> bool:
    """CUDA's allocator error, also when torch.compile wraps it."""
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def short(error: BaseException, limit: int = 600) -> str:
    text = f"{type(error).__name__}: {error}"
    return text if len(text) <= limit else text[: limit // 2] + " ... " + text[-limit // 2 :]


def release_memory(device: str):
    """What a failed attempt left: Python garbage, cached CUDA blocks and compiled graphs (a new
    batch size recompiles FlexAttention; torch.compile's recompile limit is per process)."""
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    torch.compiler.reset()


def compare(what: str, size: str, got: torch.Tensor, want: torch.Tensor, tolerance: float) -> dict:
    """One check: max |got - want| / max |want| against the tolerance; NaN or inf fails."""
    got64, want64 = got.detach().double(), want.detach().double()
    finite = bool(torch.isfinite(got64).all())
    scale = float(want64.abs().max()) if want64.numel() else 0.0
    error = float((got64 - want64).abs().max()) / max(scale, 1e-30) if finite else math.inf
    return {
        "what": what,
        "size": size,
        "error": error,
        "tolerance": tolerance,
        "status": "ok" if finite and error <= tolerance else "fail",
    }


def relative(got: float, want: float) -> float:
    return abs(got - want) / max(abs(want), 1e-6)


def status_of(checks: list[dict]) -> str:
    return "fail" if any(c["status"] == "fail" for c in checks) else "ok"


# ----------------------------------------------------------------- part 1: correctness


def environment(profile: Profile, **_) -> dict:
    """The torch, device and toolchain the results belong to."""
    info = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "c_compiler": shutil.which("gcc") or shutil.which("cc"),
    }  # Triton builds its launcher with it
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if profile.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(
            device=props.name,
            capability=f"{props.major}.{props.minor}",
            total_memory_bytes=props.total_memory,
            device_count=torch.cuda.device_count(),
            bf16_supported=torch.cuda.is_bf16_supported(),
        )
    else:
        info.update(device=f"cpu ({platform.processor() or platform.machine()})", torch_threads=torch.get_num_threads())
    return {"status": "ok", "environment": info}


def kernel_counts(profile: Profile, frames: int) -> list[int]:
    """Regional token counts checked at T: all of them, and as after the first node pruning
    (Table 9's q_v), one fewer where that lands on a multiple of G (T = 16: 1568 = 28 x 56)."""
    full = frames * profile.layer.side**2
    pruned = kept_count(full, PAPER_VISUAL_KEEP[frames])
    if pruned % profile.layer.block_size == 0:
        pruned -= 1
    return [full, pruned]


def kernel_inputs(profile: Profile, frames: int, count: int):
    """q, k, v [B, H, count + 1, d], the table, positions (pruned: per-sample sorted subsets, as
    node pruning leaves them; full: one shared row), the layout and an upstream gradient (CPU,
    float64: each kernel takes its own copy)."""
    size, grid = profile.layer, (frames, profile.layer.side, profile.layer.side)
    full = frames * size.side**2
    g = torch.Generator().manual_seed(1000 * frames + count)
    b = profile.kernel_batch
    q, k, v = (torch.randn(b, size.heads, count + 1, size.head_dim, generator=g, dtype=torch.float64) for _ in range(3))
    table = torch.randn(table_size(grid), size.heads, generator=g, dtype=torch.float64)
    if count == full:
        pos = torch.arange(full)[None]
    else:
        pos = torch.stack([torch.randperm(full, generator=g)[:count].sort().values for _ in range(b)])
    layout = sa.make_layout(count, size.block_size, size.local_blocks, size.random_blocks, g, profile.device)
    upstream = torch.randn(b, size.heads, count + 1, size.head_dim, generator=g, dtype=torch.float64)
    return grid, (q, k, v, table), pos.to(profile.device), layout, upstream


def _leaves(tensors, device, dtype):
    return [t.to(device, dtype).requires_grad_() for t in tensors]


def kernel_case(profile: Profile, kernel: str, frames: int, count: int, dtype: torch.dtype) -> list[dict]:
    """One kernel against reference_attention in float64: output, CLS attention and the
    gradients w.r.t. q, k, v and the table of a fixed upstream gradient."""
    device, tol = profile.device, KERNEL_TOLERANCE[dtype]
    grid, tensors, pos, layout, upstream = kernel_inputs(profile, frames, count)
    size = f"T={frames} N-1={count} B={profile.kernel_batch} H={profile.layer.heads} {str(dtype)[6:]}"
    ref_in = _leaves(tensors, device, torch.float64)
    ref, ref_cls = sa.reference_attention(*ref_in[:3], ref_in[3], pos, grid, layout, need_cls_attn=True)
    up = upstream.to(device)
    ref_grads = torch.autograd.grad((ref * up).sum(), ref_in)
    ref = ref.detach()
    del ref_in
    fn = sa.flex_block_attention if kernel == "flex" else sa.gather_attention
    inputs = _leaves(tensors, device, dtype)
    no_backward = None
    try:
        out, cls = fn(*inputs[:3], inputs[3], pos, grid, layout, need_cls_attn=True)
    except NotImplementedError as error:  # FlexAttention has no CPU backward: values only
        if device == "cuda":
            raise
        no_backward = short(error, 200)
        with torch.no_grad():
            out, cls = fn(*[t.detach() for t in inputs[:3]], inputs[3].detach(), pos, grid, layout, need_cls_attn=True)
    checks = [
        compare(f"{kernel} output", size, out, ref, tol),
        compare(f"{kernel} CLS attention", size, cls, ref_cls, tol),
    ]
    names = ("grad q", "grad k", "grad v", "grad table")
    if no_backward:
        return checks + [
            {"what": f"{kernel} {n}", "size": size, "status": "skip", "reason": no_backward} for n in names
        ]
    grads = torch.autograd.grad((out * up.to(dtype)).sum(), inputs)
    return checks + [compare(f"{kernel} {n}", size, got, want, tol) for n, got, want in zip(names, grads, ref_grads)]


def flex_kernel(profile: Profile, frames: int, **_) -> dict:
    """FlexAttention (compiled on CUDA, eager on the CPU), float32, full and pruned counts."""
    checks = []
    for count in kernel_counts(profile, frames):
        checks += kernel_case(profile, "flex", frames, count, torch.float32)
    return {"status": status_of(checks), "checks": checks}


def gather_kernel(profile: Profile, **_) -> dict:
    """The gather kernel in float64 on the device, every T, full and pruned counts."""
    checks = []
    for frames in profile.frames:
        for count in kernel_counts(profile, frames):
            checks += kernel_case(profile, "gather", frames, count, torch.float64)
    return {"status": status_of(checks), "checks": checks}


def effective_kernel(model, device: str) -> str:
    """The attention kernel the video encoder runs ("auto": flex on CUDA, gather elsewhere)."""
    cfg = model.video_encoder.cfg
    if cfg["block_size"] is None:
        return "dense"
    kernel = cfg["attention_kernel"]
    return kernel if kernel != "auto" else ("flex" if device == "cuda" else "gather")


def peak_bytes(timing: dict, device: str) -> int:
    """common.measure's peak: CUDA's allocator counter; on the CPU the exact allocator peak (the
    RSS-based one moves with what malloc keeps)."""
    return timing["peak_bytes"] if device == "cuda" else timing["allocated_peak_bytes"]


def _rng_state(model, device: str):
    """Everything a training step draws from: torch's generators and the block layout's."""
    cuda = torch.cuda.get_rng_state() if device == "cuda" else None
    return torch.get_rng_state(), cuda, model.video_encoder.layout_generator.get_state()


def _set_rng_state(model, device: str, state):
    torch.set_rng_state(state[0])
    if device == "cuda":
        torch.cuda.set_rng_state(state[1])
    model.video_encoder.layout_generator.set_state(state[2])


def training_step(net, model, optimizer, scaler, batch: dict, cfg: dict, profile: Profile, precision: str):
    """svitt.training.loop's optimiser step (autocast, the loss scaler, the task's inputs and losses)."""
    from svitt.training.loop import TrainState, _optimizer_step
    from svitt.training.tasks import PairsTask

    state = TrainState(
        cfg,
        PairsTask(),
        model,
        optimizer,
        scaler,
        BertVocab(profile.vocab_size),
        torch.device(profile.device),
        precision,
        net=net,
    )
    losses, _ = _optimizer_step(state, iter([batch]))
    return losses


def new_optimizer(model):
    from svitt.training.optim import param_groups

    return torch.optim.AdamW(param_groups(model, 0.02), lr=1e-5)


def replayed_step(model, precision: str, batch: dict, cfg: dict, profile: Profile, state) -> dict:
    """One optimiser step from the random state `state` (_rng_state); with fp16, a step the
    GradScaler skips (gradient overflow: it halves its scale) is replayed with the same draws
    until one is taken, as training would reach it. Returns the losses, the gradients
    (unscaled) and the skipped steps."""
    from svitt.training.precision import grad_scaler

    device = profile.device
    optimizer, scaler = new_optimizer(model), grad_scaler(precision, torch.device(device))
    for skipped in range(SCALER_TRIES):
        _set_rng_state(model, device, state)
        scale = scaler.get_scale() if scaler.is_enabled() else None
        losses = training_step(model, model, optimizer, scaler, batch, cfg, profile, precision)
        if scale is None or scaler.get_scale() >= scale:
            break
    else:
        raise RuntimeError(
            f"{precision}: the GradScaler skipped {SCALER_TRIES} steps in a row (scale now {scaler.get_scale()})"
        )
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}
    finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
    return {
        "losses": losses,
        "grads": grads,
        "skipped": skipped,
        "params_finite": finite,
        "scale": scaler.get_scale() if scaler.is_enabled() else None,
    }


def grad_error(got: dict, want: dict) -> float:
    """|got - want| / |want| over all parameters' gradients together (missing ones count whole)."""
    diff = want_sq = 0.0
    for name, w in want.items():
        g = got.get(name)
        diff += float(((g - w) if g is not None else w).double().pow(2).sum())
        want_sq += float(w.double().pow(2).sum())
    return math.sqrt(diff) / max(math.sqrt(want_sq), 1e-30)


def precision_step(profile: Profile, **_) -> dict:
    """One training step in bf16 autocast and in fp16 with the GradScaler against fp32: the paper
    model with edge sparsity (the device's default kernel) at T = 4, batch 2 (VTM's negatives are
    then fixed), no node pruning and no dropout, so the three runs make the same discrete choices."""
    from svitt.models.svitt import SViTT

    cfg = model_config(profile, "edge", 4)
    cfg["text"] = {**cfg["text"], "dropout": 0.0}
    torch.manual_seed(0)
    base = SViTT(cfg).to(profile.device).train()
    batch, train_cfg = make_batch(profile, cfg, 2, seed=1), train_config()
    size = f"T=4 B=2 {effective_kernel(base, profile.device)} kernel"
    runs, state = {}, _rng_state(base, profile.device)  # every run draws the same masks and blocks
    for precision in ("fp32", "bf16", "fp16"):
        model = copy.deepcopy(base)
        runs[precision] = replayed_step(model, precision, batch, train_cfg, profile, state)
        del model
        release_memory(profile.device)
    from svitt.training.precision import autocast_dtype

    checks, want = [], runs["fp32"]
    for precision in ("bf16", "fp16"):
        dtype = str(autocast_dtype(precision, torch.device(profile.device))).replace("torch.", "")
        run, tol = runs[precision], PRECISION_TOLERANCE[dtype]
        for name, value in run["losses"].items():
            error = relative(value, want["losses"][name])
            checks.append(
                {
                    "what": f"{precision} loss {name}",
                    "size": size,
                    "error": error,
                    "tolerance": tol["loss"],
                    "status": "ok" if error <= tol["loss"] else "fail",
                    "value": value,
                    "fp32": want["losses"][name],
                }
            )
        error = grad_error(run["grads"], want["grads"])
        checks.append(
            {
                "what": f"{precision} gradients",
                "size": size,
                "error": error,
                "tolerance": tol["grad"],
                "status": "ok" if error <= tol["grad"] else "fail",
                "autocast": dtype,
            }
        )
        checks.append(
            {
                "what": f"{precision} parameters finite after the step",
                "size": size,
                "status": "ok" if run["params_finite"] else "fail",
            }
        )
    return {
        "status": status_of(checks),
        "checks": checks,
        "fp16_scaler": {"skipped_steps": runs["fp16"]["skipped"], "scale": runs["fp16"]["scale"]},
    }


def _flat_parameters(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()]).double()


def ddp_step(profile: Profile, **_) -> dict:
    """A world-size-1 process group (NCCL on CUDA, gloo on the CPU) and one DDP step of the tiny
    model against the same step without DDP: losses, gradients and AdamW's parameter updates."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from svitt.models.svitt import SViTT
    from svitt.training.tasks import PairsTask

    device = profile.device
    backend = "nccl" if device == "cuda" else "gloo"
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group(backend, init_method=f"file://{tmp}/store", rank=0, world_size=1)
        try:
            torch.manual_seed(0)
            model = SViTT(profile.ddp_model).to(device).train()
            plain = copy.deepcopy(model)
            start = _flat_parameters(model)
            cfg = train_config()
            batch = make_batch(profile, profile.ddp_model, 4, seed=2)
            state = _rng_state(model, device)
            want = training_step(
                plain,
                plain,
                new_optimizer(plain),
                torch.amp.GradScaler(device, enabled=False),
                batch,
                cfg,
                profile,
                "fp32",
            )
            _set_rng_state(model, device, state)
            net = DistributedDataParallel(
                model,
                device_ids=[torch.cuda.current_device()] if device == "cuda" else None,
                find_unused_parameters=PairsTask().find_unused_parameters(cfg),
            )
            got = training_step(
                net,
                model,
                new_optimizer(model),
                torch.amp.GradScaler(device, enabled=False),
                batch,
                cfg,
                profile,
                "fp32",
            )
            summed = torch.arange(4.0, device=device)
            dist.all_reduce(summed)
            used = dist.get_backend()
        finally:
            dist.destroy_process_group()
    size = f"tiny model, B=4, backend {used}"
    grads_want = {n: p.grad for n, p in plain.named_parameters() if p.grad is not None}
    grads_got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    checks = [
        {"what": "backend", "size": size, "status": "ok" if used == backend else "fail", "got": used},
        {
            "what": "all_reduce over one rank",
            "size": size,
            "status": "ok" if summed.tolist() == [0.0, 1.0, 2.0, 3.0] else "fail",
        },
        {"what": "DDP loss", "size": size, "error": relative(got["loss"], want["loss"]), "tolerance": DDP_TOLERANCE},
        {"what": "DDP gradients", "size": size, "error": grad_error(grads_got, grads_want), "tolerance": DDP_TOLERANCE},
        compare(
            "DDP parameter updates",
            size,
            _flat_parameters(model) - start,
            _flat_parameters(plain) - start,
            DDP_TOLERANCE,
        ),
    ]
    for check in checks[2:4]:
        check["status"] = "ok" if check["error"] <= check["tolerance"] else "fail"
    return {"status": status_of(checks), "checks": checks}


def lock_job(out: str, release: str):
    """The job the launcher starts in the GPU-lock check: it records what it was given, uses the
    device, and holds the lease until `release` appears."""
    Path(out + ".started").touch()
    record = {
        "cvd": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "stdin_is_lock": os.path.realpath("/proc/self/fd/0").endswith("gpus.lock"),
        "cuda_devices": torch.cuda.device_count() if torch.cuda.is_available() else 0,
    }
    if record["cuda_devices"]:
        x = torch.randn(256, 256, device="cuda")
        record["device"] = torch.cuda.get_device_name(0)
        record["matmul_ok"] = bool(torch.allclose((x @ torch.eye(256, device="cuda")).cpu(), x.cpu()))
    deadline = time.monotonic() + 120
    while not os.path.exists(release) and time.monotonic() < deadline:
        time.sleep(0.02)
    Path(out).write_text(json.dumps(record))


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float):
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise RuntimeError(
                f"the launched job exited ({proc.returncode}) before starting: {proc.stderr.read()[-800:]}"
            )
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path.name} did not appear within {timeout} s")
        time.sleep(0.02)


def gpu_lock(profile: Profile, **_) -> dict:
    """workflow_scripts/launch.py --gpus 1 in a private pool: the launcher counts the devices as
    torch does, the job gets one, holds its lock (stdin) and uses the device; the lock is busy
    while the job runs and free after. Dry: SVITT_NUM_GPUS=1 stands for the count (no device)."""
    from svitt.training.devices import gpu_ids, would_wait

    env = {k: v for k, v in os.environ.items() if k != "SVITT_GPU_POOL" and not k.startswith("SLURM_")}
    if profile.device == "cpu":
        env.pop("CUDA_VISIBLE_DEVICES", None)
        env["SVITT_NUM_GPUS"] = "1"
    expected = torch.cuda.device_count() if profile.device == "cuda" else 1
    launcher = [sys.executable, str(ROOT / "workflow_scripts/launch.py")]
    counted = subprocess.run([*launcher, "--count-gpus"], env=env, capture_output=True, text=True, check=True)
    ids = gpu_ids(env)
    checks = [
        {
            "what": "launcher's GPU count equals torch's",
            "size": f"torch {expected}",
            "status": "ok" if int(counted.stdout.strip()) == expected else "fail",
            "got": int(counted.stdout.strip()),
        }
    ]
    with tempfile.TemporaryDirectory() as tmp:
        pool, out, release = Path(tmp) / "pool", Path(tmp) / "job.json", Path(tmp) / "release"
        proc = subprocess.Popen(
            [
                *launcher,
                "--gpus",
                "1",
                "--pool",
                str(pool),
                "--poll",
                "0.05",
                "--",
                str(Path(__file__).resolve()),
                "--lock-job",
                str(out),
                str(release),
            ],
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            _wait_for(Path(str(out) + ".started"), proc, 120)
            busy_while = would_wait(ids, pool)
        finally:
            release.touch()
        code = proc.wait(timeout=120)
        free_after = not would_wait(ids, pool)
        job = json.loads(out.read_text()) if out.exists() else {}
    size = f"GPUs {','.join(ids)}"
    checks += [
        {"what": "job exit status", "size": size, "status": "ok" if code == 0 else "fail", "got": code},
        {
            "what": "job got one GPU of the pool",
            "size": size,
            "status": "ok" if job.get("cvd") in ids else "fail",
            "got": job.get("cvd"),
        },
        {
            "what": "job holds the lock (its stdin)",
            "size": size,
            "status": "ok" if job.get("stdin_is_lock") else "fail",
        },
        {"what": "lock busy while the job runs", "size": size, "status": "ok" if busy_while else "fail"},
        {"what": "lock free after the job", "size": size, "status": "ok" if free_after else "fail"},
    ]
    if profile.device == "cuda":
        checks.append(
            {
                "what": "job sees exactly its device and computes on it",
                "size": size,
                "status": "ok" if job.get("cuda_devices") == 1 and job.get("matmul_ok") else "fail",
                "got": {k: job.get(k) for k in ("cuda_devices", "device", "matmul_ok")},
            }
        )
    return {"status": status_of(checks), "checks": checks}


# ---------------------------------------------------------------- part 2: attention layer

LAYER_VARIANTS = ("dense", "sdpa_nobias", "gather", "flex")


def sdpa_eligibility(profile: Profile, frames: int) -> dict:
    """Which fused SDPA kernels torch would consider for the dense layer, with and without the
    bias (torch.backends.cuda.can_use_*; the bias and inputs need gradients, as in training)."""
    if profile.device != "cuda":
        return {}
    size = profile.layer
    n = 1 + frames * size.side**2
    dtype = profile.layer_autocast  # the dense path casts the bias to q's dtype
    q, k, v = (
        torch.empty(1, size.heads, n, size.head_dim, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3)
    )
    bias = torch.empty(1, size.heads, n, n, device="cuda", dtype=dtype, requires_grad=True)
    out = {}
    for label, mask in (("with_bias", bias), ("no_bias", None)):
        try:
            params = torch.backends.cuda.SDPAParams(q, k, v, mask, 0.0, False, False)
            out[label] = {
                name: bool(getattr(torch.backends.cuda, f"can_use_{name}_attention")(params, False))
                for name in ("flash", "efficient", "cudnn")
                if hasattr(torch.backends.cuda, f"can_use_{name}_attention")
            }
        except (TypeError, RuntimeError) as error:  # the signature moved between releases
            out[label] = f"unknown ({short(error, 120)})"
    return out


def attention_layer(profile: Profile, frames: int, **_) -> dict:
    """benchmarks/attention.py's layer (q/k/v projection + attention + backward, batch 1, fp32
    weights under bf16 autocast as in training) per variant: time of the best step after a
    warm-up, peak memory above the state before it."""
    rows = []
    for variant in LAYER_VARIANTS:
        row = {"variant": variant}
        try:
            row.update(
                attention_bench.run_one(
                    variant,
                    frames,
                    profile.device,
                    profile.repeats,
                    torch.float32,
                    profile.layer,
                    autocast=profile.layer_autocast,
                ),
                status="ok",
            )
        except NotImplementedError as error:
            if profile.device == "cuda":
                row.update(status="error", error=short(error))
            else:  # no FlexAttention backward on the CPU
                row.update(status="skip", reason=short(error, 200))
        except Exception as error:  # out of memory, a failed compile: this variant only
            row.update(status="error", error=short(error), oom=is_oom(error))
        release_memory(profile.device)
        rows.append(row)
    dense = next(r for r in rows if r["variant"] == "dense")
    for row in rows:
        if row["status"] == "ok":
            row["peak_bytes"] = peak_bytes(row, profile.device)
        if row["status"] == "ok" and dense["status"] == "ok":
            row["time_vs_dense"] = row["seconds"] / dense["seconds"]
            row["memory_vs_dense"] = row["peak_bytes"] / max(dense["peak_bytes"], 1)
    failed = [r for r in rows if r["status"] == "error"]
    return {
        "status": "error" if failed else "ok",
        "frames": frames,
        "tokens": 1 + frames * profile.layer.side**2,
        "autocast": str(profile.layer_autocast)[6:],
        "rows": rows,
        "sdpa": sdpa_eligibility(profile, frames),
    }


# ---------------------------------------------------------------- part 3: training steps


def step_peak(step, device: str) -> int:
    """Peak bytes one call of `step` allocates above what was held before (CUDA: the caching
    allocator's counter; CPU: PyTorch's CPU allocator through the profiler)."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    return allocated_peak_bytes(step)


def free_bytes(profile: Profile) -> int:
    """What a step may allocate now: the device's free memory (CPU: the profile's cap)."""
    if profile.device != "cuda":
        return profile.memory_cap
    gc.collect()
    torch.cuda.empty_cache()
    return torch.cuda.mem_get_info()[0]


def linear_fit(probe: dict) -> tuple[float, float]:
    """(bytes per clip, fixed bytes) of the step's peak from two probe batches."""
    (b0, p0), (b1, p1) = sorted(probe.items())
    per_clip = max((p1 - p0) / (b1 - b0), 1.0)
    return per_clip, p0 - per_clip * b0


def predict_batch(probe: dict, free: int, ladder: tuple[int, ...]) -> tuple[int, list[int]]:
    """From the step's peak at two probe batches (linear in the batch): the largest batch whose
    peak stays within 90% of the free memory, and the ladder's batches from there down."""
    per_clip, fixed = linear_fit(probe)
    predicted = int((0.9 * free - fixed) // per_clip)
    candidates = sorted((b for b in ladder if b <= predicted), reverse=True) or [min(ladder)]
    return predicted, candidates


def largest_fitting(run, candidates: list[int], device: str, time_left) -> tuple[dict | None, list[dict], str | None]:
    """run(batch) for each candidate (largest first) until one fits: an out-of-memory error moves
    on to the next smaller batch (reported); other errors propagate. Stops when the time left is
    less than the last attempt took. Returns (result or None, the OOMs, why it stopped early)."""
    ooms, last = [], 0.0
    for batch in candidates:
        if ooms and time_left() < last:
            return None, ooms, "budget: no time for a smaller batch"
        start, message = time.monotonic(), None
        try:
            return run(batch), ooms, None
        except Exception as error:
            if not is_oom(error):
                raise
            message = short(error, 300)
        # Outside the except block: the traceback (and the tensors its frames hold) is gone.
        ooms.append({"batch": batch, "error": message})
        release_memory(device)
        last = time.monotonic() - start
    return None, ooms, "out of memory at every batch"


class Trainer:
    """One model, optimiser and scaler; runs svitt.training.loop's step on batches of a given size."""

    def __init__(self, profile: Profile, cfg: dict, precision: str, objectives, ego: bool):
        from svitt.models.svitt import SViTT
        from svitt.training.precision import grad_scaler

        self.profile, self.cfg, self.precision, self.ego = profile, cfg, precision, ego
        torch.manual_seed(0)
        self.model = SViTT(cfg).to(profile.device).train()
        self.optimizer = new_optimizer(self.model)
        self.scaler = grad_scaler(precision, torch.device(profile.device))
        self.train_cfg = train_config(objectives)
        self.losses = {}

    def step_fn(self, batch_size: int):
        batch = make_batch(self.profile, self.cfg, batch_size, seed=batch_size, ego=self.ego)

        def step():
            self.losses = training_step(
                self.model, self.model, self.optimizer, self.scaler, batch, self.train_cfg, self.profile, self.precision
            )

        return step

    def probe(self) -> dict:
        """The step's peak at the two probe batches, with the gather kernel: it compiles nothing
        and keeps what FlexAttention keeps (q, k, v, output, log-sum-exp), though q, k, v as fp32
        copies where FlexAttention keeps them in bf16: the prediction errs low."""
        encoder_cfg = self.model.video_encoder.cfg
        kernel, encoder_cfg["attention_kernel"] = encoder_cfg["attention_kernel"], "gather"
        try:
            self.step_fn(self.profile.probe_batches[0])()  # allocates the optimiser state
            return {b: step_peak(self.step_fn(b), self.profile.device) for b in self.profile.probe_batches}
        finally:
            encoder_cfg["attention_kernel"] = kernel

    def timed(self, batch_size: int) -> dict:
        """benchmarks/common.measure: a warm-up step (compiles), then the timed steps."""
        device = self.profile.device
        timing = measure(self.step_fn(batch_size), device, self.profile.repeats)
        peak = peak_bytes(timing, device)
        out = {
            "batch": batch_size,
            "seconds_per_step": timing["seconds"],
            "seconds_all": timing["seconds_all"],
            "clips_per_s": batch_size / timing["seconds"],
            "step_peak_bytes": peak,
            "step_peak_bytes_per_clip": peak / batch_size,
            "losses": {k: round(v, 4) for k, v in self.losses.items()},
        }
        if device == "cuda":  # measure() reset the counters after the warm-up: the timed steps' peaks
            out.update(
                peak_allocated_bytes=torch.cuda.max_memory_allocated(),
                peak_reserved_bytes=torch.cuda.max_memory_reserved(),
            )
        if self.scaler.is_enabled():
            out["scaler_scale"] = self.scaler.get_scale()
        return out


def train_item(
    profile: Profile,
    mode: str,
    frames: int,
    deadline: float,
    precision: str | None = None,
    objectives=("vtc", "vtm", "mlm"),
    random_blocks: int | None = None,
    batch: int | None = None,
    **_,
) -> dict:
    """The training step of one configuration at the largest batch that fits (probe, predict,
    step down on OOM), or at a fixed batch (SViTT-Ego's 8 clips)."""
    precision = precision or profile.precision
    k_l, k_r, g = profile.blocks
    blocks = (k_l, k_r if random_blocks is None else random_blocks, g)
    cfg = model_config(profile, mode, frames, blocks)
    ego = "egonce" in objectives
    trainer = Trainer(profile, cfg, precision, objectives, ego)
    out = {
        "mode": mode,
        "frames": frames,
        "precision": precision,
        "objectives": list(objectives),
        "blocks": list(blocks) if mode in ("edge", "hybrid") else None,
        "visual_keep": cfg["video"]["visual_keep"],
        "multimodal_keep": cfg["text"]["multimodal_keep"],
        "kernel": effective_kernel(trainer.model, profile.device),
    }
    if batch is None:
        probe = trainer.probe()
        free = free_bytes(profile)
        predicted, candidates = predict_batch(probe, free, profile.batches)
        out.update(probe_peak_bytes=probe, free_bytes=free, predicted_max_batch=predicted)
    else:
        candidates = [batch]
    result, ooms, stopped = largest_fitting(trainer.timed, candidates, profile.device, lambda: deadline - time.time())
    out.update(oom=ooms)
    if result is None:
        return {**out, "status": "error", "error": stopped}
    if batch is None:  # the probe ran the gather kernel (fp32 copies of q, k, v): say what the step kept
        _, fixed = linear_fit(probe)
        per_clip = max((result["step_peak_bytes"] - fixed) / result["batch"], 1.0)
        out["predicted_max_batch_from_timed_step"] = int((0.9 * free - fixed) // per_clip)
    return {**out, **result, "status": "ok"}


# ----------------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class Item:
    part: str
    name: str
    fn: object
    planned_s: float  # on one H100, compiles included
    dry_s: float  # on a 2-core CPU
    kwargs: dict = field(default_factory=dict)


PLAN = [
    Item("correctness", "environment", environment, 2, 0.5),
    Item("correctness", "gather_kernel", gather_kernel, 8, 2),
    Item("correctness", "flex_T4", flex_kernel, 35, 1, {"frames": 4}),
    Item("correctness", "flex_T8", flex_kernel, 20, 1, {"frames": 8}),
    Item("correctness", "flex_T16", flex_kernel, 25, 1, {"frames": 16}),
    Item("correctness", "precision", precision_step, 45, 3),
    Item("correctness", "ddp", ddp_step, 10, 2),
    Item("correctness", "gpu_lock", gpu_lock, 12, 6),
    # Most telling first where the budget could run out: T = 16, then SViTT-Ego, then T = 8 and 4.
    Item("attention", "layer_T16", attention_layer, 20, 3, {"frames": 16}),
    Item("attention", "layer_T8", attention_layer, 15, 2, {"frames": 8}),
    Item("attention", "layer_T4", attention_layer, 15, 2, {"frames": 4}),
    Item("training", "dense_T16", train_item, 12, 3, {"mode": "dense", "frames": 16}),
    Item("training", "hybrid_T16", train_item, 45, 3, {"mode": "hybrid", "frames": 16}),
    Item(
        "training",
        "ego_k3",
        train_item,
        35,
        2,
        {
            "mode": "hybrid",
            "frames": 4,
            "precision": "fp16",
            "objectives": ("egonce", "vtm", "mlm"),
            "random_blocks": 3,
            "batch": 8,
        },
    ),
    Item(
        "training",
        "ego_k5",
        train_item,
        35,
        2,
        {
            "mode": "hybrid",
            "frames": 4,
            "precision": "fp16",
            "objectives": ("egonce", "vtm", "mlm"),
            "random_blocks": 5,
            "batch": 8,
        },
    ),
    Item("training", "dense_T8", train_item, 10, 2, {"mode": "dense", "frames": 8}),
    Item("training", "hybrid_T8", train_item, 40, 2, {"mode": "hybrid", "frames": 8}),
    Item("training", "dense_T4", train_item, 10, 2, {"mode": "dense", "frames": 4}),
    Item("training", "hybrid_T4", train_item, 40, 2, {"mode": "hybrid", "frames": 4}),
]
PARTS = ("correctness", "attention", "training")
WORKER_START_S = {"cuda": 8, "dry": 3}  # python, torch and CUDA start-up per worker
DEFAULT_BUDGET_S = {"cuda": 480, "dry": 900}  # dry: about 30 s, but CI machines can be loaded


def planned_seconds(profile: Profile, item: Item) -> float:
    return item.planned_s if profile.name == "cuda" else item.dry_s


def plan_summary(profile: Profile, parts=PARTS) -> dict:
    """Planned seconds per part (its items plus one worker start) and in total."""
    out = {}
    for part in parts:
        items = [i for i in PLAN if i.part == part]
        out[part] = {
            "items": {i.name: planned_seconds(profile, i) for i in items},
            "total": WORKER_START_S[profile.name] + sum(planned_seconds(profile, i) for i in items),
        }
    out["total"] = sum(v["total"] for v in out.values())
    return out


# --------------------------------------------------------------------------------- worker


def run_items(profile: Profile, names: list[str], deadline: float, emit) -> None:
    """Run the named items in order; an item whose planned time no longer fits before the
    deadline is skipped; an exception is that item's error, and the next one runs."""
    by_name = {i.name: i for i in PLAN}
    for name in names:
        item = by_name[name]
        planned = planned_seconds(profile, item)
        left = deadline - time.time()
        if left < planned:
            emit({"name": name, "status": "skip", "reason": f"budget: {left:.0f} s left, planned {planned:.0f} s"})
            continue
        start = time.time()
        try:
            result = item.fn(profile, deadline=deadline, **item.kwargs)
        except Exception as error:
            result = {"status": "error", "error": short(error, 1500), "traceback": traceback.format_exc()[-3000:]}
        release_memory(profile.device)
        emit({"name": name, **result, "seconds": round(time.time() - start, 2), "planned_s": planned})


def _jsonable(value):
    """NaN and inf as strings (JSON has neither); tensors and tuples as lists; dict keys as str."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return _jsonable(value.tolist())
    return value


def worker(profile: Profile, names: list[str], deadline: float):
    if profile.cpu_threads:
        torch.set_num_threads(profile.cpu_threads)

    def emit(result):
        print(RESULT_MARK + json.dumps(_jsonable(result)), flush=True)

    run_items(profile, names, deadline, emit)


# --------------------------------------------------------------------------------- parent


def _pump(stream, sink):
    for line in stream:
        sink(line)
    stream.close()


def _kill_session(proc: subprocess.Popen):
    """SIGKILL the worker's own session (started with start_new_session): the worker and the
    compile processes it started, nothing else."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def run_part(profile: Profile, part: str, names: list[str], deadline: float) -> list[dict]:
    """The part's items in worker processes: one worker, and after a worker dies a new one for
    the items it left (the item it was on is reported as an error with its stderr)."""
    results, pending = [], list(names)
    planned = {i.name: planned_seconds(profile, i) for i in PLAN}
    while pending:
        left = deadline - time.time()
        if left < WORKER_START_S[profile.name] + min(planned.get(n, 0) for n in pending):
            results += [
                {"name": n, "status": "skip", "reason": f"budget: {max(left, 0):.0f} s left for the part"}
                for n in pending
            ]
            break
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--worker",
            part,
            "--deadline",
            str(deadline),
            "--items",
            *pending,
        ] + (["--dry"] if profile.name == "dry" else [])
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, cwd=ROOT
        )
        lines, tail = queue.Queue(), collections.deque(maxlen=60)

        def keep_stderr(line):
            tail.append(line)
            sys.stderr.write(f"  [{part}] {line}")

        threads = [
            threading.Thread(target=_pump, args=(proc.stdout, lines.put), daemon=True),
            threading.Thread(target=_pump, args=(proc.stderr, keep_stderr), daemon=True),
        ]
        for t in threads:
            t.start()
        killed, exited_at = False, None
        while True:
            try:
                line = lines.get(timeout=0.5)
            except queue.Empty:
                if proc.poll() is None:
                    if time.time() > deadline + GRACE_S and not killed:
                        _kill_session(proc)
                        killed = True
                    continue
                if not threads[0].is_alive():
                    break
                exited_at = exited_at or time.time()
                if time.time() - exited_at > 5:  # a leftover compile process still holds stdout
                    _kill_session(proc)
                    break
                continue
            if line.startswith(RESULT_MARK):
                result = json.loads(line[len(RESULT_MARK) :])
                results.append(result)
                pending.remove(result["name"])
                print(
                    f"[{part}] {result['name']}: {result['status']} ({result.get('seconds', 0):.1f} s, "
                    f"planned {result.get('planned_s', 0):.0f} s)",
                    flush=True,
                )
            else:
                sys.stdout.write(f"  [{part}] {line}")
        for t in threads:
            t.join(timeout=5)
        if pending:
            name = pending.pop(0)
            why = "stopped at the deadline" if killed else f"worker exited with status {proc.returncode}"
            results.append({"name": name, "status": "error", "error": why, "stderr": "".join(tail)[-3000:]})
            print(f"[{part}] {name}: error ({why})", flush=True)
            if killed:
                results += [{"name": n, "status": "skip", "reason": "budget: the deadline passed"} for n in pending]
                pending = []
    return results


def summary(parts: dict) -> dict:
    counts = collections.Counter()
    for items in parts.values():
        for item in items:
            counts[item["status"]] += 1
            for check in item.get("checks", []) + item.get("rows", []):
                if check.get("status") == "skip":
                    counts["skipped_checks"] += 1
    return dict(counts)


def paper_comparisons(training: list[dict]) -> dict:
    """Hybrid / dense step peak per clip against Table 2's ratio; SViTT-Ego's peak against its
    paper's (peak allocated here: the model, AdamW state, gradients and the step's tensors)."""
    by = {r["name"]: r for r in training if r.get("status") == "ok"}
    out = {}
    for frames in (4, 8, 16):
        dense, hybrid = by.get(f"dense_T{frames}"), by.get(f"hybrid_T{frames}")
        if dense and hybrid:
            out[f"T{frames}"] = {
                "memory_per_clip_hybrid_vs_dense": hybrid["step_peak_bytes_per_clip"]
                / max(dense["step_peak_bytes_per_clip"], 1),
                "paper_table2_ratio": TABLE2[(frames, "hybrid")][1] / TABLE2[(frames, "dense")][1],
                "clips_per_s_hybrid_vs_dense": hybrid["clips_per_s"] / dense["clips_per_s"],
            }
    for k_r, gb in PAPER_EGO_GB.items():
        ego = by.get(f"ego_k{k_r}")
        if ego and "peak_allocated_bytes" in ego:
            out[f"ego_k{k_r}"] = {
                "paper_gb": gb,
                "peak_allocated_gb": ego["peak_allocated_bytes"] / 1e9,
                "peak_reserved_gb": ego["peak_reserved_bytes"] / 1e9,
            }
    return out


# ------------------------------------------------------------------------------- markdown


def _fmt(value, digits=3):
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _mb(value):
    return "-" if value is None else f"{value / 2**20:.0f}"


def markdown(report: dict) -> str:
    env = report.get("environment", {})
    lines = [
        f"# GPU check ({report['mode']})",
        "",
        f"torch {report['torch']}, CUDA {report['cuda']}, device {env.get('device', '(not recorded)')}, "
        f"wall {report['wall_s']:.0f} s of a {report['budget_s']:.0f} s budget "
        f"(planned {report['planned']['total']:.0f} s); {report['summary']}",
        "",
    ]
    parts = report["parts"]
    if "correctness" in parts:
        lines += [
            "## Correctness",
            "",
            "| item | check | size | error | tolerance | result |",
            "|---|---|---|---|---|---|",
        ]
        for item in parts["correctness"]:
            for c in item.get("checks", []):
                result = c["status"] if c["status"] != "skip" else f"skip: {c.get('reason', '')[:80]}"
                lines.append(
                    f"| {item['name']} | {c['what']} | {c['size']} | {_fmt(c.get('error'))} | "
                    f"{_fmt(c.get('tolerance'))} | {result} |"
                )
            if not item.get("checks"):
                lines.append(f"| {item['name']} | | | | | {_item_note(item)} |")
        lines.append("")
    if "attention" in parts:
        lines += [
            "## One attention layer, forward + backward (batch 1, bf16 autocast)",
            "",
            "| T | N | variant | time (ms) | peak (MB) | time / dense | memory / dense |",
            "|---|---|---|---|---|---|---|",
        ]
        for item in parts["attention"]:
            for r in item.get("rows", []):
                if r["status"] != "ok":
                    note = r.get("reason") or r.get("error", "")
                    lines.append(
                        f"| {item['frames']} | {item['tokens']} | {r['variant']} | {r['status']}: {note[:80]} | | | |"
                    )
                    continue
                lines.append(
                    f"| {item['frames']} | {item['tokens']} | {r['variant']} | {r['seconds'] * 1e3:.2f} | "
                    f"{_mb(r['peak_bytes'])} | {_fmt(r.get('time_vs_dense'))} | "
                    f"{_fmt(r.get('memory_vs_dense'))} |"
                )
            if not item.get("rows"):
                lines.append(f"| {item['name']} | | | {_item_note(item)} | | | |")
        lines.append("")
    if "training" in parts:
        lines += [
            "## Training step",
            "",
            "| item | batch (predicted max) | clips/s | step peak / clip (MB) | peak allocated (GB) | "
            "peak reserved (GB) | OOM at | note |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for item in parts["training"]:
            if item["status"] != "ok":
                lines.append(f"| {item['name']} | | | | | | {_ooms(item)} | {_item_note(item)} |")
                continue
            gb = {
                k: (f"{item[k] / 1e9:.2f}" if k in item else "-")
                for k in ("peak_allocated_bytes", "peak_reserved_bytes")
            }
            lines.append(
                f"| {item['name']} | {item['batch']} ({item.get('predicted_max_batch', '-')}) | "
                f"{item['clips_per_s']:.1f} | {_mb(item['step_peak_bytes_per_clip'])} | "
                f"{gb['peak_allocated_bytes']} | {gb['peak_reserved_bytes']} | {_ooms(item)} | "
                f"{item['precision']}, {item['kernel']} |"
            )
        comparisons = report.get("paper", {})
        if comparisons:
            lines += ["", "| against the paper | here | paper |", "|---|---|---|"]
            for key, c in comparisons.items():
                if key.startswith("ego"):
                    lines.append(
                        f"| {key} peak GB (allocated / reserved) | {c['peak_allocated_gb']:.2f} / "
                        f"{c['peak_reserved_gb']:.2f} | {c['paper_gb']} |"
                    )
                else:
                    ratio = c["memory_per_clip_hybrid_vs_dense"]
                    lines.append(
                        f"| {key} memory per clip, hybrid / dense | {ratio:.3f} | "
                        f"{c['paper_table2_ratio']:.3f} (Table 2) |"
                    )
        lines.append("")
    return "\n".join(lines)


def _ooms(item) -> str:
    return ", ".join(str(o["batch"]) for o in item.get("oom", [])) or "-"


def _item_note(item) -> str:
    env = item.get("environment")
    if env:  # the header names torch and the device; here what compiles FlexAttention
        return f"{item['status']}: Triton {env.get('triton')}, C compiler {env.get('c_compiler')}"
    note = item.get("reason") or item.get("error") or item["status"]
    return f"{item['status']}: {note}"[:160].replace("|", "/").replace("\n", " ")


# ----------------------------------------------------------------------------------- main


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry", action="store_true", help="the same checks on the CPU at a tiny size")
    p.add_argument(
        "--out",
        type=Path,
        help="JSON result (and a .md beside it); default: benchmarks/results/gpu_check.json (real run), none (dry run)",
    )
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    p.add_argument("--budget", type=float, help="seconds for everything (default: 480 real, 900 dry)")
    p.add_argument("--worker", choices=PARTS, help=argparse.SUPPRESS)
    p.add_argument("--items", nargs="+", help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    p.add_argument("--lock-job", nargs=2, metavar=("OUT", "RELEASE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.lock_job:
        lock_job(*args.lock_job)
        return 0
    profile = PROFILES["dry" if args.dry else "cuda"]
    if args.worker:
        worker(profile, args.items, args.deadline)
        return 0
    if not args.dry and not torch.cuda.is_available():
        p.error("torch sees no CUDA device: run on a GPU machine, or pass --dry for the CPU run")
    out = args.out or (None if args.dry else ROOT / "benchmarks/results/gpu_check.json")
    budget = args.budget or DEFAULT_BUDGET_S[profile.name]
    start = time.time()
    deadline = start + budget
    plan = plan_summary(profile, args.parts)
    print(f"gpu_check ({profile.name}): budget {budget:.0f} s, planned {plan['total']:.0f} s", flush=True)
    parts = {part: run_part(profile, part, [i.name for i in PLAN if i.part == part], deadline) for part in args.parts}
    env = next((i.get("environment") for i in parts.get("correctness", []) if i["name"] == "environment"), None)
    report = {
        "check": "benchmarks/gpu_check.py",
        "mode": profile.name,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "environment": env or {},
        "budget_s": budget,
        "planned": plan,
        "wall_s": time.time() - start,
        "parts": parts,
        "summary": summary(parts),
        "paper": paper_comparisons(parts.get("training", [])),
        "tolerances": {
            "kernel": {str(k)[6:]: v for k, v in KERNEL_TOLERANCE.items()},
            "precision": PRECISION_TOLERANCE,
            "ddp": DDP_TOLERANCE,
        },
    }
    table = markdown(report)
    print(table)
    if out:
        atomic_write_json(out, _jsonable(report))
        atomic_write_bytes(Path(out).with_suffix(".md"), table.encode())
        print(f"wrote {out} and {Path(out).with_suffix('.md')}")
    bad = report["summary"].get("fail", 0) + report["summary"].get("error", 0)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
