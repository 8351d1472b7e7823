"""How the workflow schedules GPU jobs on one server, measured with the real Snakefile, the real
launcher and GPU pool, and stubbed GPU steps (no GPU here: SVITT_NUM_GPUS fakes the count).

A copy of the workflow gets placeholder data (every output of the data rules, so only the GPU
rules and the figures run) and, in place of train.py / evaluate.py / nlq_features.py / ground.py /
plot.py, one stub that sleeps, writes its outputs and records when it ran on which GPUs. Used by
tests/test_gpu_server.py; run as a script it prints the schedule of each layout as JSON:

    python tests/helpers/gpu_schedule.py [--server-gpus 8 --train 20 --eval 1 --nlq 10]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.helpers.workflow import copy_workflow

DATA_RULES = ("demo_corpus", "nlq_videos", "download", "extract_frames")  # in the order they run
# The jobs scheduled: pretraining, the evaluations and NLQ (finetuning and the analyses, which
# read real models, are left out of the stubbed DAG; their rules take GPUs the same way).
SCHEDULED = ("pretrain", "eval_retrieval", "eval_egomcq", "nlq_features", "ground")
STUBBED = ("train", "evaluate", "nlq_features", "ground", "plot")
SERVER_GPUS = 8

STUB = r'''#!/usr/bin/env python
"""Test stub of a GPU step (tests/helpers/gpu_schedule.py): sleeps, writes its outputs, records."""
import json, os, sys, time
from pathlib import Path

kind = Path(sys.argv[0]).stem
args = sys.argv[1:]
value = lambda flag: args[args.index(flag) + 1]
cvd = os.environ.get("CUDA_VISIBLE_DEVICES") or ""
gpus = len([d for d in cvd.split(",") if d])
seconds = json.loads(os.environ["SVITT_SCHEDULE_SECONDS"]).get(kind, 0.0)
if kind == "train" and os.environ.get("SVITT_SCHEDULE_SCALE"):  # linear scaling: the whole server = 1 unit
    seconds *= int(os.environ["SVITT_SCHEDULE_SCALE"]) / max(gpus, 1)
start = time.time()
time.sleep(seconds)
if int(os.environ.get("RANK", 0)) == 0:
    size = int(os.environ.get("SVITT_SCHEDULE_BYTES", "1000"))
    if kind == "train":
        out = Path(value("--out"))
        out.mkdir(parents=True, exist_ok=True)
        (out / "model.safetensors").write_bytes(b"\0" * size)
        (out / "model.json").write_text("{}")
        (out / "metrics.jsonl").write_text("")
        name = json.loads(value("--config-json"))["name"]
    else:
        Path(value("--out")).parent.mkdir(parents=True, exist_ok=True)
        Path(value("--out")).write_bytes(b"\0" * 10)
        if "--pt-dir" in args:  # nlq_features: one .pt per video as well
            Path(value("--pt-dir")).mkdir(parents=True, exist_ok=True)
        if "--out-dir" in args:  # ground: the grounder, its curve and its predictions
            out_dir = Path(value("--out-dir"))
            out_dir.mkdir(parents=True, exist_ok=True)
            for f in ("predictions_val.json", "metrics.jsonl", "grounder.safetensors"):
                (out_dir / f).write_bytes(b"\0" * 10)
        name = value("--out")
    line = json.dumps({"kind": kind, "name": name, "cvd": cvd, "gpus": gpus, "start": start, "end": time.time()})
    with open(os.environ["SVITT_SCHEDULE_LOG"], "a") as log:
        log.write(line + "\n")
'''


def snakemake(workdir: Path, args, env: dict, timeout: float = 900) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("snakemake")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "snakemake"]
    env = {**env, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"}
    return subprocess.run(cmd + list(args), cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout)


def _planned_outputs(workdir: Path, configs, env) -> list[tuple[str, list[str]]]:
    """(rule, outputs) of every job a dry run of `all` plans, in the order it plans them."""
    out = snakemake(workdir, ["-n", "all", "--cores", "1", "--configfile", *configs], env)
    if out.returncode:
        raise RuntimeError(out.stdout + out.stderr)
    jobs = []
    for block in re.split(r"\n(?=rule \w+:)", out.stdout):
        rule = re.match(r"rule (\w+):", block.strip())
        outputs = re.search(r"\n\s+output: (.*)", block)
        if rule and outputs:
            jobs.append((rule.group(1), [p.strip() for p in outputs.group(1).split(",")]))
    return jobs


def prepare(workdir: Path, overlay: dict, sizes: dict[str, int], env: dict) -> list[str]:
    """A workflow copy with placeholder data and stubbed GPU steps; returns its --configfile list.
    `sizes`: bytes of the placeholder shards by dataset (Snakemake's greedy scheduler breaks ties
    between equal priorities by input size)."""
    copy_workflow(workdir)
    (workdir / "configs/server.yaml").write_text(yaml.safe_dump(overlay))
    configs = ["tests/configs/test.yaml", "configs/server.yaml"]
    level = {rule: i for i, rule in enumerate(DATA_RULES)}
    for rule, outputs in _planned_outputs(workdir, configs, env):
        if rule not in level:
            continue
        for path in outputs:
            target = workdir / path
            if rule == "download" and path.endswith("/files"):
                target.mkdir(parents=True, exist_ok=True)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                dataset = path.split("/")[2] if path.startswith("resources/frames/") else None
                target.write_bytes(b"\0" * (sizes.get(dataset, 10) if path.endswith(".h5") else 10))
            os.utime(target, (1e9 + level[rule], 1e9 + level[rule]))  # data before its consumers
    for name in STUBBED:
        (workdir / f"workflow_scripts/{name}.py").write_text(STUB)
    return configs


def run(workdir: Path, configs, env: dict, seconds: dict, gpus: int = SERVER_GPUS, scale: bool = False) -> list[dict]:
    """`snakemake <the SCHEDULED jobs of all> --cores 8 --resources gpu=8` (the users' command on an
    8-GPU server, or one with `gpus` GPUs; the targets first: after --resources, Snakemake 9 reads
    them as resources)."""
    log = workdir / "schedule.jsonl"
    env = {
        **env,
        "SVITT_NUM_GPUS": str(gpus),
        "SVITT_GPU_POOL": str(workdir / "gpu-pool"),
        "SVITT_SCHEDULE_LOG": str(log),
        "SVITT_SCHEDULE_SECONDS": json.dumps(seconds),
        "SVITT_SCHEDULE_SCALE": str(gpus) if scale else "",
    }
    env.pop("CUDA_VISIBLE_DEVICES", None)
    targets = [o for rule, outs in _planned_outputs(workdir, configs, env) if rule in SCHEDULED for o in outs]
    done = snakemake(workdir, [*targets, "--cores", "8", "--resources", f"gpu={gpus}", "--configfile", *configs], env)
    if done.returncode:
        raise RuntimeError(done.stdout[-3000:] + done.stderr[-3000:])
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    t0 = min(r["start"] for r in rows)
    for r in rows:
        r["start"], r["end"] = r["start"] - t0, r["end"] - t0
    return sorted(rows, key=lambda r: r["start"])


def summary(rows: list[dict], gpus: int = SERVER_GPUS) -> dict:
    """Makespan, the GPUs' busy fraction, when the first evaluation result came, whether any
    evaluation ran beside training, and how long training stages waited after their predecessor."""
    gpu_rows = [r for r in rows if r["kind"] != "plot"]
    makespan = max(r["end"] for r in rows)
    busy = sum(r["gpus"] * (r["end"] - r["start"]) for r in gpu_rows)
    train = [r for r in gpu_rows if r["kind"] == "train"]
    evals = [r for r in gpu_rows if r["kind"] != "train"]
    overlap = any(e["start"] < t["end"] and t["start"] < e["end"] for e in evals for t in train)
    return {
        "makespan_s": round(makespan, 1),
        "gpu_busy_fraction": round(busy / (gpus * makespan), 3),
        "training_end_s": round(max(t["end"] for t in train), 1),
        "first_evaluation_end_s": round(min(e["end"] for e in evals), 1),
        "evaluations_beside_training": overlap,
        "order": [r["name"] if r["kind"] == "train" else f"{r['kind']}:{Path(r['name']).stem}" for r in gpu_rows],
    }


# Evaluation inputs larger than training's: without priorities, the greedy scheduler picks them first.
SIZES = {"webvid": 1000, "egoclip": 50_000, "demo_retrieval": 100_000, "egomcq": 100_000, "ego_nlq": 200_000}


def layouts(server: int) -> dict:
    """name: (config overlay, drop the training priority)."""

    def stages_on(gpus):
        return {"pretrain": {"gpus": gpus, "egoclip": {"init": None}}, "evaluation": {"gpus": 1}}

    return {
        f"stages on all {server} GPUs, training first (this change)": (stages_on(server), False),
        f"stages on all {server} GPUs, no priority (main)": (stages_on(server), True),
        f"stages on {server // 2} GPUs, training first (room for evaluations)": (stages_on(server // 2), False),
    }


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--server-gpus", type=int, default=SERVER_GPUS)
    p.add_argument("--train", type=float, default=20.0, help="seconds of one stage on the whole server")
    p.add_argument("--eval", type=float, default=1.0)
    p.add_argument("--nlq", type=float, default=10.0)
    a = p.parse_args()
    seconds = {"train": a.train, "evaluate": a.eval, "nlq_features": a.nlq, "ground": a.eval, "plot": 0.1}
    results = {}
    for name, (overlay, strip_priority) in layouts(a.server_gpus).items():
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp) / "w"
            configs = prepare(work, overlay, SIZES, dict(os.environ))
            if strip_priority:
                smk = work / "rules/pretrain.smk"
                smk.write_text(smk.read_text().replace("    priority: 100\n", ""))
            rows = run(work, configs, dict(os.environ), seconds, gpus=a.server_gpus, scale=True)
            results[name] = summary(rows, gpus=a.server_gpus)
    print(json.dumps({"server_gpus": a.server_gpus, "seconds": seconds, "layouts": results}, indent=1))
