"""Shared plumbing of the benchmarks: timing, peak memory, one subprocess per measurement."""
from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from svitt.io import atomic_write_json  # noqa: E402


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def measure(step, device: str, repeats: int) -> dict:
    """Run `step` once to warm up, then `repeats` times: fastest seconds, all seconds, and the peak
    memory of the timed steps (CUDA: max_memory_allocated over what was allocated before; CPU: the
    process's peak RSS over its RSS before, so run one measurement per process)."""
    step()
    cuda = device == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_bytes()
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"seconds": min(times), "seconds_all": times, "peak_bytes": max(peak - base, 0)}


def run_worker(script: str, worker_args: list[str], extra: list[str], labels: dict) -> dict:
    """`python script --worker ARGS... EXTRA...` in a fresh process; its last stdout line is JSON."""
    result = subprocess.run([sys.executable, script, "--worker", *worker_args, *extra],
                            capture_output=True, text=True)
    if result.returncode:
        run = {**labels, "error": result.stderr.strip()[-1500:]}
    else:
        run = json.loads(result.stdout.strip().splitlines()[-1])
    print(json.dumps(run)[:200], flush=True)
    return run


def write_report(path: Path, report: dict):
    atomic_write_json(path, report)
    print(json.dumps(report.get("targets", {}), indent=2))
