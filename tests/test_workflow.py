"""The Snakemake workflow for real: the demo DAG end to end at test size (configs/test.yaml),
what a config edit reruns, schema errors, the paper configuration's DAG, the profiles."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import h5py
import pytest
import yaml

from tests.helpers.workflow import copy_workflow


def snakemake(workdir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run([sys.executable, "-m", "snakemake", *args], cwd=workdir, env=env,
                            capture_output=True, text=True)
    if check and result.returncode:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result


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
def demo_run(tmp_path_factory):
    """The whole demo DAG (test size) run once for this module."""
    workdir = copy_workflow(tmp_path_factory.mktemp("workflow"))
    snakemake(workdir, "all", "--cores", "2", "--configfile", "configs/test.yaml")
    return workdir


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
        assert len(nlq) == 5 and all(nlq[k].shape[1] == 64 for k in nlq)  # 5 held-out videos, width 64
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
    assert planned_jobs(demo_run, "configs/test.yaml") == set()


def test_cosmetic_config_edits_rerun_nothing(demo_run):
    """Reordered keys, another YAML layout, 1e-3 written for 0.001: the same config."""
    cfg = yaml.safe_load((demo_run / "configs/test.yaml").read_text())
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
    cfg = yaml.safe_load((demo_run / "configs/test.yaml").read_text())
    cfg["pretrain"]["io"] = {"checkpoint_every": 7, "log_every": 3, "num_workers": 2}
    (demo_run / "configs/io.yaml").write_text(yaml.safe_dump(cfg))
    assert planned_jobs(demo_run, "configs/io.yaml") == set()
    forced = snakemake(demo_run, "-n", "-p", "--cores", "1", "--configfile", "configs/io.yaml",
                       "--forcerun", "results/pretrain/stage1/model.safetensors", "results/pretrain/stage1/model.safetensors").stdout
    assert "--checkpoint-every 7 --log-every 3 --num-workers 2" in forced


def test_editing_one_stage_reruns_that_stage_and_its_downstream_only(demo_run):
    cfg = yaml.safe_load((demo_run / "configs/test.yaml").read_text())
    cfg["pretrain"]["curriculum"][1]["lr"] = 0.0002  # stage2
    (demo_run / "configs/edited.yaml").write_text(yaml.safe_dump(cfg))
    jobs = planned_jobs(demo_run, "configs/edited.yaml")
    pretrained = {w for rule, w in jobs if rule == "pretrain"}
    assert pretrained == {"stage=stage2", "stage=stage3", "stage=egoclip"}
    assert not {rule for rule, _ in jobs} & {"demo_corpus", "download", "extract_frames"}
    assert ("eval_retrieval", "dataset=demo_retrieval, stage=stage1") not in jobs
    assert ("eval_retrieval", "dataset=demo_retrieval, stage=stage2") in jobs


def test_an_appended_32_frame_stage_is_scheduled_without_code_changes(demo_run):
    cfg = yaml.safe_load((demo_run / "configs/test.yaml").read_text())
    cfg["pretrain"]["curriculum"].append({
        "name": "stage4", "init": "stage3", "frames": 32, "local_blocks": 1, "random_blocks": 1, "block_size": 16,
        "visual_keep": 0.4, "multimodal_keep": 0.5, "epochs": 1, "lr": 0.0001})
    (demo_run / "configs/longer.yaml").write_text(yaml.safe_dump(cfg))
    jobs = planned_jobs(demo_run, "configs/longer.yaml")
    assert ("pretrain", "stage=stage4") in jobs
    assert ("eval_retrieval", "dataset=demo_retrieval, stage=stage4") in jobs
    assert ("pretrain", "stage=stage3") not in jobs


def test_adding_a_dataset_or_a_stage_reruns_only_its_own_jobs(demo_run):
    """A paragraph-retrieval dataset (64 tokens) joins the evaluation list and stage2 the retrieval
    finetuning list: only their jobs are planned, each with its own settings."""
    cfg = yaml.safe_load((demo_run / "configs/test.yaml").read_text())
    cfg["datasets"] = {"demo_didemo": {"videos": "resources/demo/downstream_videos.csv", "text_len": 64,
                                       "annotations": "resources/demo/retrieval_test_didemo.json", "paragraph": True}}
    cfg["evaluation"] = {"retrieval": {"datasets": ["demo_retrieval", {"name": "demo_didemo", "rerank_k": 4}]}}
    cfg["finetune"]["retrieval"]["stages"] = ["stage3", "stage2"]
    (demo_run / "configs/added.yaml").write_text(yaml.safe_dump(cfg))
    assert planned_jobs(demo_run, "configs/added.yaml") == {
        ("download", "dataset=demo_didemo"), ("extract_frames", "dataset=demo_didemo, index=000, shards=001"),
        *{("eval_retrieval", f"dataset=demo_didemo, stage={s}") for s in ("stage1", "stage2", "stage3")},
        ("plot_retrieval", "dataset=demo_didemo"),
        ("finetune", "task=retrieval, dataset=demo_retrieval, stage=stage2"),
        ("eval_finetuned_retrieval", "dataset=demo_retrieval, stage=stage2")}
    shell = snakemake(demo_run, "-n", "-p", "--cores", "1", "--configfile", "configs/added.yaml",
                      "--forcerun", "results/eval/retrieval/demo_retrieval/stage1.json",
                      "results/eval/retrieval/demo_retrieval/stage1.json",
                      "results/eval/retrieval/demo_didemo/stage1.json").stdout
    settings = {m[2]: json.loads(m[1]) for m in re.finditer(r"--config-json '(\{.*?\})' --out results/eval/retrieval/"
                                                             r"(\w+)/stage1.json", shell)}
    assert settings["demo_didemo"] == {"batch_size": 32, "paragraph": True, "rerank_k": 4, "text_len": 64}
    assert settings["demo_retrieval"] == {"batch_size": 32, "rerank_k": 8, "text_len": 32}


def test_evaluation_settings_rerun_the_evaluation_not_the_finetuning(demo_run):
    cfg = yaml.safe_load((demo_run / "configs/test.yaml").read_text())
    cfg["evaluation"] = {"qa": {"scoring": "singularity"}}
    cfg["finetune"]["io"] = {"num_workers": 0, "checkpoint_every": 3, "log_every": 1}
    (demo_run / "configs/scoring.yaml").write_text(yaml.safe_dump(cfg))
    assert planned_jobs(demo_run, "configs/scoring.yaml") == {("eval_qa", "dataset=demo_qa, stage=stage3")}


@pytest.mark.parametrize("edit,message", [
    ({"pretrain": {"gpu": 1}}, "Additional properties are not allowed \\('gpu' was unexpected\\)"),
    ({"frames": {"short_side": "big"}}, "'big' is not of type 'integer'"),
    ({"pretrain": {"curriculum": [{"name": "s1", "frames": 4, "learning_rate": 0.1}]}}, "learning_rate"),
])
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


PAPER_ANNOTATIONS = [f"data/anno/{name}.json" for name in (
    "msrvtt_ret_test1k", "msrvtt_ret_train9k", "didemo_ret_test", "didemo_ret_train", "charades_ret_test",
    "charades_ret_train", "ssv2_ret_label_val_small", "ssv2_ret_label_train", "ssv2_ret_template_val_small",
    "ssv2_ret_template_train", "msrvtt_qa_test", "msrvtt_qa_train", "msrvtt_qa_answer_list", "anet_qa_test",
    "anet_qa_train", "anet_qa_answer_list", "agqa_test", "agqa_train", "agqa_answer_list")]


def _paper_inputs(workdir: Path):
    for path in ["data/webvid/results_2M_train.csv", *PAPER_ANNOTATIONS, "data/ego4d/egoclip.csv",
                 "data/ego4d/egomcq.json", "data/ego4d/nlq_videos.tsv",
                 "data/bert-base-uncased/vocab.txt", "data/weights/beit_base_patch16_224.in22k_ft_in22k.pth"]:
        (workdir / path).parent.mkdir(parents=True, exist_ok=True)
        (workdir / path).touch()


def test_paper_configuration_dry_run_shows_the_whole_dag(tmp_path):
    workdir = copy_workflow(tmp_path)
    _paper_inputs(workdir)
    jobs = planned_jobs(workdir, "configs/paper.yaml")
    assert {w for r, w in jobs if r == "pretrain"} == {f"stage={s}" for s in ("stage1", "stage2", "stage3", "egoclip")}
    assert {w for r, w in jobs if r == "download"} == {
        f"dataset={d}" for d in ("webvid", "msrvtt", "didemo", "charades", "ssv2_label", "ssv2_template", "msrvtt_qa",
                                 "anet_qa", "agqa", "egoclip", "egomcq", "ego4d_nlq")}
    assert sum(r == "extract_frames" for r, _ in jobs) == 256 + 1 + 1 + 1 + 8 + 8 + 1 + 1 + 1 + 128 + 4 + 16
    assert ("nlq_features", "stage=egoclip") in jobs
    assert ("eval_egomcq", "stage=egoclip") in jobs
    assert {r for r, _ in jobs} >= {"plot_training", "plot_retrieval", "plot_egomcq", "plot_sparsity"}


def test_paper_stage_configs_follow_table_9(tmp_path):
    """What the pretrain rule hands train.py for the paper's three stages."""
    workdir = copy_workflow(tmp_path)
    _paper_inputs(workdir)
    out = snakemake(workdir, "-n", "all", "--configfile", "configs/paper.yaml", "--printshellcmds").stdout
    stages = {}
    for match in re.finditer(r"--config-json '(\{.*?\})'", out):
        cfg = json.loads(match.group(1))
        if "model" in cfg:  # a pretrain stage (evaluation rules pass settings too)
            stages[cfg["name"]] = cfg
    video = {name: cfg["model"]["video"] for name, cfg in stages.items()}
    assert video["stage1"].get("block_size") is None and video["stage1"]["frames"] == 4
    for name, frames, q_v in (("stage2", 8, 0.6), ("stage3", 16, 0.5)):
        assert (video[name]["frames"], video[name]["visual_keep"]) == (frames, q_v)
        assert (video[name]["local_blocks"], video[name]["random_blocks"], video[name]["block_size"]) == (1, 3, 56)
        assert stages[name]["model"]["text"]["multimodal_keep"] == 0.1
    assert [stages[s]["batch_size"] for s in ("stage1", "stage2", "stage3")] == [512, 336, 192]
    assert [stages[s]["lr"] for s in ("stage1", "stage2", "stage3")] == [3e-5, 1e-5, 5e-6]
    assert stages["egoclip"]["objectives"] == {"egonce": 1.0, "vtm": 1.0, "mlm": 1.0}


def test_lint_reports_nothing(tmp_path):
    result = snakemake(copy_workflow(tmp_path), "--lint", check=False)
    report = result.stdout + result.stderr
    assert "Congratulations, your workflow is in a good condition!" in report, report


def test_local_profile_dry_run(tmp_path):
    workdir = copy_workflow(tmp_path)
    result = snakemake(workdir, "-n", "all", "--profile", "profiles/local")
    assert "demo_corpus" in result.stdout


def test_html_report_holds_the_figures(demo_run):
    snakemake(demo_run, "--report", "report.html", "--configfile", "configs/test.yaml")
    html = (demo_run / "report.html").read_text(errors="replace")
    for figure in ["training_curves.png", "retrieval_demo_retrieval.png", "egomcq.png", "sparsity.png"]:
        assert figure in html
