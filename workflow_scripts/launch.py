#!/usr/bin/env python
"""Run a training/evaluation script on its own GPUs: the device half of every GPU rule.

    python workflow_scripts/launch.py --gpus 2 -- workflow_scripts/train.py --config ...

--gpus 0 runs on the CPU (CUDA_VISIBLE_DEVICES=""); --gpus 1 runs `python SCRIPT`; more runs
`torchrun --standalone --nproc_per_node N SCRIPT`. Device ids come from a lock-protected pool
(--pool), so concurrent jobs of one `snakemake --resources gpu=8` run get disjoint GPUs; when a
scheduler already set CUDA_VISIBLE_DEVICES (Slurm), that assignment is kept. SIGTERM and SIGUSR1
are passed on to the script, whose exit code is returned.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # svitt from this repository

from svitt.devices import acquire, release, visible_gpu_count  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", type=int, required=True, help="GPUs for this job (the rule's resources.gpu)")
    p.add_argument("--pool", default=".snakemake/gpu_slots", help="folder of the shared lease file")
    p.add_argument("--total", type=int, help="GPUs on this machine (default: nvidia-smi -L)")
    p.add_argument("script", nargs=argparse.REMAINDER, help="-- SCRIPT [ARGS...]")
    args = p.parse_args(argv)
    if args.script and args.script[0] == "--":
        args.script = args.script[1:]
    if not args.script:
        p.error("give the script to run after --")
    if args.gpus < 0:
        p.error(f"--gpus must be >= 0, got {args.gpus}")
    return args


def command(script: list[str], gpus: int) -> list[str]:
    if gpus > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={gpus}", *script]
    return [sys.executable, *script]


def main(argv=None) -> int:
    args = parse_args(argv)
    env = dict(os.environ)
    owner = os.getpid()
    leased = False
    if args.gpus == 0:
        env["CUDA_VISIBLE_DEVICES"] = ""
    elif "CUDA_VISIBLE_DEVICES" not in env:
        total = args.total if args.total is not None else visible_gpu_count()
        ids = acquire(args.pool, args.gpus, total, owner)
        leased = True
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, ids))
    print(f"launch: CUDA_VISIBLE_DEVICES={env['CUDA_VISIBLE_DEVICES']!r}", file=sys.stderr, flush=True)
    try:
        child = subprocess.Popen(command(args.script, args.gpus), env=env)
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            signal.signal(sig, lambda s, f: child.send_signal(s))
        return child.wait()
    finally:
        if leased:
            release(args.pool, owner)


if __name__ == "__main__":
    sys.exit(main())
