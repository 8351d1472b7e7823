"""GPU leases for jobs that share one machine: one kernel lock per GPU, held by the job's processes.

Snakemake counts `gpu` resources but assigns no device ids, so two `gpu=1` jobs running at once
would both use GPU 0. A job locks distinct GPUs in one pool file shared by every checkout and user
on the machine (`SVITT_GPU_POOL`, default /var/tmp/svitt-gpu-pool/gpus.lock): GPU `i` is byte `i`
of the file, locked with an open-file-description lock (Linux F_OFD_SETLK). Such a lock belongs to
the open file, not to a process: the launcher hands the open file to the job as its stdin, so every
process started under it holds the lock too (torchrun's workers as well: they keep only fds 0-2),
and the kernel drops it when the last of them exits, however it ends (kill -9 included). There is
nothing to reclaim and no PID to trust.

Under Slurm (SLURM_JOB_ID set) Slurm's CUDA_VISIBLE_DEVICES is the assignment and no pool is used.
Elsewhere a CUDA_VISIBLE_DEVICES set in the shell only narrows the pool: the job leases entries of
it (the entries themselves are the lock keys, so another checkout with another mask still sees the
same GPU locked).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable

POOL_ENV = "SVITT_GPU_POOL"
DEFAULT_POOL = Path("/var/tmp/svitt-gpu-pool")  # not per checkout, not per user: per machine
_MUTEX = 2**62  # a byte far past every GPU's: held for the moment of one acquisition attempt


def physical_gpu_count(env=None) -> int:
    """GPUs on this machine: SVITT_NUM_GPUS if set (tests, or to hide GPUs), else `nvidia-smi -L`, else 0."""
    env = os.environ if env is None else env
    if env.get("SVITT_NUM_GPUS"):
        return int(env["SVITT_NUM_GPUS"])
    if shutil.which("nvidia-smi") is None:
        return 0
    result = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
    return sum(line.startswith("GPU ") for line in result.stdout.splitlines()) if result.returncode == 0 else 0


def gpu_ids(env=None) -> list[str]:
    """The GPUs jobs started from this environment may use: the entries of CUDA_VISIBLE_DEVICES
    when it is set (an empty value hides every GPU), else "0".."N-1"."""
    env = os.environ if env is None else env
    if "CUDA_VISIBLE_DEVICES" in env:
        return [d.strip() for d in env["CUDA_VISIBLE_DEVICES"].split(",") if d.strip()]
    return [str(i) for i in range(physical_gpu_count(env))]


def job_gpu_count(env=None) -> int:
    """GPUs a job started from this environment may use: inside a Slurm job only those Slurm
    assigned (none without CUDA_VISIBLE_DEVICES), elsewhere gpu_ids()."""
    env = os.environ if env is None else env
    if "SLURM_JOB_ID" in env and "CUDA_VISIBLE_DEVICES" not in env:
        return 0
    return len(gpu_ids(env))


def auto_gpus(env=None) -> int:
    """`gpus: auto`: one GPU per job where there is one, else the CPU."""
    return 1 if job_gpu_count(env) else 0


def default_pool(env=None) -> Path:
    env = os.environ if env is None else env
    return Path(env.get(POOL_ENV) or DEFAULT_POOL)


def _offset(gpu: str) -> int:
    """Byte of the pool file that stands for one GPU: its index, or a hash of a UUID-style id."""
    if gpu.isdigit():
        return int(gpu)
    return 2**40 + int.from_bytes(hashlib.sha256(gpu.encode()).digest()[:5], "big")


def _lock(fd: int, offset: int, kind: int, wait: bool = False) -> bool:
    """Lock (F_WRLCK) or unlock (F_UNLCK) one byte; False when another open file holds it."""
    request = struct.pack("hhqqi4x", kind, os.SEEK_SET, offset, 1, 0)  # struct flock, l_pid 0
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLKW if wait else fcntl.F_OFD_SETLK, request)
    except (BlockingIOError, PermissionError):  # EAGAIN / EACCES: held elsewhere
        return False
    return True


def _open_pool(pool: Path) -> IO[bytes]:
    """The pool's lock file, created open to every user (sticky folder, like /tmp)."""
    try:
        if not pool.is_dir():
            pool.mkdir(parents=True, exist_ok=True)
            os.chmod(pool, 0o1777)
        path = pool / "gpus.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as err:
        raise OSError(
            f"cannot open the GPU pool {pool}/gpus.lock ({err.strerror}); set {POOL_ENV} "
            f"to a folder on a local disk that every job on this machine can write"
        ) from err
    if os.fstat(fd).st_uid == os.getuid():
        os.fchmod(fd, 0o666)  # whatever the umask: other users' jobs must lock it too
    os.utime(fd)  # keep it young for tmpfiles cleaners
    return os.fdopen(fd, "r+b", buffering=0)


@dataclass
class Lease:
    """GPUs held by `file` (give it to the job as stdin); closing every copy releases them."""

    ids: list[str]
    file: IO[bytes]
    pool: Path

    def release(self):
        self.file.close()


def _holder_path(pool: Path, gpu: str) -> Path:
    return pool / f"holder-{gpu.replace('/', '_')}.json"


def _describe_holder(pool: Path, gpu: str) -> str:
    """Who holds a GPU, as its holder wrote it (informative only: the lock is the truth)."""
    try:
        info = json.loads(_holder_path(pool, gpu).read_text())
        return f"{gpu} (pid {info['pid']}, since {info['since']}, {info['cwd']}: {info['command']})"
    except (OSError, ValueError, KeyError):
        return f"{gpu} (holder unknown)"


def _record_holder(pool: Path, gpus: list[str], command: str):
    info = {"pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S"), "cwd": os.getcwd(), "command": command}
    for gpu in gpus:
        path = _holder_path(pool, gpu)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        try:
            tmp.write_text(json.dumps(info))
            os.replace(tmp, path)
        except OSError:  # another user's record in a sticky folder: the lock still holds
            tmp.unlink(missing_ok=True)


def _try_take(fd: int, candidates: list[str], count: int) -> list[str] | None:
    """Lock `count` free GPUs of `candidates` all at once, or none."""
    _lock(fd, _MUTEX, fcntl.F_WRLCK, wait=True)
    try:
        taken = []
        for gpu in candidates:
            if _lock(fd, _offset(gpu), fcntl.F_WRLCK):
                taken.append(gpu)
                if len(taken) == count:
                    return taken
        for gpu in taken:
            _lock(fd, _offset(gpu), fcntl.F_UNLCK)
        return None
    finally:
        _lock(fd, _MUTEX, fcntl.F_UNLCK)


def _busy(fd: int, candidates: list[str]) -> list[str]:
    """GPUs of `candidates` another open file holds (probed under the mutex, released at once)."""
    busy = []
    for gpu in candidates:
        if _lock(fd, _offset(gpu), fcntl.F_WRLCK):
            _lock(fd, _offset(gpu), fcntl.F_UNLCK)
        else:
            busy.append(gpu)
    return busy


class _WouldWait(Exception):
    pass


def would_wait(ids: list[str], pool: str | Path | None = None) -> bool:
    """Whether a lease of exactly `ids` would have to wait now (a probe: it takes and frees them
    at once when they are free)."""

    def give_up(_):
        raise _WouldWait

    try:
        acquire(len(ids), ids, pool, sleep=give_up, log=lambda m: None).release()
    except _WouldWait:
        return True
    return False


def acquire(
    count: int,
    candidates: list[str],
    pool: str | Path | None = None,
    command: str = "",
    poll: float = 5.0,
    report_every: float = 300.0,
    log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True),
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> Lease:
    """Lock `count` distinct GPUs of `candidates`, waiting (without a deadline) while they are busy;
    says which GPUs it waits for, and who holds them, every `report_every` seconds."""
    if count < 1:
        raise ValueError(f"a lease needs at least 1 GPU, got {count}")
    if count > len(candidates):
        raise ValueError(
            f"a job asks for {count} GPUs but only {len(candidates)} are visible "
            f"({', '.join(candidates) or 'none'}); lower the job's gpus or the visible set"
        )
    pool = Path(pool) if pool is not None else default_pool()
    file = _open_pool(pool)
    fd = file.fileno()
    start = clock()
    next_report, waited = start, False
    while True:
        taken = _try_take(fd, candidates, count)
        if taken is not None:
            if waited:
                log(f"launch: got GPU(s) {','.join(taken)} after {(clock() - start) / 60:.1f} min")
            _record_holder(pool, taken, command)
            return Lease(taken, file, pool)
        if clock() >= next_report:
            busy = _busy(fd, candidates)
            log(
                f"launch: waiting for {count} free GPU(s) of {','.join(candidates)} "
                f"(pool {pool}/gpus.lock; no deadline; waited {(clock() - start) / 60:.1f} min); "
                f"busy: {'; '.join(_describe_holder(pool, g) for g in busy) or 'none (just freed)'}"
            )
            next_report += report_every
        waited = True
        sleep(poll)
