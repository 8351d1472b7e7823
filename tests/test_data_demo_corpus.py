"""The embedded demo corpus: captions must describe the pixels, twins must be exact twins, the
metadata must be in the real sets' layouts, and everything must be deterministic from the seed."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import av
import numpy as np
import pytest

from svitt.data.demo import corpus as demo_corpus
from svitt.data.demo import scene as demo_scene
from svitt.data.demo import twins as demo_twins

SMALL = demo_scene.DemoSizes(
    train_videos=8,
    test_videos=8,
    qa_videos=8,
    qa_questions_per_video=3,
    ego_train_videos=2,
    ego_mcq_videos=5,
    ego_mcq_questions=6,
    ego_seconds=12.0,
    finetune_videos=8,
)
GEO = demo_scene.DemoGeometry(ego_chunk_seconds=5.0)
OPP = {"left": "right", "right": "left", "up": "down", "down": "up"}
CAPTION = re.compile(r"^the (\w+) (\w+) moves (\w+), then the (\w+) (\w+) moves (\w+)$")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "corpus"
    demo_corpus.make_demo_corpus(out, seed=3, sizes=SMALL, geometry=GEO, workers=1, progress=False)
    return out


def decode(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def parse(caption: str):
    m = CAPTION.match(caption)
    assert m, caption
    return (m[1], m[2], m[3]), (m[4], m[5], m[6])


def read_webvid(corpus: Path) -> list[dict]:
    with open(corpus / "webvid_train.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_layout_and_counts(corpus):
    names = {p.name for p in corpus.iterdir()}
    assert names == {
        "videos",
        "ego_videos",
        "tokenizer",
        "corpus.json",
        "webvid_train.csv",
        "downstream_videos.csv",
        "qa_videos.csv",
        "retrieval_train.json",
        "retrieval_test.json",
        "retrieval_test_didemo.json",
        "twins_test.json",
        "qa_train.json",
        "qa_test.json",
        "qa_answers.json",
        "egoclip.csv",
        "egomcq.json",
        "ego_taxonomy.json",
        "nlq_train.json",
        "nlq_val.json",
    }
    assert len(list((corpus / "videos").glob("*.mp4"))) == 32
    rows = read_webvid(corpus)
    assert list(rows[0]) == ["videoid", "contentUrl", "duration", "page_dir", "name", "family", "variant"]
    assert len(rows) == 8 and all(r["contentUrl"].startswith("file:///") for r in rows)
    assert all(Path(r["contentUrl"][7:]).is_file() for r in rows)
    assert rows[0]["duration"] == "PT00H00M04S"  # 32 frames at 8 fps, WebVid's ISO 8601 form
    frames = decode(corpus / "videos" / f"{rows[0]['videoid']}.mp4")
    assert frames.shape == (32, 64, 64, 3)
    assert not any(p.name.startswith(".") for p in corpus.parent.iterdir())  # no temp folder left


def test_twin_captions_follow_the_rules(corpus):
    rows = read_webvid(corpus)
    families: dict[str, dict] = {}
    for r in rows:
        families.setdefault(r["family"], {})[r["variant"]] = parse(r["name"])
    for fam in families.values():
        (a_col, a_shape, a_dir), (b_col, b_shape, b_dir) = fam["fwd"]
        assert fam["rev"] == ((b_col, b_shape, OPP[b_dir]), (a_col, a_shape, OPP[a_dir]))
        assert fam["swap"] == ((b_col, b_shape, b_dir), (a_col, a_shape, a_dir))
        assert fam["swaprev"] == ((a_col, a_shape, OPP[a_dir]), (b_col, b_shape, OPP[b_dir]))
        assert (a_col, a_shape) != (b_col, b_shape)


def test_time_reversed_twins_hold_the_same_frames_reversed(corpus):
    rev_fwd = decode(corpus / "videos" / "train_00000_rev.mp4").astype(float)
    fwd = decode(corpus / "videos" / "train_00000_fwd.mp4").astype(float)
    swap = decode(corpus / "videos" / "train_00000_swap.mp4").astype(float)
    assert np.abs(rev_fwd - fwd[::-1]).mean() < 2.0  # identical up to H.264 noise
    assert np.abs(swap - fwd).mean() > 2 * np.abs(rev_fwd - fwd[::-1]).mean()  # the event-order twin differs
    a, b = demo_twins.Event("red", "circle", "left"), demo_twins.Event("blue", "square", "up")
    videos = demo_twins.render_family(a, b, GEO, np.random.default_rng(0))
    assert np.array_equal(videos["rev"], videos["fwd"][::-1]) and np.array_equal(
        videos["swaprev"], videos["swap"][::-1]
    )
    assert np.array_equal(videos["fwd"][0], videos["swap"][0]) and np.array_equal(videos["fwd"][-1], videos["swap"][-1])


def centroid(frame: np.ndarray, color) -> np.ndarray:
    mask = np.abs(frame.astype(int) - np.array(color)).sum(-1) < 90
    ys, xs = np.nonzero(mask)
    return np.array([xs.mean(), ys.mean()])


STEP = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}


def motion(frames, color, t0, t1) -> np.ndarray:
    return centroid(frames[t1], demo_scene.COLORS[color]) - centroid(frames[t0], demo_scene.COLORS[color])


def test_captions_describe_the_decoded_motion(corpus):
    """Track each object by colour in the decoded video: the caption's first object moves in the
    caption's direction during the first half and the other one in the second half."""
    checked = 0
    for path in sorted((corpus / "videos").glob("*.mp4")):
        caption = {r["id"]: r["caption"] for r in csv.DictReader(open(corpus / "downstream_videos.csv"))}
        caption.update({r["videoid"]: r["name"] for r in read_webvid(corpus)})
        first, second = parse(caption[path.stem])
        if first[0] == second[0]:
            continue  # same colour, different shape: colour tracking cannot tell them apart
        frames = decode(path)
        for (col, _shape, direction), moving, still in ((first, (0, 15), (16, 31)), (second, (16, 31), (0, 15))):
            step = motion(frames, col, *moving)
            assert np.dot(step, STEP[direction]) > 0.7 * GEO.travel, (path.name, col, direction, step)
            assert np.abs(motion(frames, col, *still)).max() < 1.5
        checked += 1
    assert checked >= 12


def test_retrieval_qa_and_twins_files(corpus):
    test = json.loads((corpus / "retrieval_test.json").read_text())
    by_id = {t["video"]: t for t in test}
    assert len(test) == 8 and all(set(t) >= {"video", "caption"} for t in test)
    for t in test:
        (a, b) = parse(t["caption"])
        rev = parse(by_id[t["reverse_twin"]]["caption"])
        assert rev == ((b[0], b[1], OPP[b[2]]), (a[0], a[1], OPP[a[2]]))
        assert parse(by_id[t["order_twin"]]["caption"]) == (b, a)
    pairs = json.loads((corpus / "twins_test.json").read_text())
    assert sorted(p["kind"] for p in pairs) == ["order"] * 4 + ["reverse"] * 4
    didemo = json.loads((corpus / "retrieval_test_didemo.json").read_text())
    assert all(isinstance(d["caption"], list) and len(d["caption"]) == 2 for d in didemo)
    finetune = json.loads((corpus / "retrieval_train.json").read_text())
    assert len(finetune) == 8 and not {f["video"] for f in finetune} & set(by_id)  # a disjoint train split
    answers = json.loads((corpus / "qa_answers.json").read_text())
    downstream = {r["id"]: r["caption"] for r in csv.DictReader(open(corpus / "downstream_videos.csv"))}
    assert {f["video"] for f in finetune} | set(by_id) <= set(downstream)
    qa = json.loads((corpus / "qa_train.json").read_text()) + json.loads((corpus / "qa_test.json").read_text())
    assert len(qa) == 8 * 3
    assert {r["id"] for r in csv.DictReader(open(corpus / "qa_videos.csv"))} == {q["video"] for q in qa}
    train_videos = {q["video"] for q in json.loads((corpus / "qa_train.json").read_text())}
    test_videos = {q["video"] for q in json.loads((corpus / "qa_test.json").read_text())}
    assert train_videos and test_videos and not train_videos & test_videos
    for q in qa:
        assert q["answer"] in answers
        first, second = parse(downstream[q["video"]])
        text = q["question"]
        if q["type"] == "first":
            assert text == "what moves first?" and q["answer"] == f"{first[0]} {first[1]}"
        elif q["type"] == "second":
            assert text == "what moves second?" and q["answer"] == f"{second[0]} {second[1]}"
        elif q["type"] == "direction":
            obj = tuple(text[len("which way does the ") : -len(" move?")].split())
            assert q["answer"] == (first[2] if obj == first[:2] else second[2])
        else:
            assert q["type"] == "before"
            m = re.match(r"does the (\w+) (\w+) move before the (\w+) (\w+)\?", text)
            assert q["answer"] == ("yes" if (m[1], m[2]) == first[:2] else "no")


def test_egoclip_and_egomcq_layouts(corpus):
    with open(corpus / "egoclip.csv", newline="") as handle:
        header = handle.readline().rstrip("\n").split("\t")
    assert header == [
        "clip_idx",
        "video_uid",
        "video_dur",
        "narration_source",
        "narration_ind",
        "narration_time",
        "clip_start",
        "clip_end",
        "clip_text",
        "tag_verb",
        "tag_noun",
    ]
    rows = list(csv.DictReader(open(corpus / "egoclip.csv", newline=""), delimiter="\t"))
    taxonomy = json.loads((corpus / "ego_taxonomy.json").read_text())
    assert len(rows) == 2 * 6  # two 12 s videos, one narration every 2 s
    for r in rows:
        assert float(r["clip_start"]) <= float(r["narration_time"]) <= float(r["clip_end"])
        assert r["clip_text"].startswith("#C C ")
        verb = taxonomy["verbs"][json.loads(r["tag_verb"])[0]]
        noun = taxonomy["nouns"][json.loads(r["tag_noun"])[0]]
        assert noun in r["clip_text"].split() and r["clip_text"].split()[2].startswith(verb[:4])
    chunked = [p for p in (corpus / "ego_videos").iterdir()]
    assert len(chunked) == 7 and all(
        sorted(c.name for c in p.iterdir()) == ["0.mp4", "1.mp4", "2.mp4"] for p in chunked
    )  # 12 s in 5 s chunks
    mcq = json.loads((corpus / "egomcq.json").read_text())
    assert list(mcq) == [str(i) for i in range(6)]
    train_uids = {r["video_uid"] for r in rows}
    for q in mcq.values():
        assert sorted(q["choices"]) == ["0", "1", "2", "3", "4"] and q["types"] in (1, 2)
        assert q["choices"][str(q["answer"])] == q["query"]
        uids = [c["video_uid"] for c in q["choices"].values()]
        assert not set(uids) & train_uids  # held-out videos
        assert len(set(uids)) == (5 if q["types"] == 1 else 1)


def test_vocab_covers_every_text_without_unk(corpus):
    from transformers import BertTokenizerFast

    vocab = (corpus / "tokenizer" / "vocab.txt").read_text().split("\n")
    assert vocab[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] and "#" in vocab and "c" in vocab
    texts = [r["name"] for r in read_webvid(corpus)]
    texts += [r["caption"] for r in csv.DictReader(open(corpus / "downstream_videos.csv"))]
    for name in ("qa_train.json", "qa_test.json"):
        texts += [q["question"] + " " + q["answer"] for q in json.loads((corpus / name).read_text())]
    texts += [r["clip_text"] for r in csv.DictReader(open(corpus / "egoclip.csv"), delimiter="\t")]
    texts += [q["query"]["clip_text"] for q in json.loads((corpus / "egomcq.json").read_text()).values()]
    for tokenizer in (
        demo_corpus.load_tokenizer(corpus / "tokenizer"),
        BertTokenizerFast(vocab=str(corpus / "tokenizer" / "vocab.txt")),
    ):
        assert tokenizer.pad_token_id == 0 and tokenizer.unk_token_id == 1
        for text in texts:
            ids = tokenizer(text)["input_ids"]
            assert tokenizer.unk_token_id not in ids, (text, tokenizer.convert_ids_to_tokens(ids))
        assert tokenizer.convert_ids_to_tokens(tokenizer("#C C lifts the red ball")["input_ids"]) == [
            "[CLS]",
            "#",
            "c",
            "c",
            "lifts",
            "the",
            "red",
            "ball",
            "[SEP]",
        ]
        assert tokenizer.unk_token_id in tokenizer("a zebra")["input_ids"]  # the check can fail


def test_deterministic_from_seed(corpus, tmp_path):
    again = tmp_path / "corpus"
    demo_corpus.make_demo_corpus(again, seed=3, sizes=SMALL, geometry=GEO, workers=2, progress=False)
    for path in sorted(p for p in corpus.rglob("*") if p.is_file()):
        other = again / path.relative_to(corpus)
        if path.suffix in (".csv", ".json"):
            assert path.read_text().replace(str(corpus), "ROOT") == other.read_text().replace(str(again), "ROOT"), path
        else:
            assert path.read_bytes() == other.read_bytes(), path
    different = tmp_path / "other"
    demo_corpus.make_demo_corpus(different, seed=4, sizes=SMALL, geometry=GEO, workers=1, progress=False)
    assert (different / "webvid_train.csv").read_text().replace(str(different), "") != (
        corpus / "webvid_train.csv"
    ).read_text().replace(str(corpus), "")


def test_bad_sizes_are_refused(tmp_path):
    with pytest.raises(ValueError, match="--train-videos must be a non-negative multiple of 4 .* got 6"):
        demo_corpus.make_demo_corpus(tmp_path / "x", sizes=demo_scene.DemoSizes(train_videos=6), progress=False)
    with pytest.raises(ValueError, match="at least 5 held-out ego videos, got 3"):
        demo_corpus.make_demo_corpus(
            tmp_path / "y",
            sizes=demo_scene.DemoSizes(8, 0, 0, ego_train_videos=1, ego_mcq_videos=3, ego_seconds=10),
            progress=False,
        )
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    assert list(tmp_path.iterdir()) == []  # temporary folders removed
