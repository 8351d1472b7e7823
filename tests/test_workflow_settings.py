"""svitt.workflow (config layering, datasets, evaluation and finetuning settings, analyses, targets):
what rules/*.smk computes, checked against hand-computed values without Snakemake."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from svitt.workflow import analysis, datasets, evaluation, stages, targets
from svitt.workflow import config as wconfig
from tests.helpers.resolved_stages import resolved

REPO = Path(__file__).resolve().parents[1]


def _config(**changes):
    """A small complete workflow config (what the schema's defaults leave), changed by `changes`."""
    cfg = {
        "datasets": {
            "webvid": {"videos": "w.csv", "annotations": "w.csv", "shards": 2, "ego4d_cli": False},
            "ret": {
                "videos": "data/ret",
                "annotations": "ret_test.json",
                "train_annotations": "ret_train.json",
                "shards": 1,
                "ego4d_cli": False,
                "text_len": 64,
            },
            "qa": {
                "videos": "qa.csv",
                "annotations": "qa_test.json",
                "train_annotations": "qa_train.json",
                "answer_list": "answers.json",
                "shards": 1,
                "ego4d_cli": False,
            },
            "ego": {
                "videos": "ego_videos",
                "annotations": "egoclip.csv",
                "clips": "egoclip",
                "shards": 1,
                "ego4d_cli": False,
            },
        },
        "tokenizer": "tok",
        "download": {"workers": 4, "timeout": 60, "retries": 3, "max_bytes": 100, "max_failed_fraction": 0.05},
        "frames": {"frames": 32, "short_side": 40, "workers": 2, "max_failed_fraction": 0.1},
        "model": {"video": {"preset": "tiny"}, "text": {"preset": "tiny"}},
        "pretrain": {
            "seeds": [],
            "defaults": {"lr": 1e-3, "epochs": 4, "warmup_epochs": 1, "data": {"flip": False}},
            "curriculum": [
                {"name": "stage1", "frames": 4},
                {
                    "name": "stage2",
                    "init": "stage1",
                    "frames": 8,
                    "local_blocks": 1,
                    "random_blocks": 1,
                    "block_size": 16,
                    "visual_keep": 0.6,
                    "lr": 5e-4,
                    "warmup_epochs": 0,
                    "data": {"scale": [0.9, 1.0]},
                },
            ],
            "egoclip": None,
            "extra": [],
            "ablation": [],
        },
        "finetune": {
            "io": {},
            "retrieval": {
                "datasets": ["ret"],
                "stages": ["stage2"],
                "defaults": {"epochs": 5, "lr": 1e-4, "data": {"flip": False}},
            },
            "qa": {
                "datasets": [{"name": "qa", "epochs": 2}],
                "stages": [{"name": "stage2", "frames": 8}],
                "defaults": {"epochs": 5, "lr": 3e-4},
            },
        },
        "evaluation": {
            "retrieval": {"datasets": ["ret", {"name": "qa", "rerank_k": 4}], "batch_size": 32, "rerank_k": 8},
            "qa": {"batch_size": 32},
        },
        "analysis": {
            "efficiency": {},
            "sweep": None,
            "paper_sweep": None,
            "pruning_maps": None,
            "control": None,
            "ablation": None,
        },
    }
    for key, value in changes.items():
        cfg[key] = value
    return cfg


# ------------------------------------------------------------------------------------ config


def test_scientific_strings_become_numbers_everywhere():
    assert wconfig.numbers({"lr": "1e-5", "x": ["2E3", "1e", "abc"], "n": {"m": "-3.5e-2"}}) == {
        "lr": 1e-05,
        "x": [2000.0, "1e", "abc"],
        "n": {"m": -0.035},
    }


def test_without_a_standalone_overlay_snakemakes_merge_stands():
    assert wconfig.standalone_layers([{"a": 1}, {"b": {"c": 2}}], {"d": 3}) is None


def test_a_standalone_overlay_replaces_what_came_before_and_later_ones_merge_over_it():
    overlays = [
        {"demo": 1, "pretrain": {"x": 1}},
        {"standalone": True, "pretrain": {"y": 2, "z": {"a": 1, "b": 2}}, "list": [1, 2]},
        {"pretrain": {"z": {"b": 3}}, "list": [9]},
    ]
    merged = wconfig.standalone_layers(overlays, {"pretrain": {"y": 5}})
    assert merged == {"standalone": True, "pretrain": {"y": 5, "z": {"a": 1, "b": 3}}, "list": [9]}


def test_the_last_standalone_overlay_wins():
    assert wconfig.standalone_layers([{"standalone": True, "a": 1}, {"standalone": True, "b": 2}], {}) == {
        "standalone": True,
        "b": 2,
    }


def test_canonical_and_cli_flags_are_one_spelling():
    assert wconfig.canonical({"b": 1.0, "a": [1, {"d": 2, "c": 3}]}) == '{"a":[1,{"c":3,"d":2}],"b":1.0}'
    assert wconfig.cli_flags({"max_bytes": 5, "a_b": "x", "skip_me": 1}, skip=("skip_me",)) == "--a-b x --max-bytes 5"


def test_by_name_reads_names_and_entries_in_order():
    assert wconfig.by_name(["a", {"name": "b", "k": 1}]) == {"a": {}, "b": {"k": 1}}


# ---------------------------------------------------------------------------------- datasets


def test_dataset_lookups():
    cfg = _config()
    assert datasets.is_video_list(cfg, "webvid") and not datasets.is_video_list(cfg, "ret")
    assert datasets.is_downloaded(cfg, "qa") and not datasets.is_downloaded(cfg, "ego")
    assert datasets.shard_paths(cfg, "webvid") == [
        "resources/frames/webvid/shard-000-of-002.h5",
        "resources/frames/webvid/shard-001-of-002.h5",
    ]
    with pytest.raises(ValueError, match="dataset 'nope' is not configured under `datasets`"):
        datasets.dataset(cfg, "nope")


def test_download_and_extraction_flags():
    cfg = _config()
    assert datasets.download_source(cfg, "webvid") == "--csv w.csv"
    assert datasets.download_run(cfg) == "--max-failed-fraction 0.05 --retries 3 --timeout 60"
    with pytest.raises(ValueError, match="reads its videos in place from data/ret"):
        datasets.download_list(cfg, "ret")
    assert (
        datasets.extraction_source(cfg, "webvid", "001", "002")
        == "--videos resources/videos/webvid/shard-001-of-002/manifest.csv"
    )
    assert (
        datasets.extraction_source(cfg, "ret", "000", "001") == "--videos data/ret --ids ret_test.json ret_train.json"
    )
    assert datasets.extraction_source(cfg, "ego", "000", "001") == "--videos ego_videos"
    assert datasets.extraction_files(cfg, "ret", "000", "001") == {
        "annotations": "ret_test.json",
        "train_annotations": "ret_train.json",
        "folder": "data/ret",
    }
    assert datasets.extraction_flags(cfg, "webvid") == "--frames 32 --short-side 40"
    assert datasets.extraction_run(cfg) == "--max-failed-fraction 0.1"
    assert datasets.clip_flag(cfg, "ego") == "--clips egoclip.csv" and datasets.clip_flag(cfg, "ret") == ""


# --------------------------------------------------------------------- evaluation, finetuning


def test_retrieval_settings_layer_section_dataset_and_entry():
    cfg = _config()
    assert evaluation.retrieval_datasets(cfg) == ["ret", "qa"]
    assert evaluation.retrieval_eval_settings(cfg, "ret") == {"batch_size": 32, "rerank_k": 8, "text_len": 64}
    assert evaluation.retrieval_eval_settings(cfg, "qa") == {"batch_size": 32, "rerank_k": 4}


def test_finetune_settings_layer_defaults_stage_dataset_and_text():
    cfg = _config()
    assert evaluation.finetune_pairs(cfg, "retrieval") == [("ret", "stage2")]
    assert evaluation.finetune_settings(cfg, "retrieval", "ret", "stage2") == {
        "epochs": 5,
        "lr": 1e-4,
        "data": {"flip": False, "text_len": 64},
        "task": "retrieval",
        "name": "retrieval/ret/stage2",
    }
    assert evaluation.finetune_settings(cfg, "qa", "qa", "stage2") == {
        "epochs": 2,
        "lr": 3e-4,
        "frames": 8,
        "task": "qa",
        "name": "qa/qa/stage2",
    }


def test_a_finetuning_job_needs_a_stage_and_its_files():
    cfg = _config()
    cfg["finetune"]["retrieval"]["stages"] = ["stage9"]
    with pytest.raises(ValueError, match="finetune.retrieval.stages names 'stage9', which is not a pretraining"):
        evaluation.check_finetune(cfg)
    cfg = _config()
    cfg["finetune"]["qa"]["datasets"] = ["ret"]
    with pytest.raises(ValueError, match="names 'ret', whose entry under `datasets` has no answer_list"):
        evaluation.check_finetune(cfg)


def test_dataset_uses():
    from svitt.workflow.uses import dataset_uses

    assert dataset_uses(_config()) == {
        "webvid": ["pretraining", "videos"],
        "ret": ["folder", "retrieval", "retrieval_finetuning"],
        "qa": ["qa", "retrieval", "videos"],
    }


# ------------------------------------------------------------------------------ analyses, targets


def test_sweep_points_are_named_by_their_numbers():
    cfg = _config()
    cfg["analysis"]["sweep"] = {"dataset": "ret", "stages": ["stage1"], "edge": [[1, 3, 56]], "keep": [[0.7, 1.0]]}
    assert analysis.sweep_points(cfg, "sweep") == {
        "edge_1_3_56": {"local_blocks": 1, "random_blocks": 3, "block_size": 56},
        "keep_0.7_1": {"visual_keep": 0.7, "multimodal_keep": 1.0},
    }
    assert analysis.sweep_references(cfg, "sweep") == {"stage1": ["results/eval/retrieval/ret/stage1.json"]}


def test_each_analysis_names_an_evaluated_dataset():
    cfg = _config()
    cfg["analysis"]["sweep"] = {"stages": ["stage1"], "edge": [[1, 1, 8]]}
    with pytest.raises(ValueError, match="analysis.sweep names no dataset"):
        analysis.check_analysis_datasets(cfg)
    cfg["analysis"]["sweep"]["dataset"] = "webvid"
    with pytest.raises(ValueError, match="analysis.sweep.dataset names 'webvid', which is not evaluated"):
        analysis.check_analysis_datasets(cfg)
    cfg["analysis"]["sweep"]["dataset"] = "msrvtt"
    with pytest.raises(ValueError, match="'msrvtt', which is not configured under `datasets`"):
        analysis.check_analysis_datasets(cfg)
    cfg["analysis"]["sweep"] = None
    cfg["analysis"]["ablation"] = [{"frames": 8, "single": "s8", "expansion": "stage2", "dataset": "qa"}]
    assert analysis.ablation_runs(cfg) == {
        "8:single": ["results/eval/retrieval/qa/s8.json"],
        "8:expansion": ["results/eval/retrieval/qa/stage2.json"],
    }
    cfg["analysis"]["control"] = {"temporal": "late", "stages": ["stage1"], "dataset": "qa"}
    assert analysis.control_runs(cfg, "late") == {"stage1": ["results/eval/retrieval/qa/stage1_late.json"]}


def test_results_of_lists_one_file_per_seed():
    cfg = _config()
    cfg["pretrain"]["seeds"] = [1, 2]
    assert analysis.results_of(cfg, "r/stage2.json") == ["r/stage2.json", "r/stage2-seed1.json", "r/stage2-seed2.json"]
    assert analysis.results_of(cfg, "r/stage2-seed1.json") == ["r/stage2-seed1.json"]


def test_table_names_decide_the_tables_in_results_md_order():
    assert analysis.table_names({"a": True, "b": False}, {"q": True}, False) == [
        "retrieval_a",
        "twins_a",
        "probing_a",
        "retrieval_b",
        "twins_b",
        "qa_q",
        "probing_qa_q",
        "egomcq",
        "efficiency",
    ]
    assert analysis.table_names({}, {}, None, efficiency=False) == []


def test_table_outputs_from_the_config():
    cfg = _config()  # frame_orders unset: every order, so every task is probed
    assert analysis.table_outputs(cfg) == [
        "retrieval_ret",
        "twins_ret",
        "probing_ret",
        "retrieval_qa",
        "twins_qa",
        "probing_qa",
        "retrieval_ret_finetuned",
        "twins_ret_finetuned",
        "probing_ret_finetuned",
        "qa_qa",
        "probing_qa_qa",
        "efficiency",
    ]


def test_the_targets_of_a_small_config():
    cfg = _config()
    cfg["finetune"]["qa"] = None
    cfg["evaluation"]["retrieval"]["datasets"] = ["ret"]
    models = [
        f"results/pretrain/{s}/{f}"
        for s in ("stage1", "stage2")
        for f in ("model.safetensors", "model.json", "metrics.jsonl")
    ]
    assert targets.result_files(cfg, ["stage1", "stage2"], []) == models + [
        "results/eval/retrieval/ret/stage1.json",
        "results/eval/retrieval/ret/stage2.json",
    ]
    assert targets.finetune_outputs(cfg) == [
        f"results/finetune/retrieval/ret/stage2/{f}" for f in ("model.safetensors", "model.json", "metrics.jsonl")
    ] + ["results/eval/retrieval_finetuned/ret/stage2.json"]
    cfg["pretrain"]["ablation"] = [{"name": "single8", "like": "stage2"}]
    assert targets.ablation_outputs(cfg)[-1] == "results/eval/retrieval/ret/single8.json"


# ------------------------------------------------------------------------------------ like:


def test_like_copies_a_curriculum_stage_but_its_name_and_init():
    cfg = _config()
    cfg["pretrain"]["ablation"] = [{"name": "single8", "like": "stage2", "lr": 1e-3, "data": {"flip": True}}]
    single = stages.stage_config(cfg, "single8")
    assert single["model"]["video"] == {
        "preset": "tiny",
        "frames": 8,
        "local_blocks": 1,
        "random_blocks": 1,
        "block_size": 16,
        "visual_keep": 0.6,
    }
    assert single["lr"] == 1e-3 and single["warmup_epochs"] == 0 and single["epochs"] == 4
    assert single["data"] == {"flip": True, "scale": [0.9, 1.0]}  # data merges key by key
    assert single["name"] == "single8" and "like" not in single
    assert stages.stage_init(stages.with_control(cfg), "single8") is None  # init is never copied


def test_a_like_copy_may_set_its_own_init():
    cfg = _config()
    cfg["pretrain"]["extra"] = [{"name": "again", "like": "stage2", "init": "stage1"}]
    assert stages.stage_init(stages.with_control(cfg), "again") == "stage1"


@pytest.mark.parametrize(
    "like, message",
    [
        ("stage9", "pretrain.ablation stage 'x' says like: 'stage9', which is not a curriculum stage"),
        ("stage3", "says like: 'stage3', which says like: 'stage2' itself"),
    ],
)
def test_like_names_a_curriculum_stage_written_out(like, message):
    cfg = _config()
    cfg["pretrain"]["curriculum"].append({"name": "stage3", "init": "stage2", "like": "stage2", "frames": 16})
    cfg["pretrain"]["ablation"] = [{"name": "x", "like": like}]
    with pytest.raises(ValueError, match=message):
        stages.configured_stages(stages.with_control(cfg))


def test_every_stage_of_the_shipped_configs_resolves_as_before():
    """tests/data/resolved_stages.json: every stage of config.yaml, configs/paper.yaml and its
    overlays as resolved before `like:` and the settings package (tests/helpers/resolved_stages.py)."""
    expected = json.loads((REPO / "tests/data/resolved_stages.json").read_text())
    assert json.loads(json.dumps(resolved(REPO))) == expected


def test_the_package_imports_without_torch():
    code = (
        "import sys; sys.modules['torch'] = None; import svitt.workflow.config, svitt.workflow.datasets, "
        "svitt.workflow.evaluation, svitt.workflow.analysis, svitt.workflow.targets, svitt.workflow.uses, "
        "svitt.workflow.stages; assert 'snakemake' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
