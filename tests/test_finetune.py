"""Finetuning through workflow_scripts/finetune.py on demo data: the job config, the train/test
overlap check, exact resume after SIGKILL, the retrieval path, per-dataset text length."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import svitt
from svitt.data.pipeline import PairCollator, build_train_loader, load_tokenizer
from svitt.evaluation import task as eval_task
from svitt.models import resolve_model_config
from svitt.training.checkpoint import export_model
from svitt.training.keys import finetune_config, resolve_train_config

ROOT = Path(__file__).resolve().parents[1]
FINETUNE = ROOT / "workflow_scripts/finetune.py"


@pytest.fixture(scope="module")
def init(pipeline, tmp_path_factory):
    """A pretraining stage's export: a tiny 8-frame sparse model (random weights)."""
    corpus, _ = pipeline
    vocab = len(load_tokenizer(corpus / "tokenizer"))
    torch.manual_seed(0)
    model = svitt.build_model(
        {
            "video": {
                "preset": "tiny",
                "frames": 8,
                "local_blocks": 1,
                "random_blocks": 1,
                "block_size": 8,
                "visual_keep": 0.6,
            },
            "text": {"preset": "tiny", "vocab_size": vocab, "multimodal_keep": 0.5},
            "embed_dim": 16,
        }
    )
    out = tmp_path_factory.mktemp("stage")
    export_model(model, out, {"name": "stage2", "model_config": model.cfg, "train_config": {}})
    return out / "model.safetensors"


def test_a_job_entry_sets_the_init_model_and_the_training_keys(init):
    base = json.loads(init.with_name("model.json").read_text())["model_config"]
    cfg = finetune_config(
        {
            "task": "qa",
            "name": "qa/x/stage2",
            "frames": 4,
            "visual_keep": 0.7,
            "multimodal_keep": 0.1,
            "epochs": 2,
            "batch_size": 4,
            "lr": 1e-4,
            "data": {"text_len": 25},
        },
        base,
    )
    assert cfg["task"] == "qa" and cfg["epochs"] == 2 and "frames" not in cfg
    assert (cfg["model"]["video"]["frames"], cfg["model"]["video"]["visual_keep"]) == (4, 0.7)
    assert cfg["model"]["video"]["block_size"] == 8 and cfg["model"]["text"]["multimodal_keep"] == 0.1
    resolved = resolve_train_config(cfg)
    assert resolved["objectives"] == {"qa": 1.0} and resolved["data"]["answer_len"] == 5
    retrieval = finetune_config({"task": "retrieval", "name": "r", "epochs": 1, "batch_size": 4, "lr": 1e-4}, base)
    assert retrieval["task"] == "pairs" and retrieval["objectives"] == {"vtc": 1.0, "vtm": 1.0}
    assert retrieval["model"]["video"]["frames"] == 8  # the stage's own clip length
    with pytest.raises(ValueError, match="finetuning task must be one of"):
        finetune_config({"task": "captioning"}, base)
    with pytest.raises(ValueError, match=r"unknown stage.data key\(s\) \['answer_len'\]"):
        resolve_train_config(finetune_config({**retrieval, "task": "retrieval", "data": {"answer_len": 5}}, base))


def _cli(pipeline, init, out, cfg, annotations, test=None, extra=()):
    corpus, res = pipeline
    cmd = [
        sys.executable,
        str(FINETUNE),
        "--config-json",
        json.dumps(cfg),
        "--init",
        str(init),
        "--shards",
        str(res / "frames/downstream/shard-0.h5"),
        "--annotations",
        str(annotations),
        "--tokenizer",
        str(corpus / "tokenizer"),
        "--out",
        str(out),
        "--no-progress",
        *extra,
    ]
    return cmd + (["--test-annotations", str(test)] if test else [])


def test_a_train_split_overlapping_the_test_split_is_an_error_listing_it_or_a_warning(pipeline, init, tmp_path):
    corpus, _ = pipeline
    test = json.loads((corpus / "qa_test.json").read_text())
    train = json.loads((corpus / "qa_train.json").read_text())
    leaked = sorted({q["video"] for q in test})[:2]
    (tmp_path / "train.json").write_text(json.dumps(train + [q for q in test if q["video"] in leaked]))
    cfg = {"task": "qa", "name": "qa", "epochs": 1, "batch_size": 4, "lr": 1e-4, "data": {"num_workers": 0}}
    run = subprocess.run(
        _cli(pipeline, init, tmp_path / "out", cfg, tmp_path / "train.json", corpus / "qa_test.json"),
        capture_output=True,
        text=True,
    )
    assert run.returncode == 2
    assert f"share {len(leaked)} video(s): {', '.join(leaked)}" in run.stderr
    assert not (tmp_path / "out").exists()  # stopped before anything was written
    run = subprocess.run(
        _cli(
            pipeline,
            init,
            tmp_path / "out",
            {**cfg, "max_steps": 1},
            tmp_path / "train.json",
            corpus / "qa_test.json",
            ["--overlap", "warn"],
        ),
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    videos = len({q["video"] for q in train}) + len(leaked)
    assert f"warning: {len(leaked)} of {videos} videos of the finetuning split" in run.stderr


QA_JOB = {
    "task": "qa",
    "name": "qa/demo/stage2",
    "frames": 4,
    "epochs": 3,
    "batch_size": 4,
    "lr": 3e-4,
    "warmup_epochs": 0,
    "log_every": 1,
    "checkpoint_every": 2,
    "data": {"flip": False, "num_workers": 0},
}


def _losses(out):
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


def _wait_for_step(out, step, proc, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (out / "metrics.jsonl").exists() and max(_losses(out), default=0) >= step:
            return
        assert proc.poll() is None, "finetuning ended before it could be interrupted"
        time.sleep(0.05)
    raise TimeoutError(f"step {step} not reached")


@pytest.mark.slow
def test_a_finetuning_job_killed_mid_run_resumes_to_the_uninterrupted_result(pipeline, init, tmp_path):
    """QA finetuning (12 questions, 3 epochs x 3 steps) killed after step 5 and run again gives the
    losses and the weights of a run that was never stopped."""
    corpus, _ = pipeline
    train = corpus / "qa_train.json"
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    assert subprocess.run(_cli(pipeline, init, reference, QA_JOB, train)).returncode == 0
    proc = subprocess.Popen(_cli(pipeline, init, resumed, QA_JOB, train))
    _wait_for_step(resumed, 5, proc)
    proc.kill()
    proc.wait()
    assert not (resumed / "model.safetensors").exists()
    saved = torch.load(resumed / "checkpoint.pt", weights_only=True)["step"]
    assert 2 <= saved < 9
    assert subprocess.run(_cli(pipeline, init, resumed, QA_JOB, train)).returncode == 0
    expected, got = _losses(reference), _losses(resumed)
    assert sorted(got) == sorted(expected) == list(range(1, 10))
    for step in range(1, 10):
        assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), step
    weights, again = load_file(reference / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert set(weights) == set(again) and any(k.startswith("answer_decoder.") for k in weights)
    for name, tensor in weights.items():
        torch.testing.assert_close(again[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    info = json.loads((resumed / "model.json").read_text())
    assert info["train_config"]["task"] == "qa" and info["frames"] == 4 and info["steps"] == 9


def test_retrieval_finetuning_trains_vtc_and_vtm_from_the_stage_and_evaluates(pipeline, init, tmp_path):
    corpus, res = pipeline
    captions = {r["video"]: r["caption"] for r in json.loads((corpus / "retrieval_test.json").read_text())}
    qa_videos = sorted({q["video"] for q in json.loads((corpus / "qa_train.json").read_text())})
    import csv

    rows = {r["id"]: r["caption"] for r in csv.DictReader(open(corpus / "downstream_videos.csv"))}
    (tmp_path / "train.json").write_text(json.dumps([{"video": v, "caption": rows[v]} for v in qa_videos]))
    assert not set(qa_videos) & set(captions)
    cfg = {
        "task": "retrieval",
        "name": "retrieval/demo/stage2",
        "epochs": 2,
        "batch_size": 4,
        "lr": 1e-4,
        "warmup_epochs": 0,
        "log_every": 1,
        "data": {"flip": False, "num_workers": 0},
    }
    out = tmp_path / "out"
    run = subprocess.run(
        _cli(pipeline, init, out, cfg, tmp_path / "train.json", corpus / "retrieval_test.json"),
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(
        set(r) >= {"vtc", "vtm", "loss"} and "mlm" not in r for r in rows
    )
    assert rows[0]["loss"] == pytest.approx(rows[0]["vtc"] + rows[0]["vtm"])
    before, after = load_file(init), load_file(out / "model.safetensors")
    assert set(before) == set(after) and not torch.equal(before["vtm_head.weight"], after["vtm_head.weight"])
    evaluate = subprocess.run(
        [
            sys.executable,
            str(ROOT / "workflow_scripts/evaluate.py"),
            "retrieval",
            "--model",
            str(out / "model.safetensors"),
            "--shards",
            str(res / "frames/downstream/shard-0.h5"),
            "--annotations",
            str(corpus / "retrieval_test.json"),
            "--tokenizer",
            str(corpus / "tokenizer"),
            "--config-json",
            json.dumps({"rerank_k": 3}),
            "--out",
            str(tmp_path / "eval.json"),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
    )
    assert evaluate.returncode == 0, evaluate.stderr[-2000:]
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["stage"] == "retrieval/demo/stage2" and set(result) >= {"metrics", "metrics_vtm", "twins"}


def _long_captions(corpus, path, sentences=3):
    """A DiDeMo-like file: per test video a list of sentences, each the video's whole caption."""
    items = json.loads((corpus / "retrieval_test.json").read_text())
    path.write_text(json.dumps([{"video": i["video"], "caption": [i["caption"] + "."] * sentences} for i in items]))
    return items


def test_a_dataset_text_length_reaches_training_and_evaluation(pipeline, tmp_path):
    corpus, res = pipeline
    items = _long_captions(corpus, tmp_path / "didemo.json")
    tokenizer = load_tokenizer(corpus / "tokenizer")
    full = len(tokenizer(" ".join([items[0]["caption"] + "."] * 3))["input_ids"])
    assert full > 32
    model = resolve_model_config(
        {"video": {"preset": "tiny", "frames": 4}, "text": {"preset": "tiny", "vocab_size": len(tokenizer)}}
    )
    data = type("Data", (), {"shards": [res / "frames/downstream/shard-0.h5"], "annotations": tmp_path / "didemo.json"})
    longest = {}
    for text_len, paragraph in ((64, True), (32, True), (64, False)):
        cfg = resolve_train_config(
            {
                "name": "s",
                "model": model,
                "objectives": {"vtc": 1.0},
                "epochs": 1,
                "batch_size": 8,
                "lr": 1e-4,
                "data": {"text_len": text_len, "paragraph": paragraph, "flip": False, "num_workers": 0},
            }
        )
        loader = build_train_loader(cfg, data, tokenizer, 8, 0, 1)
        assert len(loader.dataset) == (8 if paragraph else 24)  # one text per video, or per sentence
        longest[text_len, paragraph] = max(b["input_ids"].shape[1] for b in loader.epoch(0))
    assert longest[64, True] > 32 and longest[32, True] == 32 and longest[64, False] < 32
    retrieval = eval_task("retrieval")
    dataset = retrieval.build_dataset(res / "frames/downstream", tmp_path / "didemo.json", 4, None, {"paragraph": True})
    assert len(dataset.texts) == 8 and dataset.texts[0].count(items[0]["caption"]) == 3
    assert PairCollator(tokenizer, 64).tokenize(dataset.texts)["input_ids"].shape[1] == full
    assert PairCollator(tokenizer, 32).tokenize(dataset.texts)["input_ids"].shape[1] == 32
