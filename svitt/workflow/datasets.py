"""Dataset lookups of a workflow config (`datasets:`): what a dataset is, where its files are, and
the flags its download and frame-extraction jobs get. Pure Python: rules/common.smk binds `config`
to these, tests call them directly."""

from __future__ import annotations

from svitt.workflow.config import cli_flags

# Settings that change how a data job runs, not what it writes: they reach the scripts through
# derived params (functions taking `threads`), which Snakemake leaves out of its rerun check, so
# editing them reruns nothing (tests/test_workflow_data.py); `workers` is the rules' threads, never
# a rerun either. max_bytes is not one of them: a video over the cap fails on every run whatever
# the network does, so the cap decides which videos a dataset holds.
DOWNLOAD_RUN_KEYS = ("timeout", "retries", "max_failed_fraction")
FRAMES_RUN_KEYS = ("max_failed_fraction",)
DATASET_TEXT_KEYS = ("text_len", "paragraph")  # a dataset's texts, for every task on it


def dataset(config: dict, name: str) -> dict:
    datasets = config["datasets"]
    if name not in datasets:
        raise ValueError(f"dataset {name!r} is not configured under `datasets` (have {sorted(datasets)})")
    return datasets[name]


def is_video_list(config: dict, name: str) -> bool:
    """A CSV/TSV/JSON video list is downloaded; anything else is a folder of videos on disk."""
    return dataset(config, name)["videos"].endswith((".csv", ".tsv", ".json"))


def is_downloaded(config: dict, name: str) -> bool:
    """Videos the workflow fetches (a video list, or the Ego4D CLI); else read in place."""
    return bool(is_video_list(config, name) or dataset(config, name)["ego4d_cli"])


def shard_paths(config: dict, name: str) -> list[str]:
    n = dataset(config, name)["shards"]
    return [f"resources/frames/{name}/shard-{i:03d}-of-{n:03d}.h5" for i in range(n)]


def download_dir(name: str, index: str, shards: str) -> str:
    """Shard `index` of a downloaded dataset: its manifest and its videos."""
    return f"resources/videos/{name}/shard-{index}-of-{shards}"


def download_list(config: dict, name: str) -> str:
    """The file a download job reads: the video list, or (Ego4D CLI) the annotations."""
    ds = dataset(config, name)
    if not is_downloaded(config, name):
        raise ValueError(f"dataset {name!r} reads its videos in place from {ds['videos']}: nothing to download")
    return ds["videos"] if is_video_list(config, name) else ds["annotations"]


def download_source(config: dict, name: str) -> str:
    flag = "" if is_video_list(config, name) else " --ego4d-cli"
    return f"--csv {download_list(config, name)}{flag}"


def download_run(config: dict) -> str:
    """download.timeout / retries / max_failed_fraction as flags (see DOWNLOAD_RUN_KEYS)."""
    return cli_flags({k: config["download"][k] for k in DOWNLOAD_RUN_KEYS})


def extraction_files(config: dict, name: str, index: str, shards: str) -> dict[str, str]:
    """The input files of one extraction shard: annotations, (folder datasets) the finetuning
    split's annotations, and the shard's manifest and videos, or the folder of videos on disk
    under "folder" (the rule marks it ancient())."""
    ds = dataset(config, name)
    inputs = {"annotations": ds["annotations"]}
    downloaded = is_downloaded(config, name)
    if "train_annotations" in ds and not downloaded:
        inputs["train_annotations"] = ds["train_annotations"]  # its videos are extracted too
    if downloaded:
        inputs["manifest"] = f"{download_dir(name, index, shards)}/manifest.csv"
        inputs["videos"] = f"{download_dir(name, index, shards)}/files"
    else:
        inputs["folder"] = ds["videos"]
    return inputs


def extraction_source(config: dict, name: str, index: str, shards: str) -> str:
    """--videos: the shard's manifest, or the folder with the videos the annotations name (clip
    datasets name them by their clips; a finetuning dataset's train_annotations name more)."""
    ds = dataset(config, name)
    if is_downloaded(config, name):
        return f"--videos {download_dir(name, index, shards)}/manifest.csv"
    if ds.get("clips"):
        return f"--videos {ds['videos']}"
    ids = " ".join([ds["annotations"]] + ([ds["train_annotations"]] if "train_annotations" in ds else []))
    return f"--videos {ds['videos']} --ids {ids}"


def extraction_flags(config: dict, name: str) -> str:
    """What extraction stores: the global frame settings, with the dataset's own fps / max_frames
    where it sets them (long videos for NLQ features are sampled at a fixed rate)."""
    settings = {k: v for k, v in config["frames"].items() if k not in FRAMES_RUN_KEYS + ("workers",)}
    ds = dataset(config, name)
    if "fps" in ds:
        settings["fps"] = ds["fps"]
    if "max_frames" in ds:
        settings["frames"] = ds["max_frames"]
    return cli_flags(settings)


def extraction_run(config: dict) -> str:
    """frames.max_failed_fraction as a flag (see FRAMES_RUN_KEYS)."""
    return cli_flags({k: config["frames"][k] for k in FRAMES_RUN_KEYS})


def clip_flag(config: dict, name: str) -> str:
    ds = dataset(config, name)
    return {None: "", "egoclip": f"--clips {ds['annotations']}", "egomcq": f"--mcq {ds['annotations']}"}[
        ds.get("clips")
    ]


def dataset_text_settings(config: dict, name: str) -> dict:
    return {k: v for k, v in dataset(config, name).items() if k in DATASET_TEXT_KEYS}


def overlap_mode(config: dict) -> str:
    """A train/test overlap is a bug in the generated demo corpus, the user's call on real data."""
    return "error" if config.get("demo_corpus") else "warn"
