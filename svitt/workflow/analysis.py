"""The analyses of a workflow config (`analysis:`, rules/analysis.smk): which result files each
figure and table reads (one per seed of every model), sweep points, the late-fusion control, the
ablation, the list of result tables, and the analysis targets. Pure Python: rules/analysis_common.smk
binds `config` to these, workflow_scripts/tables.py shares `table_names`, tests call them directly.

Every analysis that evaluates on one dataset names it (`dataset:` in analysis.sweep,
analysis.paper_sweep, analysis.pruning_maps, analysis.control and each analysis.ablation entry);
`analysis_dataset` checks it is a dataset the workflow evaluates on retrieval.
"""

from __future__ import annotations

import os
import shlex

from svitt.workflow.config import canonical
from svitt.workflow.evaluation import finetune_pairs, retrieval_datasets
from svitt.workflow.stages import section_names, split_variant, variant

EFFICIENCY_JSON = "results/analysis/efficiency.json"


def _analysis(config: dict) -> dict:
    return config.get("analysis") or {}


# ------------------------------------------------------------------------------------ stage lists


def eval_stages(config: dict) -> list[str]:
    """Stages the `all` target evaluates: the curriculum and the extra stages (controls)."""
    pretrain = config["pretrain"]
    return section_names(pretrain, "curriculum") + section_names(pretrain, "extra")


def all_stages(config: dict) -> list[str]:
    """The curriculum, EgoClip and extra stages (what the training and sparsity figures show)."""
    pretrain = config["pretrain"]
    return section_names(pretrain, "curriculum") + section_names(pretrain, "egoclip") + section_names(pretrain, "extra")


def control_in_all(config: dict) -> bool:
    """Whether `all` builds the late-fusion control (analysis.control.in_all)."""
    control = _analysis(config).get("control")
    return bool(control and control.get("in_all"))


def with_controls(config: dict, stages) -> list[str]:
    """The stages, each followed by its late-fusion control when analysis.control.in_all lists it
    (stage1, stage1_late, stage2, ...): the tables and figures show the two side by side."""
    if not control_in_all(config):
        return list(stages)
    control = config["analysis"]["control"]
    suffix = f"_{control.get('temporal', 'late')}"
    return [n for s in stages for n in ([s, s + suffix] if s in control["stages"] else [s])]


# ---------------------------------------------------------------------------- result files per seed


def results_of(config: dict, path: str) -> list[str]:
    """The result files of one model, one per seed (the stage and its `-seed<k>` variants for k in
    pretrain.seeds), so every figure and table shows the mean and each value."""
    stem, suffix = os.path.splitext(path)
    if split_variant(os.path.basename(stem))[1] is not None:  # a listed seed variant: itself
        return [path]
    return [path, *(f"{stem}-seed{k}{suffix}" for k in config["pretrain"]["seeds"])]


def seed_files(config: dict, stage: str, filename: str) -> list[str]:
    """A pretraining stage's `filename` per seed: results/pretrain/<stage>[-seed<k>]/<filename>."""
    return [f"results/pretrain/{variant(stage, k)}/{filename}" for k in (None, *config["pretrain"]["seeds"])]


def retrieval_runs(config: dict, dataset_name: str, stages=None) -> dict[str, list[str]]:
    """{stage: results per seed}; by default the curriculum, each stage with its late-fusion
    control beside it when `all` builds the control (analysis.control.in_all)."""
    curriculum = section_names(config["pretrain"], "curriculum")
    return {
        s: results_of(config, f"results/eval/retrieval/{dataset_name}/{s}.json")
        for s in (stages or with_controls(config, curriculum))
    }


def probed(config: dict, task: str) -> bool:
    """Whether the task's evaluations run more than one frame order (the library's default: all
    three; svitt.evaluation.probing)."""
    orders = (config["evaluation"].get(task) or {}).get("frame_orders")
    return orders is None or len(orders) > 1


def egomcq_runs(config: dict) -> dict[str, list[str]]:
    return {s: results_of(config, f"results/eval/egomcq/{s}.json") for s in all_stages(config)}


def runs_flags(runs: dict, prefix: str = "") -> str:
    """{name: [paths]} -> "prefixname=path ..." (a name repeats once per file)."""
    return " ".join(f"{prefix}{name}={p}" for name, paths in runs.items() for p in paths)


def runs_files(runs: dict) -> list[str]:
    return [p for paths in runs.values() for p in paths]


def named(paths: dict) -> str:
    """{name: path} -> "name=path ..." for the plot CLI (insertion order kept)."""
    return " ".join(f"{k}={v}" for k, v in paths.items())


def finetuned_retrieval_runs(config: dict) -> dict[str, dict[str, list[str]]]:
    """{dataset: {stage: results per seed}} of the finetuned retrieval models (finetune.retrieval)."""
    runs: dict = {}
    for d, s in finetune_pairs(config, "retrieval"):
        runs.setdefault(d, {})[s] = results_of(config, f"results/eval/retrieval_finetuned/{d}/{s}.json")
    return runs


def qa_runs(config: dict) -> dict[str, dict[str, list[str]]]:
    """{dataset: {stage: results per seed}} of the finetuned QA models (finetune.qa)."""
    runs: dict = {}
    for d, s in finetune_pairs(config, "qa"):
        runs.setdefault(d, {})[s] = results_of(config, f"results/eval/qa/{d}/{s}.json")
    return runs


# ---------------------------------------------------------------------------- analysis datasets


def analysis_dataset(config: dict, where: str, name: str | None) -> str:
    """The dataset an analysis (`where`, e.g. "analysis.sweep") names, checked: it reads that
    dataset's retrieval results, so it must be one of evaluation.retrieval.datasets."""
    evaluated = retrieval_datasets(config)
    if not name:
        raise ValueError(
            f"{where} names no dataset: set {where}.dataset to the retrieval dataset it "
            f"uses (one of evaluation.retrieval.datasets {evaluated})"
        )
    if name not in evaluated:
        where_set = (
            "is not configured under `datasets`" if name not in config["datasets"] else "is not evaluated on retrieval"
        )
        raise ValueError(
            f"{where}.dataset names {name!r}, which {where_set} (evaluation.retrieval.datasets: {evaluated})"
        )
    return name


def sweep_dataset(config: dict, section: str = "sweep") -> str:
    return analysis_dataset(config, f"analysis.{section}", (_analysis(config).get(section) or {}).get("dataset"))


def pruning_dataset(config: dict) -> str:
    return analysis_dataset(config, "analysis.pruning_maps", _analysis(config)["pruning_maps"].get("dataset"))


def control_dataset(config: dict) -> str:
    return analysis_dataset(config, "analysis.control", _analysis(config)["control"].get("dataset"))


def check_analysis_datasets(config: dict) -> None:
    """Every analysis section present names a dataset the workflow evaluates (a clear error now,
    not a missing file later)."""
    analysis = _analysis(config)
    for section in ("sweep", "paper_sweep"):
        if analysis.get(section):
            sweep_dataset(config, section)
    if analysis.get("pruning_maps"):
        pruning_dataset(config)
    if analysis.get("control"):
        control_dataset(config)
    for i, entry in enumerate(analysis.get("ablation") or []):
        analysis_dataset(config, f"analysis.ablation[{i}]", entry.get("dataset"))


# ---------------------------------------------------------------------------------------- sweeps


def _number(value) -> str:
    return f"{value:g}"


def sweep_points(config: dict, section: str) -> dict[str, dict]:
    """{point name: settings} of a sweep section: edge_<K_l>_<K_r>_<G>, keep_<q_v>_<q_m>."""
    grid = _analysis(config).get(section) or {}
    points = {}
    for k_l, k_r, g in grid.get("edge", []):
        points[f"edge_{k_l}_{k_r}_{g}"] = {"local_blocks": k_l, "random_blocks": k_r, "block_size": g}
    for q_v, q_m in grid.get("keep", []):
        points[f"keep_{_number(q_v)}_{_number(q_m)}"] = {"visual_keep": q_v, "multimodal_keep": q_m}
    return points


def all_sweep_points(config: dict) -> dict[str, dict]:
    """The points of both sweeps (analysis.paper_sweep, analysis.sweep)."""
    return {**sweep_points(config, "paper_sweep"), **sweep_points(config, "sweep")}


def sweep_runs(config: dict, section: str, kind: str) -> dict[str, list[str]]:
    grid = _analysis(config).get(section) or {}
    return {
        f"{stage}/{name}": [f"results/analysis/sweep/{stage}/{name}.json"]  # one checkpoint
        for stage in grid.get("stages", [])
        for name in sweep_points(config, section)
        if name.startswith(kind)
    }


def sweep_references(config: dict, section: str) -> dict[str, list[str]]:
    grid = _analysis(config).get(section) or {}
    return retrieval_runs(config, sweep_dataset(config, section), grid.get("stages", []))


def sweep_figures(config: dict, section: str, suffix: str) -> list[str]:
    grid = _analysis(config).get(section) or {}
    return [
        f"results/figures/sweep_{kind}{suffix}.png"
        for kind in ("edge", "keep")
        if grid.get(kind) and grid.get("stages")
    ]


# ---------------------------------------------------------------------------------------- tables


def table_names(
    retrieval: dict[str, bool], qa: dict[str, bool], egomcq: bool | None, efficiency: bool = True
) -> list[str]:
    """The result tables, in results.md's order, decided in one place for the rule (from the
    config) and for workflow_scripts/tables.py (from the result files it is given).

    retrieval, qa: {dataset: whether its results are probed (more than one frame order)}, in
    order; egomcq: None without EgoMCQ results, else whether they are probed."""
    names = []
    for d, is_probed in retrieval.items():
        names += [f"retrieval_{d}", f"twins_{d}"] + ([f"probing_{d}"] if is_probed else [])
    for d, is_probed in qa.items():
        names += [f"qa_{d}"] + ([f"probing_qa_{d}"] if is_probed else [])
    if egomcq is not None:
        names += ["egomcq"] + (["probing_egomcq"] if egomcq else [])
    if efficiency:
        names.append("efficiency")
    return names


def table_outputs(config: dict) -> list[str]:
    """The tables the `tables` rule writes (table_names from the config)."""
    retrieval = [*retrieval_datasets(config), *(f"{d}_finetuned" for d in finetuned_retrieval_runs(config))]
    return table_names(
        {d: probed(config, "retrieval") for d in retrieval},
        {d: probed(config, "qa") for d in qa_runs(config)},
        probed(config, "egomcq") if config["evaluation"].get("egomcq") else None,
    )


def table_inputs(config: dict) -> list[str]:
    runs = [retrieval_runs(config, d) for d in retrieval_datasets(config)]
    runs += list(finetuned_retrieval_runs(config).values()) + list(qa_runs(config).values())
    if config["evaluation"].get("egomcq"):
        runs.append(egomcq_runs(config))
    return [p for r in runs for p in runs_files(r)] + [EFFICIENCY_JSON]


def table_flags(config: dict) -> str:
    retrieval = " ".join(runs_flags(retrieval_runs(config, d), prefix=f"{d}:") for d in retrieval_datasets(config))
    retrieval += "".join(
        f" {runs_flags(r, prefix=f'{d}_finetuned:')}" for d, r in finetuned_retrieval_runs(config).items()
    )
    flags = f"--retrieval {retrieval} --efficiency {EFFICIENCY_JSON}"
    qa = qa_runs(config)
    if qa:
        flags = f"{flags} --qa {' '.join(runs_flags(r, prefix=f'{d}:') for d, r in qa.items())}"
    if config["evaluation"].get("egomcq"):
        flags = f"{flags} --egomcq {runs_flags(egomcq_runs(config))}"
    return flags


# ------------------------------------------------------------------------ control, ablation, flags


def control_pairs(config: dict) -> dict[str, str]:
    """{curriculum stage: its late-fusion control stage} (analysis.control)."""
    control = config["analysis"]["control"]
    return {s: f"{s}_{control['temporal']}" for s in control["stages"]}


def control_runs(config: dict, side: str) -> dict[str, list[str]]:
    """{curriculum stage: retrieval results} of the stages ("joint") or of their controls ("late"),
    on analysis.control.dataset."""
    name = control_dataset(config)
    return {
        stage: results_of(config, f"results/eval/retrieval/{name}/{late if side == 'late' else stage}.json")
        for stage, late in control_pairs(config).items()
    }


def control_inputs(config: dict) -> list[str]:
    return runs_files(control_runs(config, "joint")) + runs_files(control_runs(config, "late"))


def ablation_runs(config: dict) -> dict[str, list[str]]:
    """{"<frames>:single|expansion": results per seed} of analysis.ablation, each entry on its dataset."""
    entries = _analysis(config).get("ablation") or []
    return {
        f"{entry['frames']}:{kind}": results_of(
            config,
            f"results/eval/retrieval/{analysis_dataset(config, f'analysis.ablation[{i}]', entry.get('dataset'))}"
            f"/{entry[kind]}.json",
        )
        for i, entry in enumerate(entries)
        for kind in ("single", "expansion")
    }


def efficiency_flags(config: dict, table: str) -> str:
    eff = config["analysis"]["efficiency"]
    memory = "auto" if table == "efficiency_full" else eff["memory"]
    return (
        f"--frames {' '.join(map(str, eff['frames']))} --modes {' '.join(eff['modes'])} "
        f"--blocks {' '.join(map(str, eff['blocks']))} --multimodal-keep {eff['multimodal_keep']} "
        f"--text-len {eff['text_len']} --memory {memory} --model-json '{canonical(eff['model'])}'"
    )


def pruning_settings(config: dict) -> str:
    maps = config["analysis"]["pruning_maps"]
    flags = f"--clips {maps['clips']}"
    for key in ("visual_keep", "multimodal_keep"):
        if maps.get(key) is not None:
            flags += f" --{key.replace('_', '-')} {maps[key]}"
    if maps.get("videos"):
        flags += " --video " + " ".join(maps["videos"])
        flags += " --caption " + " ".join(shlex.quote(c) for c in maps["captions"])
    return flags


# --------------------------------------------------------------------------------------- targets


def analysis_outputs(config: dict) -> list[str]:
    """What `all` builds beside the models and evaluations."""
    datasets = retrieval_datasets(config)
    figures = ["training_curves", "sparsity", "efficiency"]
    figures += [f"retrieval_{d}" for d in datasets]
    if probed(config, "retrieval"):
        figures += [f"probing_{d}" for d in datasets]
    if config["evaluation"].get("egomcq"):
        figures += ["egomcq"] + (["probing_egomcq"] if probed(config, "egomcq") else [])
    if _analysis(config).get("pruning_maps"):
        figures.append("pruning_maps")
    if control_in_all(config):
        figures.append("control")
    out = [f"results/figures/{f}.png" for f in figures] + sweep_figures(config, "sweep", "")
    return out + [f"results/tables/{t}.html" for t in table_outputs(config)] + ["results/tables/results.md"]


def paper_outputs(config: dict) -> list[str]:
    """The second target: the late-fusion control, the full sweep grid, memory, the ablation."""
    out = ["results/figures/efficiency_full.png"] + sweep_figures(config, "paper_sweep", "_full")
    if _analysis(config).get("control"):
        out.append("results/figures/control.png")
    if _analysis(config).get("ablation"):
        out.append("results/figures/ablation.png")
    return out
