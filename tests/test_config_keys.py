"""One home per config key: the schema checks exactly the keys the library reads, so a typo in
the model or stage sections fails when the workflow is parsed, not days later in the first job."""

import pytest
import yaml

from svitt.models.svitt import MODEL_DEFAULTS
from svitt.models.text_encoder import TEXT_DEFAULTS
from svitt.models.video_encoder import VIDEO_DEFAULTS
from svitt.training.keys import DATA_KEYS, IO_KEYS, MODEL_STAGE_KEYS, QA_DATA_KEYS, QA_KEYS, TRAIN_KEYS
from svitt.workflow.stages import STAGE_ONLY_KEYS, VOCABULARY
from tests.helpers.workflow import REPO, copy_workflow, snakemake

SCHEMA = yaml.safe_load((REPO / "schemas/config.schema.yaml").read_text())
DEFS = SCHEMA["$defs"]


def _properties(definition):
    return set(definition["properties"])


def test_model_sections_list_the_library_keys():
    assert _properties(DEFS["video_settings"]) == set(VIDEO_DEFAULTS)
    assert _properties(DEFS["text_settings"]) == set(TEXT_DEFAULTS)
    assert _properties(SCHEMA["properties"]["model"]) == set(MODEL_DEFAULTS)
    assert DEFS["video_settings"]["additionalProperties"] is False
    assert DEFS["text_settings"]["additionalProperties"] is False


def test_stage_sections_list_the_training_keys():
    # name and model come from the stage's identity and the model section; the io keys from pretrain.io;
    # task from the section (pretraining stages are pairs, finetune.<task> names its own)
    derived = {"name", "model", "device", "task"} | set(IO_KEYS)
    assert _properties(DEFS["train_settings"]) == set(TRAIN_KEYS) - derived
    assert _properties(DEFS["stage"]) == set(STAGE_ONLY_KEYS) | set(VOCABULARY)
    assert _properties(DEFS["stage_data"]) == (set(DATA_KEYS) | set(QA_DATA_KEYS)) - {"kind"} - set(IO_KEYS)


def test_finetune_sections_list_the_finetuning_keys():
    """A finetuning entry: the training keys, the qa task's own, and a stage's sparsity vocabulary."""
    assert _properties(DEFS["finetune_settings"]) == set(VOCABULARY) | (set(QA_KEYS) - set(TRAIN_KEYS))
    assert {k for keys in MODEL_STAGE_KEYS.values() for k in keys} == set(VOCABULARY)
    assert DEFS["finetune_defaults"]["unevaluatedProperties"] is False
    assert DEFS["finetune_entry"]["oneOf"][1]["unevaluatedProperties"] is False
    assert DEFS["finetune_task"]["additionalProperties"] is False
    finetune = SCHEMA["properties"]["finetune"]
    assert finetune["additionalProperties"] is False and finetune["properties"]["io"]["additionalProperties"] is False
    assert _properties(finetune["properties"]["io"]) == set(IO_KEYS)
    assert _properties(SCHEMA["properties"]["pretrain"]["properties"]["io"]) == set(IO_KEYS)


def test_vocabulary_keys_are_model_keys():
    for key, part in VOCABULARY.items():
        assert key in (VIDEO_DEFAULTS if part == "video" else TEXT_DEFAULTS), key


@pytest.mark.parametrize("section,key", [("video", "drop_pth"), ("text", "fusion_layer")])
def test_a_typo_in_the_model_section_fails_the_dry_run_naming_it(tmp_path, section, key):
    workdir = copy_workflow(tmp_path)
    (workdir / "configs/typo.yaml").write_text(yaml.safe_dump({"model": {section: {key: 0.1}}}))
    result = snakemake(workdir, "-n", "all", "--configfile", "configs/typo.yaml", check=False)
    assert result.returncode != 0
    assert f"'{key}' was unexpected" in result.stdout + result.stderr
