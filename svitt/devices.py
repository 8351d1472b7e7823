"""A lock-protected pool of GPU ids shared by concurrent jobs on one machine.

Snakemake counts `gpu` resources but assigns no device ids, so two `gpu=1` jobs running at once
would both use GPU 0. Each job leases distinct ids from a JSON file guarded by an flock; leases of
processes that died are reclaimed. Under Slurm (or any scheduler that already set
CUDA_VISIBLE_DEVICES) the scheduler's assignment is used as is.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path


def visible_gpu_count() -> int:
    """GPUs on this machine: SVITT_NUM_GPUS if set, else `nvidia-smi -L`, else 0."""
    if os.environ.get("SVITT_NUM_GPUS"):
        return int(os.environ["SVITT_NUM_GPUS"])
    if shutil.which("nvidia-smi") is None:
        return 0
    result = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
    return sum(line.startswith("GPU ") for line in result.stdout.splitlines()) if result.returncode == 0 else 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def _locked(pool_dir: Path):
    pool_dir.mkdir(parents=True, exist_ok=True)
    with open(pool_dir / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield pool_dir / "leases.json"
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _read(path: Path) -> dict[str, int]:
    leases = json.loads(path.read_text()) if path.exists() else {}
    return {gpu: pid for gpu, pid in leases.items() if _alive(pid)}


def _write(path: Path, leases: dict[str, int]):
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(leases, sort_keys=True))
    os.replace(tmp, path)


def acquire(pool_dir: str | Path, count: int, total: int, owner: int, timeout: float = 600.0,
            poll: float = 0.5) -> list[int]:
    """Lease `count` distinct GPU ids out of `total` for process `owner`; waits while busy."""
    if count > total:
        raise ValueError(f"a job asks for {count} GPUs but this machine has {total}")
    deadline = time.monotonic() + timeout
    while True:
        with _locked(Path(pool_dir)) as path:
            leases = _read(path)
            free = [i for i in range(total) if str(i) not in leases]
            if len(free) >= count:
                chosen = free[:count]
                leases.update({str(i): owner for i in chosen})
                _write(path, leases)
                return chosen
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {count} free GPUs among {total} after {timeout:.0f} s "
                               f"(leases in {pool_dir}/leases.json)")
        time.sleep(poll)


def release(pool_dir: str | Path, owner: int):
    with _locked(Path(pool_dir)) as path:
        _write(path, {gpu: pid for gpu, pid in _read(path).items() if pid != owner})
