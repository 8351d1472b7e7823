"""A copy of the workflow to run Snakemake in, so tests never touch the checkout's results/."""

from __future__ import annotations

import shutil
from pathlib import Path

from svitt.workflow import WORKFLOW_FILES

REPO = Path(__file__).resolve().parents[2]


def copy_workflow(dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for name in WORKFLOW_FILES:
        src = REPO / name
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dest / name)
    return dest


PAPER_VIDEO_FOLDERS = (
    "data/msrvtt/videos",
    "data/didemo/videos",
    "data/charades/videos",
    "data/ssv2/videos",
    "data/activitynet/videos",
    "data/ego4d/videos",
)
PAPER_WEIGHTS = ("data/bert-base-uncased/vocab.txt", "data/weights/beit_base_patch16_224.in22k_ft_in22k.pth")


def paper_inputs(workdir: Path) -> None:
    """The input files of configs/paper.yaml for a dry run: every annotation file in its published
    layout (the rehearsal's miniatures, without videos), the video folders, and empty weight files
    (a dry run never reads them)."""
    from svitt.data.miniatures import make_miniatures

    make_miniatures(workdir, "http://127.0.0.1:1", videos=False)
    for path in PAPER_WEIGHTS:
        (workdir / path).parent.mkdir(parents=True, exist_ok=True)
        (workdir / path).touch()
    for folder in PAPER_VIDEO_FOLDERS:  # folder datasets are read in place: the folders are inputs
        (workdir / folder).mkdir(parents=True, exist_ok=True)


def snakemake(workdir: Path, *args: str, check: bool = True):
    """Run Snakemake in `workdir` with this venv's executables first on PATH."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", *args], cwd=workdir, env=env, capture_output=True, text=True
    )
    if check and result.returncode:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result


def stage_configs(dry_run_output: str) -> dict[str, dict]:
    """{stage name: the --config-json a pretrain job gets} from `snakemake -n -p` output."""
    import json
    import re

    stages = {}
    for match in re.finditer(r"workflow_scripts/train\.py --config-json '(\{.*?\})'", dry_run_output):
        cfg = json.loads(match.group(1))
        stages[cfg["name"]] = cfg
    return stages
