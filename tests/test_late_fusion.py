"""The order-blind control (video.temporal = late): each frame through the image encoder alone,
CLS mean-pooled over time. Its twin accuracy is 50% by construction; these tests check the
construction itself (bit-identical outputs for any frame order), not just a number near 50."""

import pytest
import torch

import svitt
from svitt.data.datasets import RetrievalDataset
from svitt.data.pipeline import PairCollator, load_tokenizer
from svitt.data.transforms import EvalTransform
from svitt.evaluation import task
from svitt.models.video_encoder import VideoEncoder, canonical_frame_order

SPARSE = dict(local_blocks=1, random_blocks=1, block_size=8, visual_keep=0.6)


def _model(temporal, frames=8, **video):
    torch.manual_seed(0)
    return svitt.build_model(
        {
            "video": {"preset": "tiny", "frames": frames, "temporal": temporal, **video},
            "text": {"preset": "tiny", "vocab_size": 100, "multimodal_keep": 0.5},
            "embed_dim": 16,
        }
    ).eval()


def _encode(model, video):
    model.video_encoder.layout_generator.manual_seed(0)
    with torch.no_grad():
        return model.encode_video(video)


@pytest.mark.parametrize("video", [{}, SPARSE])
def test_late_fusion_output_is_the_same_bits_for_any_frame_order(video):
    clips = torch.randn(3, 8, 3, 32, 32)
    late, joint = _model("late", **video), _model("joint", **video)
    perm = torch.tensor([5, 2, 7, 0, 1, 6, 3, 4])
    tokens, emb = _encode(late, clips)
    for other in (clips.flip(1), clips[:, perm]):
        other_tokens, other_emb = _encode(late, other)
        assert torch.equal(emb, other_emb) and torch.equal(tokens, other_tokens)
        assert not torch.equal(_encode(joint, clips)[1], _encode(joint, other)[1])  # the joint model reads order


def test_late_fusion_is_the_image_encoder_per_frame_mean_pooled():
    model = _model("late", frames=4)
    encoder = model.video_encoder
    assert encoder.grid == (1, 4, 4)  # one frame per sequence
    clips = torch.randn(2, 4, 3, 32, 32)
    hidden, pos = encoder(clips, return_positions=True)
    assert hidden.shape == (2, 1 + 4 * 16, 64) and pos.shape == (2, 4 * 16)
    # by hand: each frame as a static tubelet (the frame twice), alone through the same weights
    with torch.no_grad():
        per_frame = [encoder._encode(clips[:, t : t + 1].expand(-1, 2, -1, -1, -1))[0] for t in range(4)]
    cls = torch.stack([f[:, 0] for f in per_frame], 1).mean(1)
    assert torch.allclose(hidden[:, 0], cls, atol=1e-6)
    order = canonical_frame_order(clips)
    for b in range(2):
        for slot, t in enumerate(order[b].tolist()):  # tokens follow the canonical frame order
            assert torch.allclose(hidden[b, 1 + 16 * slot : 1 + 16 * (slot + 1)], per_frame[t][b, 1:], atol=1e-6)
            assert pos[b, 16 * slot : 16 * (slot + 1)].tolist() == [16 * t + p for p in range(16)]


def test_canonical_order_tells_translated_frames_apart():
    frame = torch.zeros(3, 8, 8)
    frame[:, 2:4, 2:4] = 1.0
    moved = torch.roll(frame, 1, dims=2)  # the same pixels shifted: the same plain sum
    assert moved.sum() == frame.sum()
    clip, swapped = torch.stack([moved, frame])[None], torch.stack([frame, moved])[None]
    # a tied key would keep each input's order (stable sort), so the sorted clips would differ
    assert torch.equal(clip[0, canonical_frame_order(clip)[0]], swapped[0, canonical_frame_order(swapped)[0]])


def test_unknown_temporal_mode_is_named():
    with pytest.raises(ValueError, match="video.temporal must be one of.*'early'"):
        VideoEncoder({"preset": "tiny", "temporal": "early"})


def test_late_fusion_twin_accuracy_is_exactly_50_percent_on_the_demo(pipeline):
    """Through the real evaluation: every frame order gives the same numbers, so each time-reversed
    twin's two exact-reversal decisions split one right, one wrong: 50.0 for both heads."""
    corpus, res = pipeline
    tokenizer = load_tokenizer(corpus / "tokenizer")
    data = RetrievalDataset(res / "frames/downstream", corpus / "retrieval_test.json", 4, EvalTransform(32))
    torch.manual_seed(0)
    model = svitt.build_model(
        {
            "video": {"preset": "tiny", "frames": 4, "temporal": "late", **SPARSE},
            "text": {"preset": "tiny", "vocab_size": len(tokenizer)},
            "embed_dim": 16,
        }
    )
    result = task("retrieval").run(
        model.eval(), data, PairCollator(tokenizer, 32), {"batch_size": 4, "rerank_k": 3}, progress=False
    )
    assert result["twins_exact_reversal"] == {"itc": 50.0, "vtm": 50.0}
    for deltas in result["frame_order_deltas"].values():
        assert all(v == 0.0 for group in deltas.values() for v in group.values()), deltas
