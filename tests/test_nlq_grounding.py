"""The span grounder: time <-> feature index by hand, VSLNet's top-k decoding, the baseline, bad
input (windows outside their clip, missing features) counted and listed, that it learns a
grounding a query-independent baseline cannot, and ground.py end to end on a tiny model."""

import json

import pytest
import torch

import svitt
from svitt.data.nlq import read_nlq
from svitt.evaluation.grounding import (
    GROUNDER_DEFAULTS,
    GroundingItem,
    SpanGrounder,
    baseline_windows,
    build_items,
    most_frequent_spans,
    predict_windows,
    resolve_grounder_config,
    top_spans,
    train_grounder,
)
from svitt.evaluation.metrics import nlq_recall
from svitt.evaluation.nlq import write_video_features
from svitt.training.checkpoint import export_model
from tests.conftest import script


@pytest.fixture(autouse=True)
def one_thread():
    """The grounder's matrices are small: extra threads only wait (10x slower on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _item(n=10, window=(4.2, 5.8), rate=0.5, offset=0.0, duration=20.0, video=None, text=None):
    video = torch.zeros(n, 4) if video is None else video
    text = torch.zeros(2, 4) if text is None else text
    return GroundingItem(video, text, offset, rate, duration, window, 0)


def test_time_to_feature_index_and_back_by_hand():
    item = _item()  # 0.5 features/s: feature j covers [2j, 2j + 2) s
    assert item.labels == (2, 2)  # [4.2, 5.8] lies inside feature 2
    assert item.to_index(3.9, 6.1) == (1, 3)
    assert item.to_index(4.0, 6.0) == (2, 2)  # boundaries on feature boundaries
    assert item.to_index(-3.0, 99.0) == (0, 9)  # clamped into the clip's features
    assert item.to_window(2, 2) == [4.0, 6.0] and item.to_window(0, 9) == [0.0, 20.0]
    shifted = _item(offset=-0.2)  # feature 0 starts 0.2 s before the clip (clip_feature_span)
    assert shifted.to_index(4.2, 5.8) == (2, 2) and shifted.to_index(4.0, 6.0) == (2, 3)
    assert shifted.to_window(0, 0) == [0.0, pytest.approx(1.8)]


def test_top_spans_is_vslnets_decoding_by_hand():
    # start probabilities (0.5, 0.3, 0.2), end probabilities (0.1, 0.6, 0.3) (as log-probabilities)
    start = torch.tensor([[0.5, 0.3, 0.2]]).log()
    end = torch.tensor([[0.1, 0.6, 0.3]]).log()
    # upper triangle of start x end: (0,1)=.30 (0,2)=.15 (1,1)=.18 (1,2)=.09 (0,0)=.05 (2,2)=.06
    assert top_spans(start, end, k=4) == [[(0, 1), (1, 1), (0, 2), (1, 2)]]
    assert len(top_spans(start, end, k=50)[0]) == 6  # no more than the n (n + 1) / 2 spans
    # non-maximum suppression: after (0,1), (1,1) (IoU 1/2), (0,2) (2/3) and (1,2) (1/3) overlap it
    assert top_spans(start, end, k=4, nms_iou=0.3) == [[(0, 1), (2, 2)]]
    # at 0.5, (1,2) survives and then (2,2) overlaps it by 1/2
    assert top_spans(start, end, k=4, nms_iou=0.5) == [[(0, 1), (1, 2)]]


def test_padding_never_becomes_a_prediction():
    model = SpanGrounder(4, 4, dim=16, heads=2).eval()
    items = [_item(n=3, duration=6.0), _item(n=10)]
    windows = predict_windows(model, items, k=5)
    assert all(end <= 6.0 for _, end in windows[0]) and len(windows[0]) == 5
    padded = top_spans(torch.tensor([[0.0, 0.0, -1e30]]), torch.tensor([[0.0, 0.0, -1e30]]), k=10)
    assert sorted(padded[0]) == [(0, 0), (0, 1), (1, 1)]  # spans touching padding or ending before they start: never


def test_most_frequent_spans_by_hand():
    items = [_item(window=w) for w in [(4.2, 5.8), (4.2, 5.8), (0.2, 1.8), (8.0, 12.0), (0.2, 1.8), (6.2, 7.8)]]
    assert most_frequent_spans(items, k=3) == [(0, 0), (2, 2), (3, 3)]  # ties: the earlier span first
    short = _item(n=2, duration=4.0)
    assert baseline_windows([(0, 0), (2, 2)], [short]) == [[[0.0, 2.0], [2.0, 4.0]]]  # clamped into the clip


def test_settings_are_checked_and_match_the_schema():
    from pathlib import Path

    import yaml

    assert resolve_grounder_config(None) == GROUNDER_DEFAULTS
    with pytest.raises(ValueError, match="unknown evaluation.nlq.grounder config key\\(s\\) \\['layers'\\]"):
        resolve_grounder_config({"layers": 2})
    with pytest.raises(ValueError, match="dim 30 must be a multiple of heads 4"):
        resolve_grounder_config({"dim": 30})
    schema = yaml.safe_load((Path(__file__).parents[1] / "schemas/config.schema.yaml").read_text())
    nlq = schema["properties"]["evaluation"]["properties"]["nlq"]["properties"]
    assert set(nlq["grounder"]["properties"]) == set(GROUNDER_DEFAULTS)  # one list of keys


def _nlq_file(path, clips):
    """clips: [(video_uid, clip_uid, video_start, video_end, [(start, end, query), ...])]."""
    videos = {}
    for uid, clip_uid, c0, c1, queries in clips:
        videos.setdefault(uid, []).append(
            {
                "clip_uid": clip_uid,
                "video_start_sec": c0,
                "video_end_sec": c1,
                "annotations": [
                    {
                        "annotation_uid": f"a-{clip_uid}",
                        "language_queries": [
                            {"clip_start_sec": s, "clip_end_sec": e, "query": q} for s, e, q in queries
                        ],
                    }
                ],
            }
        )
    path.write_text(json.dumps({"version": "1", "videos": [{"video_uid": u, "clips": c} for u, c in videos.items()]}))
    return read_nlq(path)


def test_bad_queries_are_counted_and_listed_not_dropped(tmp_path):
    write_video_features(tmp_path / "f", {"v1": torch.ones(30, 4)}, {"features_per_second": 0.5})
    split = _nlq_file(
        tmp_path / "nlq.json",
        [
            ("v1", "c1", 20.0, 40.0, [(2.2, 3.8, "ok"), (25.0, 30.0, "after the clip"), (19.0, 21.0, "sticks out")]),
            ("v2", "c2", 0.0, 20.0, [(1.0, 2.0, "no features")]),
            ("v1", "c3", 70.0, 90.0, [(1.0, 2.0, "past the video's features")]),
        ],
    )
    items, skipped, clamped = build_items(split, tmp_path / "f", 0.5, [torch.zeros(2, 4)] * 5)
    assert [split.queries[i.query_index].query for i in items] == ["ok", "sticks out"]
    assert items[0].video.shape == (10, 4) and items[0].labels == (1, 1)  # features 10..19 of v1
    assert [s["query_idx"] for s in skipped] == [1, 0, 0]
    assert "lies outside its clip (0 to 20.000 s)" in skipped[0]["reason"]
    assert "video v1 has 30 features (60.0 s), none inside clip c3 [70, 90] s" == skipped[1]["reason"]
    assert skipped[2]["reason"] == "no features for video v2 (clip c2)"
    assert clamped == [{"clip_uid": "c1", "annotation_uid": "a-c1", "query_idx": 2}]


def _synthetic(n, seed, concepts):
    """Clips of 10 features; the answer feature carries the query's concept, the rest noise."""
    g = torch.Generator().manual_seed(seed)
    items = []
    for i in range(n):
        video = 0.5 * torch.randn(10, 8, generator=g)
        c, pos = int(torch.randint(len(concepts), (1,), generator=g)), int(torch.randint(10, (1,), generator=g))
        video[pos] += 2 * concepts[c]
        text = torch.stack([0.1 * torch.randn(8, generator=g), concepts[c] + 0.1 * torch.randn(8, generator=g)])
        items.append(GroundingItem(video, text, 0.0, 0.5, 20.0, (2 * pos + 0.2, 2 * pos + 1.8), i))
    return items


def test_the_grounder_learns_what_no_query_independent_window_can():
    concepts = torch.randn(6, 8, generator=torch.Generator().manual_seed(99))
    train, val = _synthetic(96, 0, concepts), _synthetic(48, 1, concepts)
    settings = resolve_grounder_config({"dim": 32, "epochs": 25, "batch_size": 16, "lr": 2e-3})
    torch.manual_seed(0)
    model = SpanGrounder(8, 8, settings["dim"], settings["heads"], settings["dropout"])
    rows = train_grounder(model, train, settings, progress=False)
    assert rows[-1]["loss"] < rows[0]["loss"]
    truth = [list(item.window) for item in val]
    grounded = nlq_recall(predict_windows(model, val), truth)
    baseline = nlq_recall(baseline_windows(most_frequent_spans(train), val), truth)
    assert baseline["r1_iou0.5"] < 25 and grounded["r1_iou0.5"] > 60  # answer positions are uniform


def test_same_seed_same_numbers():
    concepts = torch.randn(3, 8, generator=torch.Generator().manual_seed(5))
    train = _synthetic(24, 0, concepts)
    settings = resolve_grounder_config({"dim": 16, "heads": 2, "epochs": 2, "batch_size": 8})
    out = []
    for _ in range(2):
        torch.manual_seed(0)
        model = SpanGrounder(8, 8, 16, 2)
        rows = train_grounder(model, train, settings, progress=False)
        out.append((rows, predict_windows(model, train)))
    assert out[0] == out[1]


def test_ground_cli_end_to_end(tmp_path):
    """ground.py videos + train on a tiny exported model: result JSON, skipped queries, the
    official prediction format."""
    from svitt.data.demo.corpus import write_vocab

    queries = [(0.2, 1.8, "when did I lift the red ball?"), (4.2, 5.8, "when did I shake the blue cube?")]
    train = [("v1", f"t{k}", 20.0 * k, 20.0 * (k + 1), queries) for k in range(3)]
    val = [
        ("v2", "e0", 0.0, 20.0, queries + [(30.0, 31.0, "when did I lower the red ball?")]),
        ("v3", "e1", 0.0, 20.0, queries),
    ]  # v3 has no features
    _nlq_file(tmp_path / "train.json", train)
    _nlq_file(tmp_path / "val.json", val)
    write_vocab(tmp_path / "tok", [q for _, _, q in queries] + ["when did I lower the red ball?"])
    write_video_features(
        tmp_path / "feats",
        {"v1": torch.randn(30, 8), "v2": torch.randn(10, 8)},
        {"kind": "cls", "fps": 2.0, "window": 4, "stride": 4, "features_per_second": 0.5, "dim": 8},
    )
    torch.manual_seed(0)
    model = svitt.build_model(
        {"video": {"preset": "tiny"}, "text": {"preset": "tiny", "vocab_size": 64}, "embed_dim": 16}
    )
    export_model(model, tmp_path / "m", {"name": "tiny", "model_config": model.cfg, "train_config": {}})
    ground = script("ground")
    assert (
        ground.main(
            [
                "videos",
                "--train",
                str(tmp_path / "train.json"),
                "--val",
                str(tmp_path / "val.json"),
                "--out",
                str(tmp_path / "videos.tsv"),
            ]
        )
        == 0
    )
    assert (tmp_path / "videos.tsv").read_text() == "video_uid\tsplit\nv1\ttrain\nv2\tval\nv3\tval\n"
    out = tmp_path / "nlq.json"
    assert (
        ground.main(
            [
                "train",
                "--features",
                str(tmp_path / "feats"),
                "--train",
                str(tmp_path / "train.json"),
                "--val",
                str(tmp_path / "val.json"),
                "--model",
                str(tmp_path / "m" / "model.safetensors"),
                "--tokenizer",
                str(tmp_path / "tok"),
                "--config-json",
                '{"dim": 16, "epochs": 2}',
                "--out",
                str(out),
                "--out-dir",
                str(tmp_path / "g"),
                "--no-progress",
            ]
        )
        == 0
    )
    result = json.loads(out.read_text())
    assert set(result["metrics"]) == {"r1_iou0.3", "r5_iou0.3", "r1_iou0.5", "r5_iou0.5", "miou"}
    assert set(result["baseline"]["metrics"]) == set(result["metrics"])
    assert result["queries"] == {"train": 6, "val": 5} and result["evaluated"] == {"train": 6, "val": 2}
    reasons = [s["reason"] for s in result["skipped"]["val"]]
    assert reasons[0].startswith("window [30, 31] s lies outside its clip")
    assert reasons[1:] == ["no features for video v3 (clip e1)"] * 2
    assert result["features"]["kind"] == "cls" and result["settings"]["epochs"] == 2
    challenge = json.loads((tmp_path / "g" / "predictions_val.json").read_text())
    assert challenge["version"] == "1.0" and challenge["challenge"] == "ego4d_nlq_challenge"
    first = challenge["results"][0]
    assert set(first) == {"clip_uid", "annotation_uid", "query_idx", "predicted_times"}
    assert len(first["predicted_times"]) == 5
    rows = [json.loads(line) for line in (tmp_path / "g" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and "val_r1_iou0.3" in rows[0]
    # another layout is an error naming the key, not a traceback
    (tmp_path / "mcq.json").write_text(json.dumps({"0": {"query": {}}}))
    assert (
        ground.main(
            [
                "videos",
                "--train",
                str(tmp_path / "mcq.json"),
                "--val",
                str(tmp_path / "val.json"),
                "--out",
                str(tmp_path / "x.tsv"),
            ]
        )
        == 2
    )


def test_feature_standardisation_counts_each_clip_once():
    g = torch.Generator().manual_seed(0)
    items = [_item(n=n, video=3 * torch.randn(n, 4, generator=g) + 1) for n in (5, 7, 9)]
    items.append(_item(n=5, video=items[0].video))  # a second query of the first clip
    model = SpanGrounder(4, 4, dim=8, heads=2)
    model.set_feature_stats(items)
    distinct = torch.cat([item.video for item in items[:3]])
    torch.testing.assert_close(model.feature_mean, distinct.mean(0))
    torch.testing.assert_close(model.feature_std, distinct.std(0))


def test_the_grounder_registry_names_the_model_and_refuses_an_unknown_one(monkeypatch):
    from svitt.evaluation.grounding import GROUNDERS, build_grounder

    assert GROUNDER_DEFAULTS["model"] == "span" and GROUNDERS["span"] is SpanGrounder
    with pytest.raises(
        ValueError,
        match=r"evaluation.nlq.grounder.model 'vslnet' is not a known grounding model; "
        r"known: \['span'\]",
    ):
        resolve_grounder_config({"model": "vslnet"})
    # the default builds what SpanGrounder(video_dim, text_dim, dim, heads, dropout) builds, draw for draw
    settings = resolve_grounder_config({"dim": 16, "heads": 2, "dropout": 0.2})
    torch.manual_seed(3)
    built = build_grounder(settings, 8, 12)
    torch.manual_seed(3)
    direct = SpanGrounder(8, 12, 16, 2, 0.2)
    assert type(built) is SpanGrounder and built.cqa.dropout.p == 0.2
    assert all(torch.equal(a, b) for a, b in zip(built.state_dict().values(), direct.state_dict().values()))

    class Mean(torch.nn.Module):  # a second grounding model: one class and one registry entry
        def __init__(self, video_dim, text_dim):
            super().__init__()
            self.start = torch.nn.Linear(video_dim, 1)

        @classmethod
        def from_settings(cls, video_dim, text_dim, settings):
            return cls(video_dim, text_dim)

    monkeypatch.setitem(GROUNDERS, "mean", Mean)
    assert resolve_grounder_config({"model": "mean"})["model"] == "mean"
    assert isinstance(build_grounder(resolve_grounder_config({"model": "mean"}), 8, 12), Mean)
