"""svitt.models.losses against hand-computed values (math on explicit small matrices, never the function twice)."""

import math

import pytest
import torch

from svitt.models.losses import (
    clamp_temperature,
    egonce,
    info_nce,
    mask_tokens,
    mlm_loss,
    vtm_hard_negatives,
    vtm_loss,
)

# A hand-written, non-symmetric similarity matrix. With video = I (rows e_0, e_1, e_2) and
# text = M, text @ video.T = M, i.e. M[i, j] = <text_i, video_j>, and video @ text.T = M.T.
M = [
    [0.9, 0.2, -0.1],
    [0.4, 0.7, 0.0],
    [0.3, -0.2, 0.8],
]


def _video_text():
    video = torch.eye(3, dtype=torch.float64)
    text = torch.tensor(M, dtype=torch.float64)
    return video, text


def _neg_log_softmax(values, targets, tau):
    """-log(sum_{k in targets} exp(values[k] / tau) / sum_k exp(values[k] / tau)), plain math."""
    num = sum(math.exp(values[k] / tau) for k in targets)
    den = sum(math.exp(v / tau) for v in values)
    return -math.log(num / den)


def _row(i):
    return M[i]


def _col(j):
    return [M[i][j] for i in range(3)]


# ----------------------------------------------------------------------------- info_nce


def test_info_nce_hand_computed():
    video, text = _video_text()
    tau = 0.5
    # video->text logits are M.T / tau: row i of M.T is column i of M; target i
    v2t = sum(_neg_log_softmax(_col(i), [i], tau) for i in range(3)) / 3
    t2v = sum(_neg_log_softmax(_row(i), [i], tau) for i in range(3)) / 3
    loss = info_nce(video, text, tau)
    assert loss.dim() == 0
    assert loss.item() == pytest.approx(v2t + t2v, abs=1e-12)


def test_info_nce_2x2_closed_form():
    # orthonormal pairs, tau = 0.5: logits [[2, 0], [0, 2]]; each row -log(e^2 / (e^2 + 1)) = log(1 + e^-2)
    eye = torch.eye(2, dtype=torch.float64)
    assert info_nce(eye, eye, 0.5).item() == pytest.approx(2 * math.log(1 + math.exp(-2)), abs=1e-12)


def test_info_nce_does_not_normalise():
    # doubling the embeddings quadruples the logits; a normalising loss would not change
    eye = torch.eye(2, dtype=torch.float64)
    assert info_nce(2 * eye, 2 * eye, 0.5).item() == pytest.approx(2 * math.log(1 + math.exp(-8)), abs=1e-12)


def test_info_nce_tensor_temperature_gets_gradient():
    video, text = _video_text()
    tau = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    loss = info_nce(video, text, tau)
    loss.backward()

    # d/dtau of sum over both directions of (-s_ii/tau + logsumexp(s_i/tau)), by finite difference of the hand formula
    def hand(t):
        return (
            sum(_neg_log_softmax(_col(i), [i], t) for i in range(3))
            + sum(_neg_log_softmax(_row(i), [i], t) for i in range(3))
        ) / 3

    eps = 1e-6
    assert tau.grad.item() == pytest.approx((hand(0.5 + eps) - hand(0.5 - eps)) / (2 * eps), abs=1e-6)


@pytest.mark.parametrize("tau", [0.0, -0.1, torch.tensor([0.1, 0.2])])
def test_info_nce_rejects_bad_temperature(tau):
    eye = torch.eye(2)
    with pytest.raises(ValueError, match="temperature"):
        info_nce(eye, eye, tau)


def test_info_nce_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"\(3, 4\).*\(2, 4\)"):
        info_nce(torch.zeros(3, 4), torch.zeros(2, 4), 0.1)


# ----------------------------------------------------------------------------- egonce


def test_egonce_hand_computed_3x3():
    video, text = _video_text()
    # nouns: 0 and 1 share noun 0, 2 shares noun 0 with both too (noun alone is not enough)
    nouns = torch.tensor([[1, 0], [1, 1], [1, 0]])
    # verbs: 0 and 1 share verb 1; 2 has its own verb 2
    verbs = torch.tensor([[0, 1, 0], [1, 1, 0], [0, 0, 1]])
    # positives (noun AND verb, plus diagonal): {0, 1} for 0 and 1, {2} for 2
    pos = {0: [0, 1], 1: [0, 1], 2: [2]}
    tau = 0.5
    t2v = sum(_neg_log_softmax(_row(i), pos[i], tau) for i in range(3)) / 3  # text i over videos: row i of M
    v2t = sum(_neg_log_softmax(_col(j), pos[j], tau) for j in range(3)) / 3  # video j over texts: column j
    loss = egonce(video, text, nouns, verbs, temperature=tau)
    assert loss.item() == pytest.approx(t2v + v2t, abs=1e-12)


def test_egonce_default_temperature_is_005():
    video, text = _video_text()
    nouns = torch.tensor([[1, 0], [1, 0], [0, 1]])
    verbs = torch.tensor([[1], [1], [1]])
    pos = {0: [0, 1], 1: [0, 1], 2: [2]}
    t2v = sum(_neg_log_softmax(_row(i), pos[i], 0.05) for i in range(3)) / 3
    v2t = sum(_neg_log_softmax(_col(j), pos[j], 0.05) for j in range(3)) / 3
    assert egonce(video, text, nouns, verbs).item() == pytest.approx(t2v + v2t, abs=1e-9)


def test_egonce_without_shared_tags_equals_info_nce():
    gen = torch.Generator().manual_seed(0)
    video = torch.nn.functional.normalize(torch.randn(6, 8, generator=gen, dtype=torch.float64), dim=1)
    text = torch.nn.functional.normalize(torch.randn(6, 8, generator=gen, dtype=torch.float64), dim=1)
    # everybody shares noun 0, but no two samples share a verb: the AND leaves only the diagonal
    nouns = torch.ones(6, 3)
    verbs = torch.eye(6)
    for tau in (0.05, 0.07, torch.tensor(0.3, dtype=torch.float64)):
        assert egonce(video, text, nouns, verbs, tau).item() == pytest.approx(
            info_nce(video, text, tau).item(), abs=1e-12
        )
    # samples without any tag share nothing either
    assert egonce(video, text, torch.zeros(6, 2), torch.zeros(6, 2), 0.05).item() == pytest.approx(
        info_nce(video, text, 0.05).item(), abs=1e-12
    )


def test_egonce_all_positive_is_zero():
    # every pair shares a noun and a verb: all mass is positive, log 1 = 0 in both directions
    video, text = _video_text()
    assert egonce(video, text, torch.ones(3, 1), torch.ones(3, 1), 0.05).item() == pytest.approx(0.0, abs=1e-12)


def test_egonce_rejects_bad_tags():
    video, text = _video_text()
    with pytest.raises(ValueError, match=r"nouns must be a multi-hot tensor \[B=3"):
        egonce(video, text, torch.ones(2, 4), torch.ones(3, 4))
    with pytest.raises(ValueError, match="verbs must be multi-hot.*2.0"):
        egonce(video, text, torch.ones(3, 4), torch.full((3, 4), 2.0))


# ----------------------------------------------------------------------------- VTM

# Off-diagonal weights chosen so the softmax probabilities are simple fractions:
# video rows: 0 -> texts {1: 1/4, 2: 3/4}; 1 -> {0: 4/5, 2: 1/5}; 2 -> {0: 1/3, 1: 2/3}
# text columns: 0 -> videos {1: 4/5, 2: 1/5}; 1 -> {0: 1/3, 2: 2/3}; 2 -> {0: 3/4, 1: 1/4}
SIM_VTM = torch.tensor(
    [
        [5.0, 0.0, math.log(3)],
        [math.log(4), 5.0, 0.0],
        [0.0, math.log(2), 5.0],
    ]
)


def test_vtm_hard_negatives_follow_softmax_without_diagonal():
    # 250 copies of SIM_VTM on a block diagonal; off-block entries are so low that their softmax
    # weight underflows to exactly 0, so every copy is an independent draw from the 3x3 problem
    copies = 250
    block = torch.arange(3 * copies) // 3
    sim = torch.where(block[:, None] == block[None, :], SIM_VTM.repeat(copies, copies), torch.tensor(-1e4))
    gen = torch.Generator().manual_seed(0)
    draws = [vtm_hard_negatives(sim, generator=gen) for _ in range(8)]  # 2000 draws per row
    offset = block * 3
    expected_text = {0: [0, 1 / 4, 3 / 4], 1: [4 / 5, 0, 1 / 5], 2: [1 / 3, 2 / 3, 0]}
    expected_video = {0: [0, 4 / 5, 1 / 5], 1: [1 / 3, 0, 2 / 3], 2: [3 / 4, 1 / 4, 0]}
    for which, expected in ((0, expected_text), (1, expected_video)):
        local = torch.stack([d[which] - offset for d in draws])  # [8, 3 * copies], index inside the block
        assert local.min() >= 0 and local.max() <= 2  # never outside its own block
        for i in range(3):
            freq = torch.bincount(local[:, i::3].reshape(-1), minlength=3).double() / local[:, i::3].numel()
            assert freq[i] == 0  # never the positive itself
            assert freq.tolist() == pytest.approx(expected[i], abs=0.04)  # sd <= 0.011


def test_vtm_hard_negatives_mixed_with_uniform_follow_the_mixture():
    # hard_fraction h: h * softmax (diagonal removed) + (1 - h) * uniform over the other two
    h = 0.4
    gen = torch.Generator().manual_seed(5)
    draws = torch.stack([vtm_hard_negatives(SIM_VTM, generator=gen, hard_fraction=h)[0] for _ in range(3000)])
    hard_text = {0: [0, 1 / 4, 3 / 4], 1: [4 / 5, 0, 1 / 5], 2: [1 / 3, 2 / 3, 0]}
    for i in range(3):
        expected = [0.0 if j == i else h * hard_text[i][j] + (1 - h) / 2 for j in range(3)]
        freq = torch.bincount(draws[:, i], minlength=3).double() / len(draws)
        assert freq.tolist() == pytest.approx(expected, abs=0.03)  # sd <= 0.0092
    # h = 1 is the pure similarity draw, with the same random stream
    one = vtm_hard_negatives(SIM_VTM, generator=torch.Generator().manual_seed(6), hard_fraction=1.0)
    default = vtm_hard_negatives(SIM_VTM, generator=torch.Generator().manual_seed(6))
    assert torch.equal(one[0], default[0]) and torch.equal(one[1], default[1])
    with pytest.raises(ValueError, match=r"hard_fraction must be a number in \[0, 1\], got 1.5"):
        vtm_hard_negatives(SIM_VTM, hard_fraction=1.5)


def test_vtm_hard_negatives_respect_positives_mask():
    positives = torch.zeros(3, 3, dtype=torch.bool)
    positives[0, 2] = True  # video 0 and text 2 are a positive pair too
    gen = torch.Generator().manual_seed(1)
    for _ in range(50):
        t_idx, v_idx = vtm_hard_negatives(SIM_VTM, generator=gen, positives_mask=positives)
        assert t_idx[0] == 1  # video 0 may not draw text 0 (diagonal) nor text 2 (positive)
        assert v_idx[2] == 1  # text 2 may not draw video 2 (diagonal) nor video 0 (positive)


def test_vtm_hard_negatives_all_positive_row_falls_back_to_off_diagonal():
    gen = torch.Generator().manual_seed(2)
    t_idx, v_idx = vtm_hard_negatives(
        torch.zeros(2, 2), generator=gen, positives_mask=torch.ones(2, 2, dtype=torch.bool)
    )
    assert t_idx.tolist() == [1, 0] and v_idx.tolist() == [1, 0]


def test_vtm_hard_negatives_reproducible_and_errors():
    sim = torch.randn(8, 8, generator=torch.Generator().manual_seed(3))
    a = vtm_hard_negatives(sim, generator=torch.Generator().manual_seed(4))
    b = vtm_hard_negatives(sim, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert a[0].dtype == torch.int64 and a[0].shape == (8,)
    with pytest.raises(ValueError, match="at least 2 pairs, got B=1"):
        vtm_hard_negatives(torch.zeros(1, 1))
    with pytest.raises(ValueError, match=r"square.*\(2, 3\)"):
        vtm_hard_negatives(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="NaN"):
        vtm_hard_negatives(torch.tensor([[0.0, float("nan")], [0.0, 0.0]]))


def test_vtm_loss_hand_computed():
    logits_pos = torch.tensor([[0.0, math.log(3)]])  # p(match) = 3/4, label 1
    logits_neg = torch.tensor([[math.log(2), 0.0], [0.0, 0.0]])  # p(no match) = 2/3 and 1/2, label 0
    expected = (-math.log(3 / 4) - math.log(2 / 3) - math.log(1 / 2)) / 3
    assert vtm_loss(logits_pos, logits_neg).item() == pytest.approx(expected, abs=1e-6)


def test_vtm_loss_shape_errors():
    with pytest.raises(ValueError, match=r"logits_neg must be \[2B, 2\] = \[4, 2\]"):
        vtm_loss(torch.zeros(2, 2), torch.zeros(2, 2))
    with pytest.raises(ValueError, match=r"logits_pos must be \[B, 2\]"):
        vtm_loss(torch.zeros(2, 3), torch.zeros(4, 2))


# ----------------------------------------------------------------------------- MLM

PAD, CLS, SEP, MASK = 0, 101, 102, 103
VOCAB = 30522


def _batch(batch=400, length=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, VOCAB, (batch, length), generator=gen)
    lengths = torch.randint(max(3, length // 4), length + 1, (batch,), generator=gen)
    attention = (torch.arange(length)[None, :] < lengths[:, None]).long()
    ids[:, 0] = CLS
    ids[torch.arange(batch), lengths - 1] = SEP
    ids[attention == 0] = PAD
    return ids, attention


def test_mask_tokens_80_10_10_statistics():
    ids, attention = _batch()
    original = ids.clone()
    masked, labels = mask_tokens(
        ids, attention, VOCAB, MASK, [PAD, CLS, SEP, MASK], 0.15, generator=torch.Generator().manual_seed(0)
    )
    assert torch.equal(ids, original)  # input untouched
    special = (ids == CLS) | (ids == SEP) | (attention == 0)
    maskable = ~special
    chosen = labels != -100
    assert not (chosen & special).any()  # specials and padding never chosen
    assert torch.equal(masked[special], ids[special])
    assert torch.equal(labels[chosen], ids[chosen])  # labels are the original ids
    assert torch.equal(masked[~chosen], ids[~chosen])  # nothing else changes
    rate = chosen.sum().item() / maskable.sum().item()
    assert rate == pytest.approx(0.15, abs=0.01)  # ~17,000 maskable tokens: sd 0.003
    n = chosen.sum().item()
    to_mask = (masked[chosen] == MASK).sum().item() / n
    unchanged = (masked[chosen] == ids[chosen]).sum().item() / n
    replaced = 1 - to_mask - unchanged
    # ~2,500 chosen tokens: sd 0.008 (80%) and 0.006 (10%)
    assert to_mask == pytest.approx(0.8, abs=0.03)
    assert unchanged == pytest.approx(0.1, abs=0.025)
    assert replaced == pytest.approx(0.1, abs=0.025)
    randoms = masked[chosen][(masked[chosen] != MASK) & (masked[chosen] != ids[chosen])]
    assert randoms.min() >= 0 and randoms.max() < VOCAB
    assert randoms.float().std() > VOCAB / 5  # spread over the vocabulary, not a constant


def test_mask_tokens_extremes_and_reproducibility():
    ids, attention = _batch(batch=20, length=16, seed=1)
    special = (ids == CLS) | (ids == SEP) | (attention == 0)
    _, labels = mask_tokens(ids, attention, VOCAB, MASK, [PAD, CLS, SEP], 1.0)
    assert torch.equal(labels != -100, ~special)  # probability 1: every maskable token, no special
    _, labels = mask_tokens(ids, attention, VOCAB, MASK, [PAD, CLS, SEP], 0.0)
    assert (labels == -100).all()
    a = mask_tokens(ids, attention, VOCAB, MASK, [PAD, CLS, SEP], 0.3, generator=torch.Generator().manual_seed(5))
    b = mask_tokens(ids, attention, VOCAB, MASK, [PAD, CLS, SEP], 0.3, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_mask_tokens_padding_masked_by_attention_not_by_id():
    # a real token after the attention mask ends is padding even if its id is not [PAD]
    ids = torch.tensor([[CLS, 2000, 2001, SEP, 2002, 2003]])
    attention = torch.tensor([[1, 1, 1, 1, 0, 0]])
    _, labels = mask_tokens(ids, attention, VOCAB, MASK, [CLS, SEP], 1.0)
    assert labels.tolist() == [[-100, 2000, 2001, -100, -100, -100]]


@pytest.mark.parametrize(
    "kwargs, fragment",
    [(dict(mask_prob=1.5), "mask_prob.*1.5"), (dict(mask_token_id=VOCAB), "mask_token_id.*30522")],
)
def test_mask_tokens_bad_input(kwargs, fragment):
    ids, attention = _batch(batch=2, length=8)
    args = dict(vocab_size=VOCAB, mask_token_id=MASK, special_ids=[PAD], mask_prob=0.15)
    args.update(kwargs)
    with pytest.raises(ValueError, match=fragment):
        mask_tokens(ids, attention, **args)


def test_mlm_loss_hand_computed():
    # position 0: softmax([0, ln 2, ln 5]) = [1/8, 2/8, 5/8], label 2; position 1 ignored; position 2: label 0 of [0, 0, 0]
    logits = torch.tensor([[[0.0, math.log(2), math.log(5)], [9.0, -3.0, 1.0], [0.0, 0.0, 0.0]]])
    labels = torch.tensor([[2, -100, 0]])
    expected = (-math.log(5 / 8) - math.log(1 / 3)) / 2
    assert mlm_loss(logits, labels).item() == pytest.approx(expected, abs=1e-6)


def test_mlm_loss_without_masked_tokens_is_zero_with_graph():
    logits = torch.randn(2, 3, 5, requires_grad=True)
    loss = mlm_loss(logits, torch.full((2, 3), -100))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


# ----------------------------------------------------------------------------- temperature


def test_clamp_temperature():
    assert clamp_temperature(0.0001) == 0.001
    assert clamp_temperature(0.9) == 0.5
    assert clamp_temperature(0.07) == 0.07
    t = torch.tensor([0.0, 0.07, 3.0])
    assert clamp_temperature(t).tolist() == pytest.approx([0.001, 0.07, 0.5])
