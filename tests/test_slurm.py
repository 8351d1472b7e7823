"""The Slurm execution profile against a real one-node Slurm cluster (../shared/tools/local-slurm,
4 fake GPUs as GRES). A slice of the test DAG runs through `--profile profiles/slurm`: demo corpus,
downloads, frame extraction, stage1, retrieval evaluation of stage1, and stage2, whose job has its
time limit cut short mid-training (scontrol update): it saves and stops, Snakemake submits the next
job of the chain (retries), which resumes from the checkpoint. The same slice also runs locally, as
the reference the Slurm outputs are compared with. Then: plots run as local rules, and the
multi-node launch path (srun + torchrun rendezvous) trains two gloo ranks whose gradients agree.

Skipped only where the cluster cannot run: not root, no local-slurm tool, Slurm not installable.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml
from safetensors import safe_open

from tests.helpers.slurm_path import real_path
from tests.helpers.workflow import copy_workflow

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
TARGETS = ("results/pretrain/stage2/model.json", "results/eval/retrieval/demo_retrieval/stage1.json")
CONFIGS = ("--configfile", "tests/configs/test.yaml", "tests/configs/test_slurm.yaml")
# The Slurm command line is the one the README's "Running on Slurm" quotes.
SLURM_ARGS = (
    *TARGETS,
    "--profile",
    "profiles/slurm",
    "--slurm-status-command",
    "squeue",
    "--slurm-init-seconds-before-status-checks",
    "2",
    *CONFIGS,
)
# Poll a local cluster every 2 s, first after 2 s (Snakemake's 10 s and the plugin's 40 s suit a
# shared cluster; here every job would wait for them): test time only, not in the README's command.
FAST_POLL = ("--seconds-between-status-checks", "2")
FIRST_POLL = ("--slurm-init-seconds-before-status-checks", "2")  # in SLURM_ARGS already
LOCAL_ARGS = (*TARGETS, "--cores", "2", *CONFIGS)
GPU_RULES = {"pretrain", "eval_retrieval"}  # resources: gpu = pretrain.gpus / evaluation.gpus (1 here)
FAKE_GPUS = 4
STAGE2_STEPS = 100  # tests/configs/test_slurm.yaml: 32 clips / batch 8 x 25 epochs
THREADS_PER_GPU = 2  # tests/configs/test_slurm.yaml: pretrain / evaluation threads_per_gpu
RUNTIME = {"pretrain": 10}  # tests/configs/test_slurm.yaml: minutes per training job
# Budget guards (CI has 30 minutes for the whole suite): a run past these fails instead of hanging.
LOCAL_TIMEOUT_S, SLURM_TIMEOUT_S, START_TIMEOUT_S = 420, 480, 600


# ------------------------------------------------------------------------------------ cluster

# Where this workplace keeps the tool: beside the checkout, or at its fixed place for a clone made
# elsewhere (CI clones main into a folder of its own).
WORKPLACE_TOOL = Path("/work/shared/tools/local-slurm")


def local_slurm_tool() -> Path | None:
    for candidate in (
        os.environ.get("LOCAL_SLURM"),
        REPO.parent / "shared" / "tools" / "local-slurm",
        WORKPLACE_TOOL,
        shutil.which("local-slurm"),
    ):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return Path(candidate)
    return None


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:])


@pytest.fixture(scope="session")
def cluster():
    """The cluster, up for the rest of the session and stopped at its end whatever the outcome.
    (Not at this module's end: while Slurm is installed but its controller down, every Snakemake
    start waits ~9 s for the plugin's `scontrol show config`, which later tests would pay.)"""
    tool = local_slurm_tool()
    if tool is None:
        pytest.skip(
            "no local-slurm tool ($LOCAL_SLURM, ../shared/tools/local-slurm, /work/shared/tools/local-slurm or on PATH)"
        )
    if os.geteuid() != 0:
        pytest.skip("local-slurm installs and starts Slurm daemons: it must run as root")
    try:
        # The node's CPUs are the tool's `nproc`, which obeys OMP_NUM_THREADS / OMP_THREAD_LIMIT: with
        # the tests' OMP_NUM_THREADS=1 the node would have 1 CPU and no 2-CPU job would ever start.
        tool_env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_THREAD_LIMIT")}
        tool_env["PATH"] = real_path(tool_env.get("PATH", ""))
        start = subprocess.run(
            [str(tool), "start", str(FAKE_GPUS)], capture_output=True, text=True, timeout=START_TIMEOUT_S, env=tool_env
        )
        if start.returncode != 0:
            output = _tail(start.stdout + start.stderr)
            if shutil.which("sbatch") is None:
                pytest.skip(f"Slurm is not installed and could not be (no package access?):\n{output}")
            pytest.fail(f"local-slurm start failed:\n{output}")
        yield tool
    finally:
        subprocess.run(
            [str(tool), "stop"],
            capture_output=True,
            timeout=120,
            env={**os.environ, "PATH": real_path(os.environ["PATH"])},
        )


@pytest.fixture(scope="module", autouse=True)
def _real_slurm_commands():
    """This module talks to the cluster: the real scontrol on PATH, not the session's stub."""
    saved = os.environ["PATH"]
    os.environ["PATH"] = real_path(saved)
    yield
    os.environ["PATH"] = saved


# --------------------------------------------------------------------------------------- runs


def snakemake_command(args) -> list[str]:
    exe = Path(sys.executable).with_name("snakemake")
    return [str(exe), *args] if exe.exists() else [sys.executable, "-m", "snakemake", *args]


def job_environment(**extra) -> dict:
    """The venv's bin first on PATH: rules call `python`, and Slurm jobs inherit the submitting
    environment (sbatch --export=ALL). No device assignment of our own: Slurm gives it."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k != "CUDA_VISIBLE_DEVICES" and not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))
    }
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{real_path(env.get('PATH', ''))}"
    env["SVITT_SLURM_POLL"] = "1"  # launch.py: re-read the job's time limit every second (default 60)
    return {**env, **extra}


@dataclass
class Job:
    """One job as the submitting Snakemake printed it (and, under Slurm, as Slurm records it)."""

    rule: str
    wildcards: str
    threads: int
    resources: dict
    log: str
    slurm_id: str | None = None
    slurm_log: str | None = None
    slurm: dict | None = None

    @property
    def key(self) -> str:
        return f"{self.rule}[{self.wildcards}]"


def parse_jobs(output: str) -> list[Job]:
    """Job blocks ("rule X:" / "localrule X:" and their fields) and the submission lines."""
    jobs, by_id, current = [], {}, None
    for line in output.splitlines():
        start = re.fullmatch(r"(?:local)?rule (\w+):", line)
        if start:
            current = {"rule": start.group(1)}
            continue
        field = re.fullmatch(r"    (\w+): (.*)", line)
        if current is not None and field:
            current[field.group(1)] = field.group(2)
            continue
        if current is not None:
            resources = dict(item.split("=", 1) for item in current.get("resources", "").split(", ") if item)
            job = Job(
                current["rule"],
                current.get("wildcards", ""),
                int(current.get("threads", 1)),
                resources,
                current.get("log", ""),
            )
            jobs.append(job)
            by_id[current["jobid"]] = job
            current = None
        sub = re.match(r"Job (\d+) has been submitted with SLURM jobid (\d+) \(log: (.+)\)\.$", line)
        if sub:
            by_id[sub.group(1)].slurm_id, by_id[sub.group(1)].slurm_log = sub.group(2), sub.group(3)
    return jobs


def scontrol(job_id: str) -> dict:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, check=True).stdout
    return dict(re.findall(r"(\S+?)=(\S*)", out))


class JobRecords(dict):
    """Slurm's record of every job, by id, kept while the run goes on: Slurm forgets finished
    jobs after MinJobAge (600 s on local-slurm), which a run on a loaded machine outlasts."""

    def __init__(self):
        super().__init__()
        self._last = 0.0

    def update_from_slurm(self, every: float = 1.0):
        if time.monotonic() - self._last < every:
            return
        self._last = time.monotonic()
        out = subprocess.run(["scontrol", "show", "job", "-o"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            record = dict(re.findall(r"(\S+?)=(\S*)", line))
            if "JobId" in record:
                self[record["JobId"]] = record


def squeue_field(job_id: str, field: str) -> str:
    return subprocess.run(["squeue", "-h", "-j", job_id, "-o", field], capture_output=True, text=True).stdout.strip()


def running_job(comment: str, timeout: float = 30) -> str:
    """Slurm id of the running job whose comment (set by the executor plugin) is `comment`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = subprocess.run(["squeue", "-h", "-o", "%i|%k|%T"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            job_id, job_comment, state = line.split("|")
            if job_comment.strip() == comment and state == "RUNNING":
                return job_id
        time.sleep(0.2)
    raise AssertionError(f"no running Slurm job with comment {comment!r}")


@dataclass
class Run:
    returncode: int
    output: str
    seconds: float
    records: dict = field(default_factory=dict)  # Slurm's record of each job, by Slurm id

    @property
    def jobs(self) -> list[Job]:
        return parse_jobs(self.output)


def run_snakemake(args, cwd: Path, env: dict, timeout: float) -> Run:
    start = time.monotonic()
    try:
        done = subprocess.run(
            snakemake_command(args), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"snakemake {' '.join(args)} ran past its budget of {timeout} s")
    return Run(done.returncode, done.stdout + done.stderr, time.monotonic() - start)


def shorten_time_limit(job_id: str) -> int:
    """Cut a running job's time limit to 1-2 minutes from now (minutes are Slurm's unit), as a
    user fitting a job in before a maintenance would; returns the new limit in minutes."""
    elapsed = launch_module().parse_slurm_duration(squeue_field(job_id, "%M"))
    minutes = (elapsed + 30) // 60 + 1  # at least 30 s to go: the stop comes before Slurm's kill
    subprocess.run(["scontrol", "update", f"JobId={job_id}", f"TimeLimit={minutes}"], check=True)
    return minutes


def run_with_a_time_limited_stage2(cwd: Path, env: dict) -> tuple[Run, dict]:
    """The Slurm run; once stage2's first job has saved a checkpoint, its time limit is cut short.
    Returns the run and what the stop left behind, seen before the next job starts."""
    log = cwd / "slurm-run.txt"
    start = time.monotonic()
    records = JobRecords()

    def running(what: str):
        records.update_from_slurm()
        if proc.poll() is not None:
            pytest.fail(f"the Slurm run ended before {what}:\n{_tail(log.read_text())}")
        if time.monotonic() - start > SLURM_TIMEOUT_S:
            pytest.fail(f"the Slurm run ran past its budget of {SLURM_TIMEOUT_S} s before {what}")
        time.sleep(0.1)

    with open(log, "w") as out:
        proc = subprocess.Popen(
            snakemake_command((*SLURM_ARGS, *FAST_POLL)), cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT
        )
        try:
            stage2 = cwd / "results/pretrain/stage2"
            while not (stage2 / "checkpoint.pt").exists():
                running("stage2 saved a checkpoint")
            job_id = running_job("rule_pretrain_wildcards_stage2")
            minutes = shorten_time_limit(job_id)
            while scontrol(job_id)["JobState"] in ("RUNNING", "COMPLETING"):
                running("stage2's first job stopped")
            stopped = {
                "job": job_id,
                "minutes": minutes,
                "files": sorted(p.name for p in stage2.iterdir()),
                "step": torch.load(stage2 / "checkpoint.pt", weights_only=True)["step"],
                "log": (cwd / "logs/pretrain/stage2.log").read_text(),
            }
            while proc.poll() is None:
                records.update_from_slurm()
                assert time.monotonic() - start < SLURM_TIMEOUT_S, f"the Slurm run ran past {SLURM_TIMEOUT_S} s"
                time.sleep(0.2)
            records.update_from_slurm(every=0)
        finally:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=60)
    return Run(proc.returncode, log.read_text(), time.monotonic() - start, records), stopped


@pytest.fixture(scope="module")
def runs(cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("slurm")
    local, work = copy_workflow(root / "local"), copy_workflow(root / "slurm")
    # The local reference: same config, GPU ids leased from a pool of fake GPUs (torch finds no CUDA).
    local_env = job_environment(SVITT_NUM_GPUS=str(FAKE_GPUS), SVITT_GPU_POOL=str(root / "gpu-pool"))
    reference = run_snakemake(LOCAL_ARGS, local, local_env, LOCAL_TIMEOUT_S)
    assert reference.returncode == 0, _tail(reference.output)
    slurm, stopped = run_with_a_time_limited_stage2(work, job_environment())
    print(f"\nlocal run {reference.seconds:.0f} s; Slurm run with a time-limited stage2 {slurm.seconds:.0f} s")
    return {"local": local, "work": work, "reference": reference, "slurm": slurm, "stopped": stopped}


def launch_module():
    spec = importlib.util.spec_from_file_location("launch", REPO / "workflow_scripts/launch.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def slurm_jobs(run: Run) -> list[Job]:
    jobs = run.jobs
    for job in jobs:
        job.slurm = run.records.get(job.slurm_id)
    return jobs


# -------------------------------------------------------------------------------------- tests


def test_every_job_ran_as_a_slurm_job(runs):
    slurm = runs["slurm"]
    jobs = slurm_jobs(slurm)
    assert slurm.returncode == 0, _tail(slurm.output)
    for job in jobs:
        assert job.slurm_id, f"{job.key} was not submitted to Slurm"
        # Its Slurm log, named by the job id, is the one Slurm wrote, in the profile's log folder.
        log = Path(job.slurm_log)
        assert log.name == f"{job.slurm_id}.log" and log.is_file(), job.key
        assert log.is_relative_to(runs["work"] / "logs/slurm"), log
        assert job.slurm["StdOut"] == str(log) and job.slurm["WorkDir"] == str(runs["work"])
        assert f"rule {job.rule}:" in log.read_text()
    finished = [j for j in jobs if j.slurm["JobState"] == "COMPLETED"]
    for job in finished:
        assert job.slurm["ExitCode"] == "0:0", job.key
        assert f"(Rule: {job.rule})" in Path(job.slurm_log).read_text()
    # The jobs Slurm completed are exactly those the local run executed, each once; the others are
    # stage2's jobs that stopped for their time limit: the one the test cut short, and more where
    # the machine is slow enough for stage2 to outlast a whole 10-minute job too.
    assert sorted(j.key for j in finished) == sorted(j.key for j in runs["reference"].jobs)
    stopped = [j for j in jobs if j not in finished]
    assert {j.key for j in stopped} == {"pretrain[stage=stage2]"} and stopped[0].slurm_id == runs["stopped"]["job"]
    assert "localrule" not in slurm.output


def _slurm_time(minutes: int) -> str:
    days, rest = divmod(minutes, 24 * 60)
    clock = f"{rest // 60:02d}:{rest % 60:02d}:00"
    return f"{days}-{clock}" if days else clock


def test_jobs_request_what_their_rules_declare(runs):
    """GPU rules ask Slurm for their GPU (--gpus), CPU rules for none; CPUs are threads_per_gpu
    per GPU; memory and time limits are the rules' mem_mb and runtime; one task per job."""
    jobs = slurm_jobs(runs["slurm"])
    assert {j.rule for j in jobs} >= GPU_RULES | {"demo_corpus", "download", "extract_frames"}
    for job in jobs:
        gpus = int(job.resources["gpu"])
        assert gpus == (1 if job.rule in GPU_RULES else 0), job.key
        requested = job.slurm.get("TresPerJob", "")
        assert (requested == f"gres:gpu:{gpus}") if gpus else ("gpu" not in requested), (job.key, requested)
        assert job.slurm["CPUs/Task"] == str(job.threads), job.key
        if job.rule in GPU_RULES:
            assert job.threads == gpus * THREADS_PER_GPU, job.key
        assert job.slurm["MinMemoryNode"] == f"{job.resources['mem_mb']}M", job.key
        if job.rule in RUNTIME:
            assert int(job.resources["runtime"]) == RUNTIME[job.rule], job.key
        limit = runs["stopped"]["minutes"] if job.slurm_id == runs["stopped"]["job"] else int(job.resources["runtime"])
        assert job.slurm["TimeLimit"] == _slurm_time(limit), job.key
        assert job.slurm["NumTasks"] == "1", job.key


def test_gpu_jobs_saw_the_gpu_slurm_gave_them(runs):
    work = runs["work"]
    gpu_jobs = [j for j in slurm_jobs(runs["slurm"]) if j.rule in GPU_RULES and j.slurm["JobState"] == "COMPLETED"]
    assert {j.rule for j in gpu_jobs} == GPU_RULES
    for job in gpu_jobs:
        launches = re.findall(r"^launch: CUDA_VISIBLE_DEVICES=(.*)$", (work / job.log).read_text(), re.M)
        assert len(launches) == 1, (job.key, launches)  # launched once, not once per GPU
        assert re.fullmatch(rf"'[0-{FAKE_GPUS - 1}]'", launches[0]), (job.key, launches)


def test_a_job_that_hits_its_time_limit_saves_and_stops_mid_training(runs):
    slurm, stopped = runs["slurm"], runs["stopped"]
    record = slurm.records[stopped["job"]]
    assert record["JobState"] == "FAILED"  # exit 75: the job did not finish, and said so
    assert f"launch: the Slurm time limit of job {stopped['job']} was shortened" in stopped["log"]
    assert "launch: stopped before the Slurm time limit (exit 75)" in stopped["log"]
    assert f"stage stage2 stopped (signal or time limit) at step {stopped['step']};" in stopped["log"]
    assert "model.safetensors" not in stopped["files"] and "model.json" not in stopped["files"], stopped["files"]
    assert 0 < stopped["step"] < STAGE2_STEPS  # mid-training, after a checkpoint
    first_log = Path(next(j.slurm_log for j in slurm.jobs if j.slurm_id == stopped["job"])).read_text()
    assert "returned non-zero exit status 75" in first_log


def test_snakemake_submits_the_next_job_which_resumes_from_the_checkpoint(runs):
    slurm, step = runs["slurm"], runs["stopped"]["step"]
    stage2 = [j for j in slurm_jobs(slurm) if j.key == "pretrain[stage=stage2]"]
    states = [j.slurm["JobState"] for j in stage2]
    assert len(stage2) >= 2 and states == ["FAILED"] * (len(stage2) - 1) + ["COMPLETED"], states  # a chain
    assert slurm.output.count("Trying to restart job") == len(stage2) - 1
    log = (runs["work"] / "logs/pretrain/stage2.log").read_text()  # the last job's
    resumed = re.search(rf"resumed stage2 from results/pretrain/stage2/checkpoint.pt at step (\d+)/{STAGE2_STEPS}", log)
    assert resumed, log
    if len(stage2) == 2:
        assert int(resumed.group(1)) == step
    else:  # a slow machine: stage2's second job hit its own (10-minute) limit as well
        assert step < int(resumed.group(1)) < STAGE2_STEPS


# ------------------------------------------------------------------- outputs vs the local run


def _files(root: Path) -> set[str]:
    return {
        str(p.relative_to(root)) for top in ("results", "resources") for p in (root / top).rglob("*") if p.is_file()
    }


def _text(path: Path, root: Path) -> str:
    return path.read_text().replace(str(root), "<workdir>")


def _metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# A source video's size and modification time (what a kept partial shard's item must match to be
# reused): the two runs generate their own copies of the corpus, at other times.
RUN_ATTRS = ("source_stamp",)


def _h5(path: Path, root: Path) -> dict:
    """Every group and dataset: attributes (but RUN_ATTRS) and contents (JPEG bytes), the working
    folder's path in them (a video's source file) replaced."""

    def value(v):
        if isinstance(v, bytes):
            v = v.decode(errors="surrogateescape")
        if isinstance(v, str):
            return v.replace(str(root), "<workdir>")
        if isinstance(v, np.ndarray) and v.dtype == object:
            return [value(x) for x in v]
        if isinstance(v, np.ndarray):
            return (str(v.dtype), v.shape, v.tobytes())
        return v.item() if isinstance(v, np.generic) else v

    items = {}
    with h5py.File(path, "r") as f:

        def visit(name, obj):
            entry = {"attrs": {k: value(v) for k, v in obj.attrs.items() if k not in RUN_ATTRS}}
            if isinstance(obj, h5py.Dataset):
                entry.update(shape=obj.shape, dtype=str(obj.dtype), data=value(obj[()]))
            items[name] = entry

        items["/"] = {"attrs": {k: value(v) for k, v in f.attrs.items()}}
        f.visititems(visit)
    return items


def _tensors(path: Path) -> dict:
    with safe_open(str(path), "pt") as f:
        return {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}


def _shape(obj):
    """Keys and value types of a JSON document, recursively."""
    if isinstance(obj, dict):
        return {k: _shape(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_shape(v) for v in obj]
    return "number" if isinstance(obj, (int, float)) and not isinstance(obj, bool) else type(obj).__name__


def test_outputs_are_those_of_a_local_run(runs):
    """Data files are the same (up to the working folder's path in them); trained models and
    evaluations have the same form, and the same training curves: stage1 and the stopped and
    resumed stage2 train exactly as the uninterrupted local run does."""
    local, work = runs["local"], runs["work"]
    files = _files(local)
    assert _files(work) == files
    assert not [f for f in files if re.search(r"\.tmp-\d+$", f)]  # no atomic-write temp file left
    for rel in sorted(files):
        a, b = local / rel, work / rel
        if rel.endswith(".h5"):
            assert _h5(b, work) == _h5(a, local), rel
        elif rel.endswith(".safetensors"):
            assert _tensors(b) == _tensors(a), rel
        elif rel.endswith("checkpoint.pt"):
            assert torch.load(b, weights_only=True)["step"] == torch.load(a, weights_only=True)["step"], rel
        elif rel.endswith("metrics.jsonl"):
            got, expected = _metrics(b), _metrics(a)
            assert [r["step"] for r in got] == [r["step"] for r in expected], rel
            assert [r.keys() for r in got] == [r.keys() for r in expected], rel
            for g, e in zip(got, expected):
                assert g["loss"] == pytest.approx(e["loss"], rel=1e-4), (rel, g["step"])
        elif rel.startswith("results/") and rel.endswith(".json"):
            got, expected = json.loads(b.read_text()), json.loads(a.read_text())
            assert _shape(got) == _shape(expected), rel
            if rel.endswith("model.json"):
                for key in ("steps", "frames", "edges", "sparsity", "model_config"):
                    assert got[key] == expected[key], (rel, key)
        elif a.suffix in (".csv", ".json", ".txt", ".tsv"):
            assert _text(b, work) == _text(a, local), rel
        else:
            assert b.read_bytes() == a.read_bytes(), rel
    assert len(_metrics(work / "results/pretrain/stage2/metrics.jsonl")) == STAGE2_STEPS


# ------------------------------------------------------------------------- more on the cluster


def test_plots_run_beside_snakemake_as_local_rules(runs):
    """Figures take seconds: they run on the submitting machine, not as Slurm jobs."""
    work = runs["work"]
    stages = yaml.safe_load((work / "tests/configs/test_slurm.yaml").read_text())["pretrain"]["curriculum"][:2]
    # and whatever named stage3 or egoclip names stage2 instead (the config must still parse)
    two_stages = {
        "pretrain": {"curriculum": stages, "egoclip": None},
        "analysis": {
            "control": {"temporal": "late", "stages": ["stage1", "stage2"]},
            "pruning_maps": {"stage": "stage2"},
        },
        "finetune": {"retrieval": {"stages": ["stage2"]}, "qa": {"stages": ["stage2"]}},
        "evaluation": {"nlq": {"stage": "stage2"}},
    }
    (work / "configs/two_stages.yaml").write_text(yaml.safe_dump(two_stages))
    args = (
        "results/figures/training_curves.png",
        "--profile",
        "profiles/slurm",
        "--slurm-status-command",
        "squeue",
        *FAST_POLL,
        *FIRST_POLL,
        *CONFIGS,
        "configs/two_stages.yaml",
    )
    run = run_snakemake(args, work, job_environment(), SLURM_TIMEOUT_S)
    assert run.returncode == 0, _tail(run.output)
    assert [j.key for j in run.jobs] == ["plot_training[]"]  # the trained stages stay as they are
    assert "localrule plot_training:" in run.output and "submitted with SLURM" not in run.output
    assert (work / "results/figures/training_curves.png").read_bytes()[:4] == b"\x89PNG"


def _one_process_step(tmp_path: Path) -> dict:
    out = tmp_path / "one.pt"
    subprocess.run(
        [sys.executable, str(REPO / "tests/helpers/ddp_step.py"), str(out)],
        check=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    return torch.load(out, weights_only=False)


def test_the_multi_node_launch_path_wires_ranks_and_their_gradients_agree(cluster, tmp_path):
    """launch.py --srun (what pretrain.nodes > 1 runs): srun starts one torchrun agent per node of
    the allocation (one node here), the agents meet at a c10d rendezvous on the batch node, and two
    gloo ranks train one VTC step on halves of one batch. Both ranks end with the same gradients,
    those of one process on the whole batch."""
    log, out = tmp_path / "job.log", tmp_path / "step.pt"
    script = (
        f"{sys.executable} workflow_scripts/launch.py --srun --gpus 2 --threads 2 -- "
        f"tests/helpers/ddp_step.py {out} --every-rank"
    )
    done = subprocess.run(
        [
            "sbatch",
            "--parsable",
            "--wait",
            "--nodes=1",
            "--ntasks=1",
            "--cpus-per-task=2",
            "--gres=gpu:2",
            "--mem=4000",
            "-t",
            "10",
            "-o",
            str(log),
            "-D",
            str(REPO),
            "--wrap",
            script,
        ],
        env=job_environment(OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=SLURM_TIMEOUT_S,
    )
    assert done.returncode == 0, f"{done.stderr}\n{log.read_text() if log.exists() else ''}"
    job_id = done.stdout.strip().split(";")[0]
    ranks = [torch.load(tmp_path / f"step.rank{r}.pt", weights_only=False) for r in (0, 1)]
    for r, rec in enumerate(ranks):
        assert (rec["rank"], rec["world"], rec["backend"]) == (r, 2, "gloo")
        assert rec["env"]["RANK"] == rec["env"]["LOCAL_RANK"] == str(r), rec["env"]
        assert rec["env"]["WORLD_SIZE"] == "2" and rec["env"]["GROUP_RANK"] == "0", rec["env"]  # node 0 of 1
        assert rec["env"]["TORCHELASTIC_RUN_ID"] == f"svitt-{job_id}"  # the rendezvous of this job
        assert rec["env"]["SLURM_JOB_ID"] == job_id and rec["env"]["SLURM_PROCID"] == "0"  # srun's task 0
        assert rec["env"]["CUDA_VISIBLE_DEVICES"] == "0,1"  # the node's GPUs, as Slurm gave them
    assert ranks[0]["loss"] == ranks[1]["loss"]
    one = _one_process_step(tmp_path)
    assert ranks[0]["loss"] == pytest.approx(one["loss"], rel=1e-6)
    largest = max(g.abs().max() for g in one["grads"].values() if g is not None)
    for name in one["names"]:
        a, b, ref = ranks[0]["grads"][name], ranks[1]["grads"][name], one["grads"][name]
        assert (a is None) == (b is None) and (a is None or torch.equal(a, b)), name  # DDP's all-reduce
        if ref is None or ref.abs().max() < 1e-6 * largest:  # unused by VTC, or zero in exact arithmetic
            continue
        torch.testing.assert_close(a, ref, rtol=1e-4, atol=1e-5 * ref.abs().max(), msg=name)
    assert "launch: srun --nodes=1 --ntasks=1 --ntasks-per-node=1 --cpus-per-task=2 " in log.read_text()


def test_a_multi_node_stage_is_submitted_as_one_task_per_node(cluster, tmp_path):
    """pretrain.nodes: 2 with 4 GPUs each: Slurm holds the request (this one-node cluster cannot
    run it: PartitionConfig) as 2 nodes with one task on each, every task with its node's 4 GPUs
    and threads_per_gpu x 4 CPUs; the job's shell runs once and starts the ranks with srun."""
    work = copy_workflow(tmp_path / "nodes")
    for placeholder in (
        "resources/demo/webvid_train.csv",
        "resources/demo/tokenizer/vocab.txt",
        "resources/frames/webvid/shard-000-of-002.h5",
        "resources/frames/webvid/shard-001-of-002.h5",
    ):
        (work / placeholder).parent.mkdir(parents=True, exist_ok=True)
        (work / placeholder).touch()  # stage1's inputs: stage1 is the only job
    (work / "configs/two_nodes.yaml").write_text(yaml.safe_dump({"pretrain": {"gpus": 4, "nodes": 2, "retries": 0}}))
    args = (
        "results/pretrain/stage1/model.json",
        "--profile",
        "profiles/slurm",
        "--slurm-status-command",
        "squeue",
        *FAST_POLL,
        *FIRST_POLL,
        *CONFIGS,
        "configs/two_nodes.yaml",
    )
    with open(tmp_path / "run.txt", "w") as out:
        proc = subprocess.Popen(
            snakemake_command(args), cwd=work, env=job_environment(), stdout=out, stderr=subprocess.STDOUT
        )
        try:
            deadline = time.monotonic() + SLURM_TIMEOUT_S
            while not (job_id := _job_with_comment("rule_pretrain_wildcards_stage1")):
                assert proc.poll() is None and time.monotonic() < deadline, _tail((tmp_path / "run.txt").read_text())
                time.sleep(0.2)
            record = scontrol(job_id)
            subprocess.run(["scancel", job_id], check=True)
            proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=60)
    assert record["JobState"] == "PENDING" and record["Reason"] == "PartitionConfig"
    assert (record["NumNodes"], record["NumTasks"]) == ("2-2", "2")
    assert record["CPUs/Task"] == str(4 * THREADS_PER_GPU) and record["TresPerNode"] == "gres:gpu:4"
    assert "TresPerJob" not in record  # no --gpus=N for the whole job, which Slurm may split unevenly
    output = (tmp_path / "run.txt").read_text()
    assert "launch.py --gpus 4 --threads 8 --nodes 2 --save-before 120 --" in output


def _job_with_comment(comment: str) -> str | None:
    out = subprocess.run(["squeue", "-h", "-o", "%i|%k"], capture_output=True, text=True).stdout
    return next((line.split("|")[0] for line in out.splitlines() if line.split("|")[1].strip() == comment), None)


# --------------------------------------------------------------------------- without a cluster


def test_the_profile_dry_runs_the_whole_demo_dag(tmp_path):
    """No cluster needed: the profile parses and plans every job of `all` (demo config). Last in
    the file, so that where the cluster runs it is up (see `cluster`)."""
    pytest.importorskip("snakemake_executor_plugin_slurm")
    work = copy_workflow(tmp_path / "dry")
    run = run_snakemake(("-n", "all", "--profile", "profiles/slurm"), work, job_environment(), LOCAL_TIMEOUT_S)
    assert run.returncode == 0, _tail(run.output)
    assert "This was a dry-run" in run.output
    planned = {job.rule for job in run.jobs}
    assert planned >= {
        "demo_corpus",
        "download",
        "extract_frames",
        "pretrain",
        "eval_retrieval",
        "eval_egomcq",
        "plot_training",
        "all",
    }, planned
    assert not (work / "results").exists() and not (work / "logs" / "slurm").exists()


def test_the_readme_quotes_the_command_the_test_runs():
    quoted = " ".join(["snakemake", *SLURM_ARGS])
    text = (REPO / "README.md").read_text()
    assert "Running on Slurm" in text
    assert quoted in " ".join(text.replace("\\\n", " ").split())


@pytest.mark.parametrize(
    "text,seconds",
    [
        ("0:55", 55),
        ("59:01", 3541),
        ("2:00:00", 7200),
        ("1-00:00:05", 86405),
        ("12-23:59:59", 12 * 86400 + 86399),
        ("UNLIMITED", None),
        ("NOT_SET", None),
        ("INVALID", None),
        ("", None),
    ],
)
def test_squeues_time_left_is_read_in_seconds(text, seconds):
    assert launch_module().parse_slurm_duration(text) == seconds


def test_training_saves_and_stops_before_the_time_limit_squeue_reports(pipeline, tmp_path):
    """No cluster: an `squeue` that says 10 minutes are left, and --save-before 600, so the stop
    time is the launch time. The stage saves after its first step and exits 75; run again (out of
    Slurm), it resumes there and finishes."""
    corpus, res = pipeline
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "squeue").write_text("#!/bin/sh\necho 10:00\n")
    (fake / "squeue").chmod(0o755)
    stage = {
        "name": "stage1",
        "model": {
            "video": {"preset": "tiny", "frames": 4},
            "text": {"preset": "tiny", "vocab_size": None},
            "embed_dim": 16,
        },
        "objectives": {"vtc": 1.0},
        "epochs": 2,
        "batch_size": 4,
        "lr": 1e-3,
        "log_every": 1,
        "checkpoint_every": 100,
        "data": {"twin_batches": False},
    }
    train = [
        "workflow_scripts/launch.py",
        "--gpus",
        "0",
        "--save-before",
        "600",
        "--",
        "workflow_scripts/train.py",
        "--config-json",
        json.dumps(stage),
        "--shards",
        str(res / "frames/webvid/shard-0.h5"),
        "--annotations",
        str(corpus / "webvid_train.csv"),
        "--tokenizer",
        str(corpus / "tokenizer"),
        "--out",
        str(tmp_path / "out"),
        "--no-progress",
    ]
    env = {**job_environment(SLURM_JOB_ID="7"), "PATH": f"{fake}:{real_path(os.environ['PATH'])}"}
    first = subprocess.run(
        [sys.executable, *train], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert first.returncode == 75, first.stdout
    assert "launch: Slurm job 7 ends in 600 s: training saves and stops 600 s before" in first.stdout
    assert "stage stage1 stopped (signal or time limit) at step 1;" in first.stdout
    assert not (tmp_path / "out/model.safetensors").exists()
    assert torch.load(tmp_path / "out/checkpoint.pt", weights_only=True)["step"] == 1
    second = subprocess.run(
        [sys.executable, *train],
        cwd=REPO,
        env=job_environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert second.returncode == 0, second.stdout
    assert f"resumed stage1 from {tmp_path}/out/checkpoint.pt at step 1/4" in second.stdout
    assert (tmp_path / "out/model.safetensors").exists()
