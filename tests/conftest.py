"""Shared fixtures: a small demo corpus run through the real data CLIs (session-wide, ~15 s)."""

from __future__ import annotations

import importlib.util
import os
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Snakemake's Slurm plugin runs `scontrol show config` whenever Snakemake starts; on a machine with
# a Slurm client whose controller is down (local-slurm between its tests) that call waits ~9 s.
# Every test but the Slurm ones gets an `scontrol` that fails at once (the plugin then skips its
# hint); tests/test_slurm.py takes this folder off PATH again (tests/helpers/slurm_path.py).
if "SVITT_TEST_NO_SCONTROL" not in os.environ:  # once, however often this module is imported
    NO_SLURM_DIR = Path(tempfile.mkdtemp(prefix="svitt-no-scontrol-"))
    (NO_SLURM_DIR / "scontrol").write_text("#!/bin/sh\nexit 1\n")
    (NO_SLURM_DIR / "scontrol").chmod(0o755)
    os.environ["SVITT_TEST_NO_SCONTROL"] = str(NO_SLURM_DIR)
    os.environ["PATH"] = f"{NO_SLURM_DIR}{os.pathsep}{os.environ.get('PATH', '')}"


def script(name: str):
    spec = importlib.util.spec_from_file_location(f"pipeline_{name}", REPO / "workflow_scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory):
    """(corpus folder, resources folder): 8 train + 8 test videos, WebVid / downstream / ego shards."""
    root = tmp_path_factory.mktemp("pipeline")
    corpus, res = root / "demo", root / "resources"
    assert (
        script("make_demo_corpus").main(
            [
                "--out",
                str(corpus),
                "--seed",
                "1",
                "--train-videos",
                "8",
                "--test-videos",
                "8",
                "--qa-videos",
                "8",
                "--ego-train-videos",
                "1",
                "--ego-mcq-videos",
                "5",
                "--ego-mcq-questions",
                "4",
                "--ego-seconds",
                "12",
                "--ego-chunk-seconds",
                "5",
                "--workers",
                "1",
                "--no-progress",
            ]
        )
        == 0
    )
    download, extract = script("download"), script("extract_frames")
    for name, csv_name in (("webvid", "webvid_train.csv"), ("downstream", "downstream_videos.csv")):
        assert (
            download.main(
                [
                    "--csv",
                    str(corpus / csv_name),
                    "--out",
                    str(res / "videos" / name),
                    "--manifest",
                    str(res / "videos" / f"{name}.csv"),
                    "--no-progress",
                ]
            )
            == 0
        )
        assert (
            extract.main(
                [
                    "--videos",
                    str(res / "videos" / f"{name}.csv"),
                    "--out",
                    str(res / "frames" / name / "shard-0.h5"),
                    "--failures",
                    str(res / "frames" / f"{name}-failures.csv"),
                    "--frames",
                    "32",
                    "--short-side",
                    "40",
                    "--no-progress",
                ]
            )
            == 0
        )
    assert (
        download.main(
            [
                "--csv",
                str(corpus / "egoclip.csv"),
                "--csv",
                str(corpus / "egomcq.json"),
                "--local-dir",
                str(corpus / "ego_videos"),
                "--out",
                str(res / "videos" / "ego"),
                "--manifest",
                str(res / "videos" / "ego.csv"),
                "--no-progress",
            ]
        )
        == 0
    )
    assert (
        extract.main(
            [
                "--videos",
                str(res / "videos" / "ego.csv"),
                "--clips",
                str(corpus / "egoclip.csv"),
                "--mcq",
                str(corpus / "egomcq.json"),
                "--out",
                str(res / "frames" / "ego" / "shard-0.h5"),
                "--failures",
                str(res / "frames" / "ego-failures.csv"),
                "--frames",
                "16",
                "--short-side",
                "40",
                "--workers",
                "2",
                "--no-progress",
            ]
        )
        == 0
    )
    return corpus, res


@pytest.fixture(scope="session")
def test_dag(tmp_path_factory):
    """The demo DAG at test size (tests/configs/test.yaml), `all` and `paper_figures`, run once for the
    workflow and analysis tests (each writes its own config files; none rebuilds anything)."""
    from tests.helpers.workflow import copy_workflow, snakemake

    workdir = copy_workflow(tmp_path_factory.mktemp("test_dag"))
    snakemake(workdir, "all", "paper_figures", "--cores", "2", "--configfile", "tests/configs/test.yaml")
    return workdir
