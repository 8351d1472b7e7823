"""Model-driven evaluation on demo data: retrieval (with VTM re-ranking), twins, EgoMCQ, NLQ
windows; and the pure twin metric by hand."""

import math

import pytest
import torch

import svitt
from svitt.data.datasets import EgoMCQDataset, FrameStore, RetrievalDataset
from svitt.data.pipeline import PairCollator, load_tokenizer
from svitt.data.transforms import EvalTransform
from svitt.evaluation import (
    evaluate_egomcq,
    evaluate_retrieval,
    extract_window_features,
    retrieval_metrics,
    twin_accuracy,
    window_starts,
)


def test_twin_accuracy_by_hand():
    sim = torch.tensor(
        [
            [0.9, 0.1, 0.0, 0.0],  # video 0 prefers its caption over twin 1's
            [0.8, 0.2, 0.0, 0.0],  # video 1 prefers twin 0's caption: wrong
            [0.0, 0.0, 0.5, 0.5],  # a tie counts as wrong
            [0.0, 0.0, 0.1, 0.7],
        ]
    )
    acc = twin_accuracy(sim, [(0, 1, "reverse"), (2, 3, "order")])
    assert acc == {"reverse": 50.0, "order": 50.0}


def test_window_starts_by_hand():
    assert window_starts(10, 4, 4) == [0, 4]
    assert window_starts(12, 4, 2) == [0, 2, 4, 6, 8]
    assert window_starts(3, 4, 4) == [0]  # one padded window
    with pytest.raises(ValueError, match="stride"):
        window_starts(10, 4, 0)


@pytest.fixture(scope="module")
def tiny(pipeline):
    corpus, _ = pipeline
    tokenizer = load_tokenizer(corpus / "tokenizer")
    torch.manual_seed(0)
    model = svitt.build_model(
        {
            "video": {"preset": "tiny", "frames": 4},
            "text": {"preset": "tiny", "vocab_size": len(tokenizer)},
            "embed_dim": 16,
        }
    )
    return model.eval(), PairCollator(tokenizer, 32)


def test_retrieval_evaluation_on_the_demo_test_split(pipeline, tiny):
    corpus, res = pipeline
    model, collator = tiny
    data = RetrievalDataset(res / "frames/downstream", corpus / "retrieval_test.json", 4, EvalTransform(32))
    result = evaluate_retrieval(model, data, collator, batch_size=4, rerank_k=3, progress=False)
    assert result["num_videos"] == 8 and result["chance_r1"] == 12.5
    # the contrastive scores, computed here directly from the two encoders
    with torch.no_grad():
        video = torch.stack([data[i]["video"] for i in range(len(data))])
        _, video_emb = model.encode_video(video)
        tokens = collator.tokenize(data.texts)
        _, text_emb = model.encode_text(tokens["input_ids"], tokens["attention_mask"])
    expected = retrieval_metrics(text_emb @ video_emb.T, data.text_to_video)
    expected["r_mean"] = (expected["t2v_mean"] + expected["v2t_mean"]) / 2
    assert result["metrics"] == pytest.approx(expected)
    assert set(result["twins"]) == set(result["twins_vtm"]) == {"time_reversed", "event_order"}
    # re-ranking a single candidate per text changes no rank
    single = evaluate_retrieval(model, data, collator, batch_size=4, rerank_k=1, progress=False)
    for key in ("t2v_r1", "v2t_r1"):  # both sides keep their own top-1
        assert single["metrics_vtm"][key] == single["metrics_vtm_itc"][key] == single["metrics"][key]
    assert result["rerank"]["k"] == 3 and result["rerank"]["vtm_score"] == "log_odds"
    assert result["rerank"]["temperature"] == pytest.approx(model.temperature().detach().item())


def test_egomcq_evaluation_on_the_demo(pipeline, tiny):
    corpus, res = pipeline
    model, collator = tiny
    data = EgoMCQDataset(res / "frames/ego", corpus / "egomcq.json", 4, EvalTransform(32))
    result = evaluate_egomcq(model, data, collator, progress=False)
    assert result["num_questions"] == 4
    assert sum(result["counts"].values()) == 4
    for kind in ("inter", "intra"):
        value = result["metrics"][kind]
        assert math.isnan(value) if result["counts"][kind] == 0 else 0 <= value <= 100


def test_window_features_are_the_cls_of_each_window(pipeline, tiny):
    _, res = pipeline
    model, _ = tiny
    store = FrameStore(res / "frames/ego")
    video = sorted(store.shard_of)[0]
    transform = EvalTransform(32)
    [(video_id, feats, starts)] = list(
        extract_window_features(model, store, [video], transform, window=4, stride=3, progress=False)
    )
    total = store.num_frames(video)
    assert starts.tolist() == window_starts(total, 4, 3)
    clip = transform(store.read(video, [3, 4, 5, 6]))[None]
    with torch.no_grad():
        expected = model.encode_video(clip)[0][0, 0]
    torch.testing.assert_close(feats[1], expected, rtol=0, atol=1e-5)
