"""The data part of the workflow for real (test size, tests/configs/test.yaml): download shard i ->
extract shard i -> shard i's videos dropped (download.keep_videos: false); folder datasets read in
place; settings that change how a job runs rerun nothing; a missing video folder stops the dry
run; the failure threshold holds per shard. One data-only run (~40 s) is shared by the module."""

from __future__ import annotations

import csv
import http.server
import re
import threading
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml

from svitt.data.datasets import FrameStore, segment_indices
from svitt.data.download import shard_of
from svitt.data.mp4 import write_mp4
from tests.helpers.workflow import copy_workflow, snakemake

pytestmark = pytest.mark.slow

RUN_SETTINGS = {
    "download": {"workers": 3, "timeout": 90, "retries": 5, "max_failed_fraction": 0.5},
    "frames": {"workers": 1, "max_failed_fraction": 0.25},
}
DOWNLOADED = ("webvid", "demo_retrieval")  # video lists (file:// URLs into the demo corpus)
FOLDERS = ("egoclip", "egomcq", "ego_nlq")  # resources/demo/ego_videos, read in place


def planned(workdir: Path, targets: list[str], *configfiles: str, commands: list | None = None) -> set[tuple[str, str]]:
    """(rule, wildcards) of every job a dry run for `targets` would execute; their shell commands
    are appended to `commands` when given."""
    out = snakemake(workdir, "-n", "-p", *targets, "--cores", "4", "--configfile", *configfiles).stdout
    if commands is not None:
        commands += re.findall(r"Shell command: (.*)", out)
    jobs = set()
    for block in re.split(r"\n(?=(?:local)?rule \w+:)", out):
        match = re.match(r"(?:local)?rule (\w+):", block.strip())
        if match:
            wildcards = re.search(r"wildcards: (.*)", block)
            jobs.add((match.group(1), wildcards.group(1).strip() if wildcards else ""))
    return jobs


def shard_targets(workdir: Path, names) -> list[str]:
    datasets = yaml.safe_load((workdir / "config.yaml").read_text())["datasets"]
    return [
        f"resources/frames/{name}/shard-{i:03d}-of-{datasets[name].get('shards', 1):03d}.h5"
        for name in names
        for i in range(datasets[name].get("shards", 1))
    ]


def write_overlay(workdir: Path, name: str, overlay: dict) -> str:
    path = workdir / "configs" / name
    path.write_text(yaml.safe_dump(overlay))
    return f"configs/{name}"


def manifest(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def data_run(tmp_path_factory):
    """Every frame shard of the test-size demo (tests/configs/test.yaml sets download.keep_videos: false)."""
    workdir = copy_workflow(tmp_path_factory.mktemp("data_workflow"))
    assert yaml.safe_load((workdir / "tests/configs/test.yaml").read_text())["download"]["keep_videos"] is False
    targets = shard_targets(workdir, DOWNLOADED + FOLDERS)
    snakemake(workdir, *targets, "--cores", "2", "--configfile", "tests/configs/test.yaml")
    return workdir, targets, ("tests/configs/test.yaml",)


def test_every_downloaded_video_is_extracted_before_its_shard_is_dropped(data_run):
    """Finding 1: with keep_videos false the videos live until their shard is extracted."""
    workdir, _, _ = data_run
    corpus = {"webvid": "webvid_train.csv", "demo_retrieval": "downstream_videos.csv"}
    for name in DOWNLOADED:
        with open(workdir / "resources/demo" / corpus[name], newline="") as handle:
            listed = {row.get("videoid") or row["id"] for row in csv.DictReader(handle)}
        shards = sorted((workdir / "resources/videos" / name).glob("shard-*"))
        assert shards and all(not (s / "files").exists() for s in shards)  # dropped after extraction
        stored = set()
        for shard in sorted((workdir / "resources/frames" / name).glob("shard-*.h5")):
            stored |= set(FrameStore(shard).shard_of)
        assert stored == listed  # every listed video has its frames
        failures = (workdir / "resources/frames" / name).glob("failures-*.csv")
        assert all(len(manifest(f)) == 0 for f in failures)


def test_download_shard_i_feeds_extraction_shard_i(data_run):
    """Finding 5: one download job per shard; its manifest lists exactly that shard's videos."""
    workdir, _, _ = data_run
    shards = sorted((workdir / "resources/videos/webvid").glob("shard-*-of-002"))
    assert [s.name for s in shards] == ["shard-000-of-002", "shard-001-of-002"]
    for index, shard in enumerate(shards):
        rows = manifest(shard / "manifest.csv")
        assert rows and all(r["status"] == "ok" for r in rows)
        assert all(shard_of(r["id"], 2) == index for r in rows)
        frames = workdir / f"resources/frames/webvid/shard-{index:03d}-of-002.h5"
        assert set(FrameStore(frames).shard_of) == {r["id"] for r in rows}
        assert (workdir / f"logs/download/webvid-{index:03d}-of-002.log").exists()


def test_folder_datasets_are_read_in_place(data_run):
    """Finding 13: the ego videos are neither downloaded, copied nor hashed; extraction reads them
    where they are."""
    workdir, _, _ = data_run
    for name in FOLDERS:
        assert not (workdir / "resources/videos" / name).exists()
        assert not list((workdir / "logs/download").glob(f"{name}-*"))
        with h5py.File(workdir / f"resources/frames/{name}/shard-000-of-001.h5") as h5:
            sources = {h5[key].attrs["source"] for key in h5}
        assert sources and all(s.startswith("resources/demo/ego_videos/") for s in sources)


def test_run_settings_rerun_nothing(data_run):
    """Finding 6: timeouts, retries, workers and failure thresholds change how a job runs, not what
    it makes. One overlay edits all of them: any one that reran its job would show up here (that
    the new values reach the scripts: the threshold test below)."""
    workdir, targets, configs = data_run
    overlay = write_overlay(workdir, "run_settings.yaml", RUN_SETTINGS)
    assert planned(workdir, targets, *configs, overlay) == set()


@pytest.mark.parametrize(
    "edit,extracted",
    [
        # the size cap decides which videos a dataset holds: the video lists' downloads and extractions
        ({"download": {"max_bytes": 99_999_999}}, DOWNLOADED),
        # what is stored: every extraction that uses frames.frames (ego_nlq sets its own max_frames);
        # the video lists are downloaded again first, their videos were dropped (keep_videos: false)
        ({"frames": {"frames": 24}}, DOWNLOADED + ("egoclip", "egomcq")),
    ],
)
def test_settings_that_define_the_data_rerun_it(data_run, edit, extracted):
    workdir, targets, configs = data_run
    overlay = write_overlay(workdir, "data_settings.yaml", edit)
    jobs = planned(workdir, targets, *configs, overlay)
    by_rule = {rule: {w.split(",")[0] for r, w in jobs if r == rule} for rule, _ in jobs}
    assert by_rule == {
        "download": {f"dataset={n}" for n in DOWNLOADED},
        "extract_frames": {f"dataset={n}" for n in extracted},
    }


def test_stored_frames_give_every_t16_segment_several_candidates(data_run):
    """Finding 4: all 32 frames of a demo video are stored, so a 16-frame training clip draws one of
    2 frames per segment (a 4-frame clip one of 8), never the same clip every epoch."""
    workdir, _, _ = data_run
    store = FrameStore(workdir / "resources/frames/webvid/shard-000-of-002.h5")
    video = sorted(store.shard_of)[0]
    stored = store.num_frames(video)
    assert stored == 32
    for frames, candidates in ((16, 2), (4, 8)):
        draws = np.stack([segment_indices(stored, frames, np.random.default_rng(seed)) for seed in range(64)])
        for segment in range(frames):
            assert set(draws[:, segment]) == set(range(segment * candidates, (segment + 1) * candidates))


def test_paper_configuration_stores_four_candidates_per_segment_of_its_longest_stage():
    cfg = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs/paper.yaml").read_text())
    longest = max(stage["frames"] for stage in cfg["pretrain"]["curriculum"])
    assert cfg["frames"]["frames"] >= 4 * longest


def test_a_missing_video_folder_stops_the_dry_run_naming_it(tmp_path):
    """Finding 13: a dataset whose video folder is missing fails before anything runs."""
    workdir = copy_workflow(tmp_path)
    overlay = write_overlay(workdir, "missing.yaml", {"datasets": {"egomcq": {"videos": "data/ego4d/videos"}}})
    result = snakemake(workdir, "-n", "all", "--configfile", "tests/configs/test.yaml", overlay, check=False)
    assert result.returncode != 0
    assert "MissingInputException" in result.stdout + result.stderr
    assert "data/ego4d/videos" in result.stdout + result.stderr


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False


@pytest.fixture(scope="module")
def video_server(tmp_path_factory):
    """127.0.0.1: /video/<name>.mp4 is a small valid mp4, anything else 404."""
    path = tmp_path_factory.mktemp("served") / "v.mp4"
    write_mp4(path, np.random.default_rng(0).integers(0, 255, (8, 64, 64, 3), dtype=np.uint8), fps=8)
    body = path.read_bytes()

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            ok = self.path.startswith("/video/")
            self.send_response(200 if ok else 404)
            self.send_header("Content-Type", "video/mp4")
            self.send_header("Content-Length", str(len(body) if ok else 0))
            self.end_headers()
            if ok:
                self.wfile.write(body)

    httpd = _Server(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_the_failure_threshold_holds_per_shard_and_other_shards_are_kept(tmp_path, video_server):
    """Shard 0 loses 2 of its 4 videos (HTTP 404), more than max_failed_fraction 0.3: its job fails
    and says why, shard 1 is downloaded and extracted. Raising the threshold (a run setting) then
    runs shard 0 only, and its manifest records each failure."""
    ids = [f"v{i}" for i in range(40)]
    by_shard = [[i for i in ids if shard_of(i, 2) == k][:4] for k in range(2)]
    dead = set(by_shard[0][:2])
    workdir = copy_workflow(tmp_path)
    rows = [(i, f"{video_server}/{'gone' if i in dead else 'video'}/{i}.mp4", f"clip {i}") for s in by_shard for i in s]
    with open(workdir / "web.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([("id", "url", "caption"), *rows])
    web = {
        "datasets": {"web": {"videos": "web.csv", "annotations": "web.csv", "shards": 2}},
        "download": {"max_failed_fraction": 0.3, "retries": 0},
    }
    strict = write_overlay(workdir, "web.yaml", web)
    targets = [f"resources/frames/web/shard-{k:03d}-of-002.h5" for k in range(2)]
    result = snakemake(
        workdir,
        *targets,
        "--cores",
        "2",
        "--keep-going",
        "--configfile",
        "tests/configs/test.yaml",
        strict,
        check=False,
    )
    assert result.returncode != 0
    assert not (workdir / targets[0]).exists()
    assert set(FrameStore(workdir / targets[1]).shard_of) == set(by_shard[1])
    log = (workdir / "logs/download/web-000-of-002.log").read_text()
    assert "2 of 4 videos failed, more than --max-failed-fraction 0.3" in log and "HTTP 404 Not Found" in log

    web = {**web, **RUN_SETTINGS}  # a higher threshold, and new values for the other run settings
    lenient = write_overlay(workdir, "web_lenient.yaml", web)
    configs = ("tests/configs/test.yaml", lenient)
    commands = []
    assert planned(workdir, targets, *configs, commands=commands) == {
        ("download", "dataset=web, index=000, shards=002"),
        ("extract_frames", "dataset=web, index=000, shards=002"),
    }
    download, extract = sorted(commands)  # the new values reach the scripts
    assert "--max-failed-fraction 0.5 --retries 5 --timeout 90 --workers 3" in download
    assert "--max-failed-fraction 0.25 --workers 1" in extract
    snakemake(workdir, *targets, "--cores", "2", "--configfile", *configs)
    rows0 = {r["id"]: r for r in manifest(workdir / "resources/videos/web/shard-000-of-002/manifest.csv")}
    assert {i for i, r in rows0.items() if r["status"] == "failed"} == dead
    assert all(rows0[i]["reason"] == "HTTP 404 Not Found" for i in dead)
    assert set(FrameStore(workdir / targets[0]).shard_of) == set(by_shard[0]) - dead
