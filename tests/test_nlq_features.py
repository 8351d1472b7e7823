"""NLQ window features exported in the layout VSLNet's Ego4D preparation reads: {video_uid}.pt
float32 [N, D] per video at 1.875 features/s (7.5 fps, windows of 4 every 4 frames), every window
encoded (none left zero), read back here step by step as VSLNet's prepare_ego4d_dataset.py does."""

import json
import math

import h5py
import pytest
import torch

import svitt
from svitt.data.datasets import FrameStore
from svitt.data.transforms import EvalTransform
from svitt.evaluation import window_starts
from svitt.evaluation.nlq import clip_feature_span
from svitt.training.checkpoint import export_model
from tests.conftest import script

# VSLNet's Ego4D constants (NLQ/VSLNet/utils/prepare_ego4d_dataset.py)
CANONICAL_VIDEO_FPS, FEATURE_WINDOW_SIZE = 30.0, 16.0
FEATURES_PER_SEC = CANONICAL_VIDEO_FPS / FEATURE_WINDOW_SIZE


def vslnet_nearest_frame(time, floor_or_ceil):
    """VSLNet's get_nearest_frame, as written (int() first: its ceil rounds down too)."""
    return floor_or_ceil(int(time * CANONICAL_VIDEO_FPS / FEATURE_WINDOW_SIZE))


def test_480_s_clip_at_7_5_fps_gives_900_windows_as_vslnet_expects():
    assert 7.5 / 4 == FEATURES_PER_SEC == 1.875
    assert len(window_starts(int(480 * 7.5), 4, 4)) == 900 == vslnet_nearest_frame(480.0, math.ceil)
    assert window_starts(3603, 4, 4)[-1] == 3596  # the last 3 frames start no (partial, zero-padded) window


def test_clip_feature_span_by_hand():
    # 2 features/s; clip [3.2, 9.0) s: features 6..17 (6 starts at 3.0 s, i.e. 0.2 s before the clip)
    assert clip_feature_span(3.2, 9.0, 2.0, 100) == (6, 18, pytest.approx(-0.2))
    assert clip_feature_span(3.0, 9.0, 2.0, 100)[:2] == (6, 18)  # a boundary on a feature boundary
    assert clip_feature_span(3.0, 9.0, 2.0, 10)[:2] == (6, 10)  # the video ends early: what exists


@pytest.fixture(scope="module")
def exported(pipeline, tmp_path_factory):
    """Whole ego videos of the session corpus (12 s at 10 fps) extracted at 7.5 fps, and a tiny
    random SViTT model exported as training exports it."""
    corpus, res = pipeline
    root = tmp_path_factory.mktemp("nlq_features")
    shard = root / "frames" / "shard-0.h5"
    assert (
        script("extract_frames").main(
            [
                "--videos",
                str(res / "videos" / "ego.csv"),
                "--out",
                str(shard),
                "--failures",
                str(root / "failures.csv"),
                "--fps",
                "7.5",
                "--frames",
                "1000",
                "--short-side",
                "40",
                "--no-progress",
            ]
        )
        == 0
    )
    torch.manual_seed(0)
    cfg = {"video": {"preset": "tiny", "frames": 4}, "text": {"preset": "tiny", "vocab_size": 200}, "embed_dim": 16}
    model = svitt.build_model(cfg)
    data = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
    export_model(model, root / "model", {"name": "tiny", "model_config": model.cfg, "train_config": {"data": data}})
    return shard, root / "model" / "model.safetensors", model.eval()


@pytest.mark.parametrize("kind", ["cls", "projected"])
def test_exported_pt_files_read_as_vslnet_prepares_them(pipeline, exported, tmp_path, kind):
    corpus, _ = pipeline
    shard, weights, model = exported
    out = tmp_path / "features"
    assert (
        script("nlq_features").main(
            [
                "--model",
                str(weights),
                "--shards",
                str(shard),
                "--out",
                str(tmp_path / "f.h5"),
                "--pt-dir",
                str(out),
                "--kind",
                kind,
                "--batch-size",
                "5",
                "--no-progress",
            ]
        )
        == 0
    )
    info = json.loads((out / "features.json").read_text())
    assert (info["kind"], info["fps"], info["window"], info["stride"]) == (kind, 7.5, 4, 4)
    assert info["features_per_second"] == FEATURES_PER_SEC
    dim = 64 if kind == "cls" else 16  # tiny encoder width / embed_dim
    assert info["dim"] == dim

    # VSLNet: for each clip of the annotations, torch.load("{video_uid}.pt"), keep
    # [nearest(start, floor) : nearest(end, ceil) + 1] and record its length in feature_shapes.json
    nlq = json.loads((corpus / "nlq_val.json").read_text())
    feature_sizes, shapes = {}, json.loads((out / "feature_shapes.json").read_text())
    for video in nlq["videos"]:
        feature = torch.load(out / f"{video['video_uid']}.pt")  # VSLNet's call, as written
        assert feature.dtype == torch.float32 and feature.ndim == 2 and feature.shape[1] == dim
        assert feature.is_contiguous() and shapes[video["video_uid"]] == feature.shape[0]
        for clip in video["clips"]:
            clip_start = vslnet_nearest_frame(clip["video_start_sec"], math.floor)
            clip_end = vslnet_nearest_frame(clip["video_end_sec"], math.ceil)
            clip_feature = feature[clip_start : clip_end + 1]
            feature_sizes[clip["clip_uid"]] = clip_feature.shape[0]
            # its num_frames (the clip's feature count the grounder is told) is what the file holds
            duration = clip["video_end_sec"] - clip["video_start_sec"]
            assert clip_feature.shape[0] == vslnet_nearest_frame(duration, math.ceil) == int(12 * 1.875) == 22
    assert len(feature_sizes) == 5

    # no window left zero: the last (in a partial batch of 2 after 4 x 5) is the model's output on frames 84..87
    store = FrameStore(shard)
    uid = nlq["videos"][0]["video_uid"]
    assert store.num_frames(uid) == 90
    feature = torch.load(out / f"{uid}.pt", weights_only=True)
    assert feature.shape[0] == 22 and feature.abs().sum(1).min() > 0
    clip = EvalTransform(32)(store.read(uid, [84, 85, 86, 87]))[None]
    with torch.no_grad():
        cls = model.encode_video(clip)[0][:, 0]
        expected = cls if kind == "cls" else model.vision_proj(cls)  # EgoVLP: the unnormalised projection
    torch.testing.assert_close(feature[-1], expected[0], rtol=0, atol=1e-5)
    with h5py.File(tmp_path / "f.h5") as h5:  # the HDF5 holds the same numbers
        assert h5.attrs["kind"] == kind and h5.attrs["features_per_second"] == 1.875
        torch.testing.assert_close(torch.from_numpy(h5[uid][:]), feature)
        assert h5[uid].attrs["start_seconds"][1] == pytest.approx(4.5 / 7.5)  # frame 4, a segment middle


def test_shards_without_a_fixed_rate_are_refused(pipeline, exported, tmp_path, capsys):
    _, res = pipeline
    _, weights, _ = exported
    with pytest.raises(ValueError, match="one fixed fps .*fps \\[0.0\\]"):
        script("nlq_features").main(
            [
                "--model",
                str(weights),
                "--shards",
                str(res / "frames" / "ego"),
                "--out",
                str(tmp_path / "f.h5"),
                "--no-progress",
            ]
        )


def test_a_capped_video_is_refused():
    check = script("nlq_features").check_fixed_rate
    check("v", {"timestamps": [0] * 90, "duration": 12.0}, 7.5)
    with pytest.raises(ValueError, match="video v: 50 frames stored over 12.0 s, not 7.5 fps .*max_frames"):
        check("v", {"timestamps": [0] * 50, "duration": 12.0}, 7.5)


def test_a_video_recorded_below_the_rate_names_its_own_fps():
    """A 4 fps source cannot give 7.5 fps windows: the error says so instead of asking for more
    frames (the rehearsal's first miniature Ego4D videos were 4 fps)."""
    check = script("nlq_features").check_fixed_rate
    with pytest.raises(ValueError, match="160 frames stored over 40.0 s, not 7.5 fps .*the video itself has 4 fps"):
        check("v", {"timestamps": [0] * 160, "duration": 40.0, "source_fps": 4.0}, 7.5)
