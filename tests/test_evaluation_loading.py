"""svitt.evaluation.loading: the one way an evaluation loads an exported model and picks its device."""

import json

import pytest
import torch

import svitt
from svitt.evaluation.loading import LoadedModel, load_for_evaluation, pick_device, read_model_info
from svitt.training.checkpoint import export_model

DATA = {"mean": [0.25, 0.5, 0.75], "std": [0.1, 0.2, 0.3]}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(folder, the model as trained): a tiny SViTT exported as the training loop exports a stage."""
    torch.manual_seed(0)
    model = svitt.build_model(
        {"video": {"preset": "tiny"}, "text": {"preset": "tiny", "vocab_size": 64}, "embed_dim": 16}
    )
    with torch.no_grad():  # weights no fresh build would have
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    folder = tmp_path_factory.mktemp("exported") / "stage"
    export_model(
        model,
        folder,
        {
            "name": "tiny",
            "frames": model.cfg["video"]["frames"],
            "model_config": model.cfg,
            "train_config": {"data": DATA},
        },
    )
    return folder, model


def test_it_loads_the_exported_weights_exactly_in_eval_mode_on_the_cpu(exported):
    folder, trained = exported
    loaded = load_for_evaluation(folder / "model.safetensors", "cpu")
    assert isinstance(loaded, LoadedModel) and loaded.device == torch.device("cpu")
    assert not loaded.model.training and all(not m.training for m in loaded.model.modules())
    expected = trained.state_dict()
    state = loaded.model.state_dict()
    assert set(state) == set(expected)
    for name, tensor in expected.items():
        assert state[name].device.type == "cpu"
        assert torch.equal(state[name], tensor), name
    assert loaded.info["name"] == "tiny" and loaded.path == folder / "model.safetensors"
    model, device = load_for_evaluation(folder, "cpu")  # the folder, and unpacked as (model, device)
    assert device == torch.device("cpu")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.items())


def test_the_transform_is_the_models_normalisation_and_frames_resize_the_clip(exported):
    folder, trained = exported
    loaded = load_for_evaluation(folder, "cpu", frames=2 * trained.cfg["video"]["frames"])
    assert loaded.cfg["video"]["frames"] == 2 * trained.cfg["video"]["frames"]
    transform = loaded.transform()
    assert transform.size == trained.cfg["video"]["image_size"]
    assert transform.mean == (0.25, 0.5, 0.75) and transform.std == (0.1, 0.2, 0.3)
    keep = load_for_evaluation(folder, "cpu", overrides={"text": {"multimodal_keep": 0.5}})
    assert keep.cfg["text"]["multimodal_keep"] == 0.5


def test_device_choice_follows_the_workflow_convention(monkeypatch):
    assert pick_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("auto") == torch.device("cpu")
    with pytest.raises(RuntimeError, match="'cuda' was requested but torch sees no CUDA device"):
        pick_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device("auto") == torch.device("cuda")
    assert pick_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match="device must be one of .*'tpu'"):
        pick_device("tpu")


def test_a_missing_or_foreign_file_is_an_error_naming_it(exported, tmp_path):
    folder, _ = exported
    missing = tmp_path / "nowhere" / "model.safetensors"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        load_for_evaluation(missing, "cpu")
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    with pytest.raises(FileNotFoundError, match=f"{lone / 'model.json'} is missing"):
        load_for_evaluation(lone / "model.safetensors", "cpu")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "model.json").write_text((folder / "model.json").read_text())
    torch.save({"a": torch.zeros(2)}, foreign / "model.safetensors")  # a pickle under the name
    with pytest.raises(ValueError, match=f"{foreign / 'model.safetensors'} is not a safetensors file"):
        load_for_evaluation(foreign / "model.safetensors", "cpu")
    other = tmp_path / "other"
    other.mkdir()
    (other / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    (other / "model.json").write_text(json.dumps({"name": "x", "config": {}}))
    with pytest.raises(ValueError, match=f"{other / 'model.json'} has no model_config"):
        read_model_info(other)
    # a model.json that describes another model: the weights do not fit it
    info = json.loads((folder / "model.json").read_text())
    info["model_config"]["embed_dim"] = 32
    (other / "model.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match=f"the weights of {other / 'model.safetensors'} do not fit"):
        load_for_evaluation(other, "cpu")


def test_kind_qa_refuses_a_model_of_another_task(exported):
    folder, _ = exported
    with pytest.raises(ValueError, match="is a 'pairs' model, not a finetuned QA model"):
        load_for_evaluation(folder, "cpu", kind="qa")
    with pytest.raises(ValueError, match="unknown model kind 'vqa'"):
        load_for_evaluation(folder, "cpu", kind="vqa")


def test_every_evaluating_script_loads_through_it():
    from pathlib import Path

    scripts = Path(__file__).resolve().parents[1] / "workflow_scripts"
    for name in ("evaluate", "sweep", "nlq_features", "pruning_maps", "word_probe", "vtm_negatives"):
        text = (scripts / f"{name}.py").read_text()
        assert "load_for_evaluation(" in text and "load_exported" not in text and "cuda.is_available" not in text, name
    ground = (scripts / "ground.py").read_text()
    assert "ground_nlq(" in ground and "load_exported" not in ground
