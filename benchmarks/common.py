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
from svitt.io import atomic_write_json


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) to the current RSS; False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes(reset: bool) -> int:
    """Peak RSS since the reset (VmHWM), else over the process's life (ru_maxrss)."""
    if reset:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def allocated_peak_bytes(step) -> int:
    """Peak of the bytes held by PyTorch's CPU allocator during one call of `step`, over what was
    held before it (the profiler's running 'Total Allocated' of its memory events): exact, and
    independent of how malloc returns freed memory to the system, unlike RSS."""
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = json.loads(path.read_text())["traceEvents"]
    totals = [
        e["args"]["Total Allocated"]
        for e in events
        if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type") == 0
    ]
    return max([0, *totals])


def measure(step, device: str, repeats: int) -> dict:
    """Run `step` once to warm up, then `repeats` times: fastest seconds, all seconds, and the peak
    memory of the timed steps (CUDA: max_memory_allocated over what was allocated before; CPU: the
    peak RSS of the timed steps over the RSS before them, the peak counter reset after the warm-up
    where Linux allows it; run one measurement per process)."""
    step()
    cuda = device == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_bytes()
        reset = _reset_peak_rss()
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if cuda else _peak_rss_bytes(reset)
    result = {"seconds": min(times), "seconds_all": times, "peak_bytes": max(peak - base, 0)}
    if not cuda:  # after the timed steps, so the profiler does not disturb them
        result["allocated_peak_bytes"] = allocated_peak_bytes(step)
    return result


def run_worker(script: str, worker_args: list[str], extra: list[str], labels: dict) -> dict:
    """`python script --worker ARGS... EXTRA...` in a fresh process; its last stdout line is JSON."""
    result = subprocess.run([sys.executable, script, "--worker", *worker_args, *extra], capture_output=True, text=True)
    if result.returncode:
        run = {**labels, "error": result.stderr.strip()[-1500:]}
    else:
        run = {**labels, **json.loads(result.stdout.strip().splitlines()[-1])}
    print(json.dumps(run)[:200], flush=True)
    return run


def write_report(path: Path, report: dict):
    atomic_write_json(path, report)
    print(json.dumps(report.get("targets", {}), indent=2))
