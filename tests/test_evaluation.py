"""svitt.evaluation metrics on hand-computed examples."""

import math

import numpy as np
import pytest
import torch

from svitt.evaluation import egomcq_accuracy, retrieval_metrics

# 4 texts x 3 videos; texts 2 and 3 both describe video 2
SIM = [
    [0.9, 0.1, 0.3],  # text 0 (gt 0): nothing else >= 0.9            -> rank 0
    [0.8, 0.5, 0.6],  # text 1 (gt 1): 0.8 and 0.6 >= 0.5             -> rank 2
    [0.2, 0.7, 0.4],  # text 2 (gt 2): 0.7 >= 0.4                     -> rank 1
    [0.1, 0.1, 0.1],  # text 3 (gt 2): two ties count against          -> rank 2
]
TEXT_TO_VIDEO = [0, 1, 2, 2]
# v2t: video 0: gt text 0 scores 0.9, others 0.8, 0.2, 0.1           -> rank 0
#      video 1: gt text 1 scores 0.5, text 2 scores 0.7 above          -> rank 1
#      video 2: best gt text 2 scores 0.4, text 1 (0.6) above, text 0 (0.3) not -> rank 1
EXPECTED = {
    "t2v_r1": 25.0,
    "t2v_r5": 100.0,
    "t2v_r10": 100.0,
    "t2v_mean": 75.0,
    "v2t_r1": 100 / 3,
    "v2t_r5": 100.0,
    "v2t_r10": 100.0,
    "v2t_mean": (100 / 3 + 200) / 3,
}


@pytest.mark.parametrize("convert", [lambda x: x, np.array, lambda x: torch.tensor(x)])
def test_retrieval_small_by_hand(convert):
    out = retrieval_metrics(convert(SIM), convert(TEXT_TO_VIDEO))
    assert set(out) == set(EXPECTED)
    for key, value in EXPECTED.items():
        assert out[key] == pytest.approx(value, abs=1e-9), key
        assert isinstance(out[key], float)


def test_retrieval_t2v_ranks_across_recall_cutoffs():
    # 12 texts, 12 videos, text i -> video i; text i gets exactly RANKS[i] wrong videos scored above it
    ranks = [0, 0, 1, 4, 5, 9, 10, 11, 3, 6, 0, 2]
    sim = np.zeros((12, 12))
    for i, r in enumerate(ranks):
        sim[i, i] = 0.5
        others = [j for j in range(12) if j != i][:r]
        sim[i, others] = 1.0
    out = retrieval_metrics(sim, list(range(12)))
    # rank < 1: texts 0, 1, 10 -> 3/12; rank < 5: + 2, 3, 8, 11 -> 7/12; rank < 10: + 4, 5, 9 -> 10/12
    assert out["t2v_r1"] == pytest.approx(25.0)
    assert out["t2v_r5"] == pytest.approx(700 / 12)
    assert out["t2v_r10"] == pytest.approx(1000 / 12)
    assert out["t2v_mean"] == pytest.approx((25 + 700 / 12 + 1000 / 12) / 3)


def test_constant_scores_are_not_perfect():
    out = retrieval_metrics(np.ones((12, 12)), list(range(12)))
    # every ground truth ties with 11 wrong items: rank 11 in both directions
    assert all(out[k] == 0.0 for k in out)
    out = retrieval_metrics(np.ones((3, 3)), [0, 1, 2])
    assert out["t2v_r1"] == 0.0 and out["t2v_r5"] == 100.0 and out["v2t_r1"] == 0.0


def test_retrieval_bad_input():
    with pytest.raises(ValueError, match=r"videos have no ground-truth text.*\[1\]"):
        retrieval_metrics(np.zeros((2, 3)), [0, 2])
    with pytest.raises(ValueError, match=r"text_to_video entries must be in \[0, 3\), got \[3\]"):
        retrieval_metrics(np.zeros((3, 3)), [0, 1, 3])
    with pytest.raises(ValueError, match="length 3"):
        retrieval_metrics(np.zeros((3, 3)), [0, 1])
    with pytest.raises(ValueError, match="1 NaN or inf"):
        retrieval_metrics(np.array([[1.0, np.nan], [0.0, 1.0]]), [0, 1])
    with pytest.raises(ValueError, match=r"\[num_texts, num_videos\]"):
        retrieval_metrics(np.zeros(3), [0, 1, 2])


SCORES = [
    [0.1, 0.9, 0.2, 0.3, 0.0],  # answer 1, inter: correct
    [0.5, 0.5, 0.1, 0.1, 0.1],  # answer 0, inter: tie with candidate 1 -> wrong
    [0.2, 0.1, 0.3, 0.0, 0.0],  # answer 2, intra: correct
    [0.9, 0.1, 0.3, 0.0, 0.0],  # answer 4, intra: wrong
    [0.0, 0.0, 0.0, 0.0, 1.0],  # answer 4, intra: correct
]
ANSWERS = [1, 0, 2, 4, 4]
TYPES = [1, 1, 2, 2, 2]


@pytest.mark.parametrize("convert", [lambda x: x, np.array, lambda x: torch.tensor(x)])
def test_egomcq_by_hand(convert):
    out = egomcq_accuracy(convert(SCORES), convert(ANSWERS), convert(TYPES))
    assert out == {"inter": pytest.approx(50.0), "intra": pytest.approx(200 / 3)}  # 1 = inter, 2 = intra


def test_egomcq_missing_type_is_nan():
    out = egomcq_accuracy(SCORES[:2], ANSWERS[:2], TYPES[:2])
    assert out["inter"] == pytest.approx(50.0)
    assert math.isnan(out["intra"])


def test_egomcq_bad_input():
    with pytest.raises(ValueError, match=r"types must be 1 \(inter-video\) or 2 \(intra-video\), got \[3\]"):
        egomcq_accuracy(SCORES, ANSWERS, [1, 1, 2, 3, 2])
    with pytest.raises(ValueError, match=r"answers entries must be in \[0, 5\), got \[5\]"):
        egomcq_accuracy(SCORES, [1, 0, 2, 4, 5], TYPES)
    with pytest.raises(ValueError, match="NaN"):
        egomcq_accuracy([[np.nan, 0.0]], [0], [1])


# ------------------------------------------------------------------------------- re-ranked recall
from svitt.evaluation import (  # noqa: E402
    RERANK_CONVENTIONS,
    fused_rerank_scores,
    rerank_candidates,
    rerank_metrics,
)

# 5 texts x 3 videos, 1-2 captions per video (texts 0, 1 -> video 0; 2 -> 1; 3, 4 -> 2), k = 2
RR_SIM = np.array(
    [
        [0.9, 0.5, 0.1],
        [0.2, 0.8, 0.6],
        [0.7, 0.3, 0.4],
        [0.3, 0.2, 0.1],
        [0.5, 0.6, 0.55],
    ]
)
RR_TEXT_TO_VIDEO = [0, 0, 1, 2, 2]
# each text's top-2 videos: t0 [0, 1], t1 [1, 2], t2 [0, 2], t3 [0, 1], t4 [1, 2]
RR_VTM_T2V = [[2.0, 1.0], [3.0, 1.0], [0.5, 0.2], [1.0, -1.0], [0.0, 4.0]]
# each video's top-2 texts: v0 [t0, t2], v1 [t1, t4], v2 [t1, t4]
RR_VTM_V2T = [[-1.0, 2.0], [0.5, 0.7], [0.1, 0.9]]


def test_rerank_candidates_are_each_sides_own_top_k():
    t2v, v2t = rerank_candidates(RR_SIM, 2)
    assert t2v.tolist() == [[0, 1], [1, 2], [0, 2], [0, 1], [1, 2]]
    assert v2t.tolist() == [[0, 2], [1, 4], [1, 4]]


def test_rerank_metrics_by_hand_with_several_captions_per_video():
    out = rerank_metrics(RR_SIM, RR_VTM_T2V, RR_VTM_V2T, RR_TEXT_TO_VIDEO, k=2)
    # t2v ranks: t0 0 (gt top-1 by vtm), t1 2 (gt outside its top-2: below both), t2 2, t3 2, t4 0
    assert out["t2v_r1"] == pytest.approx(40.0) and out["t2v_r5"] == pytest.approx(100.0)
    assert out["t2v_mean"] == pytest.approx(80.0)
    # v2t ranks: v0 1 (non-gt t2 re-ranked above gt t0), v1 3 (gt t2 outside the top-2: below
    # t1 and t4, and below t0 by contrastive score 0.5 >= 0.3), v2 0 (gt t4 by vtm 0.9)
    assert out["v2t_r1"] == pytest.approx(100 / 3) and out["v2t_r5"] == pytest.approx(100.0)
    assert out["v2t_mean"] == pytest.approx((100 / 3 + 200) / 3)
    assert out["r_mean"] == pytest.approx((80.0 + (100 / 3 + 200) / 3) / 2)
    assert set(RERANK_CONVENTIONS) == {"candidates", "below_top_k", "ties"}


def _singularity_recalls(itc, vtm_t2v, vtm_v2t, text_to_video, k):
    """Singularity's evaluation() + itm_eval(), written from its description: -100 everywhere,
    the re-ranked scores at each side's own top-k, ranks from a descending argsort."""
    num_texts, num_videos = itc.shape
    t2v_top, v2t_top = np.argsort(-itc, axis=1)[:, :k], np.argsort(-itc.T, axis=1)[:, :k]
    t2i = np.full(itc.shape, -100.0)
    i2t = np.full(itc.T.shape, -100.0)
    for i in range(num_texts):
        t2i[i, t2v_top[i]] = vtm_t2v[i]
    for v in range(num_videos):
        i2t[v, v2t_top[v]] = vtm_v2t[v]
    img2txt = [[t for t, g in enumerate(text_to_video) if g == v] for v in range(num_videos)]
    txt_ranks = [min(np.where(np.argsort(i2t[v])[::-1] == t)[0][0] for t in img2txt[v]) for v in range(num_videos)]
    img_ranks = [np.where(np.argsort(t2i[i])[::-1] == text_to_video[i])[0][0] for i in range(num_texts)]
    recall = lambda ranks, r: 100.0 * np.mean(np.array(ranks) < r)  # noqa: E731
    return {
        **{f"t2v_r{r}": recall(img_ranks, r) for r in (1, 5, 10)},
        **{f"v2t_r{r}": recall(txt_ranks, r) for r in (1, 5, 10)},
    }


@pytest.mark.parametrize("captions_per_video", [1, 5])
def test_rerank_metrics_equal_singularity_for_k_at_least_10(captions_per_video):
    rng = np.random.default_rng(captions_per_video)
    num_videos, k = 40, 12
    text_to_video = np.repeat(np.arange(num_videos), captions_per_video)
    if captions_per_video > 1:  # 1 to 5 captions per video
        text_to_video = np.concatenate([np.arange(num_videos), rng.integers(0, num_videos, 3 * num_videos)])
    itc = rng.normal(size=(len(text_to_video), num_videos))
    t2v_top, v2t_top = rerank_candidates(itc, k)
    vtm_t2v = rng.normal(size=t2v_top.shape) + (t2v_top == text_to_video[:, None])
    is_gt_text = text_to_video[v2t_top] == np.arange(num_videos)[:, None]
    vtm_v2t = rng.normal(size=v2t_top.shape) + is_gt_text
    ours = rerank_metrics(itc, vtm_t2v, vtm_v2t, text_to_video, k)
    reference = _singularity_recalls(itc, vtm_t2v, vtm_v2t, list(text_to_video), k)
    for key, value in reference.items():
        assert ours[key] == pytest.approx(value), key


def test_rerank_metrics_reject_scores_of_the_wrong_shape():
    with pytest.raises(ValueError, match=r"vtm_v2t must have shape \[3, 2\]"):
        rerank_metrics(RR_SIM, RR_VTM_T2V, [[0.0, 1.0]], RR_TEXT_TO_VIDEO, k=2)


def test_fused_scores_add_the_contrastive_logit_at_each_candidate_by_hand():
    t2v, v2t = rerank_candidates(RR_SIM, 2)
    fused_t2v = fused_rerank_scores(RR_SIM, t2v, RR_VTM_T2V, temperature=0.1)
    # t0's candidates v0, v1: 2.0 + 0.9 / 0.1, 1.0 + 0.5 / 0.1; t4's v1, v2: 0.0 + 6, 4.0 + 5.5
    assert fused_t2v[0] == pytest.approx([11.0, 6.0]) and fused_t2v[4] == pytest.approx([6.0, 9.5])
    fused_v2t = fused_rerank_scores(RR_SIM.T, v2t, RR_VTM_V2T, temperature=0.1)
    # v0's candidates t0, t2: -1.0 + 9, 2.0 + 7 (the video side reads the transpose)
    assert fused_v2t[0] == pytest.approx([8.0, 9.0])
    out = rerank_metrics(RR_SIM, fused_t2v, fused_v2t, RR_TEXT_TO_VIDEO, k=2)
    # t2v: t0 gt v0 first (11 > 6); t4 gt v2 first (9.5 > 6); t1, t2, t3 have their gt outside
    # their top-2 (rank 2), as with the matching score alone
    assert out["t2v_r1"] == pytest.approx(40.0)
    # v2t: v0 t2 (9.0) above gt t0 (8.0): rank 1; v2: t4 (0.9 + 5.5) above t1 (0.1 + 6): rank 0
    assert out["v2t_r1"] == pytest.approx(100 / 3)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        fused_rerank_scores(RR_SIM, t2v, RR_VTM_T2V, temperature=0.0)
    with pytest.raises(ValueError, match=r"vtm must have shape \[5, 2\]"):
        fused_rerank_scores(RR_SIM, t2v, RR_VTM_T2V[:3], temperature=0.1)
