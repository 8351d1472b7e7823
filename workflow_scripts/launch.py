#!/usr/bin/env python
"""Run a training/evaluation script on its own GPUs: the device half of every GPU rule.

    python workflow_scripts/launch.py --gpus 2 -- workflow_scripts/train.py --config ...

--gpus 0 runs on the CPU (CUDA_VISIBLE_DEVICES=""); --gpus 1 runs `python SCRIPT`; more runs
`torchrun --standalone --nproc_per_node N SCRIPT`. With --nodes N > 1 (Slurm only) one torchrun
agent per node is started with `srun`, joined by a c10d rendezvous on this node.

Devices: inside a Slurm job, Slurm's CUDA_VISIBLE_DEVICES is kept. Elsewhere the job locks distinct
GPUs in the machine's pool (svitt/training/devices.py: $SVITT_GPU_POOL, default /var/tmp/svitt-gpu-pool),
waiting as long as it takes; a CUDA_VISIBLE_DEVICES set in the shell narrows the choice to its
entries. The lock is held by every process of the job and released by the kernel when the last one
exits.

Time limits: with --save-before, inside a Slurm job the script is told (SVITT_STOP_AT) to save and
stop that many seconds before the job's time limit (re-read from squeue while it runs); training
then exits 75 and Snakemake's `retries` resubmit it, resuming from the checkpoint. (Slurm's own
--signal cannot do this here: it reaches the Snakemake and shell processes around the job too,
which die of it.)
SIGTERM, SIGUSR1 and SIGINT are passed on to the script; the script's exit code is returned (75
when it stopped for the time limit).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # svitt from this repository

from svitt.training.devices import acquire, default_pool, gpu_ids, job_gpu_count

STOPPED_EXIT_CODE = 75  # EX_TEMPFAIL, as svitt.training.loop: saved, run again to continue
# torchrun's agent dies on SIGUSR1 by default (its workers would run on, orphaned): let it pass
# the signal on to them instead.
TORCHRUN_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", type=int, help="GPUs for this job, per node (the rule's gpus)")
    p.add_argument("--nodes", type=int, default=1, help="nodes of a Slurm job (srun + torchrun rendezvous)")
    p.add_argument(
        "--srun",
        action="store_true",
        help="start the ranks with srun + rendezvous even on one node (a multi-node check)",
    )
    p.add_argument("--threads", type=int, default=1, help="CPUs per node (the rule's threads; srun -c)")
    p.add_argument("--pool", help=f"folder of the machine's GPU pool (default: $SVITT_GPU_POOL or {default_pool({})})")
    p.add_argument("--poll", type=float, default=5.0, help="seconds between tries while the GPUs are busy")
    p.add_argument(
        "--save-before",
        type=float,
        help="in a Slurm job: seconds before its time limit at which training is to save and stop",
    )
    p.add_argument(
        "--count-gpus", action="store_true", help="print how many GPUs jobs started here may use, and exit (gpus: auto)"
    )
    p.add_argument("script", nargs=argparse.REMAINDER, help="-- SCRIPT [ARGS...]")
    args = p.parse_args(argv)
    if args.count_gpus:
        return args
    if args.script and args.script[0] == "--":
        args.script = args.script[1:]
    if not args.script:
        p.error("give the script to run after --")
    if args.gpus is None or args.gpus < 0:
        p.error(f"--gpus must be given and >= 0, got {args.gpus}")
    if args.nodes < 1:
        p.error(f"--nodes must be >= 1, got {args.nodes}")
    return args


def command(script: list[str], gpus: int) -> list[str]:
    if gpus > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}", *script]
    return [sys.executable, *script]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def srun_command(script: list[str], nodes: int, procs: int, threads: int, job_id: str) -> list[str]:
    """One torchrun agent per node (srun), meeting at a c10d rendezvous on this node, which is
    the allocation's first (where the batch script runs). torchrun then sets RANK, WORLD_SIZE and
    LOCAL_RANK of every worker (svitt.distributed.init_distributed reads them)."""
    endpoint = f"{socket.gethostname()}:{_free_port()}"
    return [
        "srun",
        f"--nodes={nodes}",
        f"--ntasks={nodes}",
        "--ntasks-per-node=1",
        f"--cpus-per-task={threads}",
        "--kill-on-bad-exit=1",
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nnodes={nodes}",
        f"--nproc-per-node={procs}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={endpoint}",
        f"--rdzv-id=svitt-{job_id}",
        "--max-restarts=0",
        *script,
    ]


def parse_slurm_duration(text: str) -> float | None:
    """squeue's %L ("[days-]hours:minutes:seconds", "minutes:seconds") in seconds; None when
    the job has no limit (UNLIMITED, NOT_SET, INVALID)."""
    text = text.strip()
    days, _, clock = text.rpartition("-") if "-" in text else ("0", "", text)
    parts = clock.split(":")
    if not days.isdigit() or not 1 <= len(parts) <= 3 or not all(p.isdigit() for p in parts):
        return None
    seconds = 0
    for part in parts:
        seconds = seconds * 60 + int(part)
    return int(days) * 86400 + seconds


def slurm_seconds_left(job_id: str) -> float | None:
    try:
        out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%L"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return parse_slurm_duration(out.stdout) if out.returncode == 0 else None


def log(message: str):
    print(f"launch: {message}", file=sys.stderr, flush=True)


class TimeLimit:
    """A Slurm job's end, less `save_before`: when training is to save and stop. The script learns
    it at launch (SVITT_STOP_AT, read by every rank: no agent in between can kill a rank that is
    still saving). squeue is asked again every `poll` seconds (SVITT_SLURM_POLL, default 60): when
    the limit was shortened (scontrol update), the script gets SIGUSR1 at the new time instead."""

    def __init__(self, job_id: str, save_before: float, poll: float):
        self.job_id, self.save_before, self.poll = job_id, save_before, poll
        self.stop_at = self.launch_stop_at = None
        self.signalled = False

    def _stop_time(self) -> float | None:
        left = slurm_seconds_left(self.job_id)
        return None if left is None else time.time() + left - self.save_before

    def arm(self, env: dict):
        self.stop_at = self.launch_stop_at = self._stop_time()
        if self.stop_at is None:
            log(f"Slurm job {self.job_id} has no time limit squeue can tell: no stop before it is set")
            return
        env["SVITT_STOP_AT"] = f"{self.stop_at:.0f}"
        work = self.stop_at - time.time()
        log(
            f"Slurm job {self.job_id} ends in {work + self.save_before:.0f} s: training saves and stops "
            f"{self.save_before:.0f} s before (at {time.strftime('%H:%M:%S', time.localtime(self.stop_at))})"
        )
        if work < self.save_before:
            log(f"warning: that leaves {work:.0f} s of work per job; raise the rule's runtime or lower save_before")

    def check(self, child: subprocess.Popen):
        if self.stop_at is None or self.signalled:
            return
        new = self._stop_time()
        if new is not None and new < self.stop_at - 1:
            log(
                f"the Slurm time limit of job {self.job_id} was shortened: training stops at "
                f"{time.strftime('%H:%M:%S', time.localtime(new))}"
            )
            self.stop_at = new
        if self.stop_at < self.launch_stop_at - 1 and time.time() >= self.stop_at:
            log("asking the script to save and stop (SIGUSR1)")
            child.send_signal(signal.SIGUSR1)
            self.signalled = True

    def passed(self) -> bool:
        return self.stop_at is not None and time.time() >= self.stop_at


def devices(args, env: dict, slurm: bool):
    """Set CUDA_VISIBLE_DEVICES for the job; returns the pool lease to keep (or None)."""
    if args.gpus == 0:
        env["CUDA_VISIBLE_DEVICES"] = ""
        return None
    if slurm and ("CUDA_VISIBLE_DEVICES" in env or args.nodes > 1 or args.srun):
        return None  # Slurm's assignment (per node under srun)
    lease = acquire(args.gpus, gpu_ids(env), args.pool, command=" ".join(args.script), poll=args.poll)
    env["CUDA_VISIBLE_DEVICES"] = ",".join(lease.ids)
    return lease


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.count_gpus:
        print(job_gpu_count())
        return 0
    env = dict(os.environ)
    job_id = env.get("SLURM_JOB_ID")
    multi = args.nodes > 1 or args.srun
    if multi and not job_id:
        raise SystemExit(
            f"launch: --nodes {args.nodes} / --srun start ranks with srun and need a Slurm "
            f"job (SLURM_JOB_ID is not set); submit with --profile profiles/slurm"
        )
    lease = devices(args, env, slurm=job_id is not None)
    log(f"CUDA_VISIBLE_DEVICES={env.get('CUDA_VISIBLE_DEVICES', '<Slurm, per node>')!r}")
    limit = None
    if job_id and args.save_before is not None:
        limit = TimeLimit(job_id, args.save_before, float(env.get("SVITT_SLURM_POLL") or 60))
        limit.arm(env)
    if multi:
        cmd = srun_command(args.script, args.nodes, max(args.gpus, 1), args.threads, job_id)
        log(" ".join(cmd))
    else:
        cmd = command(args.script, args.gpus)
    if "torch.distributed.run" in cmd:
        env.setdefault("TORCHELASTIC_SIGNALS_TO_HANDLE", TORCHRUN_SIGNALS)
    try:
        # The lease's open file is the job's stdin: every process under it holds the GPU lock.
        child = subprocess.Popen(cmd, env=env, stdin=lease.file if lease else None)
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            signal.signal(sig, lambda s, f: child.send_signal(s))
        code = wait(child, limit)
    finally:
        if lease:
            lease.release()
    if code != 0 and limit is not None and limit.passed():
        log(f"stopped before the Slurm time limit (exit {code}); the next attempt resumes from the checkpoint")
        return STOPPED_EXIT_CODE
    return code if code >= 0 else 128 - code


def wait(child: subprocess.Popen, limit: TimeLimit | None) -> int:
    while True:
        try:
            return child.wait(timeout=limit.poll if limit else None)
        except subprocess.TimeoutExpired:
            limit.check(child)


if __name__ == "__main__":
    sys.exit(main())
