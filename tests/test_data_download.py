"""Download stage: a real HTTP server on 127.0.0.1 serves good and bad videos; every bad input must
end as a manifest row whose reason says what went wrong."""

from __future__ import annotations

import csv
import hashlib
import http.server
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest
from conftest import REPO, script

from svitt.data import download as dl
from svitt.data.mp4 import write_mp4

cli = script("download")


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """A small valid mp4 and a larger one (noise frames, for throttled transfers)."""
    folder = tmp_path_factory.mktemp("src")
    rng = np.random.default_rng(0)
    small = folder / "small.mp4"
    write_mp4(small, rng.integers(0, 255, (4, 32, 32, 3), dtype=np.uint8), fps=4)
    large = folder / "large.mp4"
    write_mp4(large, rng.integers(0, 255, (60, 64, 64, 3), dtype=np.uint8), fps=8, crf=10)
    return {"small": small.read_bytes(), "large": large.read_bytes(), "small_path": small}


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False


def make_handler(server_state):
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def do_GET(self):
            state = server_state
            with state["lock"]:
                state["log"].append((self.path, self.headers.get("Range")))
                state["count"][self.path] = state["count"].get(self.path, 0) + 1
                count = state["count"][self.path]
            small, large = state["videos"]["small"], state["videos"]["large"]
            p = self.path
            try:
                if p.startswith("/video/"):
                    return self.send_body(small)
                if p.startswith("/slow/"):
                    return self.send_body(large, piece=2048, delay=0.01)
                if p == "/404.mp4":
                    return self.send_status(404)
                if p.startswith("/flaky/"):
                    return self.send_status(500) if count <= 2 else self.send_body(small)
                if p == "/always500.mp4":
                    return self.send_status(503)
                if p == "/stall-body.mp4":  # headers, then one byte every 50 ms
                    return self.send_body(small, piece=1, delay=0.05)
                if p.startswith("/trickle-close/"):  # a closing response, then one byte per 0.1 s
                    return self.send_trickle(small, http10=p.endswith("/http10.mp4"))
                if p == "/stall-headers.mp4":  # accepts, never answers
                    state["stop"].wait(20)
                    return None
                if p.startswith("/truncated-once/"):
                    if count == 1:
                        return self.send_truncated(small)
                    return self.send_body(small)
                if p == "/truncated-always.mp4":
                    return self.send_truncated(small)
                if p == "/html.mp4":
                    return self.send_body(b"<!DOCTYPE html><html><body>Not here</body></html>", "text/html")
                if p == "/html-disguised.mp4":
                    return self.send_body(b"<!DOCTYPE html><html><body>Error</body></html>" * 3, "video/mp4")
                if p == "/redirect.mp4":
                    return self.redirect("/video/target.mp4")
                if p == "/redirect-file.mp4":
                    return self.redirect(state["videos"]["small_path"].as_uri())
                if p == "/redirect-loop.mp4":
                    return self.redirect("/redirect-loop.mp4")
                if p == "/big.mp4":
                    self.send_response(200)
                    self.send_header("Content-Type", "video/mp4")
                    self.send_header("Content-Length", str(50 * 1024 * 1024))
                    self.end_headers()
                    return None
                if p == "/big-unsized.mp4":  # no Content-Length, the body ends when the connection closes
                    self.send_response(200)
                    self.send_header("Content-Type", "video/mp4")
                    self.send_header("Connection", "close")
                    self.end_headers()
                    self.close_connection = True
                    self.wfile.write(small[:32])
                    for _ in range(64):
                        self.wfile.write(b"\0" * 16384)
                    return None
                return self.send_status(404)
            except (BrokenPipeError, ConnectionResetError):
                return None

        def send_status(self, code):
            self.send_response(code)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def redirect(self, location):
            self.send_response(302)
            self.send_header("Location", location)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def send_body(self, body, content_type="video/mp4", piece=None, delay=0.0):
            start = 0
            rng = self.headers.get("Range")
            if rng and rng.startswith("bytes=") and content_type == "video/mp4":
                start = int(rng[6:].split("-")[0])
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            else:
                self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body) - start))
            self.end_headers()
            data = body[start:]
            if piece is None:
                self.wfile.write(data)
                return
            for i in range(0, len(data), piece):
                if server_state["stop"].is_set():
                    return
                self.wfile.write(data[i : i + piece])
                self.wfile.flush()
                time.sleep(delay)

        def send_trickle(self, body, http10):
            """HTTP/1.0 (or HTTP/1.1 with `Connection: close`): http.client hands such a socket to
            the response and sets conn.sock to None; a byte arrives well within every per-read
            timeout, for up to 60 s."""
            if http10:
                self.protocol_version = "HTTP/1.0"
            self.send_response(200)
            self.send_header("Content-Type", "video/mp4")
            self.send_header("Content-Length", str(len(body) + 600))
            if not http10:
                self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            self.wfile.write(body[:16])
            for _ in range(600):
                if server_state["stop"].wait(0.1):
                    return
                self.wfile.write(b"\0")
                self.wfile.flush()

        def send_truncated(self, body):
            self.send_response(200)
            self.send_header("Content-Type", "video/mp4")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True

    return Handler


@pytest.fixture(scope="module")
def server(videos):
    state = {"lock": threading.Lock(), "log": [], "count": {}, "videos": videos, "stop": threading.Event()}
    httpd = Server(("127.0.0.1", 0), make_handler(state))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    state["url"] = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield state
    state["stop"].set()
    httpd.shutdown()
    httpd.server_close()


def write_csv(path: Path, rows, header=("id", "url", "caption")):
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def manifest_rows(path: Path) -> dict[str, dict]:
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        assert reader.fieldnames == ["id", "status", "reason", "bytes", "sha256", "path"]
        rows = {}
        for r in reader:
            rows.setdefault(r["id"], r)  # a duplicate id's later rows are checked separately
        return rows


def requests_for(server, path):
    with server["lock"]:
        return [rng for p, rng in server["log"] if p == path]


FAST = ["--workers", "4", "--retries", "2", "--backoff", "0.01", "--timeout", "5", "--no-progress"]


def test_every_bad_input_gets_its_reason(server, videos, tmp_path):
    u = server["url"]
    small_sha = hashlib.sha256(videos["small"]).hexdigest()
    rows = [
        ("good", f"{u}/video/good.mp4", "a clip"),
        ("missing", f"{u}/404.mp4", ""),
        ("flaky", f"{u}/flaky/a.mp4", ""),
        ("down", f"{u}/always500.mp4", ""),
        ("truncated-once", f"{u}/truncated-once/a.mp4", ""),
        ("truncated", f"{u}/truncated-always.mp4", ""),
        ("html", f"{u}/html.mp4", ""),
        ("html-disguised", f"{u}/html-disguised.mp4", ""),
        ("redirect", f"{u}/redirect.mp4", ""),
        ("redirect-file", f"{u}/redirect-file.mp4", ""),
        ("redirect-loop", f"{u}/redirect-loop.mp4", ""),
        ("big", f"{u}/big.mp4", ""),
        ("big-unsized", f"{u}/big-unsized.mp4", ""),
        ("ftp", "ftp://example.org/v.mp4", ""),
        ("data", "data:video/mp4;base64,AAAA", ""),
        ("noscheme", "videos/x.mp4", ""),
        ("local", videos["small_path"].as_uri(), ""),
        ("local-missing", (tmp_path / "nope.mp4").as_uri(), ""),
        ("good", f"{u}/video/dup.mp4", "same id again"),
        ("", f"{u}/video/noid.mp4", ""),
    ]
    csv_path = write_csv(tmp_path / "list.csv", rows)
    out, manifest = tmp_path / "videos", tmp_path / "manifest.csv"
    code = cli.main(
        [
            "--csv",
            str(csv_path),
            "--out",
            str(out),
            "--manifest",
            str(manifest),
            "--max-bytes",
            str(1024 * 1024),
            "--max-failed-fraction",
            "1.0",
            *FAST,
        ]
    )
    assert code == 0
    with open(manifest, newline="") as handle:
        assert len(list(csv.DictReader(handle))) == len(rows)  # one row per input row, duplicates included
    m = manifest_rows(manifest)
    assert m["good"]["status"] == "ok" and m["good"]["sha256"] == small_sha
    assert m["good"]["bytes"] == str(len(videos["small"]))
    assert (manifest.parent / m["good"]["path"]).read_bytes() == videos["small"]
    assert m["missing"]["status"] == "failed" and m["missing"]["reason"] == "HTTP 404 Not Found"
    assert len(requests_for(server, "/404.mp4")) == 1  # 4xx is not retried
    assert m["flaky"]["status"] == "ok" and len(requests_for(server, "/flaky/a.mp4")) == 3
    assert m["down"]["status"] == "failed"
    assert m["down"]["reason"] == "HTTP 503 Service Unavailable (after 3 attempts)"
    assert m["truncated-once"]["status"] == "ok" and m["truncated-once"]["sha256"] == small_sha
    half = len(videos["small"]) // 2
    assert requests_for(server, "/truncated-once/a.mp4") == [None, f"bytes={half}-"]  # resumed
    assert m["truncated"]["reason"] == f"truncated: got {half} of {len(videos['small'])} bytes (after 3 attempts)"
    assert m["html"]["reason"] == "HTML page, not a video (Content-Type text/html)"
    assert m["html-disguised"]["reason"].startswith("HTML page, not a video (starts with b'<!DOCTYPE html")
    assert m["redirect"]["status"] == "ok" and m["redirect"]["sha256"] == small_sha
    assert m["redirect-file"]["reason"].startswith("redirect to disallowed scheme 'file'")
    assert m["redirect-loop"]["reason"] == "too many redirects (more than 5)"
    assert m["big"]["reason"] == f"size {50 * 1024 * 1024} bytes exceeds --max-bytes {1024 * 1024}"
    assert m["big-unsized"]["reason"].startswith(f"size exceeds --max-bytes {1024 * 1024}")
    assert m["ftp"]["reason"].startswith("scheme 'ftp' not allowed")
    assert m["data"]["reason"].startswith("scheme 'data' not allowed")
    assert m["noscheme"]["reason"].startswith("scheme 'none' not allowed")
    assert m["local"]["status"] == "ok" and m["local"]["sha256"] == small_sha
    assert m["local-missing"]["reason"] == f"file not found: {tmp_path / 'nope.mp4'}"
    assert m[""]["reason"] == "empty id in input row 20"
    with open(manifest, newline="") as handle:
        dup = [r for r in csv.DictReader(handle) if r["id"] == "good"][1]
    assert dup["status"] == "skipped" and dup["reason"] == "duplicate id (first seen in input row 1)"
    leftovers = sorted(p.name for p in out.iterdir() if p.name.endswith(".part"))
    assert leftovers == ["truncated.mp4.part"]  # kept for a later resume; no failed file under its final name
    assert not (out / "html.mp4").exists() and not (out / "big.mp4.part").exists()


def test_stalled_server_is_cut_by_the_total_timeout(server, tmp_path):
    """A trickle of one byte per 50 ms never trips a per-read timeout; the total deadline must."""
    rows = [("trickle", f"{server['url']}/stall-body.mp4", ""), ("silent", f"{server['url']}/stall-headers.mp4", "")]
    manifest = tmp_path / "manifest.csv"
    code = cli.main(
        [
            "--csv",
            str(write_csv(tmp_path / "l.csv", rows)),
            "--out",
            str(tmp_path / "v"),
            "--manifest",
            str(manifest),
            "--timeout",
            "1",
            "--retries",
            "0",
            "--workers",
            "2",
            "--no-progress",
            "--max-failed-fraction",
            "1",
        ]
    )
    assert code == 0
    m = manifest_rows(manifest)
    trickled = int(m["trickle"]["reason"].split("(")[1].split()[0])
    assert m["trickle"]["reason"].startswith("timeout: no complete response within 1 s (")
    assert 0 < trickled < 400  # bytes did arrive, yet the attempt ended at its deadline
    assert m["silent"]["reason"] == "timeout: no complete response within 1 s (0 bytes on disk)"


@pytest.mark.parametrize("kind", ["http10", "connection-close"])
def test_timeout_bounds_every_attempt_of_a_closing_trickle(server, tmp_path, kind):
    """--timeout bounds one attempt in total also when the response owns the socket (HTTP/1.0 or
    `Connection: close`, where http.client sets conn.sock to None): --timeout 1 --retries 3 against
    a server sending a byte every 0.1 s (never tripping the per-read timeout) ends after about
    (retries + 1) x timeout, with the failure in the manifest. The CLI runs in a subprocess with a
    hard limit, so a hang fails the test instead of stalling the suite."""
    timeout, retries = 1, 3
    url = f"{server['url']}/trickle-close/{kind}.mp4"
    manifest = tmp_path / "manifest.csv"
    args = [
        "--csv",
        str(write_csv(tmp_path / "l.csv", [("trickle", url, "")])),
        "--out",
        str(tmp_path / "v"),
        "--manifest",
        str(manifest),
        "--timeout",
        str(timeout),
        "--retries",
        str(retries),
        "--backoff",
        "0.01",
        "--max-failed-fraction",
        "1",
        "--no-progress",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    start = time.monotonic()
    try:
        subprocess.run(
            [sys.executable, str(REPO / "workflow_scripts" / "download.py"), *args],
            env=env,
            timeout=40,
            check=True,
            capture_output=True,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("the download was still running after 40 s: the deadline did not hold")
    elapsed = time.monotonic() - start
    assert len(requests_for(server, urlsplit(url).path)) == retries + 1
    assert elapsed < (retries + 1) * timeout + 5  # 4 attempts of 1 s, plus interpreter start-up
    reason = manifest_rows(manifest)["trickle"]["reason"]
    assert reason.startswith(f"timeout: no complete response within {timeout} s (") and reason.endswith(
        f"(after {retries + 1} attempts)"
    )


def test_ids_never_escape_the_output_folder(videos, tmp_path):
    ids = ["../../evil", "a/b", "a_b", "/abs/path", ".hidden", "..", "ok-1.2"]
    csv_path = write_csv(tmp_path / "l.csv", [(i, videos["small_path"].as_uri(), "") for i in ids])
    out, manifest = tmp_path / "deep" / "videos", tmp_path / "deep" / "manifest.csv"
    before = set(tmp_path.rglob("*"))
    assert cli.main(["--csv", str(csv_path), "--out", str(out), "--manifest", str(manifest), *FAST]) == 0
    m = manifest_rows(manifest)
    assert list(m) == ids  # ids kept unchanged
    paths = [(manifest.parent / m[i]["path"]).resolve() for i in ids]
    assert all(p.parent == out.resolve() for p in paths)
    assert len(set(paths)) == len(ids)  # a/b and a_b do not collide
    assert m["ok-1.2"]["path"] == "videos/ok-1.2.mp4"  # clean ids are used as they are
    created = set(tmp_path.rglob("*")) - before
    assert all(out in p.parents or p in (out, manifest, manifest.parent) for p in created)


def test_webvid_columns_and_bad_header(videos, tmp_path):
    rows = [("1001", videos["small_path"].as_uri(), "PT00H00M04S", "dir", "a caption")]
    webvid = write_csv(tmp_path / "webvid.csv", rows, ("videoid", "contentUrl", "duration", "page_dir", "name"))
    items = dl.read_video_list(webvid)
    assert [(i.id, i.url, i.caption) for i in items] == [("1001", rows[0][1], "a caption")]
    bad = write_csv(tmp_path / "bad.csv", [("x", "y")], ("name", "link"))
    with pytest.raises(dl.InputError, match=r"unrecognised header \['name', 'link'\]"):
        dl.read_video_list(bad)
    manifest = tmp_path / "m.csv"
    assert cli.main(["--csv", str(bad), "--out", str(tmp_path / "v"), "--manifest", str(manifest)]) == 2
    assert not manifest.exists()


def test_annotation_files_name_their_videos(tmp_path):
    """Folder datasets are selected by their annotations: a retrieval / QA JSON list, a video_uid
    table (nlq_videos.tsv), an egomcq.json."""
    listing = tmp_path / "ret.json"
    listing.write_text(
        '[{"video": "video7010.mp4", "caption": "a"}, {"video": "video7011.mp4", "caption": "b"},'
        ' {"video": "video7010.mp4", "caption": "c"}]'
    )
    assert [(i.row, i.id, i.url) for i in dl.read_video_list(listing)] == [
        (0, "video7010.mp4", None),
        (1, "video7011.mp4", None),
    ]
    nlq = tmp_path / "nlq_videos.tsv"
    nlq.write_text("video_uid\tsplit\nuid-a\ttrain\nuid-b\tval\nuid-a\tval\n")
    assert [i.id for i in dl.read_video_list(nlq)] == ["uid-a", "uid-b"]
    uids = write_csv(tmp_path / "uids.csv", [("uid-c", "x")], ("video_uid", "other"))
    assert [i.id for i in dl.read_video_list(uids)] == ["uid-c"]
    bad = tmp_path / "bad.json"
    bad.write_text('[{"clip": 1}]')
    with pytest.raises(
        dl.InputError,
        match=r"bad.json: a list of objects with keys \['clip'\] is none of the accepted layouts: .*egomcq.json",
    ):
        dl.read_video_list(bad)
    folder = tmp_path / "videos"
    folder.mkdir()
    (folder / "video7010.mp4").write_bytes(b"x")
    assert dl.find_local_video(folder, "video7010.mp4") == folder / "video7010.mp4"
    assert dl.find_local_video(folder, "video7010") == folder / "video7010.mp4"


def test_download_shards_partition_the_rows(videos, tmp_path):
    """--num-shards N --shard-index i: the manifests of the N shards together hold every input row
    once, each in the shard its id hashes to; a repeated id is skipped in its own shard."""
    ids = [f"vid{i}" for i in range(12)] + ["vid3"]
    csv_path = write_csv(tmp_path / "l.csv", [(i, videos["small_path"].as_uri(), "") for i in ids])
    seen = []
    for k in range(3):
        manifest = tmp_path / f"m{k}.csv"
        assert (
            cli.main(
                [
                    "--csv",
                    str(csv_path),
                    "--out",
                    str(tmp_path / f"v{k}"),
                    "--manifest",
                    str(manifest),
                    "--num-shards",
                    "3",
                    "--shard-index",
                    str(k),
                    *FAST,
                ]
            )
            == 0
        )
        with open(manifest, newline="") as handle:
            rows = list(csv.DictReader(handle))
        assert all(dl.shard_of(r["id"], 3) == k for r in rows)
        seen += [(r["id"], r["status"], r["reason"]) for r in rows]
    assert sorted(i for i, _, _ in seen) == sorted(ids)
    assert [s for s in seen if s[1] != "ok"] == [("vid3", "skipped", "duplicate id (first seen in input row 4)")]


def test_failed_fraction_threshold(server, tmp_path, capsys):
    u = server["url"]
    rows = [
        ("a", f"{u}/video/a.mp4", ""),
        ("b", f"{u}/video/b.mp4", ""),
        ("c", f"{u}/404.mp4", ""),
        ("d", f"{u}/video/d.mp4", ""),
    ]
    csv_path = write_csv(tmp_path / "l.csv", rows)
    args = ["--csv", str(csv_path), "--out", str(tmp_path / "v"), "--manifest", str(tmp_path / "m.csv"), *FAST]
    assert cli.main(args + ["--max-failed-fraction", "0.25"]) == 0  # 1 of 4 is not above 0.25
    assert cli.main(args + ["--max-failed-fraction", "0.2"]) == 1
    err = capsys.readouterr().err
    assert "1 of 4 videos failed, more than --max-failed-fraction 0.2" in err
    assert manifest_rows(tmp_path / "m.csv")["c"]["reason"] == "HTTP 404 Not Found"


def test_rerun_verifies_files_and_fetches_only_what_is_missing_or_broken(server, videos, tmp_path):
    u = server["url"]
    rows = [(name, f"{u}/video/rerun-{name}.mp4", "") for name in ("a", "b", "c")]
    csv_path = write_csv(tmp_path / "l.csv", rows)
    out, manifest = tmp_path / "v", tmp_path / "m.csv"
    args = ["--csv", str(csv_path), "--out", str(out), "--manifest", str(manifest), *FAST]
    assert cli.main(args) == 0
    (out / "a.mp4").unlink()  # missing
    broken = bytearray((out / "b.mp4").read_bytes())
    broken[-10] ^= 0xFF  # same size, same structure, different content
    (out / "b.mp4").write_bytes(bytes(broken))
    assert cli.main(args) == 0
    m = manifest_rows(manifest)
    for name in "abc":
        assert m[name]["sha256"] == hashlib.sha256(videos["small"]).hexdigest()
    assert [len(requests_for(server, f"/video/rerun-{n}.mp4")) for n in "abc"] == [2, 2, 1]
    assert m["b"]["reason"] == "re-downloaded: on-disk sha256 differs from manifest"
    assert m["c"]["reason"] == "already present (sha256 matches manifest)"


def test_resume_after_kill(server, videos, tmp_path):
    """Kill the CLI mid-transfer; the rerun keeps finished files and resumes the .part with Range."""
    u = server["url"]
    rows = [("done", f"{u}/video/kill-done.mp4", ""), ("slow", f"{u}/slow/kill.mp4", "")]
    csv_path = write_csv(tmp_path / "l.csv", rows)
    out, manifest = tmp_path / "v", tmp_path / "m.csv"
    args = [
        "--csv",
        str(csv_path),
        "--out",
        str(out),
        "--manifest",
        str(manifest),
        "--workers",
        "1",
        "--timeout",
        "60",
        "--no-progress",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, str(REPO / "workflow_scripts" / "download.py"), *args], env=env)
    part = out / "slow.mp4.part"
    try:
        for _ in range(3000):
            if part.exists() and part.stat().st_size >= 8192:
                break
            time.sleep(0.005)
        else:
            pytest.fail("the throttled transfer never started")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    have = part.stat().st_size
    assert 0 < have < len(videos["large"]) and (out / "done.mp4").exists()
    assert not manifest.exists() and not (out / "slow.mp4").exists()
    assert cli.main(args) == 0
    m = manifest_rows(manifest)
    assert m["slow"]["status"] == "ok" and m["slow"]["sha256"] == hashlib.sha256(videos["large"]).hexdigest()
    ranges = requests_for(server, "/slow/kill.mp4")
    assert ranges[0] is None and ranges[-1] is not None and int(ranges[-1][6:].split("-")[0]) >= have
    assert len(requests_for(server, "/video/kill-done.mp4")) == 1  # verified on disk, not fetched again
    assert m["done"]["reason"] == "already present (structure verified)"


def test_sniffing_rejects_truncated_and_foreign_content(videos, tmp_path):
    good = tmp_path / "good.mp4"
    good.write_bytes(videos["small"])
    assert dl.sniff_video(good) == "mp4"
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(videos["small"][:-100])
    with pytest.raises(dl.VideoCheckError, match=r"truncated MP4: box '\w+' at offset \d+ needs"):
        dl.sniff_video(cut)
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(dl.VideoCheckError, match=r"empty file \(0 bytes\)"):
        dl.sniff_video(empty)
    noise = tmp_path / "noise.mp4"
    noise.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(dl.VideoCheckError, match="unrecognised content"):
        dl.sniff_video(noise)


def test_local_folder_and_ego4d_cli(videos, tmp_path, capsys):
    folder = tmp_path / "ego"
    (folder / "uid-chunked").mkdir(parents=True)
    (folder / "uid-single.mp4").write_bytes(videos["small"])
    for k in (1, 0, 10, 2):
        (folder / "uid-chunked" / f"{k}.mp4").write_bytes(videos["small"])
    assert [p.name for p in dl.list_chunks(folder / "uid-chunked")] == ["0.mp4", "1.mp4", "2.mp4", "10.mp4"]
    egoclip = tmp_path / "egoclip.csv"
    egoclip.write_text(
        "clip_idx\tvideo_uid\tclip_start\tclip_end\tclip_text\n0\tuid-single\t0\t1\t#C C x\n"
        "1\tuid-chunked\t0\t1\t#C C y\n2\tuid-single\t1\t2\t#C C z\n3\tuid-gone\t0\t1\t#C C w\n"
    )
    manifest = tmp_path / "m.csv"
    code = cli.main(
        [
            "--csv",
            str(egoclip),
            "--local-dir",
            str(folder),
            "--out",
            str(tmp_path / "v"),
            "--manifest",
            str(manifest),
            "--max-failed-fraction",
            "0.5",
            "--no-progress",
        ]
    )
    assert code == 0
    m = manifest_rows(manifest)
    assert list(m) == ["uid-single", "uid-chunked", "uid-gone"]  # one row per distinct video_uid
    assert m["uid-single"]["status"] == "ok" and m["uid-chunked"]["reason"] == "local (4 chunks)"
    assert m["uid-chunked"]["bytes"] == str(4 * len(videos["small"]))
    assert (manifest.parent / m["uid-chunked"]["path"]).resolve() == (folder / "uid-chunked").resolve()
    assert m["uid-gone"]["reason"].startswith(f"not found in local folder {folder}")

    command = dl.ego4d_command("uids.txt", "out/ego4d", aws_profile="ego4d")
    assert command == [
        "ego4d",
        "--output_directory",
        "out/ego4d",
        "--datasets",
        "full_scale",
        "--video_uid_file",
        "uids.txt",
        "--yes",
        "--aws_profile_name",
        "ego4d",
    ]
    code = cli.main(
        [
            "--csv",
            str(egoclip),
            "--ego4d-cli",
            "--ego4d-executable",
            "ego4d-not-installed-here",
            "--out",
            str(tmp_path / "e"),
            "--manifest",
            str(tmp_path / "e.csv"),
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "Ego4D CLI 'ego4d-not-installed-here' not found on PATH" in err and "--local-dir" in err
