"""The files each target of the workflow builds (`all`, `seeds`, `ablation`; `paper_figures` in
svitt.workflow.analysis): stage models, their evaluations, the control, the finetuned models.
Pure Python: the Snakefile's target rules call these through rules/common.smk."""

from __future__ import annotations

from svitt.workflow.analysis import analysis_outputs, control_in_all, eval_stages
from svitt.workflow.evaluation import finetune_tasks, finetuned_pairs, retrieval_datasets
from svitt.workflow.stages import section_names, variant, with_control

MODEL_FILES = ("model.safetensors", "model.json", "metrics.jsonl")


def stage_files(stages) -> list[str]:
    return [f"results/pretrain/{s}/{f}" for s in stages for f in MODEL_FILES]


def retrieval_results(config: dict, dataset_name: str, stages=None) -> dict[str, str]:
    stages = eval_stages(config) if stages is None else stages
    return {s: f"results/eval/retrieval/{dataset_name}/{s}.json" for s in stages}


def egomcq_results(config: dict, stages=None) -> dict[str, str]:
    stages = eval_stages(config) + section_names(config["pretrain"], "egoclip") if stages is None else stages
    return {s: f"results/eval/egomcq/{s}.json" for s in stages}


def nlq_outputs(config: dict) -> list[str]:
    nlq = config["evaluation"].get("nlq")
    return [f"results/eval/nlq/{nlq['stage']}.json"] if nlq else []


def result_files(config: dict, stages, ego_stages) -> list[str]:
    """Every model and result file of these stages."""
    files = stage_files(list(stages) + list(ego_stages))
    for d in retrieval_datasets(config):
        files += retrieval_results(config, d, stages).values()
    if config["evaluation"].get("egomcq"):
        files += egomcq_results(config, list(stages) + list(ego_stages)).values()
    return files


def finetune_outputs(config: dict, seeds=(None,)) -> list[str]:
    """Every finetuned model (with its model.json and metrics) and its evaluation; with seeds,
    those finetuned from each seed's variant of the stage (stage3-seed1, ...)."""
    tasks = finetune_tasks(config)
    pairs = {task: finetuned_pairs(config, task, seeds) for task in tasks}
    out = [f"results/finetune/{task}/{d}/{s}/{f}" for task in tasks for d, s in pairs[task] for f in MODEL_FILES]
    out += [f"results/eval/retrieval_finetuned/{d}/{s}.json" for d, s in pairs.get("retrieval", [])]
    return out + [f"results/eval/qa/{d}/{s}.json" for d, s in pairs.get("qa", [])]


def control_outputs(config: dict, seeds=(None,)) -> list[str]:
    """The late-fusion control's models and retrieval results when `all` builds it
    (analysis.control.in_all), for each seed variant; no EgoMCQ (the tables that show the control
    are retrieval's)."""
    if not control_in_all(config):
        return []
    stages = [variant(n, k) for k in seeds for n in section_names(with_control(config), "control")]
    files = stage_files(stages)
    for d in retrieval_datasets(config):
        files += retrieval_results(config, d, stages).values()
    return files


def final_outputs(config: dict) -> list[str]:
    """What `all` builds: every stage model and result file, the figures and tables
    (svitt.workflow.analysis lists them), the NLQ outputs and the finetuned models with their
    evaluations."""
    return (
        result_files(config, eval_stages(config), section_names(config["pretrain"], "egoclip"))
        + control_outputs(config)
        + analysis_outputs(config)
        + nlq_outputs(config)
        + finetune_outputs(config)
    )


def seed_outputs(config: dict) -> list[str]:
    """What `seeds` builds: every stage of `all` again for each seed of pretrain.seeds."""
    seeds = config["pretrain"]["seeds"]
    stages = [variant(n, k) for k in seeds for n in eval_stages(config)]
    egos = [variant(n, k) for k in seeds for n in section_names(config["pretrain"], "egoclip")]
    return result_files(config, stages, egos) + control_outputs(config, seeds) + finetune_outputs(config, seeds)


def ablation_outputs(config: dict) -> list[str]:
    """What `ablation` builds: the pretrain.ablation stages (e.g. Table 3's single-stage runs)."""
    return result_files(config, section_names(config["pretrain"], "ablation"), [])
