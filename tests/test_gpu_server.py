"""One GPU server, for real: the users' command `snakemake all --cores 8 --resources gpu=8` with the
real Snakefile, launcher and GPU pool; the GPU steps are stubs (tests/helpers/gpu_schedule.py: no
GPU here, SVITT_NUM_GPUS fakes the count). `gpus: auto` resolved when the workflow is parsed.
Protected stage models rerun by a user who is not root, with the steps the README gives."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from tests.helpers.gpu_schedule import SIZES, prepare, run
from tests.helpers.workflow import copy_workflow

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SECONDS = {"train": 1.0, "evaluate": 0.2, "nlq_features": 0.5, "ground": 0.2, "plot": 0.0}
GPU_RULES = ("pretrain", "eval_retrieval", "eval_egomcq", "nlq_features", "ground")
THREADS = {"ground": 1}  # the grounder uses one CPU thread; the other GPU rules threads_per_gpu (1) per GPU


def environment(**extra) -> dict:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("CUDA_VISIBLE_DEVICES", "SVITT_GPU_POOL", "SVITT_NUM_GPUS") and not k.startswith("SLURM_")
    }
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return {**env, **extra}


def _concurrent(a: dict, b: dict) -> bool:
    return a["start"] < b["end"] and b["start"] < a["end"]


def _gpu_jobs(rows):
    return [r for r in rows if r["kind"] != "plot"]


def _assert_disjoint_gpus(rows):
    for i, a in enumerate(rows):
        for b in rows[i + 1 :]:
            if _concurrent(a, b):
                assert not set(a["cvd"].split(",")) & set(b["cvd"].split(",")), (a, b)


# ---------------------------------------------------------------------------- scheduling


def test_training_goes_first_and_nlq_features_do_not_delay_stage1(tmp_path):
    """Stages that take every GPU of the server (here a 1-GPU server: the same decision as 8 of 8,
    without torchrun starting 8 stubs): each stage starts before any evaluation or NLQ feature
    job, although those have the larger inputs (the tie-break of Snakemake's scheduler when
    priorities are equal) and the EgoClip stage (init: null, as in configs/paper.yaml) makes the
    NLQ features ready before stage1 may start."""
    overlay = {"pretrain": {"gpus": 1, "egoclip": {"init": None}}, "evaluation": {"gpus": 1}}
    env = environment()
    configs = prepare(tmp_path / "w", overlay, SIZES, env)
    rows = _gpu_jobs(run(tmp_path / "w", configs, env, SECONDS, gpus=1))
    train = [r for r in rows if r["kind"] == "train"]
    later = [r for r in rows if r["kind"] != "train"]
    assert sorted(r["name"] for r in train) == ["egoclip", "stage1", "stage2", "stage3"]
    assert {r["kind"] for r in later} == {"evaluate", "nlq_features", "ground"} and len(later) == 9
    order = [r["name"] if r["kind"] == "train" else f"{r['kind']}:{Path(r['name']).stem}" for r in rows]
    assert max(t["start"] for t in train) < min(r["start"] for r in later), order
    assert all(r["cvd"] == "0" for r in rows)
    _assert_disjoint_gpus(rows)  # one GPU: one job at a time


def test_the_demo_takes_one_gpu_per_job_and_evaluates_beside_training(tmp_path):
    """`gpus: auto` (config.yaml) on a 2-GPU server: each GPU job gets a GPU of its own, and a
    stage's evaluations run beside the next stage's training."""
    overlay = {"pretrain": {"gpus": "auto"}, "evaluation": {"gpus": "auto"}}  # test.yaml says 0 (CI)
    env = environment(SVITT_NUM_GPUS="2")
    configs = prepare(tmp_path / "w", overlay, SIZES, env)
    rows = _gpu_jobs(run(tmp_path / "w", configs, env, SECONDS, gpus=2))
    assert all(r["gpus"] == 1 and r["cvd"] in ("0", "1") for r in rows), rows
    _assert_disjoint_gpus(rows)
    train = [r for r in rows if r["kind"] == "train"]
    assert any(_concurrent(r, t) for r in rows if r["kind"] == "evaluate" for t in train)


@pytest.mark.parametrize(
    "env,gpus", [({"SVITT_NUM_GPUS": "2"}, 1), ({"SVITT_NUM_GPUS": "2", "CUDA_VISIBLE_DEVICES": ""}, 0)]
)
def test_gpus_auto_is_resolved_when_the_workflow_is_parsed(tmp_path, env, gpus):
    """The demo as shipped (config.yaml): a GPU per job where the machine has one, else the CPU
    (an empty CUDA_VISIBLE_DEVICES hides the GPUs on purpose)."""
    work = copy_workflow(tmp_path / "w")
    out = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "-p", "all", "--cores", "8", "--resources", "gpu=8"],
        cwd=work,
        env=environment(**env),
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    blocks = [b for b in re.split(r"\n(?=rule \w+:)", out.stdout) if re.match(r"rule (\w+):", b.strip())]
    jobs = [b for b in blocks if re.match(r"rule (\w+):", b.strip()).group(1) in GPU_RULES]
    assert len(jobs) == 4 + 3 + 4 + 1 + 1  # stages, retrieval and EgoMCQ evaluations, NLQ features and grounding
    for block in jobs:
        threads = THREADS.get(re.match(r"rule (\w+):", block.strip()).group(1), 1)
        assert re.search(rf"resources: .*\bgpu={gpus}\b", block), block
        assert f"workflow_scripts/launch.py --gpus {gpus} --threads {threads} " in block, block


def test_every_stage_kind_gets_the_training_layout(tmp_path):
    """The device settings of `pretrain` reach every stage svitt/workflow/stages.py resolves, not only the
    curriculum: the EgoClip stage, extra and ablation stages and the seed variants of all of them
    (`seeds`, `ablation` targets) each ask for pretrain.gpus, gpus x threads_per_gpu CPUs, go
    first (priority) and run through the launcher with the save-before flag; NLQ features and the
    grounder lease evaluation.gpus."""
    work = copy_workflow(tmp_path / "w")
    stage = {"frames": 4, "epochs": 1, "lr": 0.001}
    overlay = {
        "pretrain": {
            "gpus": 2,
            "threads_per_gpu": 3,
            "save_before": 120,
            "seeds": [1],
            "extra": [{"name": "control", **stage}],
            "ablation": [{"name": "single4", **stage}],
        },
        "evaluation": {"gpus": 1, "threads_per_gpu": 3},
    }
    (work / "configs/kinds.yaml").write_text(yaml.safe_dump(overlay))
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "snakemake",
            "-n",
            "-p",
            "all",
            "seeds",
            "ablation",
            "--cores",
            "8",
            "--resources",
            "gpu=8",
            "--configfile",
            "tests/configs/test.yaml",
            "configs/kinds.yaml",
        ],
        cwd=work,
        env=environment(),
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    blocks = [
        b for b in re.split(r"\n(?=(?:local)?rule \w+:)", out.stdout) if re.match(r"(?:local)?rule (\w+):", b.strip())
    ]
    pretrain = [b for b in blocks if b.strip().startswith("rule pretrain:")]
    stages = {re.search(r"wildcards: stage=(\S+)", b).group(1) for b in pretrain}
    assert stages == {
        f"{n}{s}" for n in ("stage1", "stage2", "stage3", "egoclip", "control", "single4") for s in ("", "-seed1")
    } - {"single4-seed1"}  # ablation: the configured stages only
    for block in pretrain:
        assert re.search(r"resources: .*\bgpu=2\b", block), block
        assert re.search(r"threads: 6\b", block), block
        assert re.search(r"priority: 100\b", block), block
        assert (
            "workflow_scripts/launch.py --gpus 2 --threads 6 --save-before 120 -- workflow_scripts/train.py" in block
        ), block
    nlq = [b for b in blocks if b.strip().startswith(("rule nlq_features:", "rule ground:"))]
    assert len(nlq) == 2, [b.splitlines()[0] for b in blocks]
    for block in nlq:
        threads = 1 if block.strip().startswith("rule ground:") else 3
        assert re.search(r"resources: .*\bgpu=1\b", block), block
        assert f"workflow_scripts/launch.py --gpus 1 --threads {threads} -- " in block, block


# ----------------------------------------------------------------- protected stage models

USER = "svitt-tester"


def unprivileged_runner(tmp_path: Path) -> tuple[list[str], Path]:
    """A command prefix that runs as a user who is not root, and a folder that user owns. A real
    user (useradd) where it can run this Python; else root without the capabilities that let it
    write read-only files (setpriv), which is the check Snakemake makes (os.access W_OK)."""
    if os.geteuid() != 0:
        pytest.skip("creating an unprivileged user needs root")
    folder = Path(tempfile.mkdtemp(prefix="svitt-protected-"))
    folder.chmod(0o755)
    if shutil.which("useradd") and shutil.which("runuser"):
        if subprocess.run(["id", USER], capture_output=True).returncode != 0:
            subprocess.run(["useradd", "--create-home", USER], check=True, capture_output=True)
        prefix = ["runuser", "-u", USER, "--", "env", f"HOME=/home/{USER}"]
        if subprocess.run([*prefix, sys.executable, "-c", "pass"], capture_output=True).returncode == 0:
            shutil.chown(folder, USER, USER)
            return prefix, folder
    if shutil.which("setpriv"):
        return ["setpriv", "--inh-caps=-all", "--bounding-set=-dac_override,-dac_read_search,-fowner"], folder
    pytest.skip(f"no way to run as a user who is not root ({USER} cannot run {sys.executable}, no setpriv)")


def test_protected_stage_models_rerun_for_a_user_who_is_not_root(pipeline, tmp_path):
    """pretrain.protect_models (on in configs/paper.yaml): once a stage is trained, editing it
    makes Snakemake refuse to build the DAG for anyone but root (root may write read-only files,
    so CI, which runs as root, never sees it). The README's three steps rerun it."""
    prefix, folder = unprivileged_runner(tmp_path)
    corpus, res = pipeline
    work = folder / "w"
    overlay = {
        "pretrain": {"protect_models": True, "gpus": 0},
        "datasets": {"webvid": {"shards": 1}},
    }  # the session corpus's one WebVid shard
    env = environment()
    configs = prepare(work, overlay, {}, env)
    # Real data in place of the placeholders (stage1 and stage2 train for real), as old as they were.
    for src, dest in (
        (corpus / "webvid_train.csv", "resources/demo/webvid_train.csv"),
        (corpus / "tokenizer/vocab.txt", "resources/demo/tokenizer/vocab.txt"),
        (res / "frames/webvid/shard-0.h5", "resources/frames/webvid/shard-000-of-001.h5"),
    ):
        stamp = (work / dest).stat().st_mtime
        shutil.copy(src, work / dest)
        os.utime(work / dest, (stamp, stamp))
    shutil.copy(REPO / "workflow_scripts/train.py", work / "workflow_scripts/train.py")
    owner = os.stat(folder)
    for path in [work, *work.rglob("*")]:  # the user's own checkout
        os.chown(path, owner.st_uid, owner.st_gid)

    def snakemake(*args):
        return subprocess.run(
            [*prefix, sys.executable, "-m", "snakemake", *args, "--cores", "2", "--configfile", *configs],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
        )

    models = [work / f"results/pretrain/{s}/model.safetensors" for s in ("stage1", "stage2")]
    first = snakemake(*[str(m.relative_to(work)) for m in models])
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert all(not m.stat().st_mode & 0o222 for m in models)  # read-only for everyone
    # Edit stage2: a new learning rate.
    cfg = yaml.safe_load((work / "configs/server.yaml").read_text())
    stages = yaml.safe_load((work / "tests/configs/test.yaml").read_text())["pretrain"]["curriculum"]
    stages[1]["lr"] = 0.0002
    cfg["pretrain"]["curriculum"] = stages
    (work / "configs/server.yaml").write_text(yaml.safe_dump(cfg))
    targets = [str(m.relative_to(work)) for m in models]
    refused = snakemake("-n", *targets)
    assert refused.returncode != 0
    assert "Write-protected output files for rule pretrain" in refused.stdout + refused.stderr
    assert "results/pretrain/stage2/model.safetensors" in refused.stdout + refused.stderr
    # The README's steps: allow the rerun, run, protect again what was not rewritten.
    stamp = models[0].stat().st_mtime_ns
    unprotect = subprocess.run([*prefix, "sh", "-c", "chmod u+w results/pretrain/*/model.safetensors"], cwd=work)
    assert unprotect.returncode == 0
    rerun = snakemake(*targets)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert re.findall(r"wildcards: stage=(\w+)", rerun.stdout + rerun.stderr) == ["stage2"]  # only the edited stage
    assert models[0].stat().st_mtime_ns == stamp and not models[1].stat().st_mode & 0o222
    assert models[0].stat().st_mode & 0o200  # not rewritten: still writable until the last step
    protect = subprocess.run([*prefix, "sh", "-c", "chmod a-w results/pretrain/*/model.safetensors"], cwd=work)
    assert protect.returncode == 0 and all(not m.stat().st_mode & 0o222 for m in models)
    shutil.rmtree(folder)
    # The steps, as the documentation gives them.
    docs = "".join(p.read_text() for p in (REPO / "README.md", REPO / "docs/gpus_and_slurm.md") if p.exists())
    for step in (
        "chmod u+w results/pretrain/*/model.safetensors",
        "chmod a-w results/pretrain/*/model.safetensors",
        "Write-protected output files for rule pretrain",
    ):
        assert step in docs, step
