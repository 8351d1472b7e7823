"""Helpers of rules/analysis.smk: result files per model (one per seed), sweep points, targets,
flags. Lookups only; the logic lives in svitt/ and workflow_scripts/."""

import os
import shlex

ANALYSIS = config["analysis"]
EFFICIENCY_JSON = "results/analysis/efficiency.json"


RETRIEVAL_DATASETS = retrieval_datasets()  # names (an entry may carry its own settings)


def results_of(path):
    """The result files of one model, one per seed (the stage and its `-seed<k>` variants for k in
    pretrain.seeds), so every figure and table shows the mean and each value."""
    stem, suffix = os.path.splitext(path)
    if (
        split_variant(os.path.basename(stem))[1] is not None
    ):  # a listed seed variant: itself
        return [path]
    return [path, *(f"{stem}-seed{k}{suffix}" for k in SEEDS)]


def seed_files(stage, filename):
    """A pretraining stage's `filename` per seed: results/pretrain/<stage>[-seed<k>]/<filename>."""
    return [f"results/pretrain/{variant(stage, k)}/{filename}" for k in (None, *SEEDS)]


def retrieval_runs(dataset_name, stages=None):
    """{stage: results per seed}; by default the curriculum, each stage with its late-fusion
    control beside it when `all` builds the control (analysis.control.in_all)."""
    return {
        s: results_of(f"results/eval/retrieval/{dataset_name}/{s}.json")
        for s in (stages or with_controls(CURRICULUM))
    }


def probed(task):
    """Whether the task's evaluations run more than one frame order (the library's default: all
    three; svitt.evaluation.probing)."""
    orders = (config["evaluation"].get(task) or {}).get("frame_orders")
    return orders is None or len(orders) > 1


def egomcq_runs():
    return {s: results_of(f"results/eval/egomcq/{s}.json") for s in all_stages()}


def runs_flags(runs, prefix=""):
    """{name: [paths]} -> "prefixname=path ..." (a name repeats once per file)."""
    return " ".join(
        f"{prefix}{name}={p}" for name, paths in runs.items() for p in paths
    )


def runs_files(runs):
    return [p for paths in runs.values() for p in paths]


def _number(value):
    return f"{value:g}"


def sweep_points(section):
    """{point name: settings} of a sweep section: edge_<K_l>_<K_r>_<G>, keep_<q_v>_<q_m>."""
    grid = ANALYSIS.get(section) or {}
    points = {}
    for k_l, k_r, g in grid.get("edge", []):
        points[f"edge_{k_l}_{k_r}_{g}"] = {
            "local_blocks": k_l,
            "random_blocks": k_r,
            "block_size": g,
        }
    for q_v, q_m in grid.get("keep", []):
        points[f"keep_{_number(q_v)}_{_number(q_m)}"] = {
            "visual_keep": q_v,
            "multimodal_keep": q_m,
        }
    return points


SWEEP_POINTS = {**sweep_points("paper_sweep"), **sweep_points("sweep")}


def sweep_dataset(section="sweep"):
    grid = ANALYSIS.get(section) or {}
    return grid.get("dataset") or RETRIEVAL_DATASETS[0]


def sweep_runs(section, kind):
    grid = ANALYSIS.get(section) or {}
    return {
        f"{stage}/{name}": [
            f"results/analysis/sweep/{stage}/{name}.json"
        ]  # one checkpoint
        for stage in grid.get("stages", [])
        for name in sweep_points(section)
        if name.startswith(kind)
    }


def sweep_references(section):
    grid = ANALYSIS.get(section) or {}
    return retrieval_runs(sweep_dataset(section), grid.get("stages", []))


def sweep_section(wildcards):
    return "paper_sweep" if wildcards.suffix else "sweep"


def sweep_figures(section, suffix):
    grid = ANALYSIS.get(section) or {}
    return [
        f"results/figures/sweep_{kind}{suffix}.png"
        for kind in ("edge", "keep")
        if grid.get(kind) and grid.get("stages")
    ]


def finetuned_retrieval_runs():
    """{dataset: {stage: results per seed}} of the finetuned retrieval models (finetune.retrieval)."""
    runs = {}
    for d, s in finetune_pairs("retrieval"):
        runs.setdefault(d, {})[s] = results_of(
            f"results/eval/retrieval_finetuned/{d}/{s}.json"
        )
    return runs


def qa_runs():
    """{dataset: {stage: results per seed}} of the finetuned QA models (finetune.qa)."""
    runs = {}
    for d, s in finetune_pairs("qa"):
        runs.setdefault(d, {})[s] = results_of(f"results/eval/qa/{d}/{s}.json")
    return runs


def table_outputs():
    retrieval = [
        *RETRIEVAL_DATASETS,
        *(f"{d}_finetuned" for d in finetuned_retrieval_runs()),
    ]
    names = [f"{kind}_{d}" for d in retrieval for kind in ("retrieval", "twins")]
    if probed("retrieval"):
        names += [f"probing_{d}" for d in retrieval]
    for d in qa_runs():
        names += [f"qa_{d}"] + ([f"probing_qa_{d}"] if probed("qa") else [])
    if config["evaluation"].get("egomcq"):
        names += ["egomcq"] + (["probing_egomcq"] if probed("egomcq") else [])
    names.append("efficiency")
    return names


def analysis_outputs():
    """What `all` builds beside the models and evaluations."""
    figures = ["training_curves", "sparsity", "efficiency"]
    figures += [f"retrieval_{d}" for d in RETRIEVAL_DATASETS]
    if probed("retrieval"):
        figures += [f"probing_{d}" for d in RETRIEVAL_DATASETS]
    if config["evaluation"].get("egomcq"):
        figures += ["egomcq"] + (["probing_egomcq"] if probed("egomcq") else [])
    if ANALYSIS.get("pruning_maps"):
        figures.append("pruning_maps")
    if control_in_all():
        figures.append("control")
    out = [f"results/figures/{f}.png" for f in figures] + sweep_figures("sweep", "")
    return (
        out
        + [f"results/tables/{t}.html" for t in table_outputs()]
        + ["results/tables/results.md"]
    )


CONTROL = ANALYSIS.get("control")


def control_pairs():
    """{curriculum stage: its late-fusion control stage} (analysis.control)."""
    return {s: f"{s}_{CONTROL['temporal']}" for s in CONTROL["stages"]}


def control_runs(side):
    """{curriculum stage: retrieval results} of the stages ("joint") or of their controls ("late")."""
    return {
        stage: results_of(
            f"results/eval/retrieval/{RETRIEVAL_DATASETS[0]}/{late if side == 'late' else stage}.json"
        )
        for stage, late in control_pairs().items()
    }


def control_inputs():
    return runs_files(control_runs("joint")) + runs_files(control_runs("late"))


def paper_outputs():
    """The second target: the late-fusion control, the full sweep grid, memory, the ablation."""
    out = ["results/figures/efficiency_full.png"] + sweep_figures(
        "paper_sweep", "_full"
    )
    if CONTROL:
        out.append("results/figures/control.png")
    if ANALYSIS.get("ablation"):
        out.append("results/figures/ablation.png")
    return out


def efficiency_flags(wildcards):
    eff = ANALYSIS["efficiency"]
    memory = "auto" if wildcards.table == "efficiency_full" else eff["memory"]
    return (
        f"--frames {' '.join(map(str, eff['frames']))} --modes {' '.join(eff['modes'])} "
        f"--blocks {' '.join(map(str, eff['blocks']))} --multimodal-keep {eff['multimodal_keep']} "
        f"--text-len {eff['text_len']} --memory {memory} --model-json '{canonical(eff['model'])}'"
    )


def pruning_settings():
    maps = ANALYSIS["pruning_maps"]
    flags = f"--clips {maps['clips']}"
    for key in ("visual_keep", "multimodal_keep"):
        if maps.get(key) is not None:
            flags += f" --{key.replace('_', '-')} {maps[key]}"
    if maps.get("videos"):
        flags += " --video " + " ".join(maps["videos"])
        flags += " --caption " + " ".join(shlex.quote(c) for c in maps["captions"])
    return flags


def ablation_runs():
    return {
        f"{entry['frames']}:{kind}": results_of(
            f"results/eval/retrieval/{entry.get('dataset', RETRIEVAL_DATASETS[0])}/{entry[kind]}.json"
        )
        for entry in ANALYSIS.get("ablation") or []
        for kind in ("single", "expansion")
    }


def table_inputs():
    runs = [retrieval_runs(d) for d in RETRIEVAL_DATASETS]
    runs += list(finetuned_retrieval_runs().values()) + list(qa_runs().values())
    if config["evaluation"].get("egomcq"):
        runs.append(egomcq_runs())
    return [p for r in runs for p in runs_files(r)] + [EFFICIENCY_JSON]


def table_flags():
    retrieval = " ".join(
        runs_flags(retrieval_runs(d), prefix=f"{d}:") for d in RETRIEVAL_DATASETS
    )
    retrieval += "".join(
        f" {runs_flags(r, prefix=f'{d}_finetuned:')}"
        for d, r in finetuned_retrieval_runs().items()
    )
    flags = f"--retrieval {retrieval} --efficiency {EFFICIENCY_JSON}"
    if qa_runs():
        qa = " ".join(runs_flags(r, prefix=f"{d}:") for d, r in qa_runs().items())
        flags = f"{flags} --qa {qa}"
    if config["evaluation"].get("egomcq"):
        flags = f"{flags} --egomcq {runs_flags(egomcq_runs())}"
    return flags
