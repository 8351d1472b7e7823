"""Ego4D NLQ recall at temporal IoU on a hand-worked case (Ego4D's evaluate_nlq_performance rules:
top-k windows, IoU strictly above the threshold, averaged over queries; mIoU of the best 3)."""

import numpy as np
import pytest
import torch

from svitt.evaluation import nlq_metric_names, nlq_recall, temporal_iou

GROUND_TRUTH = [[2, 6], [0, 10], [10, 12], [0, 10]]
PREDICTIONS = [
    [[2, 6]],  # q0: exact              IoU 1
    [[0, 4], [0, 6], [20, 30]],  # q1: 0.4, then 0.6, then 0
    [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 12]],  # q2: the exact window is 6th: outside the top 5
    [[0, 3], [0, 5], [0, 5.1]],  # q3: 0.3 and 0.5 exactly (not above), then 0.51
]
# found?           r1@0.3  r5@0.3  r1@0.5  r5@0.5
#   q0               1       1       1       1
#   q1               1       1       0       1      (0.4 > 0.3 at rank 1; 0.6 > 0.5 at rank 2)
#   q2               0       0       0       0
#   q3               0       1       0       1      (ties with the threshold miss; 0.51 at rank 3)
EXPECTED = {
    "r1_iou0.3": 50.0,
    "r5_iou0.3": 75.0,
    "r1_iou0.5": 25.0,
    "r5_iou0.5": 75.0,
    # best-3 mean IoU per query: 1, (0.4 + 0.6 + 0) / 3, (0 + 0 + 1) / 3, (0.3 + 0.5 + 0.51) / 3
    "miou": 100 * (1 + 1 / 3 + 1 / 3 + 1.31 / 3) / 4,
}


def test_nlq_recall_hand_worked_case():
    out = nlq_recall(PREDICTIONS, GROUND_TRUTH)
    assert list(out) == nlq_metric_names() + ["miou"]
    assert out == pytest.approx(EXPECTED, abs=1e-9)


def test_nlq_recall_accepts_tensors_and_other_cutoffs():
    out = nlq_recall(
        [torch.tensor(p, dtype=torch.float64) for p in PREDICTIONS], np.array(GROUND_TRUTH), ks=(1, 3, 6), ious=(0.01,)
    )
    # IoU > 0.01: q0 at rank 1, q1 at rank 1, q2 only at rank 6, q3 at rank 1
    assert out["r1_iou0.01"] == 75.0 and out["r3_iou0.01"] == 75.0 and out["r6_iou0.01"] == 100.0


def test_temporal_iou_by_hand():
    iou = temporal_iou([[0, 2], [1, 3], [4, 5], [3, 3]], (0, 4))
    np.testing.assert_allclose(iou, [0.5, 0.5, 0.0, 0.0])
    assert temporal_iou([[3, 3]], (3, 3))[0] == 0.0  # empty union: no overlap to speak of


def test_a_query_without_predictions_is_a_miss():
    out = nlq_recall([[], [[0, 10]]], [[0, 10], [0, 10]])
    assert out["r5_iou0.5"] == 50.0


@pytest.mark.parametrize(
    "predictions,truth,message",
    [
        ([[[0, 1]]], [[0, 1], [2, 3]], "1 prediction lists for 2 queries"),
        ([[[3, 1]]], [[0, 1]], "end >= start; query 0 has \\[3.0, 1.0\\]"),
        ([[[0, 1]]], [[5, 4]], "ground-truth windows must have end >= start"),
        ([[[0, float("nan")]]], [[0, 1]], "NaN"),
        ([], np.zeros((0, 2)), "non-empty"),
    ],
)
def test_bad_inputs_name_the_problem(predictions, truth, message):
    with pytest.raises(ValueError, match=message):
        nlq_recall(predictions, truth)
