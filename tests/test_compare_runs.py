"""tests/helpers/compare_runs.py, the file-by-file comparison of two runs, on hand-made run folders:
what a run cannot repeat (its folder's path, source mtimes, throughput) is told apart from content."""

from __future__ import annotations

import json

import h5py
import numpy as np

from tests.helpers.compare_runs import compare


def write_run(root, loss=1.0, clips_per_s=10.0, stamp="a.mp4:10:1", frames=(1, 2, 3)):
    (root / "results/pretrain/stage1").mkdir(parents=True)
    (root / "resources/demo").mkdir(parents=True)
    row = {"step": 1, "loss": loss, "clips_per_s": clips_per_s}
    (root / "results/pretrain/stage1/metrics.jsonl").write_text(json.dumps(row) + "\n")
    (root / "resources/demo/webvid.csv").write_text(f"videoid,contentUrl\nv1,file://{root}/videos/v1.mp4\n")
    with h5py.File(root / "resources/shard.h5", "w") as f:
        item = f.create_dataset("v1", data=np.array(frames, dtype=np.uint8))
        item.attrs["source"] = str(root / "videos/v1.mp4")
        item.attrs["source_stamp"] = stamp
    (root / "results/same.txt").write_text("unchanged\n")


def test_what_a_run_cannot_repeat_is_not_content(tmp_path):
    write_run(tmp_path / "one")
    write_run(tmp_path / "two", clips_per_s=12.5, stamp="a.mp4:10:2")
    report = compare(tmp_path / "one", tmp_path / "two")
    assert report["identical"] == 1 and not report["only_first"] and not report["only_second"]
    assert report["differ"] == {
        "resources/demo/webvid.csv": "same but paths or job runtimes",
        "resources/shard.h5": "same frames (source mtimes, paths)",
        "results/pretrain/stage1/metrics.jsonl": "same but timing or paths",
    }


def test_a_changed_loss_or_frame_is_content(tmp_path):
    write_run(tmp_path / "one")
    write_run(tmp_path / "two", loss=1.5, frames=(1, 2, 4))
    differ = compare(tmp_path / "one", tmp_path / "two")["differ"]
    assert differ["results/pretrain/stage1/metrics.jsonl"] == "CONTENT DIFFERS"
    assert differ["resources/shard.h5"] == "CONTENT DIFFERS: dataset v1"
