"""Small torch.distributed helpers: rank queries and an all-gather that keeps gradients.

Gradient bookkeeping of `gather_with_grad` (why no manual scaling is needed):
every rank gathers the full batch and computes the *same* loss L over it. On each rank autograd
produces dL/d(gathered), the gradient w.r.t. all ranks' rows. The backward all-reduces (SUM) that
full gradient over the W ranks, so rank r receives W * dL/dx_r for its own rows x_r. DDP then
*averages* parameter gradients over the W ranks: (1/W) * sum_r W * dL/dx_r * dx_r/dtheta, which is
exactly the gradient of L for one process holding the combined batch. Parameters used directly in
the loss on every rank (e.g. a learnable temperature) get dL/dtau on every rank; DDP's average
leaves it unchanged. So: compute the loss over the full gathered batch, let DDP average, and do
not rescale anything.

Every rank must call the gather in the same order and run backward through it (both are
collectives). Only all_gather/all_reduce are used, so this works on gloo (CPU), which has no
reduce_scatter. Ranks may hold different batch sizes (e.g. a short last batch): sizes are
exchanged first and the rows are padded for the all_gather, then trimmed.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_dist() -> bool:
    """True when torch.distributed is available and a process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Number of ranks (1 when not distributed)."""
    return dist.get_world_size() if is_dist() else 1


def rank() -> int:
    """This process's rank (0 when not distributed)."""
    return dist.get_rank() if is_dist() else 0


def _gather_sizes(x: torch.Tensor) -> list[int]:
    """Rows (dim 0) held by every rank, in rank order."""
    local = torch.tensor([x.shape[0]], dtype=torch.long, device=x.device)
    sizes = [torch.zeros_like(local) for _ in range(world_size())]
    dist.all_gather(sizes, local)
    return [int(s.item()) for s in sizes]


def _all_gather_rows(x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Concatenate every rank's x along dim 0 (no autograd); handles unequal row counts."""
    wire = x.to(torch.uint8) if x.dtype == torch.bool else x  # gloo cannot gather bool
    max_rows = max(sizes)
    if wire.shape[0] < max_rows:
        pad = wire.new_zeros((max_rows - wire.shape[0],) + tuple(wire.shape[1:]))
        wire = torch.cat([wire, pad], dim=0)
    buffers = [torch.empty_like(wire) for _ in sizes]
    dist.all_gather(buffers, wire.contiguous())
    out = torch.cat([buf[:n] for buf, n in zip(buffers, sizes)], dim=0)
    return out.to(torch.bool) if x.dtype == torch.bool else out


class _GatherWithGrad(torch.autograd.Function):
    """Forward: all-gather rows. Backward: all-reduce (SUM) the full gradient, keep own rows."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        sizes = _gather_sizes(x)
        ctx.sizes = sizes
        ctx.rank = rank()
        return _all_gather_rows(x, sizes)

    @staticmethod
    def backward(ctx, grad_full: torch.Tensor) -> torch.Tensor:
        grad_full = grad_full.contiguous().clone()  # all_reduce is in place; never touch autograd's buffer
        dist.all_reduce(grad_full, op=dist.ReduceOp.SUM)
        start = sum(ctx.sizes[: ctx.rank])
        return grad_full[start : start + ctx.sizes[ctx.rank]]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All-gather x along dim 0 across ranks, differentiably.

    x: [n_local, ...] -> [sum of n_local over ranks, ...], rows in rank order. Identity when
    torch.distributed is not initialised or the world has one rank. See the module docstring for
    why gradients then match a single process on the combined batch without rescaling.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"gather_with_grad expects a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 0:
        raise ValueError("gather_with_grad expects a tensor with a batch dimension (dim >= 1), got a 0-dim tensor")
    if not is_dist() or world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


def init_distributed(device: str = "auto") -> tuple[int, int, torch.device]:
    """Join the process group torchrun describes (RANK/WORLD_SIZE/LOCAL_RANK in the environment);
    a plain `python` run stays single-process. NCCL on GPUs, gloo on CPU.

    Returns (rank, world_size, device)."""
    import os

    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was requested but torch sees no CUDA device")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not is_dist():
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    return rank(), world_size(), dev


def all_reduce_(tensor: torch.Tensor, op=None) -> torch.Tensor:
    """In-place all-reduce (SUM by default); a no-op when not distributed."""
    if is_dist():
        dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM)
    return tensor


def barrier():
    if is_dist():
        dist.barrier()


def broadcast_parameters(module: torch.nn.Module):
    """Rank 0's parameters and buffers on every rank (what DDP's constructor does)."""
    if is_dist() and world_size() > 1:
        for tensor in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(tensor.data, src=0)


def average_gradients(module: torch.nn.Module):
    """Average parameter gradients over ranks in one flat all-reduce (what DDP does in backward)
    for steps that do not run through a DDP wrapper (svitt.training.grad_cache)."""
    if not is_dist() or world_size() == 1:
        return
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()
