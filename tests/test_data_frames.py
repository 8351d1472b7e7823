"""Frame extraction: expected frame counts and contents, clips across chunk boundaries, a failure
reason for every kind of bad video, and shards that never look valid after a crash."""

from __future__ import annotations

import csv
import importlib.util
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import av
import h5py
import numpy as np
import pytest
from PIL import Image

from svitt.data import download as dl
from svitt.data import frames as fr
from svitt.data.datasets import FrameStore
from svitt.data.mp4 import write_mp4

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("extract_cli", REPO / "workflow_scripts" / "extract_frames.py")
cli = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cli)


def gray_video(path: Path, values, size=(64, 80), fps=10) -> Path:
    """A video whose frame i is uniformly gray at values[i] (so frames can be identified)."""
    frames = np.stack([np.full((*size, 3), v, np.uint8) for v in values])
    write_mp4(path, frames, fps)
    return path


def jpeg_means(h5: h5py.File, key: str) -> np.ndarray:
    return np.array([np.asarray(Image.open(io.BytesIO(b.tobytes()))).mean() for b in h5[fr.h5_key(key)][:]])


def read_failures(path: Path) -> dict[str, str]:
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        assert reader.fieldnames == ["id", "reason"]
        return {r["id"]: r["reason"] for r in reader}


def test_uniform_sampling_by_hand():
    assert fr.uniform_indices(32, 8).tolist() == [2, 6, 10, 14, 18, 22, 26, 30]
    assert fr.uniform_indices(10, 4).tolist() == [1, 3, 6, 8]  # floor((i + .5) * 2.5)
    assert fr.uniform_indices(5, 8).tolist() == [0, 1, 2, 3, 4]
    assert fr.span_indices(10, 100, 2.0, 3.0).tolist() == list(range(20, 30))
    assert fr.span_indices(10, 100, 2.05, 2.31).tolist() == [21, 22, 23]
    assert fr.span_indices(10, 25, 2.0, 9.0).tolist() == list(range(20, 25))  # clipped at the end


def test_whole_videos_frame_counts_attributes_and_content(tmp_path):
    src = tmp_path / "videos"
    src.mkdir()
    ramp = [int(v) for v in np.linspace(20, 235, 40)]
    gray_video(src / "ramp.mp4", ramp, fps=8)
    gray_video(src / "short.mp4", [50, 100, 150], fps=8)
    out, failures = tmp_path / "frames" / "shard.h5", tmp_path / "frames" / "failures.csv"
    code = cli.main(
        [
            "--videos",
            str(src),
            "--out",
            str(out),
            "--failures",
            str(failures),
            "--frames",
            "8",
            "--short-side",
            "40",
            "--no-progress",
        ]
    )
    assert code == 0 and read_failures(failures) == {}
    with h5py.File(out) as h5:
        assert h5.attrs["format"] == "svitt-frames" and h5.attrs["short_side"] == 40
        ds = h5["ramp"]
        assert ds.shape == (8,) and ds.dtype == h5py.vlen_dtype(np.uint8)
        expected = [2, 7, 12, 17, 22, 27, 32, 37]  # floor((i + .5) * 40 / 8): spread over the whole video
        assert ds.attrs["frame_indices"].tolist() == expected
        assert np.allclose(ds.attrs["timestamps"], np.array(expected) / 8)
        assert ds.attrs["source_num_frames"] == 40 and ds.attrs["source_fps"] == 8 and ds.attrs["duration"] == 5
        assert (ds.attrs["height"], ds.attrs["width"]) == (40, 50)  # 64x80 -> short side 40
        assert Image.open(io.BytesIO(ds[0].tobytes())).size == (50, 40)
        assert np.allclose(jpeg_means(h5, "ramp"), [ramp[i] for i in expected], atol=3)
        assert h5["short"].shape == (3,)  # fewer frames than asked: all of them


def test_demo_videos_give_32_frames_of_40_pixels(tmp_path):
    """The demo geometry: 64x64 clips of 32 frames -> 32 stored frames, 40x40; decord reads them."""
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 255, (32, 64, 64, 3), dtype=np.uint8)
    write_mp4(tmp_path / "clip.mp4", frames, 8)
    (job_result,) = fr.run_job(fr.VideoJob("clip", tmp_path / "clip.mp4"), fr.ExtractConfig(32, None, 40))
    assert len(job_result.jpegs) == 32 and job_result.attrs["decoder"] == "decord"
    assert job_result.attrs["frame_indices"].tolist() == list(range(32))
    assert (job_result.attrs["height"], job_result.attrs["width"]) == (40, 40)


def test_decord_fallback_for_widths_it_cannot_read(tmp_path):
    """decord 0.6 fails on some small widths (48 px); PyAV reads them instead and says so."""
    gray_video(tmp_path / "w48.mp4", [30, 60, 90, 120], size=(48, 48))
    (res,) = fr.run_job(fr.VideoJob("w48", tmp_path / "w48.mp4"), fr.ExtractConfig(4, None, 40))
    assert res.reason == "" and res.attrs["decoder"] == "pyav"
    means = [np.asarray(Image.open(io.BytesIO(b))).mean() for b in res.jpegs]
    assert np.allclose(means, [30, 60, 90, 120], atol=3)


def test_clips_cross_chunk_boundaries(tmp_path):
    """A 6 s video in 2.5 s chunks (25 frames each); the clip [2.0, 3.0) takes frames 20-29."""
    values = [int(v) for v in np.linspace(10, 245, 60)]
    chunk_dir = tmp_path / "ego" / "uid-1"
    chunk_dir.mkdir(parents=True)
    for k in range(3):
        gray_video(chunk_dir / f"{k}.mp4", values[25 * k : 25 * (k + 1)], size=(64, 64))
    egoclip = tmp_path / "egoclip.csv"
    egoclip.write_text(
        "clip_idx\tvideo_uid\tvideo_dur\tnarration_source\tnarration_ind\tnarration_time\tclip_start"
        "\tclip_end\tclip_text\ttag_verb\ttag_noun\n"
        "0\tuid-1\t6\tn\t0\t2.5\t2.0\t3.0\t#C C x\t[0]\t[0]\n"
        "1\tuid-1\t6\tn\t1\t9.5\t9.0\t10.0\t#C C beyond the end\t[0]\t[0]\n"
        "2\tuid-gone\t6\tn\t0\t1.0\t0.5\t1.5\t#C C missing video\t[0]\t[0]\n"
    )
    out, failures = tmp_path / "ego.h5", tmp_path / "fail.csv"
    code = cli.main(
        [
            "--videos",
            str(tmp_path / "ego"),
            "--clips",
            str(egoclip),
            "--out",
            str(out),
            "--failures",
            str(failures),
            "--frames",
            "16",
            "--short-side",
            "32",
            "--no-progress",
            "--max-failed-fraction",
            "1",
        ]
    )
    assert code == 0
    key = fr.clip_key("uid-1", "2.0", "3.0")
    assert key == "uid-1_2.000_3.000"
    with h5py.File(out) as h5:
        ds = h5[key]
        assert ds.attrs["frame_indices"].tolist() == list(range(20, 30))
        assert np.allclose(ds.attrs["timestamps"], np.arange(20, 30) / 10)
        assert (
            ds.attrs["video_uid"] == "uid-1" and ds.attrs["clip_start"] == 2.0 and ds.attrs["source_num_frames"] == 60
        )
        assert np.allclose(jpeg_means(h5, key), values[20:30], atol=3)
    reasons = read_failures(failures)
    assert reasons["uid-1_9.000_10.000"] == "clip [9, 10] s lies outside the video (0 to 6.000 s)"
    assert reasons["uid-gone_0.500_1.500"] == "video_uid uid-gone not found in --videos"


def bad_videos(folder: Path, good: bytes) -> dict[str, str]:
    """Write one file per kind of bad input; return id -> expected reason prefix."""
    (folder / "zero.mp4").write_bytes(b"")
    (folder / "html.mp4").write_text("<!DOCTYPE html><html><body>404</body></html>")
    (folder / "noise.mp4").write_bytes(bytes(np.random.default_rng(1).integers(0, 255, 4000, dtype=np.uint8)))
    (folder / "truncated.mp4").write_bytes(good[:-40])
    with av.open(str(folder / "audio.mp4"), "w") as container:  # audio only
        stream = container.add_stream("aac", rate=16000)
        for i in range(10):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, i * 1024
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    garbage_moov = b"moov" + bytes(np.random.default_rng(2).integers(0, 255, 200, dtype=np.uint8))
    (folder / "nostream.mp4").write_bytes(
        good[: good.index(b"ftyp") + 28] + (len(garbage_moov) + 4).to_bytes(4, "big") + garbage_moov
    )
    broken = bytearray(good)  # intact boxes, random H.264 payload
    at = broken.index(b"mdat")
    size = int.from_bytes(broken[at - 4 : at], "big")
    broken[at + 4 : at - 4 + size] = np.random.default_rng(3).integers(0, 255, size - 8, dtype=np.uint8).tobytes()
    (folder / "undecodable.mp4").write_bytes(bytes(broken))
    return {
        "zero": "zero.mp4: empty file (0 bytes)",
        "html": "html.mp4: HTML page, not a video",
        "noise": "noise.mp4: unrecognised content",
        "truncated": "truncated.mp4: truncated MP4: ",
        "audio": "audio.mp4: no video stream (audio-only: 1 audio stream(s))",
        "nostream": "nostream.mp4: no video stream (streams: none)",
        "undecodable": "undecodable.mp4: undecodable (InvalidDataError",
    }


def test_every_bad_video_gets_its_reason_and_the_rest_proceed(tmp_path):
    src = tmp_path / "videos"
    src.mkdir()
    good = gray_video(src / "good.mp4", [40, 80, 120, 160]).read_bytes()
    expected = bad_videos(src, good)
    out, failures = tmp_path / "shard.h5", tmp_path / "failures.csv"
    args = [
        "--videos",
        str(src),
        "--out",
        str(out),
        "--failures",
        str(failures),
        "--frames",
        "4",
        "--no-progress",
        "--workers",
        "2",
    ]
    assert cli.main(args + ["--max-failed-fraction", "0.9"]) == 0
    reasons = read_failures(failures)
    assert sorted(reasons) == sorted(expected)
    for video_id, prefix in expected.items():
        assert reasons[video_id].startswith(prefix), (video_id, reasons[video_id])
    with h5py.File(out) as h5:
        assert list(h5) == ["good"]
    assert cli.main(args + ["--max-failed-fraction", "0.5"]) == 1  # 7 of 8 failed


def test_manifest_input_uses_ok_rows_only(tmp_path):
    gray_video(tmp_path / "a.mp4", [10, 20])
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(
        "id,status,reason,bytes,sha256,path\na/with slash,ok,,1,x,a.mp4\nb,failed,HTTP 404 Not Found,,,\n"
    )
    assert fr.discover_videos(manifest) == {"a/with slash": (tmp_path / "a.mp4").resolve()}
    out = tmp_path / "s.h5"
    assert (
        cli.main(["--videos", str(manifest), "--out", str(out), "--failures", str(tmp_path / "f.csv"), "--no-progress"])
        == 0
    )
    store = FrameStore(out)
    assert "a/with slash" in store and store.num_frames("a/with slash") == 2
    with h5py.File(out) as h5:
        assert list(h5) == ["a%2Fwith slash"]  # no group created by the slash
    for odd in ["a/b", ".hidden", "%2F", "50%", "..", "x/../y"]:
        assert fr.h5_id(fr.h5_key(odd)) == odd and "/" not in fr.h5_key(odd) and not fr.h5_key(odd).startswith(".")


def test_folder_videos_named_by_their_annotations(tmp_path):
    """--videos FOLDER --ids ANNOTATIONS: the listed videos, read where they are (a file named by
    the id, <id>.mp4, or a chunk folder); a listed video that is not there is a failure."""
    src = tmp_path / "videos"
    (src / "u2").mkdir(parents=True)
    gray_video(src / "video1.mp4", [10, 20, 30])
    gray_video(src / "u2" / "0.mp4", [40, 50])
    gray_video(src / "unlisted.mp4", [60])
    listing = tmp_path / "ret.json"
    listing.write_text(
        '[{"video": "video1.mp4", "caption": "a"}, {"video": "u2", "caption": "b"}, '
        '{"video": "gone.mp4", "caption": "c"}]'
    )
    out, failures = tmp_path / "s.h5", tmp_path / "f.csv"
    assert (
        cli.main(
            [
                "--videos",
                str(src),
                "--ids",
                str(listing),
                "--out",
                str(out),
                "--failures",
                str(failures),
                "--max-failed-fraction",
                "0.5",
                "--no-progress",
            ]
        )
        == 0
    )
    store = FrameStore(out)
    assert sorted(store.shard_of) == ["u2", "video1.mp4"]
    assert store.attrs("u2")["source"] == str(src / "u2") and store.num_frames("video1.mp4") == 3
    reason = read_failures(failures)["gone.mp4"]
    assert reason.startswith(f"not found in folder {src} (looked for gone.<mp4|webm|mkv|mov|avi|m4v|")
    assert reason.endswith("> or a chunk folder gone/; nothing there has a similar name)")


def test_several_id_lists_extract_the_union(tmp_path):
    """--ids TEST TRAIN (a finetuning dataset read in place): the videos of both splits, once each."""
    src = tmp_path / "videos"
    src.mkdir()
    for name, level in (("a.mp4", 10), ("b.mp4", 20), ("c.mp4", 30), ("unlisted.mp4", 40)):
        gray_video(src / name, [level])
    test, train = tmp_path / "test.json", tmp_path / "train.json"
    test.write_text('[{"video": "a.mp4", "caption": "x"}, {"video": "b.mp4", "caption": "y"}]')
    train.write_text('[{"video": "b.mp4", "caption": "y"}, {"video": "c.mp4", "caption": "z"}]')
    out, failures = tmp_path / "s.h5", tmp_path / "f.csv"
    assert (
        cli.main(
            [
                "--videos",
                str(src),
                "--ids",
                str(test),
                str(train),
                "--out",
                str(out),
                "--failures",
                str(failures),
                "--no-progress",
            ]
        )
        == 0
    )
    assert sorted(FrameStore(out).shard_of) == ["a.mp4", "b.mp4", "c.mp4"]
    assert read_failures(failures) == {}


def test_shards_partition_the_videos(tmp_path):
    """Shard i of the extraction holds exactly the videos shard i of the download fetched."""
    items = [dl.VideoItem(i, f"v{i}", None) for i in range(50)]
    parts = [dl.select_items(items, k, 3) for k in range(3)]
    ids = [item.id for part in parts for item in part]
    assert sorted(ids) == sorted(item.id for item in items) and len(set(ids)) == 50
    assert all(len(p) > 5 for p in parts)
    assert [i.id for i in dl.select_items(list(reversed(items)), 1, 3)] == [i.id for i in reversed(parts[1])]
    src = tmp_path / "videos"
    src.mkdir()
    for i in range(6):
        gray_video(src / f"v{i}.mp4", [10 * i, 20])
    stored = []
    for k in range(3):
        out = tmp_path / f"s{k}.h5"
        assert (
            cli.main(
                [
                    "--videos",
                    str(src),
                    "--out",
                    str(out),
                    "--failures",
                    str(tmp_path / f"f{k}.csv"),
                    "--num-shards",
                    "3",
                    "--shard-index",
                    str(k),
                    "--no-progress",
                ]
            )
            == 0
        )
        stored.append(sorted(FrameStore(out).shard_of))
        assert stored[-1] == sorted(f"v{i}" for i in range(6) if dl.shard_of(f"v{i}", 3) == k)
    assert sorted(sum(stored, [])) == [f"v{i}" for i in range(6)]


def test_error_mid_shard_leaves_nothing_that_looks_valid(tmp_path, monkeypatch):
    src = tmp_path / "videos"
    src.mkdir()
    for i in range(4):
        gray_video(src / f"v{i}.mp4", [10 * i + 10] * 3)
    real, calls = fr.run_job, []

    def failing(job, cfg):
        calls.append(job.id)
        if len(calls) == 3:
            raise MemoryError("simulated crash")
        return real(job, cfg)

    monkeypatch.setattr(fr, "run_job", failing)
    out = tmp_path / "out" / "shard.h5"
    with pytest.raises(MemoryError):
        fr.extract_to_shard(
            [fr.VideoJob(f"v{i}", src / f"v{i}.mp4") for i in range(4)],
            out,
            fr.ExtractConfig(3),
            workers=1,
            progress=False,
        )
    assert list(out.parent.iterdir()) == []


def test_killed_extraction_leaves_no_valid_shard(tmp_path):
    src = tmp_path / "videos"
    src.mkdir()
    for i in range(30):
        gray_video(src / f"v{i:02d}.mp4", [i * 8 + 5] * 3)
    out_dir = tmp_path / "frames"
    code = (
        "import sys, time; from svitt.data import frames as fr; real = fr.run_job\n"
        "def slow(job, cfg):\n    time.sleep(0.1); return real(job, cfg)\n"
        "fr.run_job = slow\n"
        "sys.argv = ['x'] + sys.argv[1:]\n"
        f"path = {str(REPO / 'workflow_scripts' / 'extract_frames.py')!r}\n"
        "exec(compile(open(path).read(), path, 'exec'), {'__file__': path, '__name__': '__main__'})\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            code,
            "--videos",
            str(src),
            "--out",
            str(out_dir / "s.h5"),
            "--failures",
            str(out_dir / "f.csv"),
            "--no-progress",
        ],
        env=env,
    )
    try:
        for _ in range(2000):
            if out_dir.exists() and any(p.name.startswith(".s.h5.tmp") for p in out_dir.iterdir()):
                break
            time.sleep(0.01)
        else:
            pytest.fail("extraction never started writing")
        time.sleep(0.3)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (out_dir / "s.h5").exists()
    with pytest.raises(FileNotFoundError, match="no HDF5 shards"):
        FrameStore(out_dir)


def test_unexpected_errors_are_reported_not_fatal(tmp_path, monkeypatch):
    gray_video(tmp_path / "a.mp4", [10, 20])

    def broken_encoder(frames, cfg):
        raise OSError("encoder exploded")

    monkeypatch.setattr(fr, "encode_jpegs", broken_encoder)
    (result,) = fr.run_job(fr.VideoJob("a", tmp_path / "a.mp4"), fr.ExtractConfig(2))
    assert result.jpegs is None and result.reason == "unexpected error: OSError: encoder exploded"
