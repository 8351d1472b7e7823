"""svitt.workflow.stages: how the workflow turns pretrain.* into each stage's training config."""

import sys

import pytest

from svitt.workflow.stages import (
    all_stage_names,
    configured_stages,
    split_variant,
    stage_config,
    stage_init,
    with_control,
)

CONFIG = {
    "datasets": {"webvid": {}, "egoclip": {"clips": "egoclip"}},
    "model": {"video": {"preset": "tiny"}, "text": {"preset": "tiny"}, "embed_dim": 64},
    "pretrain": {
        "defaults": {"lr": 1e-3, "epochs": 4, "data": {"flip": False, "text_len": 32}},
        "curriculum": [
            {"name": "stage1", "frames": 4},
            {
                "name": "stage2",
                "init": "stage1",
                "frames": 8,
                "local_blocks": 1,
                "random_blocks": 1,
                "block_size": 16,
                "multimodal_keep": 0.5,
                "lr": 5e-4,
                "data": {"scale": [0.9, 1.0]},
            },
        ],
        "egoclip": {"name": "egoclip", "init": "stage2", "dataset": "egoclip", "frames": 4},
        "extra": [{"name": "late", "frames": 8, "model": {"video": {"depth": 2}}}],
        "ablation": [{"name": "single8", "frames": 8}],
        "seeds": [1],
    },
}


def test_stage_settings_override_the_defaults_and_the_model():
    cfg = stage_config(CONFIG, "stage2")
    assert cfg["name"] == "stage2" and cfg["lr"] == 5e-4 and cfg["epochs"] == 4
    assert cfg["data"] == {"flip": False, "text_len": 32, "scale": [0.9, 1.0]}  # data merges key by key
    assert cfg["model"]["video"] == {
        "preset": "tiny",
        "frames": 8,
        "local_blocks": 1,
        "random_blocks": 1,
        "block_size": 16,
    }
    assert cfg["model"]["text"] == {"preset": "tiny", "multimodal_keep": 0.5}
    assert "init" not in cfg and "frames" not in cfg
    assert CONFIG["model"]["video"] == {"preset": "tiny"}  # nothing is modified in place


def test_a_stage_may_override_any_model_key():
    assert stage_config(CONFIG, "late")["model"]["video"] == {"preset": "tiny", "depth": 2, "frames": 8}


def test_an_egoclip_stage_reads_clips():
    assert stage_config(CONFIG, "egoclip")["data"]["kind"] == "egoclip"
    assert "kind" not in stage_config(CONFIG, "stage1")["data"]


def test_seed_variants_train_with_their_seed_from_their_inits_variant():
    assert split_variant("stage2-seed1") == ("stage2", 1) and split_variant("stage2") == ("stage2", None)
    cfg = stage_config(CONFIG, "stage2-seed1")
    assert cfg["name"] == "stage2-seed1" and cfg["seed"] == 1 and cfg["model"]["video"]["seed"] == 1
    assert stage_init(CONFIG["pretrain"], "stage2-seed1") == "stage1-seed1"
    assert stage_init(CONFIG["pretrain"], "stage2") == "stage1"
    assert stage_init(CONFIG["pretrain"], "stage1-seed1") is None
    names = all_stage_names(CONFIG["pretrain"])
    assert names == [
        "stage1",
        "stage2",
        "egoclip",
        "late",
        "single8",
        "stage1-seed1",
        "stage2-seed1",
        "egoclip-seed1",
        "late-seed1",
        "single8-seed1",
    ]


@pytest.mark.parametrize(
    "name,match", [("stage9", "'stage9' is not a pretrain stage"), ("stage1-seed2", "seed 2 is not in pretrain.seeds")]
)
def test_unknown_stages_and_seeds_are_named(name, match):
    with pytest.raises(ValueError, match=match):
        stage_config(CONFIG, name)


@pytest.mark.parametrize(
    "stages,match",
    [
        ([{"name": "a", "frames": 4}, {"name": "a", "frames": 8}], "'a' is used twice"),
        ([{"name": "a", "init": "b", "frames": 4}], "starts from 'b', which is not a stage"),
        ([{"name": "a", "frames": 4, "model": {"video": {"block_size": 16}}}], r"sets \['block_size'\] under `model`"),
    ],
)
def test_inconsistent_stage_lists_are_errors(stages, match):
    with pytest.raises(ValueError, match=match):
        configured_stages({"curriculum": stages})


def test_the_workflow_can_import_it_without_torch():
    import subprocess

    code = "import sys, svitt.workflow.stages; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_control_twins_copy_each_curriculum_stage_with_late_fusion():
    config = {**CONFIG, "analysis": {"control": {"temporal": "late", "stages": ["stage1", "stage2"]}}}
    twin, stage = stage_config(config, "stage2_late"), stage_config(config, "stage2")
    assert twin["model"]["video"] == {**stage["model"]["video"], "temporal": "late"}
    assert {k: v for k, v in twin.items() if k not in ("name", "model")} == {
        k: v for k, v in stage.items() if k not in ("name", "model")
    }  # same steps and optimisation
    assert stage_init(with_control(config), "stage2_late") == "stage1_late"
    assert stage_init(with_control(config), "stage2_late-seed1") == "stage1_late-seed1"
    assert "stage1_late" not in configured_stages(CONFIG["pretrain"])  # only with analysis.control


@pytest.mark.parametrize(
    "stages,match", [(["stage2"], "but not its init 'stage1'"), (["stage9"], r"\['stage9'\] are not curriculum stages")]
)
def test_a_control_of_a_broken_chain_is_an_error(stages, match):
    config = {**CONFIG, "analysis": {"control": {"temporal": "late", "stages": stages}}}
    with pytest.raises(ValueError, match=match):
        with_control(config)
