"""Helpers of the rules: config checks, canonical params, stage lookups, paths."""

import json
import os
import re
import subprocess
import sys

import yaml
from snakemake.utils import update_config, validate

sys.path.insert(0, workflow.basedir)  # svitt.workflow.stages, svitt.data.formats: torch-free
from svitt.data.formats import check_dataset, check_layout  # noqa: E402
from svitt.workflow.stages import (  # noqa: E402
    all_stage_names,
    configured_stages,
    over_defaults,
    with_control,
    section_names,
    split_variant,
    stage_config,
    stage_dataset,
    stage_init,
    variant,
)

# YAML 1.1 reads 1e-5 (no dot) as a string; users write learning rates that way.
_SCIENTIFIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _numbers(obj):
    if isinstance(obj, dict):
        return {k: _numbers(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_numbers(v) for v in obj]
    if isinstance(obj, str) and _SCIENTIFIC.fullmatch(obj):
        return float(obj)
    return obj


def _standalone_layers():
    """A --configfile overlay with `standalone: true` (configs/paper.yaml) replaces config.yaml
    instead of merging into it: Snakemake merges nested dicts key by key, so an overlay would
    otherwise inherit every demo key it does not set (crop scales, warm-up, demo datasets).
    Overlays given after it still merge on top of it, and --config key=value last."""
    layers = []
    for path in workflow.overwrite_configfiles:
        with open(path) as handle:
            layers.append(yaml.safe_load(handle) or {})
    standalone = [i for i, layer in enumerate(layers) if layer.get("standalone")]
    if not standalone:
        return
    merged = {}
    for layer in layers[standalone[-1] :]:
        update_config(merged, layer)
    update_config(merged, dict(workflow.config_settings.config))
    config.clear()
    config.update(merged)


_standalone_layers()
config.update(_numbers(dict(config)))
validate(config, "../schemas/config.schema.yaml", set_default=True)


def canonical(obj) -> str:
    """One spelling per config slice: key order, YAML layout and number format do not matter,
    so only real edits change a rule's params (and rerun it)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def cli_flags(settings, skip=()):
    """{"max_bytes": 5} -> "--max-bytes 5", keys sorted: a canonical string for params."""
    return " ".join(
        f"--{k.replace('_', '-')} {v}"
        for k, v in sorted(settings.items())
        if k not in skip
    )


# ---------------------------------------------------------------------------------------- data

DATASETS = config["datasets"]

# Settings that change how a data job runs, not what it writes: they reach the scripts through
# derived params (functions taking `threads`), which Snakemake leaves out of its rerun check, so
# editing them reruns nothing (tests/test_workflow_data.py); `workers` is the rules' threads, never
# a rerun either. max_bytes is not one of them: a video over the cap fails on every run whatever
# the network does, so the cap decides which videos a dataset holds.
DOWNLOAD_RUN_KEYS = ("timeout", "retries", "max_failed_fraction")
FRAMES_RUN_KEYS = ("max_failed_fraction",)


def dataset(name):
    if name not in DATASETS:
        raise ValueError(
            f"dataset {name!r} is not configured under `datasets` (have {sorted(DATASETS)})"
        )
    return DATASETS[name]


def is_video_list(name):
    """A CSV/TSV/JSON video list is downloaded; anything else is a folder of videos on disk."""
    return dataset(name)["videos"].endswith((".csv", ".tsv", ".json"))


def is_downloaded(name):
    """Videos the workflow fetches (a video list, or the Ego4D CLI); else read in place."""
    return is_video_list(name) or dataset(name)["ego4d_cli"]


def shard_paths(name):
    n = dataset(name)["shards"]
    return [f"resources/frames/{name}/shard-{i:03d}-of-{n:03d}.h5" for i in range(n)]


def download_dir(wildcards):
    """Shard i of a downloaded dataset: its manifest and its videos, fetched for shard i's extraction."""
    return f"resources/videos/{wildcards.dataset}/shard-{wildcards.index}-of-{wildcards.shards}"


def demo_file(path):
    """Files the demo corpus generates; real data must exist already (see README, Data)."""
    return path


# ------------------------------------------------------------------------------------- pretrain

PRETRAIN = with_control(
    config
)  # pretrain with the derived "control" section (analysis.control)
STAGES = configured_stages(
    PRETRAIN
)  # name -> stage (curriculum, egoclip, extra, ablation, control)
CURRICULUM = section_names(PRETRAIN, "curriculum")
EGO_STAGES = section_names(PRETRAIN, "egoclip")
EXTRA_STAGES = section_names(PRETRAIN, "extra")
ABLATION_STAGES = section_names(PRETRAIN, "ablation")
CONTROL_STAGES = section_names(PRETRAIN, "control")
SEEDS = PRETRAIN["seeds"]
ALL_STAGE_NAMES = all_stage_names(PRETRAIN)


def stage_model(path):
    """Stage weights; protected (read-only, never recomputed by accident) when
    pretrain.protect_models is set: rerunning such a stage then needs `chmod u+w` first.
    """
    return protected(path) if config["pretrain"]["protect_models"] else path


def downloaded_videos(path):
    """A download shard's video files: with download.keep_videos false they are temporary, deleted
    as soon as the shard's frames are extracted (their one consumer), so disk holds only the shards
    in flight."""
    return (
        directory(path) if config["download"]["keep_videos"] else temp(directory(path))
    )


def stage_params(wildcards):
    return canonical(stage_config(config, wildcards.stage))


def stage_inputs(wildcards):
    name = stage_dataset(PRETRAIN, wildcards.stage)
    init = stage_init(PRETRAIN, wildcards.stage)
    inputs = {
        "shards": shard_paths(name),
        "annotations": dataset(name)["annotations"],
        "tokenizer": f"{config['tokenizer']}/vocab.txt",
    }
    if init:
        inputs["init"] = f"results/pretrain/{init}/model.safetensors"
    for key in ("video_weights", "text_weights"):
        if not init and config["model"].get(key):
            inputs[key] = config["model"][key]
    return inputs


def pretrain_io(wildcards, threads):
    """pretrain.io as train.py flags. These change how a stage runs, not what it learns, so
    editing them must rerun nothing: a params function that takes `threads` counts as derived
    from the job, and Snakemake leaves derived params out of its rerun check (tested in
    tests/test_workflow.py). A stopped stage resumes with the new values."""
    return cli_flags(config["pretrain"]["io"])


def init_flag(wildcards, input):
    return f"--init {input.init}" if "init" in input.keys() else ""


# -------------------------------------------------------------------------------------- devices

_GPU_COUNT = []  # asked once, and only when a section says `gpus: auto`


def visible_gpus():
    """GPUs jobs started from here may use, as the launcher counts them (CUDA_VISIBLE_DEVICES's
    entries when set, else SVITT_NUM_GPUS, else nvidia-smi -L)."""
    if not _GPU_COUNT:
        out = subprocess.run(
            [
                sys.executable,
                f"{workflow.basedir}/workflow_scripts/launch.py",
                "--count-gpus",
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        _GPU_COUNT.append(int(out.stdout))
    return _GPU_COUNT[0]


def job_gpus(section):
    """GPUs per job (per node) of a section; `auto`: one where the machine has a GPU, else 0."""
    gpus = config[section]["gpus"]
    if gpus == "auto":
        return 1 if visible_gpus() else 0
    return gpus


def job_threads(section):
    """CPUs per job (per node): threads_per_gpu for each GPU, as many for a CPU job."""
    return max(job_gpus(section), 1) * config[section]["threads_per_gpu"]


def job_retries(section):
    """Further jobs a stage may take after one stopped for its time limit (or failed). Counted by
    the Snakemake that submits jobs, not by the one running a job inside its Slurm allocation: a
    retry there would start again under the same, spent, time limit."""
    return 0 if workflow.remote_exec else config[section]["retries"]


def job_nodes(section):
    return config[section].get("nodes", 1)


def gpu_resources(section):
    """The device resources of a job. One node: `gpu` (counted by --resources gpu=N on a server,
    sbatch --gpus on Slurm). Several (Slurm only): one task per node, each with its node's GPUs
    (gres), and the job's shell run once in the batch script (`mpi`), where launch.py starts the
    ranks with srun."""
    gpus, nodes = job_gpus(section), job_nodes(section)
    if nodes == 1:
        return {"gpu": gpus}
    layout = {
        "gpu": 0,
        "nodes": nodes,
        "tasks": nodes,
        "tasks_per_gpu": 0,
        "mpi": "srun",
    }
    if gpus:
        layout["gres"] = f"gpu:{gpus}"
    return layout


def launch(section):
    """Prefix of a GPU job (workflow_scripts/launch.py): leases distinct GPUs, uses torchrun for
    several, srun for several nodes, and stops training before a Slurm time limit. A params
    function of `threads`: the device layout changes how a job runs, not what it makes, so editing
    it reruns nothing (see pretrain_io)."""

    def prefix(wildcards, threads):
        flags = [f"--gpus {job_gpus(section)}", f"--threads {threads}"]
        if job_nodes(section) > 1:
            flags.append(f"--nodes {job_nodes(section)}")
        if "save_before" in config[section]:
            flags.append(f"--save-before {config[section]['save_before']}")
        return f"python workflow_scripts/launch.py {' '.join(flags)} --"

    return prefix


# ----------------------------------------------------------------------------- rule inputs


def download_list(wildcards):
    ds = dataset(wildcards.dataset)
    if not is_downloaded(wildcards.dataset):
        raise ValueError(
            f"dataset {wildcards.dataset!r} reads its videos in place from {ds['videos']}: "
            "nothing to download"
        )
    return ds["videos"] if is_video_list(wildcards.dataset) else ds["annotations"]


def download_source(wildcards):
    flag = "" if is_video_list(wildcards.dataset) else " --ego4d-cli"
    return f"--csv {download_list(wildcards)}{flag}"


def download_run(wildcards, threads):
    """download.timeout / retries / max_failed_fraction (and workers, as threads): derived, so
    editing them reruns nothing (see DOWNLOAD_RUN_KEYS)."""
    return cli_flags({k: config["download"][k] for k in DOWNLOAD_RUN_KEYS})


def extraction_inputs(wildcards):
    """A downloaded shard's manifest and videos, or the folder the videos already live in. The
    folder is ancient(): it must exist (a dry run names it when it does not), but files added to it
    later rerun nothing (force with --forcerun extract_frames)."""
    ds = dataset(wildcards.dataset)
    inputs = {"annotations": ds["annotations"]}
    if "train_annotations" in ds and not is_downloaded(wildcards.dataset):
        inputs["train_annotations"] = ds[
            "train_annotations"
        ]  # its videos are extracted too
    if is_downloaded(wildcards.dataset):
        inputs["manifest"] = f"{download_dir(wildcards)}/manifest.csv"
        inputs["videos"] = f"{download_dir(wildcards)}/files"
    else:
        inputs["videos"] = ancient(ds["videos"])
    return inputs


def extraction_source(wildcards):
    """--videos: the shard's manifest, or the folder with the videos the annotations name (clip
    datasets name them by their clips; a finetuning dataset's train_annotations name more).
    """
    ds = dataset(wildcards.dataset)
    if is_downloaded(wildcards.dataset):
        return f"--videos {download_dir(wildcards)}/manifest.csv"
    if ds.get("clips"):
        return f"--videos {ds['videos']}"
    ids = " ".join(
        [ds["annotations"]]
        + ([ds["train_annotations"]] if "train_annotations" in ds else [])
    )
    return f"--videos {ds['videos']} --ids {ids}"


def extraction_flags(wildcards):
    """What extraction stores: the global frame settings, with the dataset's own fps / max_frames
    where it sets them (long videos for NLQ features are sampled at a fixed rate)."""
    settings = {
        k: v
        for k, v in config["frames"].items()
        if k not in FRAMES_RUN_KEYS + ("workers",)
    }
    ds = dataset(wildcards.dataset)
    if "fps" in ds:
        settings["fps"] = ds["fps"]
    if "max_frames" in ds:
        settings["frames"] = ds["max_frames"]
    return cli_flags(settings)


def extraction_run(wildcards, threads):
    """frames.max_failed_fraction (and workers, as threads): derived, so editing reruns nothing."""
    return cli_flags({k: config["frames"][k] for k in FRAMES_RUN_KEYS})


def clip_flag(wildcards):
    ds = dataset(wildcards.dataset)
    mode = ds.get("clips")
    return {
        None: "",
        "egoclip": f"--clips {ds['annotations']}",
        "egomcq": f"--mcq {ds['annotations']}",
    }[mode]


def eval_settings(task):
    return canonical(config["evaluation"][task])


# ------------------------------------------------------------------- finetuning, per-dataset settings

DATASET_TEXT_KEYS = ("text_len", "paragraph")  # a dataset's texts, for every task on it
FINETUNE = config["finetune"]
FINETUNE_TASKS = [t for t in ("retrieval", "qa") if FINETUNE.get(t)]


def by_name(entries):
    """A list of names or {name: ..., settings} -> {name: settings}, in list order."""
    out = {}
    for entry in entries:
        entry = {"name": entry} if isinstance(entry, str) else dict(entry)
        out[entry.pop("name")] = entry
    return out


def dataset_text_settings(name):
    return {k: v for k, v in dataset(name).items() if k in DATASET_TEXT_KEYS}


def retrieval_eval_settings(name):
    """One retrieval evaluation's settings: evaluation.retrieval's, the dataset's text settings,
    then its own entry of evaluation.retrieval.datasets (only these: adding a dataset reruns no
    other). Finetuned models are evaluated the same way."""
    section = config["evaluation"]["retrieval"]
    settings = {k: v for k, v in section.items() if k != "datasets"}
    settings.update(dataset_text_settings(name))
    settings.update(by_name(section["datasets"]).get(name, {}))
    return settings


def retrieval_datasets():
    return list(by_name(config["evaluation"]["retrieval"]["datasets"]))


def finetune_pairs(task):
    """(dataset, stage) of every finetuning job of a task."""
    if task not in FINETUNE_TASKS:
        return []
    section = FINETUNE[task]
    return [
        (d, s) for d in by_name(section["datasets"]) for s in by_name(section["stages"])
    ]


def _check_finetune():
    for task in FINETUNE_TASKS:
        for name, stage in finetune_pairs(task):
            if stage not in ALL_STAGE_NAMES:
                raise ValueError(
                    f"finetune.{task}.stages names {stage!r}, which is not a pretraining stage "
                    f"(have {sorted(ALL_STAGE_NAMES)})"
                )
            needed = ["train_annotations"] + (["answer_list"] if task == "qa" else [])
            missing = [key for key in needed if key not in dataset(name)]
            if missing:
                raise ValueError(
                    f"finetune.{task}.datasets names {name!r}, whose entry under `datasets` has no "
                    f"{missing[0]} (a {task} finetuning job needs {needed})"
                )


_check_finetune()


def dataset_uses():
    """{dataset: its uses (svitt.data.formats.USES)}: what each file it names must be read as."""
    uses = {}
    for stage in STAGES:
        name = stage_dataset(PRETRAIN, stage)
        kind = "egoclip" if dataset(name).get("clips") == "egoclip" else "pretraining"
        uses.setdefault(name, set()).add(kind)
    for name in retrieval_datasets():
        uses.setdefault(name, set()).add("retrieval")
    for task, use in (("retrieval", "retrieval_finetuning"), ("qa", "qa")):
        for name, _ in finetune_pairs(task):
            uses.setdefault(name, set()).add(use)
    if config["evaluation"].get("egomcq"):
        uses.setdefault(config["evaluation"]["egomcq"]["dataset"], set()).add("egomcq")
    for name in uses:
        if is_video_list(name):
            uses[name].add("videos")
        elif not dataset(name).get("clips") and not dataset(name)["ego4d_cli"]:
            uses[name].add("folder")
    return {name: sorted(u) for name, u in uses.items()}


def _check_layouts():
    """Every annotation file already there must be in a layout its uses accept: a wrong file stops
    the workflow before any job runs, naming the file, what it holds and what is accepted. Files
    the workflow makes itself (under resources/: the demo corpus) are left to their rules.
    """
    for name, uses in dataset_uses().items():
        check_dataset(name, dataset(name), uses)
    nlq = config["evaluation"].get("nlq")
    made = lambda path: path.startswith("resources/")  # the demo corpus's NLQ files
    for key in ("train", "val") if nlq else ():
        if os.path.isfile(nlq[key]) and not made(nlq[key]):
            check_layout(nlq[key], ("nlq_json",), f"evaluation.nlq.{key} (Ego4D NLQ)")


_check_layouts()


def finetune_settings(task, name, stage):
    """One finetuning job's entry for finetune.py: finetune.<task>.defaults, then the stage's entry,
    then the dataset's (data merges key by key), then finetune.<task>.override, then the dataset's
    text settings. Only its own
    stage and dataset: adding either to a list reruns no other job."""
    section = FINETUNE[task]
    # stage3-seed1: its own entry if listed, else stage3's; finetuned with seed 1
    entries = by_name(section["stages"])
    base, seed = split_variant(stage)
    cfg = over_defaults(
        section.get("defaults", {}), entries.get(stage, entries.get(base))
    )
    cfg = over_defaults(cfg, by_name(section["datasets"])[name])
    # finetune.<task>.override: over every entry (the rehearsal's batch size and steps)
    cfg = over_defaults(cfg, section.get("override") or {})
    text = dataset_text_settings(name)
    if text:
        cfg["data"] = {**cfg.get("data", {}), **text}
    if seed is not None:
        cfg["seed"] = seed
    return {**cfg, "task": task, "name": f"{task}/{name}/{stage}"}


def finetune_inputs(wildcards):
    ds = dataset(wildcards.dataset)
    return {
        "init": f"results/pretrain/{wildcards.stage}/model.safetensors",
        "shards": shard_paths(wildcards.dataset),
        "train": ds["train_annotations"],
        "test": ds["annotations"],
        "tokenizer": f"{config['tokenizer']}/vocab.txt",
    }


def finetune_io(wildcards, threads):
    """finetune.io as finetune.py flags: derived from the job, so never a rerun (as pretrain_io)."""
    return cli_flags(FINETUNE["io"])


def overlap_mode():
    """A train/test overlap is a bug in the generated demo corpus, the user's call on real data."""
    return "error" if config.get("demo_corpus") else "warn"


def finetune_outputs(seeds=(None,)):
    """Every finetuned model (with its model.json and metrics) and its evaluation; with seeds,
    those finetuned from each seed's variant of the stage (stage3-seed1, ...)."""
    pairs = {  # a listed seed variant (stage3-seed1) is finetuned once, as listed
        task: [
            (d, variant(s, k))
            for d, s in finetune_pairs(task)
            for k in seeds
            if k is None or split_variant(s)[1] is None
        ]
        for task in FINETUNE_TASKS
    }
    out = [
        f"results/finetune/{task}/{d}/{s}/{f}"
        for task in FINETUNE_TASKS
        for d, s in pairs[task]
        for f in ("model.safetensors", "model.json", "metrics.jsonl")
    ]
    out += [
        f"results/eval/retrieval_finetuned/{d}/{s}.json"
        for d, s in pairs.get("retrieval", [])
    ]
    return out + [f"results/eval/qa/{d}/{s}.json" for d, s in pairs.get("qa", [])]


def eval_stages():
    """Stages the `all` target evaluates: the curriculum and the extra stages (controls)."""
    return CURRICULUM + EXTRA_STAGES


def control_in_all():
    """Whether `all` builds the late-fusion control (analysis.control.in_all)."""
    control = config["analysis"].get("control")
    return bool(control and control.get("in_all"))


def with_controls(stages):
    """The stages, each followed by its late-fusion control when analysis.control.in_all lists it
    (stage1, stage1_late, stage2, ...): the tables and figures show the two side by side.
    """
    if not control_in_all():
        return list(stages)
    control = config["analysis"]["control"]
    suffix = f"_{control.get('temporal', 'late')}"
    return [
        n for s in stages for n in ([s, s + suffix] if s in control["stages"] else [s])
    ]


def retrieval_results(dataset_name, stages=None):
    stages = eval_stages() if stages is None else stages
    return {s: f"results/eval/retrieval/{dataset_name}/{s}.json" for s in stages}


def egomcq_results(stages=None):
    stages = eval_stages() + EGO_STAGES if stages is None else stages
    return {s: f"results/eval/egomcq/{s}.json" for s in stages}


def all_stages():
    return CURRICULUM + EGO_STAGES + EXTRA_STAGES


def stage_files(stages):
    return [
        f"results/pretrain/{s}/{f}"
        for s in stages
        for f in ("model.safetensors", "model.json", "metrics.jsonl")
    ]


def named(paths):
    """{name: path} -> "name=path ..." for the plot CLI (insertion order kept)."""
    return " ".join(f"{k}={v}" for k, v in paths.items())


def nlq_outputs():
    nlq = config["evaluation"].get("nlq")
    return [f"results/eval/nlq/{nlq['stage']}.json"] if nlq else []


def result_files(stages, ego_stages):
    """Every model and result file of these stages."""
    files = stage_files(stages + ego_stages)
    for d in retrieval_datasets():
        files += retrieval_results(d, stages).values()
    if config["evaluation"].get("egomcq"):
        files += egomcq_results(stages + ego_stages).values()
    return files


def final_outputs():
    """What `all` builds: every stage model and result file, the figures and tables
    (rules/analysis_common.smk lists them) the NLQ outputs and the finetuned models
    with their evaluations."""
    return (
        result_files(eval_stages(), EGO_STAGES)
        + control_outputs()
        + analysis_outputs()
        + nlq_outputs()
        + finetune_outputs()
    )


def control_outputs(seeds=(None,)):
    """The late-fusion control's models and retrieval results when `all` builds it
    (analysis.control.in_all), for each seed variant; no EgoMCQ (the tables that show the control
    are retrieval's)."""
    if not control_in_all():
        return []
    stages = [variant(n, k) for k in seeds for n in CONTROL_STAGES]
    files = stage_files(stages)
    for d in retrieval_datasets():
        files += retrieval_results(d, stages).values()
    return files


def seed_outputs():
    """What `seeds` builds: every stage of `all` again for each seed of pretrain.seeds."""
    stages = [variant(n, k) for k in SEEDS for n in eval_stages()]
    egos = [variant(n, k) for k in SEEDS for n in EGO_STAGES]
    return result_files(stages, egos) + control_outputs(SEEDS) + finetune_outputs(SEEDS)


def ablation_outputs():
    """What `ablation` builds: the pretrain.ablation stages (e.g. Table 3's single-stage runs)."""
    return result_files(ABLATION_STAGES, [])
