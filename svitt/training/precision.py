"""Mixed precision: bf16 where the GPU supports it, fp16 with a loss scaler otherwise, fp32 on CPU.

An explicit policy is kept on every device, so the rehearsal runs the paper configuration's on a
CPU. fp16 means 16-bit autocast with dynamic loss scaling (a GradScaler): float16 on CUDA, bfloat16
on a CPU, whose float16 matrix products are emulated (a 1024x768 by 768x3072 product: 13.8 s in
float16, 0.046 s in bfloat16, 0.19 s in float32 on this project's CPU, one thread). The scaler runs
either way, and model.json records the dtype that was used (`autocast`)."""

from __future__ import annotations

import contextlib

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The dtype autocast computes in (None: fp32, no autocast)."""
    if precision == "fp32":
        return None
    if precision == "fp16" and device.type == "cuda":
        return torch.float16
    return torch.bfloat16  # bf16, and fp16 on a CPU (see the module docstring)


def autocast(precision: str, device: torch.device):
    dtype = autocast_dtype(precision, device)
    return contextlib.nullcontext() if dtype is None else torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """A scaler that is active only for fp16 (bf16 and fp32 need none)."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")
