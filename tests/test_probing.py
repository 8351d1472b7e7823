"""Temporal probing (SViTT Table 14): frame orders, one pass per order, deltas, exact-reversal twins."""

import numpy as np
import pytest
import torch

import svitt
from svitt.data.datasets import EgoMCQDataset, RetrievalDataset
from svitt.data.pipeline import PairCollator, load_tokenizer
from svitt.data.transforms import EvalTransform
from svitt.evaluation import task
from svitt.evaluation.encode import embed_videos, frame_permutation, reorder_frames
from svitt.evaluation.metrics import reversal_twin_accuracy
from svitt.evaluation.probing import check_frame_orders, combine


def test_frame_permutations():
    assert frame_permutation(4, "normal") == [0, 1, 2, 3]
    assert frame_permutation(4, "reversed") == [3, 2, 1, 0]
    for frames in (3, 4, 8, 16):
        perm = frame_permutation(frames, "shuffled", seed=0)
        assert sorted(perm) == list(range(frames))
        assert perm not in (list(range(frames)), list(range(frames))[::-1])
        assert perm == frame_permutation(frames, "shuffled", seed=0)  # fixed by the seed
    assert frame_permutation(8, "shuffled", seed=0) != frame_permutation(8, "shuffled", seed=1)
    assert frame_permutation(2, "shuffled") == [1, 0]  # two frames: the only shuffle is the reversal
    with pytest.raises(ValueError, match="frame order must be one of.*'sideways'"):
        frame_permutation(4, "sideways")


def test_reorder_frames_moves_whole_frames():
    video = torch.arange(2 * 4).float().view(2, 4, 1, 1, 1).expand(2, 4, 3, 2, 2)  # frame t holds value 4b + t
    out = reorder_frames(video, "reversed")
    assert out[:, :, 0, 0, 0].tolist() == [[3, 2, 1, 0], [7, 6, 5, 4]]
    perm = frame_permutation(4, "shuffled", seed=3)
    assert reorder_frames(video, "shuffled", seed=3)[1, :, 2, 1, 1].tolist() == [4 + p for p in perm]
    assert reorder_frames(video, "normal") is video
    choices = torch.arange(4).float().view(1, 1, 4, 1, 1, 1).expand(2, 5, 4, 3, 2, 2)  # [Q, 5, T, C, H, W]
    assert reorder_frames(choices, "reversed")[1, 4, :, 0, 0, 0].tolist() == [3, 2, 1, 0]


@pytest.mark.parametrize("orders", [[], ["shuffled", "normal"], ["normal", "normal"], ["normal", "upside_down"]])
def test_frame_orders_must_start_with_normal(orders):
    with pytest.raises(ValueError, match="frame_orders must be distinct entries"):
        check_frame_orders(orders)


def test_combine_reports_each_order_and_normal_minus_order():
    results = {
        "normal": {"metrics": {"t2v_r1": 40.0}, "twins": {"time_reversed": 80.0}, "num_videos": 8},
        "shuffled": {"metrics": {"t2v_r1": 30.0}, "twins": {"time_reversed": 55.0}, "num_videos": 8},
        "reversed": {"metrics": {"t2v_r1": 35.0}, "twins": {"time_reversed": 20.0}, "num_videos": 8},
    }
    out = combine(results, frames=4, seed=0)
    assert out["metrics"] == {"t2v_r1": 40.0} and out["num_videos"] == 8  # the normal pass, keys unchanged
    assert out["frame_orders"]["reversed"]["twins"] == {"time_reversed": 20.0}
    assert out["frame_order_deltas"] == {
        "shuffled": {"metrics": {"t2v_r1": 10.0}, "twins": {"time_reversed": 25.0}},
        "reversed": {"metrics": {"t2v_r1": 5.0}, "twins": {"time_reversed": 60.0}},
    }
    assert out["frame_permutations"]["reversed"] == [3, 2, 1, 0]


def test_reversal_twin_accuracy_by_hand():
    pairs = [(0, 1, "reverse"), (0, 2, "order")]  # only the reverse pair is scored
    # a model that reads time: each clip prefers its own caption, each reversed clip its twin's
    normal = np.array([[0.9, 0.1, 0.0], [0.2, 0.8, 0.0], [0.0, 0.0, 1.0]])
    reversed_ = np.array([[0.1, 0.9, 0.0], [0.7, 0.3, 0.0], [0.0, 0.0, 1.0]])
    assert reversal_twin_accuracy(normal, reversed_, pairs) == 100.0
    # blind to order: reversed == normal, so exactly one of each clip's two decisions is right
    assert reversal_twin_accuracy(normal, normal, pairs) == 50.0
    # ... unless the two captions tie as well: then both decisions are wrong (ties count against)
    tie = np.array([[0.5, 0.5, 0.0], [0.3, 0.3, 0.0], [0.0, 0.0, 1.0]])
    assert reversal_twin_accuracy(tie, tie, pairs) == 0.0
    with pytest.raises(ValueError, match="no time-reversed"):
        reversal_twin_accuracy(normal, normal, [(0, 2, "order")])


@pytest.fixture(scope="module")
def demo(pipeline):
    corpus, res = pipeline
    tokenizer = load_tokenizer(corpus / "tokenizer")
    collator = PairCollator(tokenizer, 32)
    retrieval = RetrievalDataset(res / "frames/downstream", corpus / "retrieval_test.json", 4, EvalTransform(32))
    return tokenizer, collator, retrieval


def _model(tokenizer, **video):
    torch.manual_seed(0)
    return svitt.build_model(
        {
            "video": {"preset": "tiny", "frames": 4, **video},
            "text": {"preset": "tiny", "vocab_size": len(tokenizer)},
            "embed_dim": 16,
        }
    ).eval()


def test_retrieval_runs_every_frame_order_and_reports_the_differences(demo):
    tokenizer, collator, data = demo
    model = _model(tokenizer, local_blocks=1, random_blocks=1, block_size=8)  # random blocks: reseeded per pass
    result = task("retrieval").run(model, data, collator, {"batch_size": 4, "rerank_k": 3}, progress=False)
    assert set(result["frame_orders"]) == {"normal", "shuffled", "reversed"}
    assert result["frame_orders"]["normal"]["metrics"] == result["metrics"]
    for order in ("shuffled", "reversed"):
        for key in ("metrics", "metrics_vtm", "twins", "twins_vtm"):
            got = result["frame_order_deltas"][order][key]
            assert got == pytest.approx({m: result[key][m] - v for m, v in result["frame_orders"][order][key].items()})
    # the reversed pass is the reversed clips' evaluation, done by hand here
    single = task("retrieval").evaluate_retrieval
    model.video_encoder.layout_generator.manual_seed(0)
    by_hand = single(model, data, collator, batch_size=4, rerank_k=3, progress=False, frame_order="reversed")
    assert by_hand["metrics"] == result["frame_orders"]["reversed"]["metrics"]
    assert set(result["twins_exact_reversal"]) == {"itc", "vtm"}
    # a joint model reads frame order: reversing every clip changes its embeddings (recall over 8
    # clips of an untrained model can coincide, so compare what the recalls are computed from)
    embeddings = {
        order: embed_videos(model, data, 4, 0, "cpu", keep_tokens=False, progress=False, frame_order=order)[0]
        for order in ("normal", "reversed")
    }
    assert not torch.allclose(embeddings["normal"], embeddings["reversed"], atol=1e-4)


def test_egomcq_runs_every_frame_order(pipeline, demo):
    corpus, res = pipeline
    tokenizer, collator, _ = demo
    data = EgoMCQDataset(res / "frames/ego", corpus / "egomcq.json", 4, EvalTransform(32))
    result = task("egomcq").run(
        _model(tokenizer), data, collator, {"frame_orders": ["normal", "reversed"]}, progress=False
    )
    assert set(result["frame_orders"]) == {"normal", "reversed"}
    assert set(result["frame_order_deltas"]["reversed"]["metrics"]) == {"inter", "intra"}
