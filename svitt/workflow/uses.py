"""What each dataset of a workflow config is used for (svitt.data.formats.USES): the layouts its
files must be in. Pure Python: rules/common.smk checks the files with it before any job runs."""

from __future__ import annotations

from svitt.workflow.datasets import dataset, is_video_list
from svitt.workflow.evaluation import finetune_pairs, retrieval_datasets
from svitt.workflow.stages import configured_stages, stage_dataset, with_control


def dataset_uses(config: dict) -> dict[str, list[str]]:
    """{dataset: its uses (svitt.data.formats.USES)}: what each file it names must be read as."""
    pretrain = with_control(config)
    uses: dict[str, set] = {}
    for stage in configured_stages(pretrain):
        name = stage_dataset(pretrain, stage)
        kind = "egoclip" if dataset(config, name).get("clips") == "egoclip" else "pretraining"
        uses.setdefault(name, set()).add(kind)
    for name in retrieval_datasets(config):
        uses.setdefault(name, set()).add("retrieval")
    for task, use in (("retrieval", "retrieval_finetuning"), ("qa", "qa")):
        for name, _ in finetune_pairs(config, task):
            uses.setdefault(name, set()).add(use)
    if config["evaluation"].get("egomcq"):
        uses.setdefault(config["evaluation"]["egomcq"]["dataset"], set()).add("egomcq")
    for name in uses:
        if is_video_list(config, name):
            uses[name].add("videos")
        elif not dataset(config, name).get("clips") and not dataset(config, name)["ego4d_cli"]:
            uses[name].add("folder")
    return {name: sorted(u) for name, u in uses.items()}


def check_layouts(config: dict) -> None:
    """Every annotation file already there must be in a layout its uses accept: a wrong file stops
    the workflow before any job runs, naming the file, what it holds and what is accepted. Files
    the workflow makes itself (under resources/: the demo corpus) are left to their rules."""
    import os

    from svitt.data.formats import check_dataset, check_layout  # torch-free

    for name, uses in dataset_uses(config).items():
        check_dataset(name, dataset(config, name), uses)
    nlq = config["evaluation"].get("nlq")
    made = lambda path: path.startswith("resources/")  # noqa: E731 (the demo corpus's NLQ files)
    for key in ("train", "val") if nlq else ():
        if os.path.isfile(nlq[key]) and not made(nlq[key]):
            check_layout(nlq[key], ("nlq_json",), f"evaluation.nlq.{key} (Ego4D NLQ)")
