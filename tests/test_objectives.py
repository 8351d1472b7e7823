"""svitt.models.objectives: the one table of objectives drives the model's losses, the stage config's
validation, DDP's find_unused_parameters, the plots' labels and the meta-device training step."""

import dataclasses
import itertools
from pathlib import Path

import pytest
import torch
import yaml

from svitt.analysis import efficiency, plots
from svitt.models import objectives as registry
from svitt.models.objectives import OBJECTIVES, LossSettings, check_objectives
from svitt.models.svitt import SViTT
from svitt.training.keys import TRAIN_KEYS, resolve_train_config
from svitt.training.tasks import PairsTask

STAGE = {
    "name": "s",
    "model": {"video": {"preset": "tiny", "frames": 4}, "text": {"preset": "tiny"}},
    "objectives": {"vtc": 1.0},
    "epochs": 1,
    "batch_size": 4,
    "lr": 1e-4,
}
TINY = {"video": {"preset": "tiny", "frames": 4}, "text": {"preset": "tiny", "vocab_size": 40}, "embed_dim": 16}
SUBSETS = [frozenset(c) for n in range(1, len(OBJECTIVES) + 1) for c in itertools.combinations(OBJECTIVES, n)]


def _valid(subset) -> bool:
    return not {"vtc", "egonce"} <= subset


def test_the_registry_holds_the_four_objectives_in_order():
    assert OBJECTIVES == ("vtc", "egonce", "vtm", "mlm")


@pytest.mark.parametrize("objectives", [("vtc", "itc"), ("itc",)])
def test_an_unknown_objective_is_refused_naming_it(objectives):
    with pytest.raises(ValueError, match=r"unknown objectives \['itc'\]; expected some of"):
        check_objectives(objectives)
    with pytest.raises(ValueError, match=r"stage.objectives .*'itc'.* must be a non-empty mapping of"):
        resolve_train_config({**STAGE, "objectives": dict.fromkeys(objectives, 1.0)})


def test_vtc_and_egonce_exclude_each_other():
    with pytest.raises(ValueError, match="'vtc' and 'egonce' exclude each other"):
        check_objectives(("egonce", "vtc", "vtm"))
    with pytest.raises(ValueError, match="use either 'vtc' or 'egonce', not both"):
        resolve_train_config({**STAGE, "objectives": {"vtc": 1.0, "egonce": 1.0}, "data": {"kind": "egoclip"}})


def test_the_data_an_objective_needs_is_checked():
    with pytest.raises(ValueError, match="'egonce' needs data.kind 'egoclip' \\(its nouns and verbs\\)"):
        resolve_train_config({**STAGE, "objectives": {"egonce": 1.0}})
    resolve_train_config({**STAGE, "objectives": {"egonce": 1.0}, "data": {"kind": "egoclip"}})


def _old_find_unused_parameters(objectives: set) -> bool:
    """svitt.training.tasks.PairsTask.find_unused_parameters before the registry, as it was written."""
    return objectives != {"vtc", "vtm", "mlm"} and objectives != {"egonce", "vtm", "mlm"}


@pytest.mark.parametrize("subset", SUBSETS, ids=lambda s: "+".join(sorted(s)))
def test_find_unused_parameters_is_the_old_rule_except_where_egonce_leaves_the_temperature(subset):
    """The derived rule agrees with the hand-written one for every set of objectives but one:
    EgoNCE + VTM + MLM, where the old rule said every parameter is used. EgoNCE has a fixed
    temperature and VTM reads the learnable one without a gradient, so `temp` gets none there
    (test_find_unused_parameters_matches_the_gradients) and DDP must look for unused parameters.
    A set with both VTC and EgoNCE never reaches DDP: the stage config refuses it."""
    got = PairsTask().find_unused_parameters({"objectives": dict.fromkeys(subset, 1.0)})
    if not _valid(subset):
        with pytest.raises(ValueError, match="not both"):
            resolve_train_config({**STAGE, "objectives": dict.fromkeys(subset, 1.0), "data": {"kind": "egoclip"}})
    elif subset == {"egonce", "vtm", "mlm"}:
        assert got is True and _old_find_unused_parameters(set(subset)) is False
    else:
        assert got == _old_find_unused_parameters(set(subset))


@pytest.fixture(scope="module")
def tiny_pairs():
    torch.manual_seed(0)
    model = SViTT(TINY).train()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 40, (4, 6), generator=g)
    labels = torch.where(torch.rand(4, 6, generator=g) < 0.5, ids, -100)
    labels[:, 1] = ids[:, 1]
    batch = {
        "video": torch.randn(4, 4, 3, 32, 32, generator=g),
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "mlm_ids": torch.where(labels >= 0, 4, ids),
        "mlm_labels": labels,
        "nouns": (torch.rand(4, 3, generator=g) < 0.5).float(),
        "verbs": (torch.rand(4, 2, generator=g) < 0.5).float(),
    }
    return model, batch


@pytest.mark.parametrize("subset", [s for s in SUBSETS if _valid(s)], ids=lambda s: "+".join(sorted(s)))
def test_find_unused_parameters_matches_the_gradients(tiny_pairs, subset):
    """The registry's `trains` against a real backward: some parameter without a gradient exactly
    when DDP is told to look for unused ones."""
    model, batch = tiny_pairs
    model.zero_grad(set_to_none=True)
    objectives = tuple(n for n in OBJECTIVES if n in subset)
    sum(model(objectives=objectives, **batch).values()).backward()
    unused = [n for n, p in model.named_parameters() if p.grad is None]
    assert PairsTask().find_unused_parameters({"objectives": dict.fromkeys(subset, 1.0)}) == bool(unused), unused


def test_every_objective_has_a_plot_label_and_the_total_comes_first():
    assert list(plots.LOSS_NAMES) == ["loss", *OBJECTIVES]
    assert plots.LOSS_NAMES["loss"] == "total loss"
    assert all(plots.LOSS_NAMES[o.name] == o.label and o.label for o in registry.OBJECTIVE_TABLE)


def test_the_meta_device_step_sums_every_objective_of_the_registry():
    """efficiency.training_step counts a step's memory from each row's meta_loss: SViTT's and
    SViTT-Ego's sets run there, and every objective adds what it holds."""
    model = efficiency.meta_model(TINY)
    clip, ids, mask = efficiency._pair_inputs(model, 2, 6, "meta")
    for objectives in (("vtc", "vtm", "mlm"), ("egonce", "vtm", "mlm")):
        assert efficiency.training_step(model, clip, ids, mask, objectives).shape == ()
    peaks = {}
    for objectives in (("vtc",), ("vtc", "vtm"), ("vtc", "vtm", "mlm")):
        with efficiency.LiveTensorBytes() as tracker:
            efficiency.training_step(model, clip, ids, mask, objectives).backward()
        model.zero_grad(set_to_none=True)
        peaks[objectives] = tracker.peak
    assert peaks[("vtc",)] < peaks[("vtc", "vtm")] < peaks[("vtc", "vtm", "mlm")]
    with pytest.raises(ValueError, match="exclude each other"):
        efficiency.training_step(model, clip, ids, mask, ("vtc", "egonce"))


def test_loss_settings_are_the_stage_keys_with_their_defaults():
    defaults = LossSettings()
    for name, value in vars(defaults).items():
        assert TRAIN_KEYS[name][1] == value
    cfg = resolve_train_config({**STAGE, "egonce_temperature": 0.1, "vtm_hard_fraction": 0})
    assert LossSettings.from_config(cfg) == LossSettings(egonce_temperature=0.1, vtm_hard_fraction=0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        defaults.vtm_hard_fraction = 0.5  # frozen: the settings of a step cannot drift inside it


def test_forward_takes_the_settings_or_their_keywords(tiny_pairs):
    model, batch = tiny_pairs
    inputs = {k: batch[k] for k in ("video", "input_ids", "attention_mask")}
    torch.manual_seed(3)
    by_keyword = model(objectives=("vtc", "vtm"), vtm_hard_fraction=0.0, **inputs)
    torch.manual_seed(3)
    by_settings = model(objectives=("vtc", "vtm"), settings=LossSettings(vtm_hard_fraction=0.0), **inputs)
    assert all(torch.equal(by_keyword[k], by_settings[k]) for k in ("vtc", "vtm"))
    with pytest.raises(TypeError):
        model(objectives=("vtc",), vtm_hard_fractions=0.0, **inputs)


def test_a_missing_input_is_named():
    model = SViTT(TINY)
    ids = torch.randint(5, 40, (2, 6))
    video = torch.randn(2, 4, 3, 32, 32)
    with pytest.raises(ValueError, match="objective 'mlm' needs mlm_ids and mlm_labels"):
        model(video, ids, torch.ones_like(ids), objectives=("mlm",))
    with pytest.raises(ValueError, match="objective 'egonce' needs nouns and verbs multi-hot tensors"):
        model(video, ids, torch.ones_like(ids), objectives=("egonce",))


def test_the_schema_lists_every_objective():
    """The config schema (checked before anything runs) accepts exactly the registry's objectives,
    and the qa task's one loss."""
    schema = yaml.safe_load((Path(__file__).resolve().parents[1] / "schemas/config.schema.yaml").read_text())
    assert set(schema["$defs"]["objectives"]["properties"]) == {*OBJECTIVES, "qa"}


def test_the_losses_of_cached_features_check_the_objectives_too():
    """svitt.training.grad_cache calls SViTT.losses directly, not forward: the registry is checked there as well."""
    with pytest.raises(ValueError, match=r"unknown objectives \['itc'\]"):
        SViTT(TINY).losses({}, {}, ("vtc", "itc"))
