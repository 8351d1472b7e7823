"""Clip datasets, transforms and the twin batch sampler, over HDF5 shards written here by hand
(uniform-gray frames whose level identifies the frame, so sampling can be checked by value)."""

from __future__ import annotations

import io
import json
import pickle

import h5py
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from svitt.data import datasets as ds
from svitt.data.frames import clip_key, h5_key
from svitt.data.samplers import TwinBatchSampler
from svitt.data.transforms import EvalTransform, TrainTransform, random_resized_crop_params


def level(k: int) -> int:
    return 10 + 7 * k


def gray_frames(n: int, size=(40, 40), base: int = 0) -> list[np.ndarray]:
    return [np.full((*size, 3), base + level(k), np.uint8) for k in range(n)]


def make_shard(path, videos: dict[str, list[np.ndarray]]):
    """A frame shard in the documented layout, written without the extraction code."""
    vlen = h5py.vlen_dtype(np.dtype("uint8"))
    with h5py.File(path, "w") as f:
        f.attrs["format"] = "svitt-frames"
        for video_id, frames in videos.items():
            data = np.empty(len(frames), dtype=object)
            for i, frame in enumerate(frames):
                buffer = io.BytesIO()
                Image.fromarray(frame).save(buffer, format="JPEG", quality=95)
                data[i] = np.frombuffer(buffer.getvalue(), np.uint8)
            f.create_dataset(h5_key(video_id), data=data, dtype=vlen).attrs["id"] = video_id
    return path


def to_level(video: torch.Tensor) -> np.ndarray:
    """Per-frame mean gray level back from a BEiT-normalised [T, 3, H, W] clip."""
    return ((video * 0.5 + 0.5) * 255).mean(dim=(1, 2, 3)).numpy()


# ------------------------------------------------------------------------------------------------
# sampling and transforms
# ------------------------------------------------------------------------------------------------
def test_segment_indices_by_hand():
    assert ds.segment_indices(32, 4).tolist() == [4, 12, 20, 28]
    assert ds.segment_indices(32, 16).tolist() == list(range(1, 32, 2))
    assert ds.segment_indices(3, 4).tolist() == [0, 1, 1, 2]  # segment middles 0.375, 1.125, 1.875, 2.625
    seen = [set() for _ in range(4)]
    rng = np.random.default_rng(0)
    for _ in range(400):
        for i, pick in enumerate(ds.segment_indices(32, 4, rng)):
            seen[i].add(int(pick))
    assert seen == [set(range(8 * i, 8 * i + 8)) for i in range(4)]  # uniform over each segment, nothing else
    short = [set() for _ in range(4)]
    for _ in range(200):
        for i, pick in enumerate(ds.segment_indices(3, 4, rng)):
            short[i].add(int(pick))
    assert short == [{0}, {0, 1}, {1, 2}, {2}]


def test_normalisation_values():
    red = torch.zeros(2, 3, 40, 40, dtype=torch.uint8)
    red[:, 0] = 255
    out = TrainTransform(32, flip=True)(red, np.random.default_rng(0))
    assert out.dtype == torch.float32 and out.shape == (2, 3, 32, 32)
    assert torch.allclose(out[:, 0], torch.tensor(1.0)) and torch.allclose(out[:, 1:], torch.tensor(-1.0))
    gray = torch.full((1, 3, 40, 40), 128, dtype=torch.uint8)
    imagenet = EvalTransform(32, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))(gray)
    expected = [(128 / 255 - m) / s for m, s in zip((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))]
    assert torch.allclose(imagenet[0, :, 5, 5], torch.tensor(expected), atol=1e-5)


def test_one_crop_for_all_frames():
    """Frames that differ by a constant offset stay so after the transform: same crop and flip."""
    yy, xx = np.mgrid[0:40, 0:48]
    base = np.stack([xx * 4, yy * 5, (xx + yy) * 2], 0).astype(np.uint8)
    video = torch.from_numpy(np.stack([base + 3 * k for k in range(4)]))
    for seed in range(10):
        out = TrainTransform(32)(video, np.random.default_rng(seed))
        for k in range(4):
            assert torch.allclose(out[k] - out[0], torch.tensor(3 * k / 255 / 0.5), atol=1e-4)


def test_flip_switch():
    left_red = torch.zeros(1, 3, 40, 40, dtype=torch.uint8)
    left_red[:, 0, :, :20] = 255
    left_red[:, 2, :, 20:] = 255

    def red_on_left(transform, seed):
        out = transform(left_red, np.random.default_rng(seed))
        return bool(out[0, 0, :, 0].mean() > out[0, 2, :, 0].mean())

    assert all(red_on_left(TrainTransform(32, flip=False), s) for s in range(40))
    flipped = [red_on_left(TrainTransform(32, flip=True), s) for s in range(40)]
    assert 5 < sum(flipped) < 35  # both orientations occur


def test_crop_parameters_respect_scale_and_ratio():
    rng = np.random.default_rng(0)
    for _ in range(300):
        top, left, h, w = random_resized_crop_params(40, 48, (0.5, 1.0), (3 / 4, 4 / 3), rng)
        assert 0 <= top and top + h <= 40 and 0 <= left and left + w <= 48
        assert 0.5 * 40 * 48 * 0.9 <= h * w <= 40 * 48
        assert 3 / 4 * 0.85 <= w / h <= 4 / 3 * 1.15


def test_eval_transform_resizes_short_side_and_centre_crops():
    thirds = torch.zeros(1, 3, 40, 60, dtype=torch.uint8)
    thirds[:, 0, :, :20] = 255
    thirds[:, 1, :, 20:40] = 255
    thirds[:, 2, :, 40:] = 255
    out = EvalTransform(32)(thirds)  # 40x60 -> 32x48, keep columns 8..40 of 48
    assert out.shape == (1, 3, 32, 32)
    assert out[0, :, 16, 2].argmax() == 0 and out[0, :, 16, 16].argmax() == 1 and out[0, :, 16, 29].argmax() == 2


# ------------------------------------------------------------------------------------------------
# datasets
# ------------------------------------------------------------------------------------------------
@pytest.fixture()
def shard(tmp_path):
    videos = {f"v{i}": gray_frames(32, base=i) for i in range(8)}
    videos["odd/id"] = gray_frames(32)
    return make_shard(tmp_path / "a.h5", videos)


def test_pretraining_pairs(shard, tmp_path):
    csv_path = tmp_path / "webvid.csv"
    csv_path.write_text(
        "videoid,contentUrl,duration,page_dir,name,family\n"
        + "".join(f"v{i},file:///x,PT1S,d,caption {i},fam{i // 4}\n" for i in range(8))
        + "gone,file:///y,PT1S,d,lost,fam9\nodd/id,file:///z,PT1S,d,slashed,\n"
    )
    data = ds.VideoTextDataset(shard, csv_path, 4, TrainTransform(32, flip=False), seed=0)
    assert len(data) == 9 and data.missing == ["gone"]
    assert data.groups[:5] == ["fam0"] * 4 + ["fam1"] and data.groups[8] == ""
    item = data[3]
    assert set(item) == {"video", "caption", "video_id", "index"}
    assert item["video"].shape == (4, 3, 32, 32) and item["video"].dtype == torch.float32
    assert item["caption"] == "caption 3" and item["video_id"] == "v3" and item["index"] == 3
    levels = to_level(item["video"]) - 3
    for i, lv in enumerate(levels):  # a random stored frame from each quarter
        assert min(abs(lv - level(k)) for k in range(8 * i, 8 * i + 8)) < 2.5
    assert data[8]["caption"] == "slashed"
    evaluation = ds.VideoTextDataset(shard, csv_path, 4, EvalTransform(32), train=False)
    assert np.allclose(to_level(evaluation[0]["video"]), [level(k) for k in (4, 12, 20, 28)], atol=2.5)
    torch.testing.assert_close(data[3]["video"], data[3]["video"])  # a function of (seed, epoch, index)
    data.set_epoch(1)
    assert not torch.equal(data[3]["video"], item["video"])


def test_nothing_left_is_an_error(shard, tmp_path):
    csv_path = tmp_path / "l.csv"
    csv_path.write_text("id,url,caption\nx1,u,a\nx2,u,b\n")
    with pytest.raises(ds.EmptyDatasetError, match=r"no video of .*l\.csv has frames in .*a\.h5.*2 ids missing"):
        ds.VideoTextDataset(shard, csv_path, 4)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no HDF5 shards"):
        ds.FrameStore(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="frame shard .*nothing does not exist"):
        ds.FrameStore(tmp_path / "nothing")


def test_lazy_handles_and_workers(shard, tmp_path):
    csv_path = tmp_path / "l.csv"
    csv_path.write_text("id,url,caption\n" + "".join(f"v{i},u,c{i}\n" for i in range(8)))
    data = ds.VideoTextDataset(shard, csv_path, 4, TrainTransform(32), seed=7)
    assert data.store._files == {}  # nothing opened at construction
    _ = data[0]
    assert len(data.store._files) == 1
    assert pickle.loads(pickle.dumps(data)).store._files == {}  # never shipped to workers
    single = [b["video"] for b in DataLoader(data, batch_size=4, num_workers=0)]
    multi = [b["video"] for b in DataLoader(data, batch_size=4, num_workers=2)]
    assert all(torch.equal(a, b) for a, b in zip(single, multi)) and single[0].shape == (4, 4, 3, 32, 32)


def test_retrieval_dataset(shard, tmp_path):
    annotation = tmp_path / "ret.json"
    annotation.write_text(
        json.dumps(
            [
                {"video": "v0.mp4", "caption": "zero", "reverse_twin": "v1", "order_twin": "v2"},
                {"video": "v1", "caption": ["one a", "one b"], "reverse_twin": "v0.mp4"},
                {"video": "missing", "caption": "lost"},
                {"video": "v2", "caption": "two", "order_twin": "v0"},
            ]
        )
    )
    data = ds.RetrievalDataset(shard, annotation, 4, EvalTransform(32))
    assert data.video_ids == ["v0", "v1", "v2"] and data.missing == ["missing"]
    assert data.texts == ["zero", "one a", "one b", "two"]
    assert data.text_to_video == [0, 1, 1, 2] and data.video_to_texts == [[0], [1, 2], [3]]
    assert data.twin_pairs == [(0, 1, "reverse"), (0, 2, "order")]
    assert np.allclose(to_level(data[1]["video"]) - 1, [level(k) for k in (4, 12, 20, 28)], atol=2.5)
    assert torch.equal(data[1]["video"], data[1]["video"])
    paragraph = ds.RetrievalDataset(shard, annotation, 4, EvalTransform(32), paragraph=True)
    assert paragraph.texts == ["zero", "one a one b", "two"] and paragraph.text_to_video == [0, 1, 2]


def test_qa_dataset(shard, tmp_path):
    annotation = tmp_path / "qa.json"
    annotation.write_text(
        json.dumps(
            [
                {"video": "v0", "question": "what?", "answer": "red"},
                {"video": "v1", "question": "which?", "answer": "zebra"},
                {"video": "nope", "question": "?", "answer": "red"},
            ]
        )
    )
    answers = tmp_path / "answers.json"
    answers.write_text(json.dumps(["blue", "red"]))
    data = ds.QADataset(shard, annotation, 8, EvalTransform(32), answer_list=answers)
    assert len(data) == 2 and data.answer_list == ["blue", "red"]
    item = data[0]
    assert item["video"].shape == (8, 3, 32, 32) and item["question"] == "what?" and item["answer"] == "red"
    assert item["answer_index"] == 1 and data[1]["answer_index"] == -1 and item["video_id"] == "v0"


EGO_HEADER = (
    "clip_idx\tvideo_uid\tvideo_dur\tnarration_source\tnarration_ind\tnarration_time\tclip_start\tclip_end"
    "\tclip_text\ttag_verb\ttag_noun\n"
)


def ego_row(i, uid, t, start, end, text, verbs="[0]", nouns="[1, 3]"):
    return f"{i}\t{uid}\t100\tn\t{i}\t{t}\t{start}\t{end}\t{text}\t{verbs}\t{nouns}\n"


@pytest.fixture()
def ego(tmp_path):
    clips = [
        ("A", 10, 9.5, 10.5),
        ("A", 20, 19.5, 20.5),
        ("A", 20.4, 20.0, 21.0),
        ("A", 70, 69.5, 70.5),
        ("B", 5, 4.5, 5.5),
    ]
    videos = {clip_key(uid, s, e): gray_frames(16, base=3 * n) for n, (uid, _t, s, e) in enumerate(clips)}
    shard = make_shard(tmp_path / "ego.h5", videos)
    csv_path = tmp_path / "egoclip.csv"
    csv_path.write_text(
        EGO_HEADER
        + "".join(ego_row(n, uid, t, s, e, f"#C C does {n}") for n, (uid, t, s, e) in enumerate(clips))
        + ego_row(9, "C", 1, 0.5, 1.5, "#C C is missing")
    )
    return shard, csv_path, clips


def test_egoclip_tags_and_scene_aware_negatives(ego):
    shard, csv_path, _ = ego
    data = ds.EgoClipDataset(shard, csv_path, 4, TrainTransform(32), num_nouns=5, num_verbs=2, seed=0)
    assert len(data) == 5 and data.missing == ["C_0.500_1.500"]
    item = data[0]
    assert item["nouns"].tolist() == [0, 1, 0, 1, 0] and item["verbs"].tolist() == [1, 0]
    assert item["video"].shape == item["neg_video"].shape == (4, 3, 32, 32)
    assert item["video_id"] == "A" and item["clip_id"] == "A_9.500_10.500"
    sources = {}
    for index in range(5):
        negatives = set()
        for epoch in range(20):
            data.set_epoch(epoch)
            neg, source = data.negative_index(index, data._rng(index))
            negatives.add(neg)
            sources[index] = source
        if index == 0:
            assert negatives == {1, 2} and sources[0] == "bucket"  # same video, same 60 s bucket
        if index == 1:
            assert negatives == {0}  # clip 2 overlaps clip 1 in time, clip 0 does not
        if index == 3:
            assert negatives == {2} and sources[3] == "video"  # alone in its bucket: nearest clip of the video
        if index == 4:
            assert sources[4] == "other" and 4 not in negatives  # alone in its video
    item = data[3]
    assert item["neg_source"] == "video" and item["neg_caption"] == "#C C does 2" and item["neg_index"] == 2
    assert np.allclose(to_level(item["neg_video"]).mean() - 6, np.mean([level(k) for k in range(16)]), atol=6)


def test_egoclip_bad_tags_and_single_clip(ego, tmp_path):
    shard, _, clips = ego
    bad = tmp_path / "bad.csv"
    bad.write_text(EGO_HEADER + ego_row(0, "A", 10, 9.5, 10.5, "x", nouns="[7]"))
    with pytest.raises(ValueError, match=r"bad\.csv line 2: tag_noun \[7\] outside \[0, 5\)"):
        ds.EgoClipDataset(shard, bad, 4, num_nouns=5, num_verbs=2)
    one = tmp_path / "one.csv"
    one.write_text(EGO_HEADER + ego_row(0, "A", 10, 9.5, 10.5, "x"))
    single = ds.EgoClipDataset(shard, one, 4, TrainTransform(32), num_nouns=5, num_verbs=2, seed=0)
    assert single[0]["neg_source"] == "self"


def test_egomcq_dataset(ego, tmp_path):
    shard, _, clips = ego

    def clip(n):
        uid, t, s, e = clips[n]
        return {"video_uid": uid, "clip_start": s, "clip_end": e, "clip_text": f"#C C does {n}", "narration_time": t}

    mcq = {
        "0": {
            "query": clip(2),
            "choices": {str(k): clip(n) for k, n in enumerate([0, 1, 2, 3, 4])},
            "answer": 2,
            "types": 1,
        },
        "1": {
            "query": clip(1),
            "choices": {str(k): clip(n) for k, n in enumerate([4, 1, 0, 2, 3])},
            "answer": 1,
            "types": 2,
        },
        "2": {
            "query": clip(0),
            "choices": {**{str(k): clip(k) for k in range(4)}, "4": {**clip(0), "video_uid": "absent"}},
            "answer": 0,
            "types": 2,
        },
    }
    path = tmp_path / "egomcq.json"
    path.write_text(json.dumps(mcq))
    data = ds.EgoMCQDataset(shard, path, 4, EvalTransform(32))
    assert len(data) == 2 and data.missing == ["absent_9.500_10.500"]
    item = data[1]
    assert item["choices"].shape == (5, 4, 3, 32, 32) and item["query"] == "#C C does 1"
    assert item["answer"] == 1 and item["type"] == 2 and item["question_id"] == "1"
    bases = [3 * n for n in [4, 1, 0, 2, 3]]  # choice k shows clip n's frames
    expected_mid = [level(k) for k in (2, 6, 10, 14)]
    for k, base in enumerate(bases):
        assert np.allclose(to_level(item["choices"][k]) - base, expected_mid, atol=2.5)
    batch = next(iter(DataLoader(data, batch_size=2)))
    assert batch["choices"].shape == (2, 5, 4, 3, 32, 32) and batch["type"].tolist() == [1, 2]


# ------------------------------------------------------------------------------------------------
# sampler
# ------------------------------------------------------------------------------------------------
def family_groups(n_families: int, size: int = 4) -> list[str]:
    return [f"f{i // size}" for i in range(n_families * size)]


def test_twins_share_batches_and_ranks_partition_the_epoch():
    groups = family_groups(24)
    batches_by_rank = []
    for rank in range(2):
        sampler = TwinBatchSampler(groups, 16, rank=rank, world_size=2, seed=5)
        sampler.set_epoch(3)
        batches_by_rank.append(list(sampler))
        assert len(batches_by_rank[-1]) == len(sampler) == 3  # 96 items, 6 batches of 16, 3 per rank
    everything = [i for batches in batches_by_rank for b in batches for i in b]
    assert sorted(everything) == list(range(96))  # disjoint ranks, nothing lost
    for batches in batches_by_rank:
        for batch in batches:
            assert len(batch) == 16
            assert all(sum(groups[j] == groups[i] for j in batch) == 4 for i in batch)  # whole families


def test_sampler_is_deterministic_and_changes_with_epoch():
    groups = family_groups(30)
    a = TwinBatchSampler(groups, 8, seed=1)
    b = TwinBatchSampler(groups, 8, seed=1)
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first
    assert list(TwinBatchSampler(groups, 8, seed=2)) != first


def test_sampler_split_groups_padding_and_singletons():
    groups = family_groups(10)  # 40 items, batch 12: a family must straddle some batch border
    sampler = TwinBatchSampler(groups, 12, seed=0, drop_last=True)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 3 and all(len(b) == 12 for b in batches)
    assert len(set(i for b in batches for i in b)) == 36
    padded = TwinBatchSampler(groups, 12, seed=0, drop_last=False, world_size=3, rank=2)
    assert len(list(padded)) == len(padded) == 2  # 4 batches (last padded) -> 6 across 3 ranks
    assert all(len(b) == 12 for b in padded)
    plain = TwinBatchSampler([None] * 10, 5, seed=0, shuffle=False)
    assert list(plain) == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    with pytest.raises(ValueError, match=r"rank must be in \[0, world_size=2\), got 2"):
        TwinBatchSampler(groups, 4, rank=2, world_size=2)
    with pytest.raises(ValueError, match="fewer than world_size 8"):
        TwinBatchSampler(groups, 12, world_size=8)


def test_sampler_drives_a_dataloader(shard, tmp_path):
    csv_path = tmp_path / "l.csv"
    csv_path.write_text("id,url,caption,family\n" + "".join(f"v{i},u,c{i},f{i // 2}\n" for i in range(8)))
    data = ds.VideoTextDataset(shard, csv_path, 4, TrainTransform(32), seed=0)
    sampler = TwinBatchSampler(data.groups, 4, seed=0)
    for batch in DataLoader(data, batch_sampler=sampler):
        ids = sorted(int(i) for i in batch["index"])
        assert batch["video"].shape == (4, 4, 3, 32, 32)
        assert [i // 2 for i in ids] == [ids[0] // 2] * 2 + [ids[2] // 2] * 2  # two whole pairs
