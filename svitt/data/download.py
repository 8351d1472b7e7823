"""Robust video download: http(s)/file URLs -> one folder of videos + a manifest CSV.

What it guarantees (issue 4, section 1):
- one manifest row per input row, `id,status,reason,bytes,sha256,path`, status ok/failed/skipped;
- `timeout` bounds one attempt at one file from connect to last byte (a watchdog shuts the socket,
  also one a closing HTTP/1.0 or `Connection: close` response owns, so a server trickling one byte
  a second cannot hold a worker);
- retries with exponential backoff on 5xx / 408 / 429 / timeouts / dropped connections, never on
  other 4xx; resume of `.part` files with HTTP Range; a size cap; content sniffing (an HTML error
  page saved as .mp4 is rejected; an MP4 whose boxes run past the end of the file is truncated);
- redirects followed only to http/https (never to file://);
- ids become file names only after sanitising; duplicates are reported as `skipped`;
- a rerun verifies what is on disk (sha256 against the previous manifest, or the container
  structure) and downloads only what is missing or broken.
"""

from __future__ import annotations

import csv
import difflib
import functools
import hashlib
import http.client
import os
import re
import shutil
import socket
import ssl
import subprocess
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urljoin, urlsplit

from tqdm import tqdm

from svitt.data import formats
from svitt.data.formats import VIDEO_EXTENSIONS, InputError, VideoRef
from svitt.io import atomic_write_csv

ALLOWED_SCHEMES = ("http", "https", "file")
REDIRECT_SCHEMES = ("http", "https")  # a redirect must never turn a web URL into a local file read
MANIFEST_COLUMNS = ["id", "status", "reason", "bytes", "sha256", "path"]
MAX_REDIRECTS = 5
CHUNK = 64 * 1024
USER_AGENT = "svitt-download/0.1"


# ----------------------------------------------------------------------------------------------
# Input lists (svitt.data.formats reads every layout)
# ----------------------------------------------------------------------------------------------
VideoItem = VideoRef  # one input row: `id` exactly as in the input, `url` None for lists without URLs


def read_video_list(path: str | Path) -> list[VideoItem]:
    """The videos of a video list or annotation file (svitt.data.formats.read_video_list)."""
    return formats.read_video_list(path)


def shard_of(video_id: str, num_shards: int) -> int:
    """The shard of a video: a stable hash of its id (the same in download and extraction, so shard
    i's frames come from shard i's videos)."""
    return zlib.crc32(video_id.encode("utf-8")) % num_shards


def select_items(items: list[VideoItem], shard_index: int, num_shards: int) -> list[VideoItem]:
    """The rows of one shard, in input order (every repeat of an id lands in the same shard)."""
    if not 0 <= shard_index < num_shards:
        raise InputError(f"--shard-index must be in [0, {num_shards}), got {shard_index}")
    return [item for item in items if shard_of(item.id, num_shards) == shard_index]


# ----------------------------------------------------------------------------------------------
# File names and content checks
# ----------------------------------------------------------------------------------------------
def safe_filename(video_id: str) -> str:
    """A file name for `video_id` that stays inside the output folder.

    Keeps [A-Za-z0-9._-], replaces the rest by '_', strips leading dots; when anything changed a
    short hash of the original id is appended so that distinct ids never collide.
    """
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", video_id).lstrip(".")[:120]
    if cleaned != video_id or not cleaned:
        digest = hashlib.sha1(video_id.encode("utf-8")).hexdigest()[:8]
        cleaned = f"{cleaned or 'id'}-{digest}"
    return cleaned


def url_extension(url: str) -> str:
    ext = os.path.splitext(urlsplit(url).path)[1].lower()
    return ext if ext in VIDEO_EXTENSIONS else ".mp4"


class VideoCheckError(Exception):
    """Content that is not a (complete) video; the message is the manifest reason."""


def sniff_video(path: str | Path) -> str:
    """Return the container kind of `path` or raise VideoCheckError with the reason.

    MP4/MOV: the top-level boxes must tile the file exactly and include `moov` (a truncated
    download leaves a box that runs past the end). Other containers: magic bytes only.
    """
    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        raise VideoCheckError("empty file (0 bytes)")
    with open(path, "rb") as handle:
        head = handle.read(512)
    text = head.lstrip().lower()
    if text.startswith((b"<!doctype html", b"<html", b"<head", b"<body", b"<?xml", b"{", b"<")):
        kind = "HTML page" if b"html" in text[:64] else "text/markup document"
        raise VideoCheckError(f"{kind}, not a video (starts with {head[:24]!r})")
    if head[4:8] == b"ftyp":
        _check_mp4_boxes(path, size)
        return "mp4"
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return "matroska"
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return "avi"
    if head[:3] == b"FLV":
        return "flv"
    if head[:4] == b"OggS":
        return "ogg"
    if len(head) >= 189 and head[0] == 0x47 and head[188] == 0x47:
        return "mpegts"
    if head[:4] == b"\x00\x00\x01\xba":  # MPEG program stream (.mpg)
        return "mpeg-ps"
    if head[:8] == b"\x30\x26\xb2\x75\x8e\x66\xcf\x11":  # ASF (.wmv)
        return "asf"
    raise VideoCheckError(f"unrecognised content, not a known video container (starts with {head[:16]!r})")


def _check_mp4_boxes(path: Path, size: int) -> None:
    offset, names = 0, []
    with open(path, "rb") as handle:
        while offset < size:
            handle.seek(offset)
            header = handle.read(16)
            if len(header) < 8:
                raise VideoCheckError(f"truncated MP4: {size - offset} stray bytes at offset {offset}")
            box_size = int.from_bytes(header[:4], "big")
            name = header[4:8].decode("latin-1")
            if box_size == 1:
                box_size = int.from_bytes(header[8:16], "big")
            elif box_size == 0:  # box extends to the end of the file
                box_size = size - offset
            if box_size < 8:
                raise VideoCheckError(f"corrupt MP4: box {name!r} at offset {offset} has size {box_size}")
            if offset + box_size > size:
                raise VideoCheckError(
                    f"truncated MP4: box {name!r} at offset {offset} needs {box_size} bytes, file has {size - offset}"
                )
            names.append(name)
            offset += box_size
    if "moov" not in names:
        raise VideoCheckError(f"incomplete MP4: no 'moov' box (boxes: {names[:8]})")


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------
# One attempt at one URL
# ----------------------------------------------------------------------------------------------
class FetchError(Exception):
    def __init__(self, reason: str, retryable: bool):
        super().__init__(reason)
        self.reason = reason
        self.retryable = retryable


@dataclass
class DownloadOptions:
    timeout: float = 120.0  # seconds for one attempt at one file, connect to last byte
    retries: int = 3  # extra attempts after the first, on retryable errors only
    backoff: float = 1.0  # first retry waits this long, then 2x, 4x, ...
    max_bytes: int = 2 * 1024**3
    verify: str = "sha256"  # rerun check of files on disk: "sha256" or "quick" (size + structure)


class _Watchdog:
    """Shuts the socket of the current connection when the attempt's deadline passes.

    It keeps its own reference to the socket: once a response will close the connection (HTTP/1.0,
    `Connection: close`) http.client hands the socket to the response and sets `conn.sock` to None,
    and a trickling server would otherwise hold the read forever.
    """

    def __init__(self, seconds: float):
        self.fired = False
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._timer = threading.Timer(max(seconds, 0.0), self._fire)
        self._timer.daemon = True
        self._timer.start()

    def watch(self, sock: socket.socket | None) -> None:
        with self._lock:
            self._sock = sock
            if self.fired:
                self._shutdown()

    def _fire(self) -> None:
        with self._lock:
            self.fired = True
            self._shutdown()

    def _shutdown(self) -> None:
        if self._sock is None:
            return
        try:  # the plain-socket shutdown (also for TLS): wakes a recv blocked in another thread
            socket.socket.shutdown(self._sock, socket.SHUT_RDWR)
        except OSError:  # already closed (its fd is -1 then, never another file's)
            pass

    def cancel(self) -> None:
        self._timer.cancel()


def fetch_to_part(url: str, part: Path, opts: DownloadOptions, on_bytes=lambda n: None) -> None:
    """One attempt: bring `part` to the complete content of `url` (resuming when possible)."""
    scheme = urlsplit(url).scheme.lower()
    if scheme not in ALLOWED_SCHEMES:
        shown = scheme or "none"
        raise FetchError(
            f"scheme '{shown}' not allowed in {url!r} (allowed: {', '.join(ALLOWED_SCHEMES)})", retryable=False
        )
    if scheme == "file":
        _copy_file_url(url, part, opts, on_bytes)
    else:
        _http_fetch(url, part, opts, on_bytes)


def _copy_file_url(url: str, part: Path, opts: DownloadOptions, on_bytes) -> None:
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise FetchError(f"file URL with remote host {parts.netloc!r} not allowed: {url!r}", retryable=False)
    source = Path(unquote(parts.path))
    if not source.is_file():
        raise FetchError(f"file not found: {source}", retryable=False)
    size = source.stat().st_size
    if size > opts.max_bytes:
        raise FetchError(f"size {size} bytes exceeds --max-bytes {opts.max_bytes}", retryable=False)
    deadline = time.monotonic() + opts.timeout
    with open(source, "rb") as src, open(part, "wb") as dst:
        for block in iter(lambda: src.read(1 << 20), b""):
            dst.write(block)
            on_bytes(len(block))
            if time.monotonic() > deadline:
                raise FetchError(f"timeout: copy not finished within {opts.timeout:g} s", retryable=True)


def _http_fetch(url: str, part: Path, opts: DownloadOptions, on_bytes) -> None:
    watchdog = _Watchdog(opts.timeout)
    try:
        for _hop in range(MAX_REDIRECTS + 1):
            have = part.stat().st_size if part.exists() else 0
            conn, response = _open(url, have, watchdog, opts)
            try:
                if response.status in (301, 302, 303, 307, 308):
                    url = _redirect_target(url, response)
                    continue
                offset = _start_offset(response, have, part)
                _stream_body(response, part, offset, opts, watchdog, on_bytes)
                return
            finally:
                response.close()
                conn.close()
        raise FetchError(f"too many redirects (more than {MAX_REDIRECTS})", retryable=False)
    except FetchError:
        if watchdog.fired:
            raise _timeout_error(opts, part) from None
        raise
    except (OSError, http.client.HTTPException) as exc:
        # The socket's own timeout equals the deadline, so it may beat the watchdog by a hair.
        if watchdog.fired or isinstance(exc, TimeoutError):
            raise _timeout_error(opts, part) from None
        raise FetchError(f"connection error: {type(exc).__name__}: {exc}", retryable=True) from None
    finally:
        watchdog.cancel()


def _timeout_error(opts: DownloadOptions, part: Path) -> FetchError:
    have = part.stat().st_size if part.exists() else 0
    return FetchError(f"timeout: no complete response within {opts.timeout:g} s ({have} bytes on disk)", retryable=True)


def _open(url: str, have: int, watchdog: _Watchdog, opts: DownloadOptions):
    parts = urlsplit(url)
    if parts.scheme == "https":
        conn = http.client.HTTPSConnection(
            parts.hostname, parts.port, timeout=opts.timeout, context=ssl.create_default_context()
        )
    else:
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=opts.timeout)
    watchdog.watch(None)  # a connect is bounded by the socket timeout (= the deadline)
    conn.connect()
    watchdog.watch(conn.sock)  # shut at once if the deadline passed while connecting
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    headers = {"User-Agent": USER_AGENT, "Accept": "*/*", "Accept-Encoding": "identity"}
    if have > 0:
        headers["Range"] = f"bytes={have}-"
    conn.request("GET", target, headers=headers)
    return conn, conn.getresponse()


def _redirect_target(url: str, response) -> str:
    location = response.getheader("Location")
    if not location:
        raise FetchError(f"HTTP {response.status} redirect without a Location header", retryable=False)
    target = urljoin(url, location)
    scheme = urlsplit(target).scheme.lower()
    if scheme not in REDIRECT_SCHEMES:
        raise FetchError(
            f"redirect to disallowed scheme '{scheme}' ({target}); redirects may only go to "
            f"{', '.join(REDIRECT_SCHEMES)}",
            retryable=False,
        )
    return target


def _start_offset(response, have: int, part: Path) -> int:
    """Check the status; return the byte offset the body starts at (resume) or 0."""
    status = response.status
    if status == 206:
        match = re.match(r"bytes (\d+)-\d+/(\d+|\*)", response.getheader("Content-Range") or "")
        if match and int(match.group(1)) == have:
            return have
        part.unlink(missing_ok=True)
        raise FetchError(
            f"server answered the resume from byte {have} with Content-Range {response.getheader('Content-Range')!r}",
            retryable=True,
        )
    if status == 416:
        part.unlink(missing_ok=True)
        raise FetchError(f"server rejected resume from byte {have} (HTTP 416)", retryable=True)
    if status != 200:
        reason = f"HTTP {status} {response.reason}".strip()
        retryable = status >= 500 or status in (408, 429)
        raise FetchError(reason, retryable=retryable)
    content_type = (response.getheader("Content-Type") or "").lower()
    if content_type.startswith(("text/html", "application/xhtml")):
        raise FetchError(f"HTML page, not a video (Content-Type {content_type})", retryable=False)
    return 0


def _stream_body(response, part: Path, offset: int, opts, watchdog: _Watchdog, on_bytes) -> int:
    length = response.getheader("Content-Length")
    expected = int(length) + offset if length and length.isdigit() else None
    if expected is not None and expected > opts.max_bytes:
        raise FetchError(f"size {expected} bytes exceeds --max-bytes {opts.max_bytes}", retryable=False)
    total = offset
    with open(part, "ab" if offset else "wb") as handle:
        while True:
            block = response.read1(CHUNK)  # returns after one recv: the watchdog bounds the total
            if not block:
                break
            total += len(block)
            if total > opts.max_bytes:
                handle.close()
                part.unlink(missing_ok=True)
                raise FetchError(
                    f"size exceeds --max-bytes {opts.max_bytes} (stopped at {total} bytes)", retryable=False
                )
            handle.write(block)
            on_bytes(len(block))
    if watchdog.fired:
        raise _timeout_error(opts, part)
    if expected is not None and total < expected:
        raise FetchError(f"truncated: got {total} of {expected} bytes", retryable=True)
    return total


# ----------------------------------------------------------------------------------------------
# One item, with retries and on-disk verification
# ----------------------------------------------------------------------------------------------
@dataclass
class DownloadResult:
    id: str
    status: str  # ok | failed | skipped
    reason: str = ""
    bytes: int | None = None
    sha256: str = ""
    path: Path | None = None
    extra: dict = field(default_factory=dict)


def download_one(
    item: VideoItem,
    out_dir: Path,
    opts: DownloadOptions,
    previous: dict[str, dict] | None = None,
    on_bytes=lambda n: None,
    sleep=time.sleep,
) -> DownloadResult:
    """Download one item into `out_dir`; never raises for per-file problems."""
    if not item.id:
        return DownloadResult(item.id, "failed", f"empty id in input row {item.row + 1}")
    if not item.url:
        return DownloadResult(item.id, "failed", "no URL in the input row")
    scheme = urlsplit(item.url).scheme.lower()
    if scheme not in ALLOWED_SCHEMES:
        return DownloadResult(
            item.id,
            "failed",
            f"scheme '{scheme or 'none'}' not allowed in {item.url!r} (allowed: {', '.join(ALLOWED_SCHEMES)})",
        )
    final = out_dir / (safe_filename(item.id) + url_extension(item.url))
    if final.resolve().parent != out_dir.resolve():  # defence in depth after sanitising
        return DownloadResult(item.id, "failed", f"id {item.id!r} would write outside {out_dir}")
    note = ""
    if final.exists():
        verdict = verify_existing(final, (previous or {}).get(item.id), opts.verify)
        if isinstance(verdict, DownloadResult):
            verdict.id = item.id
            return verdict
        note = f"re-downloaded: {verdict}"
        final.unlink()
    part = final.with_name(final.name + ".part")
    attempts = 1 + max(0, opts.retries)
    for attempt in range(attempts):
        try:
            fetch_to_part(item.url, part, opts, on_bytes)
            sniff_video(part)
        except FetchError as exc:
            if not exc.retryable or attempt == attempts - 1:
                suffix = f" (after {attempt + 1} attempts)" if exc.retryable and attempt else ""
                return DownloadResult(item.id, "failed", exc.reason + suffix)
            sleep(opts.backoff * 2**attempt)
            continue
        except VideoCheckError as exc:
            part.unlink(missing_ok=True)
            return DownloadResult(item.id, "failed", str(exc))
        os.replace(part, final)
        return DownloadResult(item.id, "ok", note, final.stat().st_size, sha256_file(final), final)
    raise AssertionError("unreachable")


def verify_existing(path: Path, record: dict | None, mode: str):
    """A DownloadResult(ok) when the file on disk is intact, else a string saying what is wrong."""
    size = path.stat().st_size
    known_sha = (record or {}).get("sha256") if (record or {}).get("status") == "ok" else ""
    known_size = (record or {}).get("bytes") if known_sha else ""
    if known_size and str(size) != str(known_size):
        return f"on-disk size {size} differs from manifest {known_size}"
    try:
        sniff_video(path)
    except VideoCheckError as exc:
        return f"file on disk is broken ({exc})"
    if mode == "quick":
        return DownloadResult("", "ok", "already present (size and structure verified)", size, known_sha or "", path)
    digest = sha256_file(path)
    if known_sha and digest != known_sha:
        return "on-disk sha256 differs from manifest"
    how = "sha256 matches manifest" if known_sha else "structure verified"
    return DownloadResult("", "ok", f"already present ({how})", size, digest, path)


# ----------------------------------------------------------------------------------------------
# Many items
# ----------------------------------------------------------------------------------------------
class _Progress:
    def __init__(self, total: int, enabled: bool):
        self.files = tqdm(total=total, unit="file", desc="videos", disable=not enabled, position=0)
        self.bytes = tqdm(unit="B", unit_scale=True, desc="bytes", disable=not enabled, position=1)
        self.lock = threading.Lock()

    def add_bytes(self, n: int) -> None:
        with self.lock:
            self.bytes.update(n)

    def file_done(self, result: DownloadResult) -> None:
        with self.lock:
            self.files.update(1)

    def close(self) -> None:
        self.files.close()
        self.bytes.close()


def mark_duplicates(items: list[VideoItem]) -> dict[int, DownloadResult]:
    """Position in `items` -> `skipped` result for every repeat of an id seen in an earlier row
    (the reason names that row's number in the input)."""
    first_row: dict[str, int] = {}
    skipped = {}
    for position, item in enumerate(items):
        if item.id and item.id in first_row:
            skipped[position] = DownloadResult(
                item.id, "skipped", f"duplicate id (first seen in input row {first_row[item.id] + 1})"
            )
        else:
            first_row.setdefault(item.id, item.row)
    return skipped


def download_all(
    items: list[VideoItem],
    out_dir: str | Path,
    opts: DownloadOptions,
    workers: int = 4,
    previous: dict[str, dict] | None = None,
    progress: bool = True,
) -> list[DownloadResult]:
    """Download all items in parallel; one result per item, in input order."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results: list[DownloadResult | None] = [None] * len(items)
    for position, result in mark_duplicates(items).items():
        results[position] = result
    todo = [i for i, r in enumerate(results) if r is None]
    bar = _Progress(len(items), progress)
    bar.files.update(len(items) - len(todo))

    def work(index: int) -> None:
        result = download_one(items[index], out_dir, opts, previous, bar.add_bytes)
        results[index] = result
        bar.file_done(result)

    try:
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            list(pool.map(work, todo))
    finally:
        bar.close()
    return results  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------
# Manifest
# ----------------------------------------------------------------------------------------------
def write_manifest(path: str | Path, results: list[DownloadResult]) -> None:
    """Write the manifest atomically; `path` column relative to the manifest's folder."""
    path = Path(path)
    folder = path.parent.resolve()
    atomic_write_csv(
        path,
        MANIFEST_COLUMNS,
        (
            [
                r.id,
                r.status,
                r.reason,
                "" if r.bytes is None else r.bytes,
                r.sha256,
                os.path.relpath(r.path, folder) if r.path else "",
            ]
            for r in results
        ),
    )


def read_manifest(path: str | Path) -> list[dict]:
    """Rows of a manifest, with `path` resolved to an absolute path (empty when failed)."""
    path = Path(path)
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames != MANIFEST_COLUMNS:
            raise InputError(
                f"{path}: header {reader.fieldnames} is not a download manifest (expected {','.join(MANIFEST_COLUMNS)})"
            )
        rows = list(reader)
    for row in rows:
        row["path"] = str((path.parent / row["path"]).resolve()) if row["path"] else ""
    return rows


def previous_records(manifest: str | Path) -> dict[str, dict]:
    """id -> manifest row of an earlier run (empty when there was none or it is unreadable)."""
    try:
        return {row["id"]: row for row in read_manifest(manifest)}
    except (OSError, InputError, csv.Error):
        return {}


def failed_fraction(results: list[DownloadResult]) -> tuple[int, int, float]:
    """(failed, attempted, fraction); skipped duplicates are not attempts."""
    attempted = [r for r in results if r.status != "skipped"]
    failed = sum(r.status == "failed" for r in attempted)
    return failed, len(attempted), failed / max(1, len(attempted))


# ----------------------------------------------------------------------------------------------
# Ego4D: local folders and the official CLI
# ----------------------------------------------------------------------------------------------
def find_local_video(folder: Path, video_id: str, hint: str | None = None) -> Path | None:
    """The file (or EgoVLP chunk folder `<id>/0.mp4, 1.mp4, ...`) of `video_id` in `folder`.

    Tried in order: the layout's own place (`hint`, e.g. WebVid's <page_dir>/<videoid>.mp4); the id
    as the file is named, as published ("54322086@N00_2408598493_274c77d26a.mp4", "video7010", with
    any video extension when it has none or another); the name download.py gives the id
    (safe_filename). An id that would leave the folder (absolute, '..') is only looked up by its
    sanitised name."""
    folder = Path(folder)
    if hint and _inside(hint) and (folder / hint).is_file():
        return folder / hint
    for name in dict.fromkeys(n for n in (video_id if _inside(video_id) else None, safe_filename(video_id)) if n):
        found = _file_or_chunks(folder, name)
        if found is not None:
            return found
    return None


def _inside(name: str) -> bool:
    """A relative path that stays inside its folder."""
    parts = Path(name).parts
    return bool(parts) and not Path(name).is_absolute() and ".." not in parts


def _file_or_chunks(folder: Path, name: str) -> Path | None:
    stem = formats.video_stem(name)
    candidates = ([folder / name] if name != stem else []) + [folder / f"{stem}{ext}" for ext in VIDEO_EXTENSIONS]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    chunk_dir = folder / stem
    return chunk_dir if chunk_dir.is_dir() and list_chunks(chunk_dir) else None


def looked_for(video_id: str, hint: str | None = None) -> str:
    """What find_local_video looked for, for the failure reason."""
    names = [n for n in dict.fromkeys((video_id if _inside(video_id) else None, safe_filename(video_id))) if n]
    files = " or ".join(f"{formats.video_stem(n)}.<{'|'.join(e[1:] for e in VIDEO_EXTENSIONS)}>" for n in names)
    where = f"{hint}, " if hint else ""
    return f"looked for {where}{files} or a chunk folder {formats.video_stem(names[0])}/"


def closest_names(folder: Path, video_id: str, count: int = 3) -> list[str]:
    """The names in `folder` most like `video_id` (difflib ratio; equal ones in name order), for a
    failure reason."""
    wanted = formats.video_stem(Path(video_id).name)
    close = difflib.get_close_matches(wanted, _folder_stems(str(folder)), n=3 * count, cutoff=0.5)
    ratio = lambda name: difflib.SequenceMatcher(None, wanted, name).ratio()  # noqa: E731
    return sorted(close, key=lambda name: (-ratio(name), name))[:count]


@functools.lru_cache(maxsize=8)
def _folder_stems(folder: str, limit: int = 200_000) -> list[str]:
    names = []
    with os.scandir(folder) as entries:
        for entry in entries:
            names.append(formats.video_stem(entry.name))
            if len(names) >= limit:
                break
    return sorted(names)


def not_found_reason(folder: Path, video_id: str, hint: str | None = None, what: str = "folder") -> str:
    """`not found in folder F (looked for ...; closest names there: ...)`."""
    close = closest_names(folder, video_id)
    nearby = f"; closest names there: {', '.join(close)}" if close else "; nothing there has a similar name"
    return f"not found in {what} {folder} ({looked_for(video_id, hint)}{nearby})"


def list_chunks(chunk_dir: Path) -> list[Path]:
    """Chunk files `<k>.mp4` of an EgoVLP-style chunked video, in numeric order."""
    chunks = [p for p in chunk_dir.iterdir() if p.suffix in VIDEO_EXTENSIONS and p.stem.isdigit()]
    return sorted(chunks, key=lambda p: int(p.stem))


def register_local(
    items: list[VideoItem], folder: str | Path, verify: str = "sha256", progress: bool = True, workers: int = 4
) -> list[DownloadResult]:
    """Manifest results for videos already on disk in `folder` (no copy is made); the files are
    checked (and hashed with verify="sha256") by `workers` threads (hashlib releases the GIL)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"--local-dir {folder} is not a folder")
    results = [None] * len(items)
    for position, result in mark_duplicates(items).items():
        results[position] = result
    todo = [i for i, r in enumerate(results) if r is None]
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        checked = pool.map(lambda i: _register_one(items[i], folder, verify), todo)
        for index, result in zip(
            todo, tqdm(checked, total=len(todo), desc="verify local videos", unit="file", disable=not progress)
        ):
            results[index] = result
    return results  # type: ignore[return-value]


def _register_one(item: VideoItem, folder: Path, verify: str) -> DownloadResult:
    if not item.id:
        return DownloadResult(item.id, "failed", f"empty id in input row {item.row + 1}")
    found = find_local_video(folder, item.id, item.hint)
    if found is None:
        return DownloadResult(item.id, "failed", not_found_reason(folder, item.id, item.hint, "local folder"))
    files = list_chunks(found) if found.is_dir() else [found]
    digest = hashlib.sha256()
    for file in files:
        try:
            sniff_video(file)
        except VideoCheckError as exc:
            return DownloadResult(item.id, "failed", f"{file.name}: {exc}")
        if verify == "sha256":
            digest.update(bytes.fromhex(sha256_file(file)))
    size = sum(f.stat().st_size for f in files)
    sha = digest.hexdigest() if verify == "sha256" else ""
    reason = f"local ({len(files)} chunks)" if found.is_dir() else "local"
    return DownloadResult(item.id, "ok", reason, size, sha, found)


def ego4d_command(
    uid_file: str | Path,
    out_dir: str | Path,
    executable: str = "ego4d",
    datasets: str = "full_scale",
    aws_profile: str | None = None,
    version: str | None = None,
) -> list[str]:
    """The official Ego4D CLI call that downloads the listed video uids (licence required)."""
    command = [
        executable,
        "--output_directory",
        str(out_dir),
        "--datasets",
        datasets,
        "--video_uid_file",
        str(uid_file),
        "--yes",
    ]
    if aws_profile:
        command += ["--aws_profile_name", aws_profile]
    if version:
        command += ["--version", version]
    return command


class Ego4DCliMissing(RuntimeError):
    pass


def run_ego4d_cli(
    items: list[VideoItem],
    out_dir: str | Path,
    executable: str = "ego4d",
    datasets: str = "full_scale",
    aws_profile: str | None = None,
    version: str | None = None,
    verify: str = "sha256",
    progress: bool = True,
    workers: int = 4,
) -> list[DownloadResult]:
    """Call the Ego4D CLI for the items' uids, then register what it wrote (one row per uid)."""
    resolved = shutil.which(executable)
    if resolved is None:
        raise Ego4DCliMissing(
            f"Ego4D CLI {executable!r} not found on PATH. Ego4D videos need a signed licence and the "
            "official CLI (`pip install ego4d`, AWS credentials from the licence e-mail); or pass "
            "--local-dir with a folder that already holds <video_uid>.mp4 files"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    uid_file = out_dir / "video_uids.txt"
    uid_file.write_text("".join(f"{i.id}\n" for i in items if i.id), encoding="utf-8")
    command = ego4d_command(uid_file, out_dir, resolved, datasets, aws_profile, version)
    completed = subprocess.run(command, check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"Ego4D CLI failed with exit code {completed.returncode}: {' '.join(command)}")
    # The CLI writes <out>/<version>/<dataset>/<uid>.mp4; register whichever folder holds them.
    folders = sorted({p.parent for p in out_dir.rglob("*.mp4")}) or [out_dir]
    results = register_local(items, folders[0], verify, progress, workers)
    return results
