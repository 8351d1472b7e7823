"""Helpers of the rules: config checks, canonical params, stage lookups, paths."""

import copy
import json
import re
import subprocess
import sys

from snakemake.utils import validate

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


def dataset(name):
    if name not in DATASETS:
        raise ValueError(
            f"dataset {name!r} is not configured under `datasets` (have {sorted(DATASETS)})"
        )
    return DATASETS[name]


def is_video_list(name):
    """A CSV/TSV/JSON video list is downloaded; anything else is a folder of videos on disk."""
    return dataset(name)["videos"].endswith((".csv", ".tsv", ".json"))


def shard_paths(name):
    n = dataset(name)["shards"]
    return [f"resources/frames/{name}/shard-{i:03d}-of-{n:03d}.h5" for i in range(n)]


def demo_file(path):
    """Files the demo corpus generates; real data must exist already (see README, Data)."""
    return path


# ------------------------------------------------------------------------------------- pretrain

VIDEO_STAGE_KEYS = (
    "frames",
    "local_blocks",
    "random_blocks",
    "block_size",
    "visual_keep",
    "prune_layers",
)
TEXT_STAGE_KEYS = ("multimodal_keep",)
STAGE_ONLY_KEYS = ("init", "dataset")


def _stages():
    stages = {s["name"]: s for s in config["pretrain"]["curriculum"]}
    ego = config["pretrain"].get("egoclip")
    if ego:
        stages[ego["name"]] = ego
    return stages


STAGES = _stages()
CURRICULUM = [s["name"] for s in config["pretrain"]["curriculum"]]
EGO_STAGE = (
    config["pretrain"]["egoclip"]["name"] if config["pretrain"].get("egoclip") else None
)


def _check_inits():
    for name, stage in STAGES.items():
        init = stage.get("init")
        if init is not None and init not in STAGES:
            raise ValueError(
                f"pretrain stage {name!r} starts from {init!r}, which is not a stage "
                f"(have {sorted(STAGES)})"
            )


_check_inits()


def _over_defaults(defaults, stage):
    """Stage settings over pretrain.defaults; `data` merges key by key, the rest replaces
    (a stage's objectives are its whole objective set)."""
    out = copy.deepcopy(defaults)
    for key, value in stage.items():
        if key == "data":
            out["data"] = {**out.get("data", {}), **value}
        else:
            out[key] = copy.deepcopy(value)
    return out


def stage_model(path):
    """Stage weights; protected (read-only, never recomputed by accident) when
    pretrain.protect_models is set: rerunning such a stage then needs `chmod u+w` first.
    """
    return protected(path) if config["pretrain"]["protect_models"] else path


def downloaded_videos(path):
    """The downloaded video files: deleted once every shard is extracted unless download.keep_videos."""
    return (
        directory(path) if config["download"]["keep_videos"] else temp(directory(path))
    )


def stage_config(name):
    """The config svitt.train reads for one stage: model with the stage's sparsity, and the
    stage's optimisation settings over pretrain.defaults."""
    stage = STAGES[name]
    model = copy.deepcopy(config["model"])
    for key in VIDEO_STAGE_KEYS:
        if key in stage:
            model["video"][key] = stage[key]
    for key in TEXT_STAGE_KEYS:
        if key in stage:
            model["text"][key] = stage[key]
    train = {
        k: v
        for k, v in stage.items()
        if k not in VIDEO_STAGE_KEYS + TEXT_STAGE_KEYS + STAGE_ONLY_KEYS
    }
    cfg = _over_defaults(config["pretrain"].get("defaults", {}), train)
    cfg["model"] = model
    if stage_dataset(name) != "webvid" and "clips" in dataset(stage_dataset(name)):
        cfg.setdefault("data", {})["kind"] = "egoclip"
    return cfg


def stage_dataset(name):
    return STAGES[name].get("dataset", "webvid")


def stage_inputs(wildcards):
    stage = STAGES[wildcards.stage]
    name = stage_dataset(wildcards.stage)
    inputs = {
        "shards": shard_paths(name),
        "annotations": dataset(name)["annotations"],
        "tokenizer": f"{config['tokenizer']}/vocab.txt",
    }
    if stage.get("init"):
        inputs["init"] = f"results/pretrain/{stage['init']}/model.safetensors"
    for key in ("video_weights", "text_weights"):
        if not stage.get("init") and config["model"].get(key):
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
            [sys.executable, f"{workflow.basedir}/workflow_scripts/launch.py", "--count-gpus"],
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
    layout = {"gpu": 0, "nodes": nodes, "tasks": nodes, "tasks_per_gpu": 0, "mpi": "srun"}
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


def download_input(wildcards):
    return (
        dataset(wildcards.dataset)["videos"] if is_video_list(wildcards.dataset) else []
    )


def download_source(wildcards):
    ds = dataset(wildcards.dataset)
    annotations = ds["annotations"]
    if is_video_list(wildcards.dataset):
        return f"--csv {ds['videos']}"
    if ds.get("ego4d_cli"):
        return f"--csv {annotations} --ego4d-cli"
    return f"--csv {annotations} --local-dir {ds['videos']}"


def extraction_flags(wildcards):
    """The global frame settings, with the dataset's own fps / max_frames where it sets them
    (long videos for NLQ features are sampled at a fixed rate)."""
    settings = {k: v for k, v in config["frames"].items() if k != "workers"}
    ds = dataset(wildcards.dataset)
    if "fps" in ds:
        settings["fps"] = ds["fps"]
    if "max_frames" in ds:
        settings["frames"] = ds["max_frames"]
    return cli_flags(settings)


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


def retrieval_results(dataset_name):
    return {s: f"results/eval/retrieval/{dataset_name}/{s}.json" for s in CURRICULUM}


def egomcq_results():
    stages = CURRICULUM + ([EGO_STAGE] if EGO_STAGE else [])
    return {s: f"results/eval/egomcq/{s}.json" for s in stages}


def all_stages():
    return CURRICULUM + ([EGO_STAGE] if EGO_STAGE else [])


def named(paths):
    """{name: path} -> "name=path ..." for the plot CLI (insertion order kept)."""
    return " ".join(f"{k}={v}" for k, v in paths.items())


def nlq_outputs():
    nlq = config["evaluation"].get("nlq")
    return [f"results/nlq_features/{nlq['stage']}.h5"] if nlq else []


def final_outputs():
    figures = ["results/figures/training_curves.png", "results/figures/sparsity.png"]
    figures += [
        f"results/figures/retrieval_{d}.png"
        for d in config["evaluation"]["retrieval"]["datasets"]
    ]
    if config["evaluation"].get("egomcq"):
        figures.append("results/figures/egomcq.png")
    return figures + nlq_outputs()
