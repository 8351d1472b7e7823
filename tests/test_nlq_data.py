"""Ego4D NLQ annotations: the reader (v1 / v2 layouts, bad layouts), the video list, and the NLQ
part of the demo corpus (queries with one answer each, over the EgoClip / EgoMCQ videos)."""

import csv
import json

import numpy as np
import pytest

from svitt.data.demo import ego as demo_ego
from svitt.data.demo import scene as demo_scene
from svitt.data.nlq import read_nlq, write_video_list


def _query(start, end, text, **extra):
    return {
        "clip_start_sec": start,
        "clip_end_sec": end,
        "video_start_sec": start,
        "video_end_sec": end,
        "query": text,
        **extra,
    }


V2 = {  # shaped like Ego4D's nlq_val.json v2 (a clip starting a hair before 0, a window past the clip end)
    "version": "2.0",
    "date": "230105",
    "description": "NLQ Annotations (val)",
    "videos": [
        {
            "video_uid": "vid-a",
            "split": "val",
            "clips": [
                {
                    "clip_uid": "clip-a0",
                    "video_start_sec": -4e-07,
                    "video_end_sec": 480.0366735908854,
                    "clip_start_sec": 0,
                    "clip_end_sec": 480.0156449908854,
                    "source_clip_uid": "s0",
                    "annotations": [
                        {
                            "annotation_uid": "ann-0",
                            "request_uid": "r0",
                            "language_queries": [
                                _query(
                                    28.60389,
                                    29.013,
                                    "Where did i put the fire gun ?",
                                    template="Place: Where did I put X?",
                                ),
                                {
                                    "clip_start_sec": 3.0,
                                    "clip_end_sec": 4.0,
                                    "template": "Objects: ...",
                                },  # no query text
                                _query(468.95576, 480.067, "In what location did i last see the blue bucket?"),
                            ],
                        },
                        {
                            "annotation_uid": "ann-1",
                            "language_queries": [
                                _query(500.0, 510.0, "Query Text:Did I leave the door open?"),
                                _query(9.0, 8.0, "Where was the drill?"),
                            ],
                        },
                    ],
                }
            ],
        },
        {
            "video_uid": "vid-b",
            "split": "val",
            "clips": [
                {
                    "clip_uid": "clip-b0",
                    "video_start_sec": 2340.0,
                    "video_end_sec": 2820.0,
                    "annotations": [
                        {"annotation_uid": "ann-2", "language_queries": [_query(240.5, 254.7, "What color t-shirt?")]}
                    ],
                }
            ],
        },
    ],
}


def test_read_v2_layout(tmp_path):
    path = tmp_path / "nlq_val.json"
    path.write_text(json.dumps(V2))
    split = read_nlq(path)
    assert split.version == "2.0" and split.video_uids == ["vid-a", "vid-b"]
    assert [(q.clip.clip_uid, q.annotation_uid, q.query_idx) for q in split.queries] == [
        ("clip-a0", "ann-0", 0),
        ("clip-a0", "ann-0", 2),
        ("clip-a0", "ann-1", 0),
        ("clip-a0", "ann-1", 1),
        ("clip-b0", "ann-2", 0),
    ]  # query_idx counts the query without text, as the official evaluation does
    assert split.skipped == [
        {"clip_uid": "clip-a0", "annotation_uid": "ann-0", "query_idx": 1, "reason": "no query text"}
    ]
    first, past_end, outside, backwards, other = split.queries
    assert (first.start, first.end) == (28.60389, 29.013)
    assert first.clip.duration == pytest.approx(480.0366739908854)
    assert other.clip.video_start_sec == 2340.0 and other.clip.duration == 480.0
    assert first.window_problem() is None and not first.sticks_out()
    assert past_end.window_problem() is None and past_end.sticks_out()  # 480.067 > 480.037: clamped, kept
    assert "lies outside its clip (0 to 480.037 s)" in outside.window_problem()
    assert "ends before it starts" in backwards.window_problem()
    assert first.key == {"clip_uid": "clip-a0", "annotation_uid": "ann-0", "query_idx": 0}


def test_read_v1_layout(tmp_path):
    """v1 (nlq_train.json of 2022): the same nesting, version "1", clips without source_clip_uid."""
    v1 = {
        "version": "1",
        "videos": [
            {
                "video_uid": "u",
                "clips": [
                    {
                        "clip_uid": "c",
                        "video_start_sec": 60,
                        "video_end_sec": 540,
                        "video_start_frame": 1800,
                        "annotations": [
                            {"annotation_uid": "a", "language_queries": [_query(1, 2.5, "what did I pour?")]}
                        ],
                    }
                ],
            }
        ],
    }
    (tmp_path / "v1.json").write_text(json.dumps(v1))
    [query] = read_nlq(tmp_path / "v1.json").queries
    assert (query.query, query.start, query.end, query.clip.duration) == ("what did I pour?", 1.0, 2.5, 480.0)


@pytest.mark.parametrize(
    "data,message",
    [
        (
            {"0": {"query": {"video_uid": "x"}, "choices": {}, "answer": 0, "types": 1}},  # egomcq.json
            "the top level has no 'videos' .*expected the Ego4D NLQ layout videos\\[\\]\\.clips\\[\\]",
        ),
        ([{"video": "v", "caption": "c"}], "the top level has no 'videos' \\(found list\\)"),  # a retrieval list
        (
            {"videos": [{"video_uid": "u", "clips": [{"video_start_sec": 0, "video_end_sec": 1, "annotations": []}]}]},
            "videos\\[0\\]\\.clips\\[0\\] has no 'clip_uid'",
        ),
        (
            {
                "videos": [
                    {
                        "video_uid": "u",
                        "clips": [
                            {
                                "clip_uid": "c",
                                "video_start_sec": 0,
                                "video_end_sec": 9,
                                "annotations": [
                                    {"annotation_uid": "a", "language_queries": [{"query": "q", "clip_start_sec": 1}]}
                                ],
                            }
                        ],
                    }
                ]
            },
            "language_queries\\[0\\] has no 'clip_end_sec'",
        ),
        (
            {
                "videos": [
                    {
                        "video_uid": "u",
                        "clips": [{"clip_uid": "c", "video_start_sec": 5, "video_end_sec": 5, "annotations": []}],
                    }
                ]
            },
            "expected video_end_sec > video_start_sec",
        ),
    ],
)
def test_another_layout_is_an_error_naming_the_expected_key(tmp_path, data, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=message):
        read_nlq(path)


def test_a_file_that_is_not_json_is_named(tmp_path):
    (tmp_path / "nlq.csv").write_text("video_uid,split\n")
    with pytest.raises(ValueError, match="nlq.csv is not JSON"):
        read_nlq(tmp_path / "nlq.csv")


def test_video_list_is_what_download_reads(tmp_path):
    from svitt.data.download import read_video_list

    (tmp_path / "val.json").write_text(json.dumps(V2))
    clip = {"video_start_sec": 0, "video_end_sec": 9, "annotations": []}
    train = {
        "videos": [
            {"video_uid": "vid-t", "clips": [{**clip, "clip_uid": "t0"}]},
            {"video_uid": "vid-b", "clips": [{**clip, "clip_uid": "b1"}]},
            {"video_uid": "vid-none", "clips": []},
        ]
    }  # a video without clips needs no features
    (tmp_path / "train.json").write_text(json.dumps(train))
    out = tmp_path / "videos.tsv"
    splits = {"train": read_nlq(tmp_path / "train.json"), "val": read_nlq(tmp_path / "val.json")}
    assert write_video_list(out, splits) == 3
    rows = list(csv.DictReader(open(out), delimiter="\t"))
    assert rows == [
        {"video_uid": "vid-a", "split": "val"},
        {"video_uid": "vid-b", "split": "train"},
        {"video_uid": "vid-t", "split": "train"},
    ]
    assert [item.id for item in read_video_list(out)] == ["vid-a", "vid-b", "vid-t"]


# ------------------------------------------------------------------------------- demo corpus
def test_demo_nlq_queries_have_one_answer_each(tmp_path):
    geo = demo_scene.DemoGeometry(ego_nlq_clip_seconds=30)
    rng = np.random.default_rng(3)
    plans = {f"{i:08x}-0000-4000-8000-000000000000": demo_ego.plan_ego_video(90, geo, rng) for i in range(3)}
    nlq = demo_ego.make_nlq(plans, "train", 90, geo)
    (tmp_path / "nlq.json").write_text(json.dumps(nlq))
    split = read_nlq(tmp_path / "nlq.json")
    assert len(split.clips) == 9 and not split.skipped
    assert [(c.video_start_sec, c.video_end_sec) for c in split.clips.values()][:3] == [(0, 30), (30, 60), (60, 90)]
    assert len(split.queries) >= 9  # a few per clip
    for query in split.queries:
        plan = plans[query.clip.video_uid]
        c0, c1 = query.clip.video_start_sec, query.clip.video_end_sec
        inside = [a for a in plan["actions"] if a.start >= c0 and a.end <= c1]
        [action] = [a for a in inside if (a.start - c0, a.end - c0) == pytest.approx((query.start, query.end))]
        assert query.query == demo_ego.nlq_query_text(action, plan["objects"][action.obj][0])
        # the only action of its kind in the clip: the query has one answer
        assert sum((a.obj, a.verb, a.side) == (action.obj, action.verb, action.side) for a in inside) == 1
        assert query.window_problem() is None and not query.sticks_out()
    assert demo_ego.make_nlq(plans, "train", 90, geo) == nlq  # uuid5 of the video: no random draw, same uids


def test_demo_nlq_text():
    action = demo_ego.EgoAction(2.2, 3.8, 0, "move", "left", "ball", "#C C moves the red ball to the left")
    assert demo_ego.nlq_query_text(action, "red") == "when did I move the red ball to the left?"
    assert (
        demo_ego.nlq_query_text(demo_ego.EgoAction(0, 1, 0, "lift", "", "cone"), "blue")
        == "when did I lift the blue cone?"
    )
    assert demo_ego.nlq_clip_spans(12, demo_scene.DemoGeometry(ego_nlq_clip_seconds=30)) == [(0.0, 12.0)]
    assert demo_ego.nlq_clip_spans(70, demo_scene.DemoGeometry(ego_nlq_clip_seconds=30)) == [
        (0.0, 30.0),
        (30.0, 60.0),
        (60.0, 70.0),
    ]
    assert demo_ego.nlq_clip_spans(70, demo_scene.DemoGeometry(ego_nlq_clip_seconds=0)) == [(0.0, 70.0)]


def test_demo_corpus_writes_nlq_over_egoclip_and_egomcq_videos(pipeline):
    corpus, _ = pipeline
    summary = json.loads((corpus / "corpus.json").read_text())["ego"]
    train, val = read_nlq(corpus / "nlq_train.json"), read_nlq(corpus / "nlq_val.json")
    assert train.video_uids == sorted(summary["train_videos"]) and val.video_uids == sorted(summary["mcq_videos"])
    assert summary["nlq_queries"] == {"train": len(train.queries), "val": len(val.queries)} and len(val.queries) > 0
    from svitt.data.pipeline import load_tokenizer

    tokenizer = load_tokenizer(corpus / "tokenizer")
    for query in train.queries + val.queries:  # the vocabulary covers the queries
        assert tokenizer.unk_token_id not in tokenizer(query.query)["input_ids"], query.query
