"""The rehearsal: configs/paper.yaml executed on miniatures of every dataset in its published layout.

- The overlays change only how big and how long: every job of the paper DAG, planned under the
  paper configuration alone and with configs/rehearsal.yaml (+ rehearsal_ci.yaml), runs the same
  command once batch sizes, steps, shards, GPU / worker counts and io flags are set aside (and, at
  CI size, the model's widths).
- At CI size the whole DAG runs here (`all` and `paper_figures`): every rule's job count is the
  paper's, everything completes, and the awkward cases of the real releases come out as published.
"""

from __future__ import annotations

import importlib.util
import json
import re
from collections import Counter
from pathlib import Path

import pytest

from tests.helpers.workflow import copy_workflow, paper_inputs, snakemake

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("rehearsal_cli", REPO / "workflow_scripts" / "rehearsal.py")
rehearsal = importlib.util.module_from_spec(spec)
spec.loader.exec_module(rehearsal)

TARGETS = ("all", "paper_figures")
# What the overlays may change in a job's --config-json (how big and how long a job runs).
TRAINING_SIZE_KEYS = {"batch_size", "max_steps"}
GROUNDER_SIZE_KEYS = {"epochs", "batch_size"}
# At CI size the model is the tiny preset's widths at the paper's depths.
CI_MODEL_KEYS = {
    "preset",
    "image_size",
    "patch_size",
    "width",
    "heads",
    "mlp_ratio",
    "tubelet_frames",
    "init_std",
    "intermediate_size",
    "max_position_embeddings",
    "dropout",
    "layer_scale_init",
}


def _commands(workdir: Path, *configfiles: str) -> list[str]:
    result = snakemake(workdir, *TARGETS, "-n", "-p", "--forceall", "--configfile", *configfiles)
    return re.findall(
        r"^(?:Shell command: )?\s*(?:python workflow_scripts/launch\.py [^\n]*? -- )?(?:python )?"
        r"(workflow_scripts/[a-z_]+\.py[^\n]*)$",
        result.stdout,
        flags=re.M,
    )


def _config_json(command: str) -> dict:
    return json.loads(re.search(r"--config-json '(\{.*?\})'", command).group(1))


def _without(cfg: dict, keys: set, model_keys: set = frozenset()) -> dict:
    out = {k: v for k, v in cfg.items() if k not in keys}
    if "model" in out and model_keys:
        from svitt.models.svitt import resolve_model_config

        model = resolve_model_config(out["model"])  # presets spelled out: the depths compare as numbers
        for part in ("video", "text"):
            for key in model_keys:
                model.get(part, {}).pop(key, None)
        for key in ("embed_dim", "video_weights", "text_weights"):
            model.pop(key, None)
        out["model"] = model
    return out


def _normalise(command: str, model_keys: set = frozenset()) -> str:
    """A job's command with what the overlays may change set aside."""
    command = re.sub(
        r"resources/frames/(\w+)/shard-\d+-of-\d+\.h5( resources/frames/\1/shard-\d+-of-\d+\.h5)*",
        r"resources/frames/\1/SHARDS",
        command,
    )
    command = re.sub(r" --(checkpoint-every|log-every|num-workers|keep-checkpoint|workers|threads) \S+", "", command)
    command = re.sub(r" --model-json '\{.*?\}'", "", command) if model_keys else command
    if "--config-json" not in command:
        return command
    cfg = _config_json(command)
    script = command.split()[0]
    if script.endswith(("train.py", "finetune.py")):
        cfg = _without(cfg, TRAINING_SIZE_KEYS, model_keys)
    elif script.endswith("ground.py"):
        cfg = _without(cfg, GROUNDER_SIZE_KEYS)
    return re.sub(r"--config-json '\{.*?\}'", f"--config-json '{json.dumps(cfg, sort_keys=True)}'", command)


def _data_command(command: str) -> bool:
    return command.startswith(("workflow_scripts/download.py", "workflow_scripts/extract_frames.py"))


def _data_settings(command: str) -> str:
    """A download / extraction command without its shard: what every shard of a dataset shares."""
    command = re.sub(r"shard-\d+-of-\d+|--num-shards \d+|--shard-index \d+|[\w-]+-\d+-of-\d+", "", command)
    return re.sub(r" --workers \S+", "", command)


@pytest.fixture(scope="module")
def plans(tmp_path_factory):
    workdir = copy_workflow(tmp_path_factory.mktemp("plans"))
    paper_inputs(workdir)
    for path in ("data/weights/beit_tiny_hf", "data/bert_tiny"):  # the CI overlay's weights (never read)
        (workdir / path).mkdir(parents=True)
    return {
        name: _commands(workdir, "configs/paper.yaml", *overlays)
        for name, overlays in (
            ("paper", ()),
            ("full", ("configs/rehearsal.yaml",)),
            ("ci", ("configs/rehearsal.yaml", "tests/configs/rehearsal_ci.yaml")),
        )
    }


@pytest.mark.parametrize("size", ["full", "ci"])
def test_the_overlays_change_only_how_big_and_how_long(plans, size):
    model_keys = CI_MODEL_KEYS if size == "ci" else frozenset()
    jobs = {name: [c for c in plans[name] if not _data_command(c)] for name in ("paper", size)}
    assert len(jobs["paper"]) > 90  # training, finetuning, evaluation and analysis jobs
    paper = Counter(_normalise(c, model_keys) for c in jobs["paper"])
    ours = Counter(_normalise(c, model_keys) for c in jobs[size])
    assert ours == paper, (sorted((ours - paper).elements())[:3], sorted((paper - ours).elements())[:3])
    data = {name: {_data_settings(c) for c in plans[name] if _data_command(c)} for name in ("paper", size)}
    assert data[size] == data["paper"]  # the same downloads and extraction settings, fewer shards


def test_the_overlays_really_change_the_sizes(plans):
    """The normalisation above must not hide everything: batch sizes and steps do differ."""
    stage1 = {
        name: _config_json(next(c for c in plans[name] if "--out results/pretrain/stage1 " in c))
        for name in ("paper", "full", "ci")
    }
    assert stage1["paper"]["batch_size"] == 512 and "max_steps" not in stage1["paper"]
    assert stage1["full"]["batch_size"] == 2 and stage1["full"]["max_steps"] == 2
    assert stage1["full"]["model"] == stage1["paper"]["model"]  # the paper's BEiT-B + BERT-base
    assert stage1["ci"]["model"]["video"]["preset"] == "tiny" and stage1["ci"]["model"]["video"]["depth"] == 12


@pytest.mark.slow
def test_the_ci_rehearsal_runs_every_paper_job(tmp_path):
    workdir = tmp_path / "rehearsal"
    assert rehearsal.main(["--size", "ci", "--dir", str(workdir), "--cores", "2"]) == 0
    summary = json.loads((workdir / "results/rehearsal.json").read_text())
    assert summary["complete"] and summary["report"] and not summary["count_differences"]
    assert summary["executed"] == summary["planned_rehearsal"]  # every planned job ran, once
    assert summary["executed"]["pretrain"] == 10 and summary["executed"]["finetune"] == 18
    assert (workdir / "results/report.html").stat().st_size > 100_000
    results = workdir / "results/eval"
    ssv2 = json.loads((results / "retrieval_finetuned/ssv2_label/stage2.json").read_text())
    assert ssv2["ground_truth"].startswith("several ground-truth videos per text")
    assert ssv2["num_videos"] == 4 and ssv2["num_texts"] == 2  # val_small: two captions, two videos each
    didemo = json.loads((results / "retrieval/didemo/stage2.json").read_text())
    assert didemo["num_videos"] == 4 and "@" in "".join(
        json.loads((workdir / "data/anno/didemo_ret_test.json").read_text())[0]["video"]
    )
    nlq = json.loads((results / "nlq/egoclip.json").read_text())
    assert any(s["reason"] == "no query text" for s in nlq["skipped"]["train"])  # Ego4D's queries without text
    egoclip = json.loads((workdir / "results/pretrain/egoclip/model.json").read_text())
    assert egoclip["train_config"]["precision"] == "fp16"  # SViTT-Ego's policy: loss scaling on the CPU too,
    assert egoclip["autocast"] == "bfloat16"  # in bfloat16 there (float16 products are emulated on CPUs)
