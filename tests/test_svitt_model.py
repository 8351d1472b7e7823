"""The assembled model: losses, weight loading (BERT folders, stage-to-stage), bad checkpoints."""

import math

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM

import svitt
from svitt.models import losses
from svitt.models.relative_position import table_size

TINY = {
    "video": {
        "preset": "tiny",
        "frames": 4,
        "local_blocks": 1,
        "random_blocks": 1,
        "block_size": 8,
        "visual_keep": 0.7,
    },
    "text": {"preset": "tiny", "vocab_size": 60, "multimodal_keep": 0.5},
    "embed_dim": 16,
}


def _batch(b=4, length=7, vocab=60):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab, (b, length), generator=g)
    ids[:, 0] = 2  # [CLS]
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    ids[mask == 0] = 0
    return torch.randn(b, 4, 3, 32, 32, generator=g), ids, mask


def test_pretraining_losses_are_finite_and_train_every_part():
    torch.manual_seed(0)
    model = svitt.build_model(TINY)
    video, ids, mask = _batch()
    mlm_ids, labels = losses.mask_tokens(
        ids,
        mask,
        60,
        mask_token_id=4,
        special_ids=[0, 1, 2, 3, 4],
        mask_prob=0.5,
        generator=torch.Generator().manual_seed(1),
    )
    out = model(video, ids, mask, objectives=("vtc", "vtm", "mlm"), mlm_ids=mlm_ids, mlm_labels=labels)
    assert set(out) == {"vtc", "vtm", "mlm"}
    assert all(torch.isfinite(v) for v in out.values())
    sum(out.values()).backward()
    for name in [
        "video_encoder.patch_embed.proj.weight",
        "text_encoder.embeddings.word_embeddings.weight",
        "vision_proj.weight",
        "text_proj.weight",
        "vtm_head.weight",
        "mlm_head.bias",
        "temp",
        "text_encoder.encoder.layer.3.crossattention.self.key.weight",
    ]:
        assert dict(model.named_parameters())[name].grad.abs().sum() > 0, name


def test_vtc_loss_at_init_is_about_2_log_b():
    """Random embeddings: each direction's cross-entropy is close to log(B)."""
    torch.manual_seed(0)
    model = svitt.build_model(dict(TINY, temperature=0.5))
    video, ids, mask = _batch(b=8)
    with torch.no_grad():
        vtc = model(video, ids, mask, objectives=("vtc",))["vtc"]
    assert vtc.item() == pytest.approx(2 * torch.log(torch.tensor(8.0)).item(), rel=0.1)


def test_egonce_objective_uses_noun_and_verb_tags():
    model = svitt.build_model(TINY)
    video, ids, mask = _batch()
    nouns = torch.tensor([[1, 0], [1, 0], [0, 1], [0, 1]])
    verbs = torch.tensor([[1, 0], [1, 0], [1, 0], [0, 1]])
    out = model(video, ids, mask, objectives=("egonce", "vtm"), nouns=nouns, verbs=verbs)
    assert set(out) == {"egonce", "vtm"} and all(torch.isfinite(v) for v in out.values())
    with pytest.raises(ValueError, match="nouns and verbs"):
        model(video, ids, mask, objectives=("egonce",))


def test_bert_weights_load_from_a_hugging_face_folder(tmp_path):
    bert = BertForMaskedLM(
        BertConfig(
            vocab_size=60,
            hidden_size=64,
            num_hidden_layers=4,
            num_attention_heads=2,
            intermediate_size=128,
            max_position_embeddings=64,
        )
    )
    bert.save_pretrained(tmp_path / "bert")
    model = svitt.build_model(dict(TINY, text_weights=str(tmp_path / "bert")))
    ours = model.state_dict()
    for key, value in bert.state_dict().items():
        if key.startswith("bert.encoder") or key.startswith("bert.embeddings"):
            torch.testing.assert_close(ours["text_encoder." + key[len("bert.") :]], value)
    torch.testing.assert_close(
        ours["mlm_head.transform.dense.weight"], bert.state_dict()["cls.predictions.transform.dense.weight"]
    )
    torch.testing.assert_close(ours["mlm_head.bias"], bert.state_dict()["cls.predictions.bias"])


def _random_tables(model):
    """Relative tables start at zero: random ones make a resize visible."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("relative_position_bias_table"):
                p.normal_()
    return model


def test_stage_checkpoint_4_to_8_frames_resizes_the_temporal_bias():
    stage1 = _random_tables(svitt.build_model(TINY))
    cfg8 = {**TINY, "video": {**TINY["video"], "frames": 8, "visual_keep": 0.6}}
    stage2 = svitt.build_model(cfg8)
    stage2.load_stage_checkpoint(stage1.state_dict())
    key = "video_encoder.blocks.0.attn.relative_position_bias_table"
    src, dst = stage1.state_dict()[key], stage2.state_dict()[key]
    assert src.shape[0] == table_size((2, 4, 4)) and dst.shape[0] == table_size((4, 4, 4))
    per_offset = 7 * 7
    # tubelet offsets at 4 tubelets -> 2 tubelets: 0 -> 0, +-1 -> +-1, +-2 -> +-1, +-3 -> +-1 (clamped)
    for d_dst, d_src in [(0, 0), (1, 1), (2, 1), (3, 1), (-2, -1)]:
        torch.testing.assert_close(
            dst[(d_dst + 3) * per_offset : (d_dst + 4) * per_offset],
            src[(d_src + 1) * per_offset : (d_src + 2) * per_offset],
        )
    torch.testing.assert_close(dst[-3:], src[-3:])
    other = stage1.state_dict()
    torch.testing.assert_close(stage2.state_dict()["vision_proj.weight"], other["vision_proj.weight"])


def test_stage_checkpoint_resize_follows_the_models_temporal_resize_rule():
    """video.temporal_resize interpolate_nearest (the released code) at 2 -> 4 tubelets: row i of 7
    takes row floor(3 i / 7) of 3, so offsets -3..3 take -1, -1, -1, 0, 0, 1, 1."""
    nearest = {**TINY["video"], "temporal_resize": "interpolate_nearest"}
    stage1 = _random_tables(svitt.build_model({**TINY, "video": nearest}))
    stage2 = svitt.build_model({**TINY, "video": {**nearest, "frames": 8}})
    stage2.load_stage_checkpoint(stage1.state_dict())
    key = "video_encoder.blocks.1.attn.relative_position_bias_table"
    src, dst = stage1.state_dict()[key], stage2.state_dict()[key]
    per_offset = 7 * 7
    for d_dst, d_src in zip(range(-3, 4), [-1, -1, -1, 0, 0, 1, 1]):
        torch.testing.assert_close(
            dst[(d_dst + 3) * per_offset : (d_dst + 4) * per_offset],
            src[(d_src + 1) * per_offset : (d_src + 2) * per_offset],
        )


def test_stage_checkpoint_of_another_architecture_names_the_tensors():
    stage1 = svitt.build_model(TINY)
    wider = svitt.build_model({**TINY, "embed_dim": 32})
    with pytest.raises(ValueError, match="vision_proj.weight: checkpoint \\(16, 64\\) vs model \\(32, 64\\)"):
        wider.load_stage_checkpoint(stage1.state_dict())
    deeper = svitt.build_model({**TINY, "video": {**TINY["video"], "depth": 5}})
    with pytest.raises(ValueError, match="another architecture: missing"):
        deeper.load_stage_checkpoint(stage1.state_dict())


@pytest.mark.parametrize(
    "pooling,fusion_norm", [("cls", "shared"), ("mean", "separate"), ("mean", "shared"), ("cls", "separate")]
)
def test_video_embedding_and_fusion_tokens_follow_pooling_and_fusion_norm(pooling, fusion_norm):
    """cls/shared (the default): the embedding projects the normed CLS of the fusion tokens;
    mean/separate (the released code): it projects `norm` of the mean regional token and the fusion
    layers see their own LayerNorm of every token."""
    torch.manual_seed(0)
    model = svitt.build_model(
        {**TINY, "video": {**TINY["video"], "pooling": pooling, "fusion_norm": fusion_norm}}
    ).eval()
    encoder = model.video_encoder
    fusion = encoder.fusion_norm if fusion_norm == "separate" else encoder.norm
    with torch.no_grad():
        for p in (encoder.norm.weight, fusion.weight):
            p.normal_()
        video = _batch()[0]
        layout = encoder.layout_generator.get_state()  # the same random blocks in each pass
        hidden = encoder(video)
        encoder.layout_generator.set_state(layout)
        tokens, emb = model.encode_video(video)
        encoder.layout_generator.set_state(layout)
        summary_of_model = model.video_summary(video)
    layer_norm = torch.nn.functional.layer_norm
    torch.testing.assert_close(tokens, layer_norm(hidden, (64,), fusion.weight, fusion.bias, 1e-6))
    source = hidden[:, 1:].mean(1) if pooling == "mean" else hidden[:, 0]
    summary = layer_norm(source, (64,), encoder.norm.weight, encoder.norm.bias, 1e-6)
    torch.testing.assert_close(emb, torch.nn.functional.normalize(model.vision_proj(summary), dim=-1))
    torch.testing.assert_close(summary_of_model, summary)


def test_unknown_model_key_is_rejected():
    with pytest.raises(ValueError, match="unknown model config key"):
        svitt.build_model({**TINY, "embed_dims": 3})


def _colour_clips(colours, classes, generator):
    """Clips of one solid colour per class (plus noise), captioned by one token per class."""
    b = len(classes)
    video = colours[classes][:, None, :, None, None].expand(b, 2, 3, 32, 32)
    video = video + 0.05 * torch.randn(b, 2, 3, 32, 32, generator=generator)
    ids = torch.stack([torch.full((b,), 2), classes + 10, torch.full((b,), 3)], 1)
    return video, ids, torch.ones_like(ids)


def _matching_accuracy(model, clips) -> float:
    """Share of (caption, other clip) pairs the matching head scores below the caption's own clip."""
    video, ids, mask = clips
    with torch.no_grad():
        tokens, _ = model.encode_video(video)
        text, _ = model.encode_text(ids, mask)
        scores = torch.stack([model.vtm_score(text, mask, tokens.roll(k, 0)) for k in range(len(ids))])
    return float((scores[0][None] > scores[1:]).float().mean())


def test_matching_head_separates_clips_from_unrelated_negatives():
    """The VTM control (issue 11): negatives are unrelated clips (uniform, vtm_hard_fraction 0),
    so a head that learns at all must separate them; it starts at chance, at about the 1:2 prior."""
    torch.manual_seed(0)
    model = svitt.build_model(
        {"video": {"preset": "tiny", "frames": 2}, "text": {"preset": "tiny", "vocab_size": 20}, "embed_dim": 16}
    )
    colours = torch.rand(8, 3, generator=torch.Generator().manual_seed(1))
    held_out = _colour_clips(colours, torch.arange(8), torch.Generator().manual_seed(9))
    assert _matching_accuracy(model, held_out) <= 0.6
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    vtm = []
    for _ in range(250):
        out = model(*_colour_clips(colours, torch.randperm(8), None), objectives=("vtc", "vtm"), vtm_hard_fraction=0.0)
        optimizer.zero_grad()
        (out["vtc"] + out["vtm"]).backward()
        optimizer.step()
        vtm.append(out["vtm"].item())
    prior = -(math.log(1 / 3) / 3 + 2 * math.log(2 / 3) / 3)  # 0.6365: p(match) = 1/3 everywhere
    assert sum(vtm[:10]) / 10 > 0.95 * prior  # nothing separated at first
    assert sum(vtm[-10:]) / 10 < 0.5 * prior
    assert _matching_accuracy(model, held_out) >= 0.95
