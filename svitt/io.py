"""Atomic writes: every output is written under a temporary name beside it, then renamed, so a
crash never leaves a file that looks complete."""

from __future__ import annotations

import csv
import json
import os
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | Path):
    """Yields a temporary path in the same folder; renamed to `path` when the block succeeds,
    removed when it fails. The temporary name ends in .tmp-<pid>, so globs for the real suffix
    (say *.h5 shards) never pick up a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes):
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_json(path: str | Path, obj):
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def atomic_write_csv(path: str | Path, header: list[str], rows):
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def write_safetensors(path: str | Path, tensors: dict, metadata: dict[str, str]) -> None:
    """Tensors (moved to the CPU, made contiguous) and string metadata as a .safetensors file,
    atomically and with its header sorted: the same tensors give the same bytes from any process."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        sort_safetensors_header(tmp)


def sort_safetensors_header(path: str | Path) -> None:
    """Rewrite a .safetensors header with its keys sorted, in place: safetensors writes the
    metadata map in no fixed order, so two exports of the same weights differed in their bytes.
    The sorted JSON is no longer than the original and is padded with spaces to its length, so
    the tensors' offsets do not move."""
    with open(path, "r+b") as handle:
        length = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(length))
        canonical = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
        if len(canonical) > length:
            raise ValueError(
                f"{path}: the sorted header ({len(canonical)} bytes) does not fit the original ({length} bytes)"
            )
        handle.seek(8)
        handle.write(canonical + b" " * (length - len(canonical)))
