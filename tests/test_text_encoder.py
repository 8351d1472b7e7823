"""BERT text/fusion encoder against Hugging Face BERT, fusion pruning, the QA decoder."""

import math

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM

from svitt.models.answer_decoder import AnswerDecoder
from svitt.models.text_encoder import TextEncoder
from svitt.models.weights import bert_checkpoint_filter_fn

CFG = dict(
    vocab_size=50,
    width=32,
    depth=4,
    heads=2,
    intermediate_size=64,
    fusion_layers=2,
    max_position_embeddings=40,
    dropout=0.0,
)


def _hf_bert(depth=4):
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=50,
        hidden_size=32,
        num_hidden_layers=depth,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=40,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertForMaskedLM(cfg).eval()


def _batch():
    ids = torch.randint(5, 50, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    mask[2, 4:] = 0
    ids[mask == 0] = 0
    return ids, mask


def test_text_layers_reproduce_hugging_face_bert():
    """bert-base layout: all HF weights load except the new cross-attention, and the text-only
    layers (0 .. depth - fusion - 1) equal HF BERT's hidden states at that depth."""
    hf = _hf_bert(depth=4)
    encoder = TextEncoder(CFG, video_width=16).eval()
    state = bert_checkpoint_filter_fn(hf.state_dict(), {"bert.": ""})
    missing, unexpected = encoder.load_state_dict(state, strict=False)
    assert not unexpected
    assert missing and all(".crossattention." in k for k in missing)
    ids, mask = _batch()
    with torch.no_grad():
        expected = hf.bert(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[2]
        hidden = encoder.encode(ids, mask)
    valid = mask.bool()
    torch.testing.assert_close(hidden[valid], expected[valid], rtol=0, atol=1e-5)


def test_fusion_with_keep_rate_one_uses_every_video_token():
    encoder = TextEncoder(CFG, video_width=16).eval()
    ids, mask = _batch()
    video = torch.randn(3, 11, 16)
    with torch.no_grad():
        text = encoder.encode(ids, mask)
        fused, kept = encoder.fuse(text, mask, video, return_kept=True)
    assert fused.shape == (3, 9, 32) and kept.shape == (3, 10)


def test_multimodal_pruning_keeps_top_tokens_by_text_cls_cross_attention():
    encoder = TextEncoder(dict(CFG, multimodal_keep=0.25), video_width=16).eval()
    ids, mask = _batch()
    video = torch.randn(3, 21, 16)
    with torch.no_grad():
        text = encoder.encode(ids, mask)
        _, kept = encoder.fuse(text, mask, video, return_kept=True)
        # By hand: first fusion layer's cross-attention of text [CLS] over the video tokens.
        layer = encoder.encoder.layer[encoder.first_fusion]
        x = layer.attention(text, text, (1.0 - mask[:, None, None].float()) * -1e30)[0]
        cross = layer.crossattention.self
        q = cross.query(x[:, :1]).view(3, 1, 2, 16).transpose(1, 2)
        k = cross.key(video).view(3, 21, 2, 16).transpose(1, 2)
        probs = (q @ k.transpose(-1, -2) / math.sqrt(16)).softmax(-1)[:, :, 0].mean(1)
    expected = probs[:, 1:].topk(math.ceil(0.25 * 20), dim=1).indices.sort(dim=1).values
    assert torch.equal(kept, expected)


def _video_seen_by_each_fusion_layer(cfg, num_regional=40):
    """Video tokens (CLS included) that each fusion layer's cross-attention reads."""
    encoder = TextEncoder(cfg, video_width=16).eval()
    seen = []
    for layer in encoder.encoder.layer[encoder.first_fusion :]:
        layer.crossattention.register_forward_hook(lambda m, args, out: seen.append(args[1].shape[1]))
    ids, mask = _batch()
    with torch.no_grad():
        encoder.fuse(encoder.encode(ids, mask), mask, torch.randn(3, 1 + num_regional, 16))
    return seen


def test_multimodal_pruning_is_one_step_by_default():
    """q_m = 0.1 with three fusion layers: 40 -> 4 -> 4 regional tokens (one sparsification step,
    after the first fusion layer), not 40 -> 4 -> 1 (q_m squared in the last layer)."""
    cfg = dict(CFG, depth=5, fusion_layers=3, multimodal_keep=0.1)
    assert _video_seen_by_each_fusion_layer(cfg) == [41, 5, 5]


def test_per_layer_multimodal_keep_rates_compound():
    cfg = dict(CFG, depth=5, fusion_layers=3, multimodal_keep=[0.5, 0.5], multimodal_prune_layers=[1, 2])
    assert _video_seen_by_each_fusion_layer(cfg) == [41, 21, 11]


def test_question_pruning_off_fuses_questions_with_every_video_token():
    """text.question_pruning false (the released code's multi_modal mode): a QA question sees all
    the video tokens in every fusion layer, as with q_m = 1; true prunes as retrieval does."""
    from svitt.models.answer_decoder import VideoQA

    model = {
        "video": {"preset": "tiny", "frames": 2},
        "text": {"preset": "tiny", "vocab_size": 50, "multimodal_keep": 0.1},
        "embed_dim": 8,
    }
    torch.manual_seed(0)
    pruned = VideoQA(model).eval()
    kept = VideoQA({**model, "text": {**model["text"], "question_pruning": False}}).eval()
    dense = VideoQA({**model, "text": {**model["text"], "multimodal_keep": 1.0}}).eval()
    for other in (kept, dense):
        other.load_state_dict(pruned.state_dict())
    ids, mask = _batch()
    video = torch.randn(3, 2, 3, 32, 32)
    with torch.no_grad():
        states = {
            name: m.question_states(video, ids, mask)
            for name, m in (("pruned", pruned), ("kept", kept), ("dense", dense))
        }
        tokens = pruned.video_encoder.fusion_tokens(pruned.video_encoder(video))
        text = pruned.text_encoder.encode(ids, mask)
        by_rate = pruned.text_encoder.fuse(text, mask, tokens)  # retrieval's fusion: q_m applied
    torch.testing.assert_close(states["kept"], states["dense"], rtol=0, atol=0)
    torch.testing.assert_close(states["pruned"], by_rate, rtol=0, atol=0)
    assert (states["pruned"] - states["kept"]).abs().max() > 1e-3


@pytest.mark.parametrize("value", ["no", 0])
def test_question_pruning_must_be_a_boolean(value):
    with pytest.raises(ValueError, match=f"text.question_pruning must be true or false, got {value!r}"):
        TextEncoder(dict(CFG, question_pruning=value), video_width=16)


@pytest.mark.parametrize(
    "cfg,match",
    [
        (dict(multimodal_keep=[0.5, 0.5]), "multimodal_keep has 2 entries but multimodal_prune_layers has 1"),
        (dict(multimodal_keep=0.5, multimodal_prune_layers=[2]), "entry 2 must be a fusion layer in 1..1"),
    ],
)
def test_bad_multimodal_pruning_settings_are_named(cfg, match):
    with pytest.raises(ValueError, match=match):
        TextEncoder(dict(CFG, **cfg), video_width=16)


def test_too_long_text_is_rejected():
    encoder = TextEncoder(CFG, video_width=16)
    with pytest.raises(ValueError, match="max_position_embeddings \\(40\\)"):
        encoder.encode(torch.zeros(1, 41, dtype=torch.long), torch.ones(1, 41, dtype=torch.long))


@pytest.mark.parametrize(
    "cfg,match",
    [
        (dict(multimodal_keep=0), "multimodal_keep 0"),
        (dict(fusion_layers=5), "fusion_layers 5"),
        (dict(width=33), "width 33"),
    ],
)
def test_bad_text_config_is_rejected(cfg, match):
    with pytest.raises(ValueError, match=match):
        TextEncoder(dict(CFG, **cfg), video_width=16)


def test_answer_decoder_ranks_answers_by_their_log_likelihood():
    torch.manual_seed(0)
    decoder = AnswerDecoder(
        dict(CFG, preset=None, type_vocab_size=2, layer_norm_eps=1e-12, pad_token_id=0, multimodal_keep=1.0),
        num_layers=2,
    ).eval()
    question = torch.randn(2, 5, 32)
    qmask = torch.ones(2, 5, dtype=torch.long)
    answers = torch.tensor([[2, 7, 3, 0], [2, 9, 11, 3], [2, 7, 12, 3]])  # [CLS] ... [SEP] pad
    amask = (answers != 0).long()
    scores = decoder.rank_answers(question, qmask, answers, amask)
    # By hand: sum over tokens of log p(token | prefix), one answer at a time.
    for b in range(2):
        for a in range(3):
            n = int(amask[a].sum())
            ids = answers[a : a + 1, :n]
            with torch.no_grad():
                logp = decoder.logits(ids, amask[a : a + 1, :n], question[b : b + 1], qmask[b : b + 1])
            expected = sum(logp[0, t].log_softmax(-1)[ids[0, t + 1]] for t in range(n - 1))
            assert scores[b, a].item() == pytest.approx(expected.item(), abs=1e-4)
    # with k = 1 only the answer with the likeliest first token keeps a finite score
    top1 = decoder.rank_answers(question, qmask, answers, amask, k=1)
    assert (torch.isfinite(top1).sum(1) == 1).all()
    loss = decoder.loss(answers[:2], amask[:2], question, qmask)
    assert torch.isfinite(loss) and loss > 0
