"""The Slurm execution profile against a real one-node Slurm cluster (../shared/tools/local-slurm,
4 fake GPUs as GRES). A slice of the test DAG runs through `--profile profiles/slurm`: demo corpus,
downloads, frame extraction, stage1, retrieval evaluation of stage1, and stage2, which the test
cancels with `scancel` mid-training and then resumes by running the same command again. The same
slice also runs locally, as the reference the Slurm outputs are compared with.

Skipped only where the cluster cannot run: not root, no local-slurm tool, Slurm not installable.
"""
from __future__ import annotations

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
from safetensors import safe_open

from tests.helpers.workflow import copy_workflow

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
TARGETS = ("results/pretrain/stage2/model.json", "results/eval/retrieval/demo_retrieval/stage1.json")
CONFIGS = ("--configfile", "configs/test.yaml", "configs/test_slurm.yaml")
# The Slurm command line is the one the README's "Running on Slurm" quotes.
SLURM_ARGS = (*TARGETS, "--profile", "profiles/slurm", "--slurm-status-command", "squeue",
              "--slurm-init-seconds-before-status-checks", "2", *CONFIGS)
LOCAL_ARGS = (*TARGETS, "--cores", "2", *CONFIGS)
GPU_RULES = {"pretrain", "eval_retrieval"}  # resources: gpu = pretrain.gpus / evaluation.gpus (1 here)
FAKE_GPUS = 4
STAGE2_STEPS = 100  # configs/test_slurm.yaml: 32 clips / batch 8 x 25 epochs
# Budget guards (CI has 30 minutes for the whole suite): a run past these fails instead of hanging.
LOCAL_TIMEOUT_S, SLURM_TIMEOUT_S, START_TIMEOUT_S = 420, 480, 600


# ------------------------------------------------------------------------------------ cluster

# Where this workplace keeps the tool: beside the checkout, or at its fixed place for a clone made
# elsewhere (CI clones main into a folder of its own).
WORKPLACE_TOOL = Path("/work/shared/tools/local-slurm")


def local_slurm_tool() -> Path | None:
    for candidate in (os.environ.get("LOCAL_SLURM"), REPO.parent / "shared" / "tools" / "local-slurm",
                      WORKPLACE_TOOL, shutil.which("local-slurm")):
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
        pytest.skip("no local-slurm tool ($LOCAL_SLURM, ../shared/tools/local-slurm, /work/shared/tools/local-slurm or on PATH)")
    if os.geteuid() != 0:
        pytest.skip("local-slurm installs and starts Slurm daemons: it must run as root")
    try:
        start = subprocess.run([str(tool), "start", str(FAKE_GPUS)], capture_output=True, text=True,
                               timeout=START_TIMEOUT_S)
        if start.returncode != 0:
            output = _tail(start.stdout + start.stderr)
            if shutil.which("sbatch") is None:
                pytest.skip(f"Slurm is not installed and could not be (no package access?):\n{output}")
            pytest.fail(f"local-slurm start failed:\n{output}")
        yield tool
    finally:
        subprocess.run([str(tool), "stop"], capture_output=True, timeout=120)


# --------------------------------------------------------------------------------------- runs

def snakemake_command(args) -> list[str]:
    exe = Path(sys.executable).with_name("snakemake")
    return [str(exe), *args] if exe.exists() else [sys.executable, "-m", "snakemake", *args]


def job_environment(**extra) -> dict:
    """The venv's bin first on PATH: rules call `python`, and Slurm jobs inherit the submitting
    environment (sbatch --export=ALL). No device assignment of our own: Slurm gives it."""
    env = {k: v for k, v in os.environ.items()
           if k != "CUDA_VISIBLE_DEVICES" and not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
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
            job = Job(current["rule"], current.get("wildcards", ""), int(current.get("threads", 1)),
                      resources, current.get("log", ""))
            jobs.append(job)
            by_id[current["jobid"]] = job
            current = None
        sub = re.match(r"Job (\d+) has been submitted with SLURM jobid (\d+) \(log: (.+)\)\.$", line)
        if sub:
            by_id[sub.group(1)].slurm_id, by_id[sub.group(1)].slurm_log = sub.group(2), sub.group(3)
    return jobs


def scontrol(job_id: str) -> dict:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True,
                         check=True).stdout
    return dict(re.findall(r"(\S+?)=(\S*)", out))


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
        done = subprocess.run(snakemake_command(args), cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"snakemake {' '.join(args)} ran past its budget of {timeout} s")
    return Run(done.returncode, done.stdout + done.stderr, time.monotonic() - start)


def run_and_cancel_stage2(cwd: Path, env: dict) -> tuple[Run, str]:
    """The Slurm run, with stage2's job cancelled (scancel) once it has saved a checkpoint."""
    log = cwd / "first-run.txt"
    start = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen(snakemake_command(SLURM_ARGS), cwd=cwd, env=env, stdout=out,
                                stderr=subprocess.STDOUT)
        try:
            checkpoint = cwd / "results/pretrain/stage2/checkpoint.pt"
            while not checkpoint.exists():
                if proc.poll() is not None:
                    pytest.fail(f"the Slurm run ended before stage2 saved a checkpoint:\n"
                                f"{_tail(log.read_text())}")
                if time.monotonic() - start > SLURM_TIMEOUT_S:
                    pytest.fail(f"stage2 saved no checkpoint within {SLURM_TIMEOUT_S} s")
                time.sleep(0.1)
            job_id = running_job("rule_pretrain_wildcards_stage2")
            subprocess.run(["scancel", job_id], check=True)
            proc.wait(timeout=SLURM_TIMEOUT_S)
        finally:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=60)
    return Run(proc.returncode, log.read_text(), time.monotonic() - start), job_id


@pytest.fixture(scope="module")
def runs(cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("slurm")
    local, work = copy_workflow(root / "local"), copy_workflow(root / "slurm")
    # The local reference: same config; CUDA_VISIBLE_DEVICES="" is what launch.py keeps (no GPU here).
    reference = run_snakemake(LOCAL_ARGS, local, job_environment(CUDA_VISIBLE_DEVICES=""), LOCAL_TIMEOUT_S)
    assert reference.returncode == 0, _tail(reference.output)

    env = job_environment()
    first, cancelled = run_and_cancel_stage2(work, env)
    first.records = {job.slurm_id: scontrol(job.slurm_id) for job in first.jobs if job.slurm_id}
    stage2 = work / "results/pretrain/stage2"
    after_cancel = {"files": sorted(p.name for p in stage2.iterdir()),
                    "step": torch.load(stage2 / "checkpoint.pt", weights_only=True)["step"]}
    second = run_snakemake(SLURM_ARGS, work, env, SLURM_TIMEOUT_S)
    second.records = {job.slurm_id: scontrol(job.slurm_id) for job in second.jobs if job.slurm_id}
    print(f"\nlocal run {reference.seconds:.0f} s; Slurm run with scancel {first.seconds:.0f} s, "
          f"rerun {second.seconds:.0f} s")
    return {"local": local, "work": work, "reference": reference, "first": first, "second": second,
            "cancelled": cancelled, "after_cancel": after_cancel}


def slurm_jobs(run: Run) -> list[Job]:
    jobs = run.jobs
    for job in jobs:
        job.slurm = run.records.get(job.slurm_id)
    return jobs


# -------------------------------------------------------------------------------------- tests

def test_every_job_ran_as_a_slurm_job(runs):
    first, second = slurm_jobs(runs["first"]), slurm_jobs(runs["second"])
    for job in first + second:
        assert job.slurm_id, f"{job.key} was not submitted to Slurm"
        # Its Slurm log, named by the job id, is the one Slurm wrote, in the profile's log folder.
        log = Path(job.slurm_log)
        assert log.name == f"{job.slurm_id}.log" and log.is_file(), job.key
        assert log.is_relative_to(runs["work"] / "logs/slurm"), log
        assert job.slurm["StdOut"] == str(log) and job.slurm["WorkDir"] == str(runs["work"])
        assert f"rule {job.rule}:" in log.read_text()
    finished = [j for j in first if j.slurm["JobState"] == "COMPLETED"] + second
    for job in finished:
        assert job.slurm["JobState"] == "COMPLETED" and job.slurm["ExitCode"] == "0:0", job.key
        assert f"(Rule: {job.rule})" in Path(job.slurm_log).read_text()
    # The jobs Slurm completed are exactly those the local run executed, each once.
    assert sorted(j.key for j in finished) == sorted(j.key for j in runs["reference"].jobs)
    assert "localrule" not in runs["first"].output + runs["second"].output


def _slurm_time(minutes: int) -> str:
    days, rest = divmod(minutes, 24 * 60)
    clock = f"{rest // 60:02d}:{rest % 60:02d}:00"
    return f"{days}-{clock}" if days else clock


def test_jobs_request_what_their_rules_declare(runs):
    """GPU rules ask Slurm for their GPU (--gpus), CPU rules for none; CPUs, memory and time
    limits are the rules' threads, mem_mb and runtime; one task per job (no run per GPU)."""
    jobs = slurm_jobs(runs["first"]) + slurm_jobs(runs["second"])
    assert {j.rule for j in jobs} >= GPU_RULES | {"demo_corpus", "download", "extract_frames"}
    for job in jobs:
        gpus = int(job.resources["gpu"])
        assert gpus == (1 if job.rule in GPU_RULES else 0), job.key
        requested = job.slurm.get("TresPerJob", "")
        assert (requested == f"gres:gpu:{gpus}") if gpus else ("gpu" not in requested), (job.key, requested)
        assert job.slurm["CPUs/Task"] == str(job.threads), job.key
        assert job.slurm["MinMemoryNode"] == f"{job.resources['mem_mb']}M", job.key
        assert job.slurm["TimeLimit"] == _slurm_time(int(job.resources["runtime"])), job.key
        assert job.slurm["NumTasks"] == "1", job.key


def test_gpu_jobs_saw_the_gpu_slurm_gave_them(runs):
    work = runs["work"]
    gpu_jobs = [j for j in slurm_jobs(runs["first"]) + slurm_jobs(runs["second"])
                if j.rule in GPU_RULES and j.slurm["JobState"] == "COMPLETED"]
    assert {j.rule for j in gpu_jobs} == GPU_RULES
    for job in gpu_jobs:
        launches = re.findall(r"^launch: CUDA_VISIBLE_DEVICES=(.*)$", (work / job.log).read_text(), re.M)
        assert len(launches) == 1, (job.key, launches)  # launched once, not once per GPU
        assert re.fullmatch(rf"'[0-{FAKE_GPUS - 1}]'", launches[0]), (job.key, launches)


def test_a_cancelled_training_job_leaves_nothing_that_looks_finished(runs):
    first, cancelled = runs["first"], runs["cancelled"]
    assert first.returncode != 0
    assert f"SLURM-job '{cancelled}' failed, SLURM status is: 'CANCELLED'" in first.output
    assert first.records[cancelled]["JobState"] == "CANCELLED"
    files, step = runs["after_cancel"]["files"], runs["after_cancel"]["step"]
    assert "model.safetensors" not in files and "model.json" not in files, files
    assert 0 < step < STAGE2_STEPS  # the kill landed mid-training, after a checkpoint


def test_the_rerun_resumes_the_cancelled_stage_from_its_checkpoint(runs):
    second, step = runs["second"], runs["after_cancel"]["step"]
    assert second.returncode == 0, _tail(second.output)
    assert [j.key for j in second.jobs] == ["pretrain[stage=stage2]"]  # nothing else reran
    log = (runs["work"] / "logs/pretrain/stage2.log").read_text()
    assert f"resumed stage2 from results/pretrain/stage2/checkpoint.pt at step {step}/{STAGE2_STEPS}" in log


# ------------------------------------------------------------------- outputs vs the local run

def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for top in ("results", "resources") for p in (root / top).rglob("*")
            if p.is_file()}


def _text(path: Path, root: Path) -> str:
    return path.read_text().replace(str(root), "<workdir>")


def _metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _h5(path: Path, root: Path) -> dict:
    """Every group and dataset: attributes and contents (JPEG bytes), the working folder's path
    in them (a video's source file) replaced."""
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
            entry = {"attrs": {k: value(v) for k, v in obj.attrs.items()}}
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
    evaluations have the same form, and the same training curves: stage1 and the cancelled and
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
    assert planned >= {"demo_corpus", "download", "extract_frames", "pretrain", "eval_retrieval",
                       "eval_egomcq", "plot_training", "all"}, planned
    assert not (work / "results").exists() and not (work / "logs" / "slurm").exists()


def test_the_readme_quotes_the_command_the_test_runs():
    quoted = " ".join(["snakemake", *SLURM_ARGS])
    text = (REPO / "README.md").read_text()
    assert "Running on Slurm" in text
    assert quoted in " ".join(text.replace("\\\n", " ").split())
