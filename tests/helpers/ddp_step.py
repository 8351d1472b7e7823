"""One VTC optimiser step of a tiny SViTT, single-process or under torchrun (gloo).

    python ddp_step.py OUT.pt                                   (whole batch, one process)
    python -m torch.distributed.run --nproc_per_node 2 ddp_step.py OUT.pt   (half per rank)
    ... ddp_step.py OUT.pt 2                                    (each rank's half in 2 micro-batches)
Writes {"loss", "params" after the step, "grads" of the step} from rank 0; with --every-rank,
every rank writes OUT.rank<r>.pt, with its rank, world size and launch environment as well.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from svitt import distributed as dist
from svitt.models.svitt import SViTT
from svitt.training.loop import TrainState, _optimizer_step
from svitt.training.tasks import PairsTask

BATCH = 8


class Tokenizer:
    """Just what _optimizer_step reads when MLM is off."""

    def __len__(self):
        return 40


LAUNCH_ENV = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "GROUP_RANK",
    "LOCAL_WORLD_SIZE",
    "TORCHELASTIC_RUN_ID",
    "SLURM_JOB_ID",
    "SLURM_PROCID",
    "SLURM_NODEID",
    "CUDA_VISIBLE_DEVICES",
    "SVITT_STOP_AT",
)


def main(out: str, grad_accum: int = 1, every_rank: bool = False):
    rank, world, device = dist.init_distributed("cpu")
    torch.manual_seed(0)
    model = SViTT(
        {"video": {"preset": "tiny", "frames": 4}, "text": {"preset": "tiny", "vocab_size": 40}, "embed_dim": 16}
    )
    g = torch.Generator().manual_seed(1)
    video = torch.randn(BATCH, 4, 3, 32, 32, generator=g)
    ids = torch.randint(5, 40, (BATCH, 6), generator=g)
    ids[:, 0] = 2
    mask = torch.ones_like(ids)
    part = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    batch = {"video": video[part], "input_ids": ids[part], "attention_mask": mask[part]}
    micro = [{k: v.chunk(grad_accum)[i] for k, v in batch.items()} for i in range(grad_accum)]
    net = model
    if world > 1 and grad_accum == 1:  # as svitt.training.loop: the cached step averages gradients itself
        net = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.02)
    cfg = {
        "objectives": {"vtc": 1.0},
        "grad_accum": grad_accum,
        "clip_grad_norm": None,
        "egonce_temperature": 0.05,
        "vtm_hard_fraction": 1.0,
    }
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    state = TrainState(cfg, PairsTask(), model, optimizer, scaler, Tokenizer(), device, "fp32", net=net)
    parts, _ = _optimizer_step(state, iter(micro))
    named = list(model.named_parameters())
    record = {
        "loss": parts["vtc"],
        "names": [n for n, _ in named],
        "params": {n: p.detach().clone() for n, p in named},
        "grads": {n: None if p.grad is None else p.grad.clone() for n, p in named},
    }
    if every_rank:
        import os
        import socket

        record.update(
            rank=rank,
            world=world,
            backend=torch.distributed.get_backend() if world > 1 else None,
            host=socket.gethostname(),
            env={k: os.environ.get(k) for k in LAUNCH_ENV},
        )
        torch.save(record, out.replace(".pt", f".rank{rank}.pt"))
    elif rank == 0:
        torch.save(record, out)
    dist.barrier()


if __name__ == "__main__":
    positional = [a for a in sys.argv[2:] if not a.startswith("--")]
    main(sys.argv[1], int(positional[0]) if positional else 1, every_rank="--every-rank" in sys.argv[2:])
