"""The data stages end to end on a small demo corpus, through the same CLIs the workflow calls:
make_demo_corpus -> download (file:// and --local-dir) -> extract_frames -> datasets."""

from __future__ import annotations

import csv
import json

import h5py
import pytest
import torch
from conftest import script

from svitt.data import datasets as ds
from svitt.data.frames import clip_key
from svitt.data.transforms import EvalTransform, TrainTransform


def test_expected_frame_counts(pipeline):
    corpus, res = pipeline
    with h5py.File(res / "frames" / "webvid" / "shard-0.h5") as h5:
        assert len(h5) == 8
        for key in h5:
            assert h5[key].shape == (32,) and (h5[key].attrs["height"], h5[key].attrs["width"]) == (40, 40)
    with h5py.File(res / "frames" / "downstream" / "shard-0.h5") as h5:
        assert len(h5) == 16
    rows = list(csv.DictReader(open(corpus / "egoclip.csv"), delimiter="\t"))
    mcq = json.loads((corpus / "egomcq.json").read_text())
    keys = {clip_key(r["video_uid"], r["clip_start"], r["clip_end"]) for r in rows}
    keys |= {
        clip_key(c["video_uid"], c["clip_start"], c["clip_end"]) for q in mcq.values() for c in q["choices"].values()
    }
    with h5py.File(res / "frames" / "ego" / "shard-0.h5") as h5:
        assert set(h5) == keys
        crossing = h5[clip_key(rows[2]["video_uid"], rows[2]["clip_start"], rows[2]["clip_end"])]
        assert crossing.attrs["clip_start"] == 4.2 and crossing.attrs["frame_indices"].tolist() == list(range(42, 58))
        assert all(h5[k].shape == (16,) for k in h5)  # 1.6 s at 10 fps
    for name in ("webvid", "downstream", "ego"):
        assert (res / "frames" / f"{name}-failures.csv").read_text() == "id,reason\n"


@pytest.mark.parametrize("frames", [4, 8, 16])
def test_training_clips_at_every_curriculum_length(pipeline, frames):
    corpus, res = pipeline
    data = ds.VideoTextDataset(
        res / "frames" / "webvid", corpus / "webvid_train.csv", frames, TrainTransform(32, flip=False), seed=0
    )
    item = data[0]
    assert item["video"].shape == (frames, 3, 32, 32) and -1.0 <= item["video"].min() <= item["video"].max() <= 1.0
    assert len(set(data.groups)) == 2 and data.groups.count(data.groups[0]) == 4


def test_eval_and_ego_datasets_on_the_demo(pipeline):
    corpus, res = pipeline
    retrieval = ds.RetrievalDataset(res / "frames" / "downstream", corpus / "retrieval_test.json", 4, EvalTransform(32))
    assert len(retrieval) == 8 and len(retrieval.texts) == 8
    assert sorted(k for *_, k in retrieval.twin_pairs) == ["order"] * 4 + ["reverse"] * 4
    qa = ds.QADataset(
        res / "frames" / "downstream",
        corpus / "qa_test.json",
        4,
        EvalTransform(32),
        answer_list=corpus / "qa_answers.json",
    )
    assert all(qa[i]["answer_index"] >= 0 for i in range(len(qa)))
    nouns, verbs = ds.load_taxonomy(corpus / "ego_taxonomy.json")
    ego = ds.EgoClipDataset(
        res / "frames" / "ego",
        corpus / "egoclip.csv",
        4,
        TrainTransform(32, flip=False),
        num_nouns=len(nouns),
        num_verbs=len(verbs),
        seed=0,
    )
    item = ego[0]
    assert len(ego) == 6 and item["neg_source"] == "bucket" and item["nouns"].sum() == 1
    mcq = ds.EgoMCQDataset(res / "frames" / "ego", corpus / "egomcq.json", 4, EvalTransform(32))
    assert len(mcq) == 4 and mcq[0]["choices"].shape == (5, 4, 3, 32, 32)
    assert torch.isfinite(mcq[0]["choices"]).all()


@pytest.mark.parametrize(
    "name, flags",
    [
        (
            "download",
            [
                "--csv",
                "--out",
                "--manifest",
                "--workers",
                "--max-failed-fraction",
                "--timeout",
                "--retries",
                "--max-bytes",
                "--local-dir",
                "--ego4d-cli",
            ],
        ),
        (
            "make_demo_corpus",
            ["--out", "--seed", "--train-videos", "--test-videos", "--qa-videos", "--ego-train-videos"],
        ),
        (
            "extract_frames",
            [
                "--videos",
                "--out",
                "--failures",
                "--frames",
                "--short-side",
                "--workers",
                "--max-failed-fraction",
                "--clips",
                "--mcq",
                "--num-shards",
            ],
        ),
    ],
)
def test_cli_help(name, flags, capsys):
    with pytest.raises(SystemExit) as exit_info:
        script(name).parse_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert all(flag in text for flag in flags)
