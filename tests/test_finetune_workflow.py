"""The paper configuration's finetuning DAG (dry run, placeholder inputs): a finetuning and an
evaluation job for every configured dataset and stage, each with Table 9's settings (the resolved
training configs: tests/test_paper_config.py)."""

import json
import re

import pytest

from tests.helpers.workflow import copy_workflow, paper_inputs, snakemake
from tests.test_workflow import planned_jobs

RETRIEVAL = ("msrvtt", "didemo", "charades", "ssv2_label", "ssv2_template")
QA = ("msrvtt_qa", "anet_qa", "agqa")
STAGES = ("stage2", "stage3", "stage4")  # the chain's sparse stages: T = 4, 8, 16
QA_STAGE = "stage3"  # T = 8


@pytest.fixture(scope="module")
def paper(tmp_path_factory):
    workdir = copy_workflow(tmp_path_factory.mktemp("paper"))
    paper_inputs(workdir)
    shell = snakemake(workdir, "-n", "-p", "all", "--cores", "1", "--configfile", "configs/paper.yaml").stdout
    jobs = {
        json.loads(m[1])["name"]: json.loads(m[1]) for m in re.finditer(r"finetune.py --config-json '(\{.*?\})'", shell)
    }
    return workdir, shell, jobs


def test_every_configured_dataset_gets_its_finetuning_and_evaluation_jobs(paper):
    workdir, _, _ = paper
    jobs = planned_jobs(workdir, "configs/paper.yaml")
    assert {w for r, w in jobs if r == "finetune"} == (
        {f"task=retrieval, dataset={d}, stage={s}" for d in RETRIEVAL for s in STAGES}
        | {f"task=qa, dataset={d}, stage={QA_STAGE}" for d in QA}
    )
    assert {w for r, w in jobs if r == "eval_finetuned_retrieval"} == {
        f"dataset={d}, stage={s}" for d in RETRIEVAL for s in STAGES
    }
    assert {w for r, w in jobs if r == "eval_qa"} == {f"dataset={d}, stage={QA_STAGE}" for d in QA}


def test_finetuning_jobs_follow_table_9(paper):
    _, _, jobs = paper
    for stage, frames, batch, q_v in (("stage2", 4, 64, 0.7), ("stage3", 8, 48, 0.6), ("stage4", 16, 32, 0.5)):
        for name in RETRIEVAL:
            job = jobs[f"retrieval/{name}/{stage}"]
            assert (job["batch_size"], job["visual_keep"], job["multimodal_keep"]) == (batch, q_v, 0.1)
            assert (job["epochs"], job["warmup_epochs"], job["lr"], job["weight_decay"]) == (15, 0, 1e-5, 0.02)
            assert (job["local_blocks"], job["random_blocks"], job["block_size"]) == (1, 3, 56)
            assert job["objectives"] == {"vtc": 1.0, "vtm": 1.0} and job["frames"] == frames  # the stage's own T
            assert job["data"]["text_len"] == (64 if name == "didemo" else 32)
            assert job["data"].get("paragraph", False) == (name == "didemo")
    for name in QA:
        job = jobs[f"qa/{name}/{QA_STAGE}"]
        assert (job["frames"], job["batch_size"], job["lr"], job["epochs"]) == (
            8,
            128,
            5e-5,
            1 if name == "agqa" else 5,
        )
        assert (job["visual_keep"], job["multimodal_keep"], job["decoder_layers"]) == (0.6, 0.5, 3)
        assert (job["data"]["text_len"], job["data"]["answer_len"]) == (25, 5)


def test_evaluations_get_their_dataset_text_length_and_qa_its_protocol(paper):
    _, shell, _ = paper
    retrieval = {
        m[2]: json.loads(m[1])
        for m in re.finditer(
            r"--config-json '(\{.*?\})' --out results/eval/retrieval(?:_finetuned)?/(\w+)/stage2.json", shell
        )
    }
    assert retrieval["didemo"] == {"batch_size": 32, "paragraph": True, "rerank_k": 128, "text_len": 64}
    assert retrieval["msrvtt"] == retrieval["charades"] == {"batch_size": 32, "rerank_k": 128, "text_len": 32}
    qa = re.search(r"evaluate.py qa .*--answer-list data/anno/agqa_answer_list.json .*--config-json '(\{.*?\})'", shell)
    assert json.loads(qa[1]) == {"batch_size": 32, "rerank_k": 128, "scoring": "sequence"}
    assert "--overlap warn" in shell and "--overlap error" not in shell  # real data: the user decides
