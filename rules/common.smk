"""Lookups of the rules: `config` bound to svitt/workflow (config layering, datasets, stages,
evaluation and finetuning settings, targets), plus what only Snakemake has: protected / temp /
directory / ancient outputs, GPU and thread resources, the launch prefix."""

import re
import subprocess
import sys

import yaml
from snakemake.utils import validate

# svitt.workflow: torch-free, never imports Snakemake
sys.path.insert(0, workflow.basedir)
from svitt.workflow import analysis as _analysis  # noqa: E402
from svitt.workflow import datasets as _datasets  # noqa: E402
from svitt.workflow import evaluation as _evaluation  # noqa: E402
from svitt.workflow import stages as _stages  # noqa: E402
from svitt.workflow import targets as _targets  # noqa: E402
from svitt.workflow.config import canonical, cli_flags  # noqa: E402
from svitt.workflow.config import numbers, standalone_layers  # noqa: E402
from svitt.workflow.stages import split_variant, variant  # noqa: E402
from svitt.workflow.uses import check_layouts  # noqa: E402


def _overlays():
    """The --configfile files, in command-line order (standalone_layers reads their `standalone`)."""
    layers = []
    for path in workflow.overwrite_configfiles:
        with open(path) as handle:
            layers.append(yaml.safe_load(handle) or {})
    return layers


_layered = standalone_layers(_overlays(), dict(workflow.config_settings.config))
if _layered is not None:
    config.clear()
    config.update(_layered)
config.update(numbers(dict(config)))
validate(config, "../schemas/config.schema.yaml", set_default=True)

# ---------------------------------------------------------------------------------------- data

DATASETS = config["datasets"]


def dataset(name):
    return _datasets.dataset(config, name)


def is_video_list(name):
    return _datasets.is_video_list(config, name)


def is_downloaded(name):
    return _datasets.is_downloaded(config, name)


def shard_paths(name):
    return _datasets.shard_paths(config, name)


def download_list(wildcards):
    return _datasets.download_list(config, wildcards.dataset)


def download_source(wildcards):
    return _datasets.download_source(config, wildcards.dataset)


def download_run(wildcards, threads):
    """download.timeout / retries / max_failed_fraction (and workers, as threads): a params
    function of `threads` is derived from the job, which Snakemake leaves out of its rerun check,
    so editing them reruns nothing (svitt.workflow.datasets.DOWNLOAD_RUN_KEYS)."""
    return _datasets.download_run(config)


def downloaded_videos(path):
    """A download shard's video files: with download.keep_videos false they are temporary, deleted
    as soon as the shard's frames are extracted (their one consumer), so disk holds only the shards
    in flight."""
    return (
        directory(path) if config["download"]["keep_videos"] else temp(directory(path))
    )


def extraction_inputs(wildcards):
    """A downloaded shard's manifest and videos, or the folder the videos already live in. The
    folder is ancient(): it must exist (a dry run names it when it does not), but files added to it
    later rerun nothing (force with --forcerun extract_frames)."""
    files = _datasets.extraction_files(
        config, wildcards.dataset, wildcards.index, wildcards.shards
    )
    if "folder" in files:
        files["videos"] = ancient(files.pop("folder"))
    return files


def extraction_source(wildcards):
    return _datasets.extraction_source(
        config, wildcards.dataset, wildcards.index, wildcards.shards
    )


def extraction_flags(wildcards):
    return _datasets.extraction_flags(config, wildcards.dataset)


def extraction_run(wildcards, threads):
    """frames.max_failed_fraction (and workers, as threads): derived, so editing reruns nothing."""
    return _datasets.extraction_run(config)


def clip_flag(wildcards):
    return _datasets.clip_flag(config, wildcards.dataset)


def demo_file(path):
    """Files the demo corpus generates; real data must exist already (see README, Data)."""
    return path


# ------------------------------------------------------------------------------------- pretrain

PRETRAIN = _stages.with_control(config)  # pretrain with the derived "control" section
STAGES = _stages.configured_stages(
    PRETRAIN
)  # curriculum, egoclip, extra, ablation, control
CURRICULUM = _stages.section_names(PRETRAIN, "curriculum")
EGO_STAGES = _stages.section_names(PRETRAIN, "egoclip")
SEEDS = PRETRAIN["seeds"]
ALL_STAGE_NAMES = _stages.all_stage_names(PRETRAIN)


def stage_model(path):
    """Stage weights; protected (read-only, never recomputed by accident) when
    pretrain.protect_models is set: rerunning such a stage then needs `chmod u+w` first.
    """
    return protected(path) if config["pretrain"]["protect_models"] else path


def stage_params(wildcards):
    return canonical(_stages.stage_config(config, wildcards.stage))


def stage_inputs(wildcards):
    return _stages.stage_inputs(config, wildcards.stage)


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


# A job of seconds on one CPU (figures, tables): every such rule's resources.
SMALL_JOB = {"gpu": 0, "mem_mb": 1000, "runtime": 10}


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


# ------------------------------------------------------------- evaluation, finetuning, targets


def eval_settings(task):
    return _evaluation.eval_settings(config, task)


def retrieval_eval_settings(name):
    return _evaluation.retrieval_eval_settings(config, name)


def finetune_settings(task, name, stage):
    return _evaluation.finetune_settings(config, task, name, stage)


def finetune_inputs(wildcards):
    return _evaluation.finetune_files(config, wildcards.dataset, wildcards.stage)


def finetune_io(wildcards, threads):
    """finetune.io as finetune.py flags: derived from the job, so never a rerun (as pretrain_io)."""
    return cli_flags(config["finetune"]["io"])


def overlap_mode():
    return _datasets.overlap_mode(config)


def final_outputs():
    return _targets.final_outputs(config)


def seed_outputs():
    return _targets.seed_outputs(config)


def ablation_outputs():
    return _targets.ablation_outputs(config)


_evaluation.check_finetune(config)
_analysis.check_analysis_datasets(config)
check_layouts(config)
