"""Evaluation and finetuning settings of a workflow config: the retrieval datasets, one retrieval
evaluation's settings, the finetuning jobs (finetune.<task>) and their settings. Pure Python:
rules/common.smk binds `config` to these, tests call them directly."""

from __future__ import annotations

from svitt.workflow.config import by_name, canonical
from svitt.workflow.datasets import dataset, dataset_text_settings
from svitt.workflow.stages import all_stage_names, over_defaults, split_variant, variant, with_control

FINETUNE_TASK_NAMES = ("retrieval", "qa")


def eval_settings(config: dict, task: str) -> str:
    return canonical(config["evaluation"][task])


def retrieval_datasets(config: dict) -> list[str]:
    """evaluation.retrieval.datasets' names, in list order (an entry may carry its own settings)."""
    return list(by_name(config["evaluation"]["retrieval"]["datasets"]))


def retrieval_eval_settings(config: dict, name: str) -> dict:
    """One retrieval evaluation's settings: evaluation.retrieval's, the dataset's text settings,
    then its own entry of evaluation.retrieval.datasets (only these: adding a dataset reruns no
    other). Finetuned models are evaluated the same way."""
    section = config["evaluation"]["retrieval"]
    settings = {k: v for k, v in section.items() if k != "datasets"}
    settings.update(dataset_text_settings(config, name))
    settings.update(by_name(section["datasets"]).get(name, {}))
    return settings


def finetune_tasks(config: dict) -> list[str]:
    """The finetuning tasks the config sets (finetune.retrieval, finetune.qa)."""
    return [t for t in FINETUNE_TASK_NAMES if config["finetune"].get(t)]


def finetune_pairs(config: dict, task: str) -> list[tuple[str, str]]:
    """(dataset, stage) of every finetuning job of a task."""
    if task not in finetune_tasks(config):
        return []
    section = config["finetune"][task]
    return [(d, s) for d in by_name(section["datasets"]) for s in by_name(section["stages"])]


def check_finetune(config: dict) -> None:
    """Every finetuning job names a pretraining stage, and a dataset with the files its task needs."""
    names = all_stage_names(with_control(config))
    for task in finetune_tasks(config):
        for name, stage in finetune_pairs(config, task):
            if stage not in names:
                raise ValueError(
                    f"finetune.{task}.stages names {stage!r}, which is not a pretraining stage (have {sorted(names)})"
                )
            needed = ["train_annotations"] + (["answer_list"] if task == "qa" else [])
            missing = [key for key in needed if key not in dataset(config, name)]
            if missing:
                raise ValueError(
                    f"finetune.{task}.datasets names {name!r}, whose entry under `datasets` has no "
                    f"{missing[0]} (a {task} finetuning job needs {needed})"
                )


def finetune_settings(config: dict, task: str, name: str, stage: str) -> dict:
    """One finetuning job's entry for finetune.py: finetune.<task>.defaults, then the stage's entry,
    then the dataset's (data merges key by key), then finetune.<task>.override, then the dataset's
    text settings. Only its own stage and dataset: adding either to a list reruns no other job."""
    section = config["finetune"][task]
    # stage3-seed1: its own entry if listed, else stage3's; finetuned with seed 1
    entries = by_name(section["stages"])
    base, seed = split_variant(stage)
    cfg = over_defaults(section.get("defaults", {}), entries.get(stage, entries.get(base)))
    cfg = over_defaults(cfg, by_name(section["datasets"])[name])
    # finetune.<task>.override: over every entry (the rehearsal's batch size and steps)
    cfg = over_defaults(cfg, section.get("override") or {})
    text = dataset_text_settings(config, name)
    if text:
        cfg["data"] = {**cfg.get("data", {}), **text}
    if seed is not None:
        cfg["seed"] = seed
    return {**cfg, "task": task, "name": f"{task}/{name}/{stage}"}


def finetune_files(config: dict, name: str, stage: str) -> dict[str, str]:
    """The input files of one finetuning job (dataset `name`, from pretraining stage `stage`)."""
    from svitt.workflow.datasets import shard_paths

    ds = dataset(config, name)
    return {
        "init": f"results/pretrain/{stage}/model.safetensors",
        "shards": shard_paths(config, name),
        "train": ds["train_annotations"],
        "test": ds["annotations"],
        "tokenizer": f"{config['tokenizer']}/vocab.txt",
    }


def finetuned_pairs(config: dict, task: str, seeds=(None,)) -> list[tuple[str, str]]:
    """(dataset, stage variant) of a task's finetuning jobs for each seed; a listed seed variant
    (stage3-seed1) is finetuned once, as listed."""
    return [
        (d, variant(s, k))
        for d, s in finetune_pairs(config, task)
        for k in seeds
        if k is None or split_variant(s)[1] is None
    ]
