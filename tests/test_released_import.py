"""Importing checkpoints of the released SViTT code: reading without OmegaConf, the tensor mapping
and the settings, numerically against this project's model and against the released computation,
at BEiT-B / BERT-base sizes on the meta device, and bad input.

The released-format checkpoints are written once per module by tests/helpers/released_checkpoints.py
in a subprocess: tiny models whose config OmegaConf 2.1.1 itself pickled, while this process never
imports OmegaConf; tests/helpers/released.py writes the released naming.
"""

import copy
import json
import pathlib
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from svitt.models.answer_decoder import VideoQA
from svitt.models.released import (
    ReleasedCheckpointError,
    checkpoint_kind,
    config_value,
    convert,
    map_state_dict,
    model_config,
    read_checkpoint,
)
from svitt.models.svitt import SViTT
from svitt.training.checkpoint import load_exported
from tests.conftest import script
from tests.helpers.released import (
    RELEASED_CONFIG,
    TINY_RELEASED_MODEL,
    perturbed,
    released_state_dict,
    released_video_reference,
)

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def released(tmp_path_factory) -> pathlib.Path:
    """A folder of {pretrain,retrieval,qa}.pth as the released scripts save them."""
    out = tmp_path_factory.mktemp("released")
    subprocess.run([sys.executable, "-m", "tests.helpers.released_checkpoints", str(out)], cwd=ROOT, check=True)
    return out


def _inputs(frames=2, vocab=40, b=3, length=7):
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(5, vocab, (b, length), generator=g)
    ids[:, 0] = 2
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    ids[mask == 0] = 0
    return torch.randn(b, frames, 3, 32, 32, generator=g), ids, mask


def _ours(kind="pretrain", model=TINY_RELEASED_MODEL, seed=1):
    torch.manual_seed(0)
    net = VideoQA(model, decoder_layers=2) if kind == "qa" else SViTT(model)
    return perturbed(net, seed=seed).eval()


# ---------------------------------------------------------------------------------- reading
def test_a_config_pickled_by_omegaconf_reads_as_plain_data_without_omegaconf(released):
    sys.modules.pop("omegaconf", None)
    checkpoint = read_checkpoint(released / "pretrain.pth")
    assert "omegaconf" not in sys.modules
    config = checkpoint["config"]
    for key in ("vision_encoder_args", "text_encoder_args", "joint_encoder_args", "video_input", "max_txt_l"):
        assert config[key] == RELEASED_CONFIG[key], key
    assert config["output_dir"] is None  # the released convert_types' "None" -> None
    assert config["vit_name_or_pretrained_path"] == "${vit_zoo[${vit_type}]}"  # stored unresolved
    assert config["available_corpus"]["webvid"] == [
        "${data_root}/webvid_train.json",
        "${data_root}/webvid_videos",
        "video",
    ]
    assert checkpoint["epoch"] == 4 and checkpoint["global_step"] == 100
    assert checkpoint_kind(checkpoint["model"]) == "pretrain"


def test_config_values_resolve_plain_references_and_refuse_the_rest():
    config = {
        "vit_type": "beit",
        "vit_zoo": {"beit": "microsoft/beit"},
        "name": "${vit_zoo.beit}",
        "frames": "${video_input.num_frames}",
        "video_input": {"num_frames": 8},
        "data_root": "${oc.env:SL_DATA_DIR}",
        "lost": "???",
        "none": "None",
    }
    assert config_value(config, "name") == "microsoft/beit"
    assert config_value(config, "frames") == 8
    assert config_value(config, "none") is None and config_value(config, "absent", 3) == 3
    with pytest.raises(ReleasedCheckpointError, match="data_root is the interpolation '\\$\\{oc.env:SL_DATA_DIR\\}'"):
        config_value(config, "data_root")
    with pytest.raises(ReleasedCheckpointError, match="lost is missing"):
        config_value(config, "lost")


# ------------------------------------------------------------------------ settings and keys
def test_the_stored_config_translates_into_this_projects_settings():
    model = _ours()
    state = released_state_dict(model, "pretrain")
    cfg, notes = model_config(RELEASED_CONFIG, state, "pretrain")
    video, text = cfg["video"], cfg["text"]
    assert video["prune_layers"] == [1]  # token_drop_loc [0]: after the first layer (0-based)
    assert (video["local_blocks"], video["random_blocks"], video["block_size"], video["visual_keep"]) == (1, 1, 5, 0.5)
    assert {
        k: video[k] for k in ("layer_norm_eps", "pooling", "fusion_norm", "prune_score", "temporal_resize")
    } == dict(
        layer_norm_eps=1e-12,
        pooling="mean",
        fusion_norm="separate",
        prune_score="raw",
        temporal_resize="interpolate_nearest",
    )
    assert (video["depth"], video["width"], video["heads"], video["mlp_ratio"], video["frames"]) == (2, 16, 2, 2.0, 2)
    # text_encoder_args: token_drop_loc [2] with fusion_layer 2 is the first fusion layer; q_m read there
    assert (text["multimodal_prune_layers"], text["multimodal_keep"], text["fusion_layers"]) == ([1], 0.25, 2)
    assert text["question_pruning"] is False and text["layer_norm_eps"] == 1e-12
    assert any("joint_encoder_args" in n and "not read by the released model" in n for n in notes)
    assert any("padding" in n for n in notes)


def test_the_released_yamls_multimodal_keep_rate_is_not_applied():
    """The released YAMLs put q_m under joint_encoder_args, which the model never reads: with no
    text_encoder_args the imported model prunes nothing in the fusion layers, as the released one."""
    config = {k: v for k, v in RELEASED_CONFIG.items() if k != "text_encoder_args"}
    config["text_encoder_args"] = {"fusion_layer": 2, "num_attention_heads": 2}
    cfg, notes = model_config(config, released_state_dict(_ours(), "pretrain"), "pretrain")
    assert cfg["text"]["multimodal_keep"] == 1.0
    assert any("joint_encoder_args {'token_keep_rate': 0.1" in n for n in notes)


def test_beit_b_and_bert_base_keys_and_shapes_map_onto_the_paper_model_on_the_meta_device():
    """At full size (no memory: meta tensors): every released tensor has its place, with the shape
    of this project's model under the settings the stored config gives, T = 4."""
    paper = {
        "video": {
            "preset": "beit_base",
            "frames": 4,
            "local_blocks": 1,
            "random_blocks": 3,
            "block_size": 56,
            "visual_keep": 0.7,
            "prune_layers": [4, 7, 10],
            "drop_path": 0.1,
            "layer_norm_eps": 1e-12,
            "pooling": "mean",
            "fusion_norm": "separate",
            "prune_score": "raw",
            "temporal_resize": "interpolate_nearest",
        },
        "text": {"preset": "bert_base", "multimodal_keep": 0.1, "question_pruning": False},
        "embed_dim": 256,
    }
    with torch.device("meta"):
        model = SViTT(paper)
    state = released_state_dict(model, "pretrain")
    config = {
        "vit_type": "beit",
        "image_res": 224,
        "embed_dim": 256,
        "temp": 0.07,
        "video_input": {"num_frames": 4},
        "vision_encoder_args": {
            "token_keep_rate": 0.7,
            "token_keep_strategy": "cls_attn",
            "token_drop_loc": [3, 6, 9],
            "sparse_local_attn": 1,
            "sparse_random_attn": 3,
            "attn_block_size": 56,
        },
        "text_encoder_args": {"token_keep_rate": 0.1, "token_drop_loc": [9]},
    }
    cfg, _ = model_config(config, state, "pretrain")
    assert cfg["video"]["prune_layers"] == [4, 7, 10] and cfg["text"]["multimodal_prune_layers"] == [1]
    assert cfg["text"]["heads"] == 12 and cfg["video"]["heads"] == 12 and cfg["text"]["fusion_layers"] == 3
    for section in ("video", "text"):
        resolved = model.cfg[section]
        assert {k: resolved[k] for k in cfg[section]} == cfg[section], section
    tensors, verified = map_state_dict(state, "pretrain", model.video_encoder.grid)
    target = model.state_dict()
    assert set(tensors) == set(target)
    assert all(tensors[k].shape == target[k].shape for k in target)
    assert len(verified) == 12 + 3  # 12 index buffers; position_ids; the tied decoder weight and bias
    assert state["vision_encoder.encoder.layer.0.attention.attention.query.weight"].shape == (768, 768)
    assert "vision_encoder.encoder.layer.0.attention.attention.key.bias" not in state


# ------------------------------------------------------------------------------ numerically
def _converted(kind, model=TINY_RELEASED_MODEL, config=RELEASED_CONFIG):
    ours = _ours(kind, model)
    state = released_state_dict(ours, kind)
    imported, info = convert({"model": state, "config": copy.deepcopy(config), "epoch": 1, "global_step": 9})
    return ours, imported.eval(), info


def _restart_layouts(*models):
    for m in models:
        m.video_encoder.layout_generator.manual_seed(0)


@pytest.mark.parametrize("kind", ["pretrain", "retrieval"])
def test_a_converted_checkpoint_scores_like_the_same_weights_loaded_natively(kind):
    """Our model -> released names -> import: every score of a fixed input agrees to 1e-5 (edge
    sparsity with padding, visual and multimodal pruning included)."""
    ours, imported, info = _converted(kind)
    video, ids, mask = _inputs()
    outputs = []
    for m in (ours, imported):
        _restart_layouts(m)
        with torch.no_grad():
            tokens, video_emb = m.encode_video(video)
            text, text_emb = m.encode_text(ids, mask)
            vtm = m.vtm_score(text, mask, tokens)
            mlm = m.mlm_logits(m.fuse(text, mask, tokens))
        outputs.append((tokens, video_emb, text_emb, vtm, mlm))
    for name, a, b in zip(("tokens", "video_emb", "text_emb", "vtm", "mlm"), *outputs):
        if kind == "retrieval" and name == "mlm":
            continue  # the released retrieval model has no MLM head: ours keeps its initialisation
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5, msg=name)
    initialised = info["released"]["initialised"]
    assert (sorted(initialised) == sorted(k for k in ours.state_dict() if k.startswith("mlm_head."))) == (
        kind == "retrieval"
    ) and (initialised == {}) == (kind == "pretrain")


def test_a_converted_qa_checkpoint_answers_like_the_same_weights_loaded_natively():
    ours, imported, info = _converted("qa")
    video, ids, mask = _inputs()
    answers = torch.tensor([[2, 7, 3, 0], [2, 9, 11, 3], [2, 12, 3, 0]])
    answer_mask = (answers != 0).long()
    scores = []
    for m in (ours, imported):
        _restart_layouts(m)
        scores.append(m.rank(video, ids, mask, answers, answer_mask))
    torch.testing.assert_close(scores[1], scores[0], rtol=0, atol=1e-5)
    assert info["train_config"] == {**info["train_config"], "task": "qa", "decoder_layers": 2}
    assert sorted(info["released"]["initialised"]) == ["video_encoder.norm.bias", "video_encoder.norm.weight"]


def test_the_imported_video_tower_computes_what_the_released_one_does():
    """Against a computation from the released tensors alone (tests/helpers/released.py): HF BEiT
    layers with the checkpoint's 3D index buffer, pruning by the raw head-mean CLS attention,
    vision_layernorm for the fusion tokens, the pooler's norm of the mean token for VTC."""
    dense = copy.deepcopy(TINY_RELEASED_MODEL)
    dense["video"].update(local_blocks=None, random_blocks=None, block_size=None)
    config = copy.deepcopy(RELEASED_CONFIG)
    config["vision_encoder_args"].update(sparse_random_attn=None)
    ours = _ours("pretrain", dense)
    with torch.no_grad():  # heads that give CLS different shares: raw and renormalised scores differ
        ours.video_encoder.blocks[0].attn.relative_position_bias_table[-1, 0] = 3.0
    state = released_state_dict(ours, "pretrain")
    imported, _ = convert({"model": state, "config": config})
    video = _inputs()[0]
    with torch.no_grad():
        fusion, pooled = released_video_reference(state, video, eps=1e-12, keep_rate=0.5, drop_loc=[0], heads=2)
        tokens, emb = imported.encode_video(video)
        expected_emb = torch.nn.functional.normalize(
            torch.nn.functional.linear(pooled, state["vision_proj.weight"], state["vision_proj.bias"]), dim=-1
        )
        renormalised = SViTT({**imported.cfg, "video": {**imported.cfg["video"], "prune_score": "renormalised"}})
        renormalised.load_state_dict(imported.state_dict())
        other_tokens, _ = renormalised.eval().encode_video(video)
    assert tokens.shape == (3, 1 + 16, 16)
    torch.testing.assert_close(tokens, fusion, rtol=0, atol=1e-5)
    torch.testing.assert_close(emb, expected_emb, rtol=0, atol=1e-5)
    assert (other_tokens - fusion).abs().max() > 1e-3  # the pruning rule decides which tokens remain


# ------------------------------------------------------------------------- the import script
@pytest.mark.parametrize("kind", ["pretrain", "retrieval", "qa"])
def test_the_script_writes_a_model_that_load_exported_reads(kind, tmp_path, released):
    out = tmp_path / f"released_{kind}"
    assert script("import_released").main([str(released / f"{kind}.pth"), str(out)]) == 0
    info = json.loads((out / "model.json").read_text())
    assert info["name"] == out.name and info["released"]["kind"] == kind and info["frames"] == 2
    assert (
        info["model_config"]["video"]["pooling"] == "mean" and info["model_config"]["text"]["question_pruning"] is False
    )
    model, _ = load_exported(out / "model.safetensors")
    assert isinstance(model, VideoQA if kind == "qa" else SViTT)
    state = read_checkpoint(released / f"{kind}.pth")["model"]
    weights = load_file(str(out / "model.safetensors"))
    torch.testing.assert_close(weights["video_encoder.fusion_norm.weight"], state["vision_layernorm.weight"])
    q, k, v = weights["video_encoder.blocks.1.attn.qkv.weight"].chunk(3)
    torch.testing.assert_close(k, state["vision_encoder.encoder.layer.1.attention.attention.key.weight"])
    text = "text_encoder.bert." if kind == "pretrain" else "text_encoder."
    torch.testing.assert_close(
        weights["text_encoder.encoder.layer.3.crossattention.self.value.bias"],
        state[text + "encoder.layer.3.crossattention.self.value.bias"],
    )
    if kind == "qa":
        from svitt.evaluation.qa import load_model

        assert isinstance(load_model(out / "model.safetensors")[0], VideoQA)
        torch.testing.assert_close(
            weights["answer_decoder.transform.2.weight"],
            state["text_decoder.cls.predictions.transform.LayerNorm.weight"],
        )
    else:
        torch.testing.assert_close(
            weights["video_encoder.norm.weight"], state["vision_encoder.pooler.layernorm.weight"]
        )
        torch.testing.assert_close(weights["vtm_head.weight"], state["itm_head.weight"])


def test_an_imported_model_starts_a_longer_stage_with_the_released_temporal_resize(tmp_path, released):
    """As a stage's init (train.py --init): 2 -> 4 frames, the tables resized by torch's nearest
    rule (video.temporal_resize from model.json): offset rows -3..3 take -1, -1, -1, 0, 0, 1, 1."""
    out = tmp_path / "released"
    assert script("import_released").main([str(released / "pretrain.pth"), str(out)]) == 0
    cfg = json.loads((out / "model.json").read_text())["model_config"]
    longer = SViTT({**cfg, "video": {**cfg["video"], "frames": 4}})
    source = load_file(str(out / "model.safetensors"))
    longer.load_stage_checkpoint(source)
    key = "video_encoder.blocks.0.attn.relative_position_bias_table"
    per_offset = 7 * 7
    src, dst = source[key], longer.state_dict()[key]
    for d_dst, d_src in zip(range(-3, 4), [-1, -1, -1, 0, 0, 1, 1]):
        torch.testing.assert_close(
            dst[(d_dst + 3) * per_offset : (d_dst + 4) * per_offset],
            src[(d_src + 1) * per_offset : (d_src + 2) * per_offset],
        )


# ---------------------------------------------------------------------------------- bad input
def test_a_file_that_is_not_a_released_checkpoint_names_the_keys_expected_and_found(tmp_path, capsys):
    path = tmp_path / "state.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "epoch": 1}, path)
    assert script("import_released").main([str(path), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "expected the top-level keys ['model', 'config']" in err and "found ['epoch', 'state_dict']" in err
    assert not (tmp_path / "out" / "model.json").exists()


def test_a_state_dict_of_no_supported_kind_names_the_signatures_and_what_it_holds():
    state = released_state_dict(_ours(), "pretrain")
    del state["itm_head.weight"]
    with pytest.raises(ReleasedCheckpointError) as error:
        checkpoint_kind(state)
    message = str(error.value)
    assert "expected the keys of one of pretrain: [" in message and "'itm_head.weight'" in message
    assert "vision_encoder.encoder (" in message and "text_encoder.bert (" in message


@pytest.mark.parametrize(
    "extra",
    [
        "vision_encoder.embeddings.mask_token",
        "text_encoder.bert.pooler.dense.weight",
        "vision_encoder.encoder.layer.0.attention.attention.key.bias",
    ],
)
def test_an_unmapped_tensor_is_an_error_naming_it(extra):
    state = released_state_dict(_ours(), "pretrain")
    state[extra] = torch.zeros(16)
    with pytest.raises(ReleasedCheckpointError, match=f"1 tensors .* no place .*\\['{extra}'\\]"):
        convert({"model": state, "config": copy.deepcopy(RELEASED_CONFIG)})


@pytest.mark.parametrize(
    "section,key,value",
    [
        ("vision_encoder_args", "token_3d_order", "zcurve"),
        ("vision_encoder_args", "token_keep_strategy", "random"),
        ("vision_encoder_args", "sparse_local_attn", 3),
        ("vision_encoder_args", "num_cls_tokens", 2),
        ("vision_encoder_args", "hidden_dropout_prob", 0.1),
        ("text_encoder_args", "token_keep_strategy", "avg_attn"),
        ("text_encoder_args", "position_embedding_type", "relative_key"),
    ],
)
def test_a_stored_setting_this_project_does_not_implement_is_named(section, key, value):
    config = copy.deepcopy(RELEASED_CONFIG)
    config[section][key] = value
    with pytest.raises(ReleasedCheckpointError, match=f"sets {section}.{key} = {value!r}, which this project"):
        convert({"model": released_state_dict(_ours(), "pretrain"), "config": config})


def test_an_unknown_stored_setting_is_named_rather_than_guessed():
    config = copy.deepcopy(RELEASED_CONFIG)
    config["vision_encoder_args"]["token_merge"] = True
    with pytest.raises(ReleasedCheckpointError, match="vision_encoder_args sets \\['token_merge'\\]"):
        convert({"model": released_state_dict(_ours(), "pretrain"), "config": config})


def test_an_index_buffer_of_another_layout_or_untied_decoder_weights_are_refused():
    state = released_state_dict(_ours(), "pretrain")
    key = "vision_encoder.encoder.layer.1.attention.attention.relative_position_bias.relative_position_index"
    state[key] = state[key].flip(0)
    with pytest.raises(ReleasedCheckpointError, match=f"{key} is not the raster-order relative position index"):
        convert({"model": state, "config": copy.deepcopy(RELEASED_CONFIG)})
    state = released_state_dict(_ours(), "pretrain")
    state["text_encoder.cls.predictions.decoder.weight"] = state["text_encoder.cls.predictions.decoder.weight"] + 1
    with pytest.raises(ReleasedCheckpointError, match="decoder.weight is not tied to text_encoder.bert.embeddings"):
        convert({"model": state, "config": copy.deepcopy(RELEASED_CONFIG)})


def test_frames_that_disagree_with_the_tables_are_named():
    config = copy.deepcopy(RELEASED_CONFIG)
    config["video_input"]["num_frames"] = 4
    with pytest.raises(ReleasedCheckpointError, match="num_frames 4 and image_res 32 give the grid \\(4, 4, 4\\)"):
        convert({"model": released_state_dict(_ours(), "pretrain"), "config": config})


def test_an_object_outside_the_allow_list_stops_the_load_naming_it(tmp_path):
    path = tmp_path / "odd.pth"
    torch.save({"model": {}, "config": {"root": pathlib.PurePosixPath("/data")}}, path)
    with pytest.raises(ReleasedCheckpointError, match="holds pathlib.PurePosixPath, outside the allow-list"):
        read_checkpoint(path)


def test_loading_a_released_checkpoint_as_plain_weights_points_to_the_importer(released):
    from svitt.models.weights import load_state_dict_file

    with pytest.raises(ValueError, match="OmegaConf config.*workflow_scripts/import_released.py"):
        load_state_dict_file(released / "pretrain.pth")
