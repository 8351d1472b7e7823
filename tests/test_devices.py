"""GPU leases with real processes: concurrent jobs get disjoint GPUs, whatever the shell's
CUDA_VISIBLE_DEVICES and whichever checkout they start from; a lease lives exactly as long as the
job's processes; a waiter waits as long as it takes. No GPU needed: SVITT_NUM_GPUS fakes the count
(ids are just ids), and the lock is the real kernel lock."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from svitt.training.devices import DEFAULT_POOL, acquire, auto_gpus, gpu_ids, would_wait
from tests.helpers.workflow import copy_workflow

ROOT = Path(__file__).resolve().parents[1]
# The job: records the devices it was given and when it ran, holds them until `release` appears.
JOB = """
import json, os, sys, time
out, release = sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None
start = time.time()
open(out + ".started", "w").close()
while release and not os.path.exists(release):
    time.sleep(0.02)
time.sleep(0.3 if not release else 0)
json.dump({"cvd": os.environ.get("CUDA_VISIBLE_DEVICES"), "start": start, "end": time.time(),
           "stdin_is_lock": os.path.realpath(f"/proc/self/fd/0").endswith("gpus.lock")}, open(out, "w"))
"""


@pytest.fixture
def job(tmp_path):
    path = tmp_path / "job.py"
    path.write_text(JOB)
    return path


def environment(**extra) -> dict:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("CUDA_VISIBLE_DEVICES", "SVITT_GPU_POOL") and not k.startswith("SLURM_")
    }
    return {**env, **{k: v for k, v in extra.items() if v is not None}}


def launch(job, out, gpus, env, pool=None, release=None, repo=ROOT, poll=0.05):
    pool_args = ["--pool", str(pool)] if pool else []
    args = [
        sys.executable,
        str(repo / "workflow_scripts/launch.py"),
        "--gpus",
        str(gpus),
        "--poll",
        str(poll),
        *pool_args,
        "--",
        str(job),
        str(out),
    ] + ([str(release)] if release else [])
    return subprocess.Popen(args, env=env, cwd=repo, stderr=subprocess.PIPE, text=True)


def wait_for(path: Path, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear within {timeout} s"
        time.sleep(0.02)


def result(out: Path) -> dict:
    return json.loads(out.read_text())


def busy(pool, gpus) -> bool:
    """Whether a new lease of `gpus` would have to wait."""
    return would_wait(gpus, pool)


def overlap(a: dict, b: dict) -> bool:
    return a["start"] < b["end"] and b["start"] < a["end"]


# ------------------------------------------------------------------------------------- leases


def test_concurrent_single_gpu_jobs_get_distinct_devices(tmp_path, job):
    env = environment(SVITT_NUM_GPUS="4")
    procs = [launch(job, tmp_path / f"job{i}.json", 1, env, tmp_path / "pool") for i in range(4)]
    assert [p.wait() for p in procs] == [0, 0, 0, 0]
    runs = [result(tmp_path / f"job{i}.json") for i in range(4)]
    assert sorted(r["cvd"] for r in runs) == ["0", "1", "2", "3"]
    assert all(r["stdin_is_lock"] for r in runs)  # the job holds the lock itself
    assert not busy(tmp_path / "pool", ["0", "1", "2", "3"])  # all released


def test_multi_gpu_leases_are_disjoint_and_all_or_nothing(tmp_path):
    a = acquire(2, ["0", "1", "2", "3"], tmp_path)
    b = acquire(2, ["0", "1", "2", "3"], tmp_path)
    assert len(set(a.ids)) == len(set(b.ids)) == 2 and not set(a.ids) & set(b.ids)
    a.release()
    assert busy(tmp_path, ["0", "1", "2"]) and not busy(tmp_path, a.ids)  # nothing half-taken
    b.release()


def test_a_cuda_visible_devices_in_the_shell_narrows_the_pool_and_does_not_bypass_it(tmp_path, job):
    """Two gpu=1 jobs from a shell with CUDA_VISIBLE_DEVICES=0,1 used to both get "0,1"."""
    env = environment(SVITT_NUM_GPUS="8", CUDA_VISIBLE_DEVICES="0,1")
    release = tmp_path / "release"
    procs = [launch(job, tmp_path / f"job{i}.json", 1, env, tmp_path / "pool", release) for i in range(2)]
    for i in range(2):
        wait_for(tmp_path / f"job{i}.json.started")
    release.touch()
    assert [p.wait() for p in procs] == [0, 0]
    assert sorted(result(tmp_path / f"job{i}.json")["cvd"] for i in range(2)) == ["0", "1"]
    # The entries are the keys: a shell showing GPUs 5 and 1 gets those, not indices 0 and 1.
    env = environment(SVITT_NUM_GPUS="8", CUDA_VISIBLE_DEVICES="5,1")
    procs = [launch(job, tmp_path / f"masked{i}.json", 1, env, tmp_path / "pool") for i in range(2)]
    assert [p.wait() for p in procs] == [0, 0]
    assert sorted(result(tmp_path / f"masked{i}.json")["cvd"] for i in range(2)) == ["1", "5"]


def test_slurms_assignment_is_kept_and_cpu_jobs_see_no_gpu(tmp_path, job):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "squeue").write_text("#!/bin/sh\necho UNLIMITED\n")  # the job's time left
    (fake / "squeue").chmod(0o755)
    env = environment(CUDA_VISIBLE_DEVICES="5,7", SLURM_JOB_ID="42", PATH=f"{fake}:{os.environ['PATH']}")
    holder = acquire(1, ["5"], tmp_path / "pool")  # the pool is not asked: this would make it wait
    proc = launch(job, tmp_path / "slurm.json", 1, env, tmp_path / "pool")
    assert proc.wait() == 0, proc.stderr.read()
    assert result(tmp_path / "slurm.json")["cvd"] == "5,7"
    holder.release()
    proc = launch(job, tmp_path / "cpu.json", 0, env, tmp_path / "pool")
    assert proc.wait() == 0
    assert result(tmp_path / "cpu.json")["cvd"] == ""


def test_two_checkouts_share_the_machines_pool(tmp_path, job):
    """Each checkout used to keep its own pool (.snakemake/gpu_slots): both took GPU 0. Now the
    default pool is the machine's, whichever folder a job starts from."""
    checkouts = [copy_workflow(tmp_path / name) for name in ("first", "second")]
    env = environment(SVITT_NUM_GPUS="1")
    release = tmp_path / "release"
    first = launch(job, tmp_path / "first.json", 1, env, release=release, repo=checkouts[0])
    wait_for(tmp_path / "first.json.started")
    second = launch(job, tmp_path / "second.json", 1, env, repo=checkouts[1])
    time.sleep(1.0)
    assert not (tmp_path / "second.json.started").exists()  # waiting for GPU 0
    release.touch()
    assert [first.wait(timeout=60), second.wait(timeout=60)] == [0, 0]
    a, b = result(tmp_path / "first.json"), result(tmp_path / "second.json")
    assert a["cvd"] == b["cvd"] == "0" and not overlap(a, b)
    waiting = second.stderr.read()
    assert f"waiting for 1 free GPU(s) of 0 (pool {DEFAULT_POOL}/gpus.lock; no deadline" in waiting, waiting
    assert f"{checkouts[0]}" in waiting  # who holds it: the first checkout's job


# ----------------------------------------------------------------------- the lease's lifetime


def test_kill_9_of_the_launcher_keeps_the_gpu_until_its_job_exits(tmp_path, job):
    env = environment(SVITT_NUM_GPUS="1")
    pool, release = tmp_path / "pool", tmp_path / "release"
    launcher = launch(job, tmp_path / "job.json", 1, env, pool, release)
    wait_for(tmp_path / "job.json.started")
    launcher.send_signal(signal.SIGKILL)
    launcher.wait()
    assert busy(pool, ["0"])  # the orphaned job still holds GPU 0
    release.touch()
    wait_for(tmp_path / "job.json")
    time.sleep(0.2)  # the job's exit, just after it wrote its record
    assert not busy(pool, ["0"])


def test_torchruns_orphaned_workers_keep_their_gpus(tmp_path):
    """kill -9 of the launcher *and* torchrun's agent (a killed process group): the workers,
    in sessions of their own, run on, and so do their leases (they hold the lock as stdin)."""
    worker = tmp_path / "worker.py"
    worker.write_text(
        "import os, sys, time\n"
        "open(f\"{sys.argv[1]}.{os.environ['RANK']}\", 'w').close()\n"
        "while not os.path.exists(sys.argv[2]):\n    time.sleep(0.05)\n"
    )
    env = environment(SVITT_NUM_GPUS="2", OMP_NUM_THREADS="1")
    pool, release, started = tmp_path / "pool", tmp_path / "release", tmp_path / "started"
    launcher = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "workflow_scripts/launch.py"),
            "--gpus",
            "2",
            "--pool",
            str(pool),
            "--",
            str(worker),
            str(started),
            str(release),
        ],
        env=env,
        start_new_session=True,
    )
    for rank in (0, 1):
        wait_for(Path(f"{started}.{rank}"), timeout=120)
    os.killpg(launcher.pid, signal.SIGKILL)  # the launcher and torchrun's agent, not the workers
    launcher.wait()
    assert busy(pool, ["0"]) and busy(pool, ["1"])
    release.touch()
    deadline = time.monotonic() + 30
    while busy(pool, ["0"]) or busy(pool, ["1"]):
        assert time.monotonic() < deadline, "the workers' exit did not free their GPUs"
        time.sleep(0.1)


def test_a_waiter_waits_past_the_old_600_s_deadline_and_says_so(tmp_path):
    """Acquiring used to give up after 600 s, which an evaluation queued beside a multi-day stage
    would hit. Simulated time (a clock the waiter's sleep advances): 30 minutes of waiting."""
    holder = acquire(1, ["0"], tmp_path, command="train.py stage1", log=lambda m: None)
    now = [0.0]
    messages = []

    def sleep(seconds):
        now[0] += seconds
        if now[0] >= 1800:
            holder.release()

    lease = acquire(
        1, ["0"], tmp_path, poll=60, report_every=300, log=messages.append, sleep=sleep, clock=lambda: now[0]
    )
    assert lease.ids == ["0"] and now[0] == 1800
    waiting = [m for m in messages if m.startswith("launch: waiting")]
    assert len(waiting) == 6  # at 0, 5, ..., 25 min (free again at 30)
    assert all("waiting for 1 free GPU(s) of 0" in m and "no deadline" in m for m in waiting)
    assert f"busy: 0 (pid {os.getpid()}, since " in waiting[0] and "train.py stage1" in waiting[0]
    assert "waited 25.0 min" in waiting[-1]
    assert messages[-1] == "launch: got GPU(s) 0 after 30.0 min"
    lease.release()


def test_asking_for_more_gpus_than_are_visible_is_an_error(tmp_path):
    with pytest.raises(ValueError, match=r"asks for 3 GPUs but only 2 are visible \(0, 1\)"):
        acquire(3, ["0", "1"], tmp_path)


# --------------------------------------------------------------------------------- gpus: auto


@pytest.mark.parametrize(
    "env,ids",
    [
        ({"SVITT_NUM_GPUS": "3"}, ["0", "1", "2"]),
        ({"SVITT_NUM_GPUS": "0"}, []),
        ({"SVITT_NUM_GPUS": "3", "CUDA_VISIBLE_DEVICES": "2,6"}, ["2", "6"]),
        ({"SVITT_NUM_GPUS": "3", "CUDA_VISIBLE_DEVICES": ""}, []),  # GPUs hidden on purpose
        ({"SVITT_NUM_GPUS": "3", "SLURM_JOB_ID": "5"}, None),  # a Slurm job given no GPU has none
    ],
)
def test_visible_gpus_and_auto(env, ids):
    if ids is not None:
        assert gpu_ids(env) == ids
    count = len(ids or [])
    assert auto_gpus(env) == (1 if count else 0)
    out = subprocess.run(
        [sys.executable, str(ROOT / "workflow_scripts/launch.py"), "--count-gpus"],
        env=environment(**env),
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == str(count)
