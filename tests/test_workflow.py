"""The Snakemake workflow for real: the demo DAG end to end at test size (tests/configs/test.yaml),
what a config edit reruns, schema errors, the paper configuration's DAG, the profiles."""

import json
import re
from pathlib import Path

import h5py
import pytest
import yaml

from tests.helpers.workflow import copy_workflow, paper_inputs, snakemake


def planned_jobs(workdir: Path, *configfiles: str) -> set[tuple[str, str]]:
    """(rule, wildcards) of every job a dry run would execute."""
    args = ["-n", "all", "--cores", "1"]
    if configfiles:
        args += ["--configfile", *configfiles]
    out = snakemake(workdir, *args).stdout
    jobs = set()
    for block in re.split(r"\n(?=(?:local)?rule \w+:)", out):
        match = re.match(r"(?:local)?rule (\w+):", block.strip())
        if match and match.group(1) != "all":
            wildcards = re.search(r"wildcards: (.*)", block)
            jobs.add((match.group(1), wildcards.group(1).strip() if wildcards else ""))
    return jobs


@pytest.fixture(scope="module")
def demo_run(test_dag):
    """The whole demo DAG (test size), run once per session (tests/conftest.py: test_dag)."""
    return test_dag


def test_demo_dag_runs_end_to_end(demo_run):
    stages = ["stage1", "stage2", "stage3", "egoclip"]
    for stage in stages:
        info = json.loads((demo_run / f"results/pretrain/{stage}/model.json").read_text())
        assert info["steps"] >= 1 and (demo_run / f"results/pretrain/{stage}/model.safetensors").stat().st_size > 0
        assert (demo_run / f"logs/pretrain/{stage}.log").exists()
    frames = [json.loads((demo_run / f"results/pretrain/{s}/model.json").read_text())["frames"] for s in stages]
    assert frames == [4, 8, 16, 4]
    for stage in stages[:3]:
        result = json.loads((demo_run / f"results/eval/retrieval/demo_retrieval/{stage}.json").read_text())
        assert set(result["metrics"]) >= {"t2v_r1", "t2v_r5", "t2v_r10", "v2t_r1"}
        assert set(result["twins"]) == {"time_reversed", "event_order"}
    assert set(json.loads((demo_run / "results/eval/egomcq/egoclip.json").read_text())["metrics"]) == {"inter", "intra"}
    with h5py.File(demo_run / "results/nlq_features/egoclip.h5") as nlq:
        # the 2 EgoClip videos (NLQ train) and the 5 held-out ones (NLQ val), width 64
        assert len(nlq) == 7 and all(nlq[k].shape[1] == 64 for k in nlq) and nlq.attrs["kind"] == "cls"
    assert len(list((demo_run / "results/nlq_features/egoclip").glob("*.pt"))) == 7
    grounding = json.loads((demo_run / "results/eval/nlq/egoclip.json").read_text())
    recalls = {"r1_iou0.3", "r5_iou0.3", "r1_iou0.5", "r5_iou0.5"}
    assert set(grounding["metrics"]) >= recalls and set(grounding["baseline"]["metrics"]) >= recalls
    assert grounding["evaluated"]["val"] > 0 and grounding["skipped"] == {"train": [], "val": []}
    for figure in ["training_curves", "sparsity", "retrieval_demo_retrieval", "egomcq"]:
        assert (demo_run / f"results/figures/{figure}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_demo_dag_finetunes_retrieval_and_qa_from_the_last_stage(demo_run):
    for task in ("retrieval", "qa"):
        folder = demo_run / f"results/finetune/{task}/demo_{task}/stage3"
        info = json.loads((folder / "model.json").read_text())
        assert info["steps"] >= 1 and (folder / "model.safetensors").stat().st_size > 0
        assert info["train_config"]["task"] == {"retrieval": "pairs", "qa": "qa"}[task]
        assert json.loads((folder / "metrics.jsonl").read_text().splitlines()[-1])["step"] == info["steps"]
    assert json.loads((demo_run / "results/finetune/qa/demo_qa/stage3/model.json").read_text())["frames"] == 8
    retrieval = json.loads((demo_run / "results/eval/retrieval_finetuned/demo_retrieval/stage3.json").read_text())
    assert retrieval["stage"] == "retrieval/demo_retrieval/stage3"
    assert set(retrieval["metrics"]) >= {"t2v_r1", "v2t_r1"} and set(retrieval["metrics_vtm"]) >= {"t2v_r1"}
    qa = json.loads((demo_run / "results/eval/qa/demo_qa/stage3.json").read_text())
    assert set(qa["metrics"]) == {"overall", "first", "second", "direction", "before"}
    assert qa["scoring"] == "sequence" and qa["unanswerable"] == 0 and qa["num_questions"] == 4 * 3


def test_an_untouched_config_reruns_nothing(demo_run):
    assert planned_jobs(demo_run, "tests/configs/test.yaml") == set()


def test_a_missing_stage_folder_is_rebuilt_by_all(demo_run):
    """After a failed rerun of stage2 Snakemake deletes its outputs; `all` names every stage model
    and result file, so the next `snakemake all` rebuilds stage2 and what depends on it."""
    stage2 = demo_run / "results/pretrain/stage2"
    aside = demo_run / "stage2.aside"
    stage2.rename(aside)
    try:
        jobs = planned_jobs(demo_run, "tests/configs/test.yaml")
    finally:
        aside.rename(stage2)
    assert {w for r, w in jobs if r == "pretrain"} == {"stage=stage2", "stage=stage3", "stage=egoclip"}
    assert ("eval_retrieval", "dataset=demo_retrieval, stage=stage3") in jobs


def test_cosmetic_config_edits_rerun_nothing(demo_run):
    """Reordered keys, another YAML layout, 1e-3 written for 0.001: the same config."""
    cfg = yaml.safe_load((demo_run / "tests/configs/test.yaml").read_text())
    stage = cfg["pretrain"]["curriculum"][0]
    cfg["pretrain"]["curriculum"][0] = dict(reversed(list(stage.items())))
    cfg["pretrain"] = dict(reversed(list(cfg["pretrain"].items())))
    text = yaml.safe_dump(cfg, default_flow_style=True, sort_keys=False)
    assert "lr: 0.001" in text
    (demo_run / "configs/cosmetic.yaml").write_text(text.replace("lr: 0.001", "lr: 1e-3"))
    assert planned_jobs(demo_run, "configs/cosmetic.yaml") == set()


def test_editing_io_settings_reruns_nothing(demo_run):
    """pretrain.io (checkpoint and log intervals, loader processes) changes how a stage runs, not
    what it learns; the new values still reach train.py."""
    cfg = yaml.safe_load((demo_run / "tests/configs/test.yaml").read_text())
    cfg["pretrain"]["io"] = {"checkpoint_every": 7, "log_every": 3, "num_workers": 2}
    (demo_run / "configs/io.yaml").write_text(yaml.safe_dump(cfg))
    assert planned_jobs(demo_run, "configs/io.yaml") == set()
    forced = snakemake(
        demo_run,
        "-n",
        "-p",
        "--cores",
        "1",
        "--configfile",
        "configs/io.yaml",
        "--forcerun",
        "results/pretrain/stage1/model.safetensors",
        "results/pretrain/stage1/model.safetensors",
    ).stdout
    assert "--checkpoint-every 7 --keep-checkpoint True --log-every 3 --num-workers 2" in forced


def test_editing_one_stage_reruns_that_stage_and_its_downstream_only(demo_run):
    cfg = yaml.safe_load((demo_run / "tests/configs/test.yaml").read_text())
    cfg["pretrain"]["curriculum"][1]["lr"] = 0.0002  # stage2
    (demo_run / "configs/edited.yaml").write_text(yaml.safe_dump(cfg))
    jobs = planned_jobs(demo_run, "configs/edited.yaml")
    pretrained = {w for rule, w in jobs if rule == "pretrain"}
    assert pretrained == {"stage=stage2", "stage=stage3", "stage=egoclip"}
    assert not {rule for rule, _ in jobs} & {"demo_corpus", "download", "extract_frames"}
    assert ("eval_retrieval", "dataset=demo_retrieval, stage=stage1") not in jobs
    assert ("eval_retrieval", "dataset=demo_retrieval, stage=stage2") in jobs


def test_an_appended_32_frame_stage_is_scheduled_without_code_changes(demo_run):
    cfg = yaml.safe_load((demo_run / "tests/configs/test.yaml").read_text())
    cfg["pretrain"]["curriculum"].append(
        {
            "name": "stage4",
            "init": "stage3",
            "frames": 32,
            "local_blocks": 1,
            "random_blocks": 1,
            "block_size": 16,
            "visual_keep": 0.4,
            "multimodal_keep": 0.5,
            "epochs": 1,
            "lr": 0.0001,
        }
    )
    (demo_run / "configs/longer.yaml").write_text(yaml.safe_dump(cfg))
    jobs = planned_jobs(demo_run, "configs/longer.yaml")
    assert ("pretrain", "stage=stage4") in jobs
    assert ("eval_retrieval", "dataset=demo_retrieval, stage=stage4") in jobs
    assert ("pretrain", "stage=stage3") not in jobs


def test_adding_a_dataset_or_a_stage_reruns_only_its_own_jobs(demo_run):
    """A paragraph-retrieval dataset (64 tokens) joins the evaluation list and stage2 the retrieval
    finetuning list: only their jobs are planned, each with its own settings."""
    cfg = yaml.safe_load((demo_run / "tests/configs/test.yaml").read_text())
    cfg["datasets"] = {
        "demo_didemo": {
            "videos": "resources/demo/downstream_videos.csv",
            "text_len": 64,
            "annotations": "resources/demo/retrieval_test_didemo.json",
            "paragraph": True,
        }
    }
    # tests/configs/test.yaml's own evaluation keys (the NLQ grounder's) stay: only the retrieval list changes
    cfg["evaluation"]["retrieval"] = {"datasets": ["demo_retrieval", {"name": "demo_didemo", "rerank_k": 4}]}
    cfg["finetune"]["retrieval"]["stages"] = ["stage3", "stage2"]
    (demo_run / "configs/added.yaml").write_text(yaml.safe_dump(cfg))
    assert planned_jobs(demo_run, "configs/added.yaml") == {
        ("download", "dataset=demo_didemo, index=000, shards=001"),
        ("extract_frames", "dataset=demo_didemo, index=000, shards=001"),
        *{("eval_retrieval", f"dataset=demo_didemo, stage={s}") for s in ("stage1", "stage2", "stage3")},
        ("plot_retrieval", "dataset=demo_didemo"),
        ("plot_probing", "dataset=demo_didemo"),
        ("finetune", "task=retrieval, dataset=demo_retrieval, stage=stage2"),
        ("eval_finetuned_retrieval", "dataset=demo_retrieval, stage=stage2"),
        ("tables", ""),
    }  # the results tables read every evaluation
    shell = snakemake(
        demo_run,
        "-n",
        "-p",
        "--cores",
        "1",
        "--configfile",
        "configs/added.yaml",
        "--forcerun",
        "results/eval/retrieval/demo_retrieval/stage1.json",
        "results/eval/retrieval/demo_retrieval/stage1.json",
        "results/eval/retrieval/demo_didemo/stage1.json",
    ).stdout
    settings = {
        m[2]: json.loads(m[1])
        for m in re.finditer(
            r"--config-json '(\{.*?\})' --out results/eval/retrieval/"
            r"(\w+)/stage1.json",
            shell,
        )
    }
    assert settings["demo_didemo"] == {"batch_size": 32, "paragraph": True, "rerank_k": 4, "text_len": 64}
    assert settings["demo_retrieval"] == {"batch_size": 32, "rerank_k": 8, "text_len": 32}


def test_evaluation_settings_rerun_the_evaluation_not_the_finetuning(demo_run):
    cfg = yaml.safe_load((demo_run / "tests/configs/test.yaml").read_text())
    cfg["evaluation"]["qa"] = {"scoring": "singularity"}
    cfg["finetune"]["io"] = {"num_workers": 0, "checkpoint_every": 3, "log_every": 1}
    (demo_run / "configs/scoring.yaml").write_text(yaml.safe_dump(cfg))
    assert planned_jobs(demo_run, "configs/scoring.yaml") == {
        ("eval_qa", "dataset=demo_qa, stage=stage3"),
        ("tables", ""),
    }  # the QA table reads it


@pytest.mark.parametrize(
    "edit,message",
    [
        ({"pretrain": {"gpu": 1}}, "Additional properties are not allowed \\('gpu' was unexpected\\)"),
        ({"frames": {"short_side": "big"}}, "'big' is not of type 'integer'"),
        ({"pretrain": {"curriculum": [{"name": "s1", "frames": 4, "learning_rate": 0.1}]}}, "learning_rate"),
    ],
)
def test_schema_errors_name_the_key(tmp_path, edit, message):
    workdir = copy_workflow(tmp_path)
    (workdir / "configs/bad.yaml").write_text(yaml.safe_dump(edit))
    result = snakemake(workdir, "-n", "all", "--configfile", "configs/bad.yaml", check=False)
    assert result.returncode != 0
    assert re.search(message, result.stdout + result.stderr)


def test_a_missing_input_list_is_snakemakes_missing_input_error(tmp_path):
    workdir = copy_workflow(tmp_path)
    result = snakemake(workdir, "-n", "all", "--configfile", "configs/paper.yaml", check=False)
    assert result.returncode != 0
    assert "MissingInputException" in result.stdout + result.stderr
    assert "data/webvid/results_2M_train.csv" in result.stdout + result.stderr


def test_paper_configuration_dry_run_shows_the_whole_dag(tmp_path):
    workdir = copy_workflow(tmp_path)
    paper_inputs(workdir)
    jobs = planned_jobs(workdir, "configs/paper.yaml")
    assert {w for r, w in jobs if r == "pretrain"} == {
        f"stage={s}" for s in ("stage1", "stage2", "stage3", "stage4", "egoclip", "egoclip_k5")
    }
    # WebVid is downloaded shard by shard; folder datasets are read in place (no download job)
    assert {w for r, w in jobs if r == "download"} == {f"dataset=webvid, index={i:03d}, shards=256" for i in range(256)}
    # msrvtt, didemo, charades, ssv2_label (8), ssv2_template (8), msrvtt_qa, anet_qa, agqa: finetuning datasets
    assert sum(r == "extract_frames" for r, _ in jobs) == 256 + 1 + 1 + 1 + 8 + 8 + 1 + 1 + 1 + 128 + 4 + 16
    assert {("nlq_videos", ""), ("nlq_features", "stage=egoclip"), ("ground", "stage=egoclip")} <= jobs
    assert {("eval_egomcq", "stage=egoclip"), ("eval_egomcq", "stage=egoclip_k5")} <= jobs
    assert {r for r, _ in jobs} >= {"plot_training", "plot_retrieval", "plot_egomcq", "plot_sparsity"}


def test_local_profile_dry_run(tmp_path):
    workdir = copy_workflow(tmp_path)
    result = snakemake(workdir, "-n", "all", "--profile", "profiles/local")
    assert "demo_corpus" in result.stdout


def test_html_report_holds_the_figures(demo_run):
    snakemake(demo_run, "--report", "report.html", "--configfile", "tests/configs/test.yaml")
    html = (demo_run / "report.html").read_text(errors="replace")
    for figure in ["training_curves.png", "retrieval_demo_retrieval.png", "egomcq.png", "sparsity.png"]:
        assert figure in html
