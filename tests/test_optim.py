"""AdamW's parameter groups from the models' own no_weight_decay(), checked against the rule the
trainer wrote by name before the models declared it (svitt.training.optim)."""

from __future__ import annotations

import copy

import pytest

from svitt.models.answer_decoder import VideoQA
from svitt.models.svitt import SViTT
from svitt.training.optim import param_groups
from tests.test_svitt_model import TINY


def suffix_rule(model):
    """The trainer's rule before the models declared theirs: no decay for biases, norms, layer
    scales (under 2 dims) and names ending in cls_token, relative_position_bias_table or temp."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        skip = p.ndim < 2 or name.endswith(("cls_token", "relative_position_bias_table", "temp"))
        (no_decay if skip else decay).append(p)
    return decay, no_decay


@pytest.mark.parametrize(
    "build", [lambda: SViTT(copy.deepcopy(TINY)), lambda: VideoQA(copy.deepcopy(TINY), 1)], ids=["svitt", "qa"]
)
def test_groups_equal_the_suffix_rule(build):
    model = build()
    decay, no_decay = suffix_rule(model)
    groups = param_groups(model, 0.05)
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]
    assert [id(p) for p in groups[0]["params"]] == [id(p) for p in decay]
    assert [id(p) for p in groups[1]["params"]] == [id(p) for p in no_decay]


def test_declared_names_exist_and_are_matrices():
    """Each name a model declares is one of its parameters, and one the 2-dim rule alone would decay."""
    model = SViTT(copy.deepcopy(TINY))
    params = dict(model.named_parameters())
    declared = model.no_weight_decay()
    assert "temp" in declared and "video_encoder.cls_token" in declared
    assert declared <= set(params)
    assert all(params[n].ndim >= 2 for n in declared if n != "temp")


def test_frozen_parameters_are_left_out():
    model = SViTT(copy.deepcopy(TINY))
    model.vtm_head.weight.requires_grad_(False)
    kept = {id(p) for g in param_groups(model, 0.1) for p in g["params"]}
    assert id(model.vtm_head.weight) not in kept and id(model.vtm_head.bias) in kept
