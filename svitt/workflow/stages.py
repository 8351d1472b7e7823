"""The pretraining stages of a workflow config, resolved into what svitt.training.loop reads.

Pure Python (no torch): the workflow imports it when it parses the config (rules/common.smk), and
tests call it directly.

    pretrain.curriculum   the temporal sparse expansion chain (a list; each stage may `init` from one)
    pretrain.egoclip      SViTT-Ego stage(s) on EgoClip with EgoNCE (null, a stage or a list)
    pretrain.extra        further stages built by `all` beside the chain, e.g. the late-fusion control
    pretrain.ablation     stages built by the `ablation` target only (Table 3's single-stage runs)
    analysis.control      derived section "control": an order-blind twin `<stage>_<temporal>` of
                          each listed curriculum stage (same settings and steps, video.temporal
                          replaced, started from its init's twin)
    pretrain.seeds        extra seeds: every stage also exists as `<stage>-seed<k>` for k in seeds,
                          trained with seed k and started from its init's seed-k variant
    pretrain.override     training settings applied over every stage's own entry (the rehearsal's
                          batch size and steps); never the model or its sparsity

`like: <stage>`: a stage entry (e.g. an ablation or extra stage) may name the curriculum stage it
copies instead of repeating its numbers. It gets that stage's entry, then its own keys over it
(`data` merges key by key, every other key replaces, as over pretrain.defaults). It never copies
`name` or `init`: a copy is a stage of its own, started from the image/text weights unless it says
`init:` itself (a single-stage run "like stage2" trains stage2's settings from scratch; write
`init: stage1` to expand from stage1 as stage2 does). It copies everything else, `dataset` and
`model` included. `like` names a curriculum stage that has no `like` itself (one level, no chains);
anything else is an error naming the value. The resolved entry has no `like` key: the stage trains
exactly as if its numbers were written out (the workflow's params do not change).

A stage sets the sparsity vocabulary at its top level (frames, temporal, local_blocks,
random_blocks, block_size, visual_keep, prune_layers, multimodal_keep, multimodal_prune_layers), any other model
key under `model: {video: {...}, text: {...}}`, and optimisation keys over pretrain.defaults
(`data` merges key by key, everything else replaces).
"""

from __future__ import annotations

import copy
import re

# Stage keys that override the model section: key -> model.video / model.text.
VOCABULARY = {
    "frames": "video",
    "local_blocks": "video",
    "random_blocks": "video",
    "block_size": "video",
    "visual_keep": "video",
    "prune_layers": "video",
    "temporal": "video",
    "multimodal_keep": "text",
    "multimodal_prune_layers": "text",
}
STAGE_ONLY_KEYS = ("name", "like", "init", "dataset", "model")
DEFAULT_DATASET = "webvid"
SECTIONS = ("curriculum", "egoclip", "extra", "ablation", "control")  # control: derived (with_control)
_VARIANT = re.compile(r"^(?P<base>[A-Za-z0-9_]+)-seed(?P<seed>\d+)$")


def _as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [value]


LIKE_NEVER_COPIED = ("name", "init")  # a `like:` copy is a stage of its own (see the docstring)


def _like(entry: dict, curriculum: dict[str, dict], where: str) -> dict:
    """One stage entry with its `like:` resolved (a copy; entries without `like` come back as is)."""
    if "like" not in entry:
        return entry
    name, like = entry.get("name"), entry["like"]
    if like not in curriculum:
        raise ValueError(
            f"{where} stage {name!r} says like: {like!r}, which is not a curriculum stage (have {sorted(curriculum)})"
        )
    base = curriculum[like]
    if "like" in base:
        raise ValueError(
            f"{where} stage {name!r} says like: {like!r}, which says like: {base['like']!r} "
            f"itself: `like` names a stage written out in full (no chains)"
        )
    copied = {k: v for k, v in base.items() if k not in LIKE_NEVER_COPIED}
    own = {k: v for k, v in entry.items() if k != "like"}
    return over_defaults(copied, own)


def resolve_like(pretrain: dict) -> dict:
    """pretrain with every stage's `like:` resolved (see the module docstring); idempotent."""
    curriculum = {s["name"]: s for s in _as_list(pretrain.get("curriculum"))}
    out = dict(pretrain)
    for section in SECTIONS:
        value = pretrain.get(section)
        if value is None or section == "control":
            continue
        where = f"pretrain.{section}"
        if isinstance(value, list):
            out[section] = [_like(s, curriculum, where) for s in value]
        else:
            out[section] = _like(value, curriculum, where)
    return out


def control_stages(pretrain: dict, control: dict | None) -> list[dict]:
    """analysis.control -> the twin of each listed curriculum stage, `<name>_<temporal>`."""
    if not control:
        return []
    curriculum = {s["name"]: s for s in _as_list(resolve_like(pretrain).get("curriculum"))}
    names, suffix = list(control["stages"]), f"_{control.get('temporal', 'late')}"
    unknown = sorted(set(names) - set(curriculum))
    if unknown:
        raise ValueError(f"analysis.control.stages {unknown} are not curriculum stages (have {sorted(curriculum)})")
    twins = []
    for name in names:
        twin = {**copy.deepcopy(curriculum[name]), "name": name + suffix, "temporal": suffix[1:]}
        init = curriculum[name].get("init")
        if init:
            if init not in names:
                raise ValueError(
                    f"analysis.control.stages has {name!r} but not its init {init!r}: "
                    f"list the whole chain (have {names})"
                )
            twin["init"] = init + suffix
        twins.append(twin)
    return twins


def with_control(config: dict) -> dict:
    """config["pretrain"] with the derived "control" section (analysis.control) filled in."""
    pretrain = resolve_like(config["pretrain"])
    pretrain["control"] = control_stages(pretrain, (config.get("analysis") or {}).get("control"))
    return pretrain


def configured_stages(pretrain: dict) -> dict[str, dict]:
    """{name: stage} of every section (SECTIONS), in that order, `like:` resolved."""
    pretrain = resolve_like(pretrain)
    stages: dict[str, dict] = {}
    for section in SECTIONS:
        for stage in _as_list(pretrain.get(section)):
            if stage["name"] in stages:
                raise ValueError(f"pretrain stage name {stage['name']!r} is used twice")
            stages[stage["name"]] = stage
    for name, stage in stages.items():
        init = stage.get("init")
        if init is not None and init not in stages:
            raise ValueError(
                f"pretrain stage {name!r} starts from {init!r}, which is not a stage (have {sorted(stages)})"
            )
        nested = sorted(set(stage.get("model", {}).get("video", {})) | set(stage.get("model", {}).get("text", {})))
        clash = [k for k in nested if k in VOCABULARY]
        if clash:
            raise ValueError(
                f"pretrain stage {name!r} sets {clash} under `model`; set them at the stage's top "
                f"level (the sparsity vocabulary: {sorted(VOCABULARY)})"
            )
    return stages


def section_names(pretrain: dict, section: str) -> list[str]:
    """Names of one section's stages (one of SECTIONS), in config order."""
    return [s["name"] for s in _as_list(pretrain.get(section))]


def split_variant(name: str) -> tuple[str, int | None]:
    """`stage3-seed1` -> ("stage3", 1); `stage3` -> ("stage3", None)."""
    match = _VARIANT.match(name)
    return (match["base"], int(match["seed"])) if match else (name, None)


def variant(name: str, seed: int | None) -> str:
    return name if seed is None else f"{name}-seed{seed}"


def all_stage_names(pretrain: dict) -> list[str]:
    """Every stage the pretrain rule can build: configured stages and their seed variants."""
    names = list(configured_stages(pretrain))
    return names + [variant(n, s) for s in pretrain.get("seeds", []) for n in names]


def _stage(pretrain: dict, name: str) -> tuple[dict, int | None]:
    base, seed = split_variant(name)
    stages = configured_stages(pretrain)
    if base not in stages:
        raise ValueError(f"{name!r} is not a pretrain stage (have {sorted(stages)})")
    if seed is not None and seed not in pretrain.get("seeds", []):
        raise ValueError(f"{name!r}: seed {seed} is not in pretrain.seeds {pretrain.get('seeds', [])}")
    return stages[base], seed


def stage_init(pretrain: dict, name: str) -> str | None:
    """The stage (variant) this one starts from, or None (image/text weights)."""
    stage, seed = _stage(pretrain, name)
    return variant(stage["init"], seed) if stage.get("init") else None


def stage_dataset(pretrain: dict, name: str) -> str:
    return _stage(pretrain, name)[0].get("dataset", DEFAULT_DATASET)


def over_defaults(defaults: dict, stage: dict) -> dict:
    """Stage settings over pretrain.defaults: `data` merges key by key, the rest replaces (a
    stage's objectives are its whole objective set)."""
    out = copy.deepcopy(defaults)
    for key, value in stage.items():
        if key == "data":
            out["data"] = {**out.get("data", {}), **value}
        else:
            out[key] = copy.deepcopy(value)
    return out


def stage_config(config: dict, name: str) -> dict:
    """The config svitt.training.loop reads for one stage (variant): the model with the stage's
    overrides, the stage's optimisation settings over pretrain.defaults, and the seed."""
    pretrain = with_control(config)
    stage, seed = _stage(pretrain, name)
    model = copy.deepcopy(config["model"])
    for part, overrides in stage.get("model", {}).items():
        model.setdefault(part, {}).update(copy.deepcopy(overrides))
    for key, part in VOCABULARY.items():
        if key in stage:
            model[part][key] = copy.deepcopy(stage[key])
    train = {k: v for k, v in stage.items() if k not in VOCABULARY and k not in STAGE_ONLY_KEYS}
    cfg = over_defaults(pretrain.get("defaults", {}), train)
    cfg = over_defaults(cfg, pretrain.get("override") or {})  # over every stage's own entry
    cfg["name"] = name
    cfg["model"] = model
    if seed is not None:
        cfg["seed"] = seed
        model["video"]["seed"] = seed  # the random-block layouts too
    dataset = stage_dataset(pretrain, name)
    if dataset != DEFAULT_DATASET and "clips" in config["datasets"].get(dataset, {}):
        cfg.setdefault("data", {})["kind"] = "egoclip"
    return cfg


def stage_inputs(config: dict, name: str) -> dict[str, str]:
    """The input files of one stage (variant): its dataset's shards and annotations, the tokenizer,
    and the stage it starts from, or (no init) the model's image/text weights where set."""
    from svitt.workflow.datasets import dataset, shard_paths

    pretrain = with_control(config)
    data, init = stage_dataset(pretrain, name), stage_init(pretrain, name)
    inputs = {
        "shards": shard_paths(config, data),
        "annotations": dataset(config, data)["annotations"],
        "tokenizer": f"{config['tokenizer']}/vocab.txt",
    }
    if init:
        inputs["init"] = f"results/pretrain/{init}/model.safetensors"
    for key in ("video_weights", "text_weights"):
        if not init and config["model"].get(key):
            inputs[key] = config["model"][key]
    return inputs
