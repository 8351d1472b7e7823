"""GPU slot leasing: concurrent jobs get disjoint device ids (no GPU needed: ids are just ids)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from svitt.devices import acquire, release

ROOT = Path(__file__).resolve().parents[1]
REPORT = "import json, os, sys, time; time.sleep(1.0); " \
         "open(sys.argv[1], 'w').write(json.dumps(os.environ.get('CUDA_VISIBLE_DEVICES')))"


def _launch_args(tmp_path, gpus, total, name):
    script = tmp_path / "report.py"
    script.write_text(REPORT)
    return [sys.executable, str(ROOT / "workflow_scripts/launch.py"), "--gpus", str(gpus), "--total",
            str(total), "--pool", str(tmp_path / "pool"), "--", str(script), str(tmp_path / f"{name}.json")]


def _without_cuda_env():
    return {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}


def _seen(tmp_path, name):
    return json.loads((tmp_path / f"{name}.json").read_text())


def test_concurrent_single_gpu_jobs_get_distinct_devices(tmp_path):
    procs = [subprocess.Popen(_launch_args(tmp_path, 1, 4, f"job{i}"), env=_without_cuda_env(), cwd=tmp_path)
             for i in range(4)]
    assert [p.wait() for p in procs] == [0, 0, 0, 0]
    seen = [_seen(tmp_path, f"job{i}") for i in range(4)]
    assert sorted(seen) == ["0", "1", "2", "3"]
    assert json.loads((tmp_path / "pool/leases.json").read_text()) == {}  # all released


def test_concurrent_multi_gpu_jobs_get_disjoint_sets(tmp_path):
    procs = [subprocess.Popen(_launch_args(tmp_path, 2, 4, f"job{i}"), env=_without_cuda_env(), cwd=tmp_path)
             for i in range(2)]
    assert [p.wait() for p in procs] == [0, 0]
    a, b = (set(_seen(tmp_path, f"job{i}").split(",")) for i in range(2))
    assert len(a) == len(b) == 2 and not a & b


def test_scheduler_assignment_is_kept_and_cpu_jobs_see_no_gpu(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "5,7"}
    assert subprocess.run(_launch_args(tmp_path, 2, 8, "slurm"), env=env, cwd=tmp_path).returncode == 0
    assert _seen(tmp_path, "slurm") == "5,7"
    assert subprocess.run(_launch_args(tmp_path, 0, 8, "cpu"), env=env, cwd=tmp_path).returncode == 0
    assert _seen(tmp_path, "cpu") == ""


def test_leases_of_dead_processes_are_reclaimed(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    assert acquire(tmp_path, 2, 2, owner=dead.pid) == [0, 1]
    assert acquire(tmp_path, 2, 2, owner=os.getpid(), timeout=1) == [0, 1]  # dead pid's leases freed
    with pytest.raises(TimeoutError, match="no 1 free GPUs among 2"):
        acquire(tmp_path, 1, 2, owner=os.getpid(), timeout=0.2, poll=0.05)
    release(tmp_path, os.getpid())
    assert acquire(tmp_path, 1, 2, owner=os.getpid(), timeout=1) == [0]


def test_asking_for_more_gpus_than_the_machine_has_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="asks for 3 GPUs but this machine has 2"):
        acquire(tmp_path, 3, 2, owner=os.getpid())
