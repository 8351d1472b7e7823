#!/usr/bin/env python
"""Download throughput per worker against a local HTTP server on 127.0.0.1. Not a test; writes
JSON (default benchmarks/results/download.json).

The server runs in its own process (so it does not share the downloader's GIL) and serves valid
MP4 files (a small H.264 clip padded with a top-level `free` box to --megabytes), with the failure
mix of tests/test_data_download.py, by row: of every 20 rows 14 succeed at once, 1 is a 404, 1
fails twice with HTTP 500 and then succeeds, 1 always answers 503 (retried until --retries is
spent), 1 is cut in half once and resumed with a Range request, 1 is an HTML page, 1 redirects to
a good file. Two scenarios:
- loopback: no latency, no rate limit: the downloader's own cost (sniffing, sha256, writing);
- cdn: --latency seconds before each response and --rate bytes/s per connection, closer to the
  WebVid hosts, where more workers overlap the waiting.
Reported per worker count: rows/s, successful files/s, MB/s of successful files, files/s per
worker, and the downloader's CPU seconds per file (user + system of this process), which say how
many cores a download job needs (`download.workers` is the rule's `threads`).
"""

from __future__ import annotations

import argparse
import http.server
import multiprocessing
import os
import platform
import resource
import shutil
import struct
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from common import write_report

from svitt.data import download as dl
from svitt.data.mp4 import write_mp4

MIX = ["ok"] * 14 + ["404", "flaky", "always503", "truncated-once", "html", "redirect"]


def padded_mp4(size: int, folder: Path) -> bytes:
    """A valid MP4 of exactly `size` bytes: a short clip and a top-level `free` box."""
    path = folder / "clip.mp4"
    write_mp4(path, np.random.default_rng(0).integers(0, 255, (8, 64, 64, 3), dtype=np.uint8), fps=8)
    clip = path.read_bytes()
    pad = max(8, size - len(clip))
    return clip + struct.pack(">I", pad) + b"free" + b"\0" * (pad - 8)


def serve(body: bytes, latency: float, rate: float | None, port_queue) -> None:
    counts: dict[str, int] = {}
    lock = threading.Lock()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def do_GET(self):
            with lock:
                counts[self.path] = count = counts.get(self.path, 0) + 1
            kind = self.path.split("/")[1]
            time.sleep(latency)
            try:
                if kind in ("ok", "target") or (kind == "flaky" and count > 2):
                    return self.body(body)
                if kind == "truncated-once":
                    return self.body(body, cut=count == 1)
                if kind == "redirect":
                    return self.status(302, Location="/target" + self.path[len("/redirect") :])
                if kind == "html":
                    return self.body(b"<!DOCTYPE html><html><body>gone</body></html>", "text/html")
                return self.status({"404": 404, "flaky": 500, "always503": 503}[kind])
            except (BrokenPipeError, ConnectionResetError):
                return None

        def status(self, code, **headers):
            self.send_response(code)
            for key, value in {"Content-Length": "0", **headers}.items():
                self.send_header(key, value)
            self.end_headers()

        def body(self, data, content_type="video/mp4", cut=False):
            start = 0
            requested = self.headers.get("Range")
            if requested and requested.startswith("bytes="):
                start = int(requested[6:].split("-")[0])
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            else:
                self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data) - start))
            if cut:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            data = data[start : len(data) // 2 if cut else len(data)]
            step = 64 * 1024
            for i in range(0, len(data), step):
                self.wfile.write(data[i : i + step])
                if rate:
                    time.sleep(min(step, len(data) - i) / rate)

    class Server(http.server.ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = 256

        def handle_error(self, request, client_address):
            pass  # a client closing its kept-alive connection resets it: not news

    httpd = Server(("127.0.0.1", 0), Handler)
    port_queue.put(httpd.server_address[1])
    httpd.serve_forever()


def start_server(body: bytes, latency: float, rate: float | None):
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    process = context.Process(target=serve, args=(body, latency, rate, queue), daemon=True)
    process.start()
    return process, f"http://127.0.0.1:{queue.get(timeout=30)}"


def run(url: str, rows: int, workers: int, workdir: Path, opts: dl.DownloadOptions, tag: str) -> dict:
    items = [dl.VideoItem(i, f"{tag}-{i:05d}", f"{url}/{MIX[i % len(MIX)]}/{tag}-{i:05d}.mp4") for i in range(rows)]
    out = workdir / f"{tag}-w{workers}"
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    results = dl.download_all(items, out, opts, workers, progress=False)
    seconds = time.perf_counter() - start
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    ok = [r for r in results if r.status == "ok"]
    expected_ok = sum(MIX[i % len(MIX)] in ("ok", "flaky", "truncated-once", "redirect") for i in range(rows))
    assert len(ok) == expected_ok, [(r.id, r.reason) for r in results if r.status != "ok"][:5]
    megabytes = sum(r.bytes for r in ok) / 1e6
    shutil.rmtree(out)
    return {
        "workers": workers,
        "rows": rows,
        "ok": len(ok),
        "failed": rows - len(ok),
        "seconds": round(seconds, 3),
        "rows_per_second": round(rows / seconds, 2),
        "files_per_second": round(len(ok) / seconds, 2),
        "megabytes_per_second": round(megabytes / seconds, 2),
        "files_per_second_per_worker": round(len(ok) / seconds / workers, 3),
        "cpu_seconds_per_file": round(cpu / len(ok), 4),
        "cpu_cores_busy": round(cpu / seconds, 2),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/download.json"))
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--megabytes", type=float, default=1.0, help="size of a served video")
    parser.add_argument("--loopback-rows", type=int, default=200)
    parser.add_argument("--cdn-rows-per-worker", type=int, default=10)
    parser.add_argument("--latency", type=float, default=0.1, help="cdn: seconds before each response")
    parser.add_argument("--rate", type=float, default=1e6, help="cdn: bytes per second per connection")
    parser.add_argument("--retries", type=int, default=2)
    parser.add_argument("--backoff", type=float, default=0.05)
    args = parser.parse_args(argv)
    opts = dl.DownloadOptions(timeout=60, retries=args.retries, backoff=args.backoff)
    scenarios = {}
    with tempfile.TemporaryDirectory(prefix="svitt-bench-") as tmp:
        body = padded_mp4(int(args.megabytes * 1e6), Path(tmp))
        assert dl.sniff_video(Path(tmp) / "clip.mp4") == "mp4"
        for name, latency, rate in (("loopback", 0.0, None), ("cdn", args.latency, args.rate)):
            server, url = start_server(body, latency, rate)
            try:
                runs = []
                for workers in args.workers:
                    rows = args.loopback_rows if name == "loopback" else max(20, args.cdn_rows_per_worker * workers)
                    runs.append(run(url, rows, workers, Path(tmp), opts, f"{name}{workers}"))
                    print(name, runs[-1], flush=True)
            finally:
                server.terminate()
                server.join()
            scenarios[name] = {"latency_seconds": latency, "rate_bytes_per_second": rate, "runs": runs}
    report = {
        "benchmark": "download: throughput per worker against a local HTTP server (failure mix of the tests)",
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "note": "shared machine; the server shares the cores; compare ratios within one run",
        },
        "settings": {
            "video_bytes": len(body),
            "mix_per_20_rows": MIX,
            "retries": args.retries,
            "backoff_seconds": args.backoff,
            "verify": opts.verify,
        },
        "scenarios": scenarios,
    }
    write_report(args.out, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
