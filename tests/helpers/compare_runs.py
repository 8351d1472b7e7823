"""Compare two runs of the workflow file by file (results/ and resources/), as issue 23 asked of two
clean `make demo` runs: which files are identical bytes, and for each one that is not, whether only
what a run cannot repeat differs or its content.

What a run cannot repeat: the run folder's path inside a file (corpus URLs, the report), the
source videos' modification times that a frame shard keeps to reuse items on resume
(`source_stamp`), and timings (training throughput `clips_per_s`, the report's job runtimes).

    python tests/helpers/compare_runs.py /tmp/run1 /tmp/run2
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import struct
from pathlib import Path

TIMING_KEYS = re.compile(r"clips_per_s|seconds|wall|per_s$")
RUNTIME_LINE = re.compile(r"var (runtimes|timeline)_spec = ")  # the Snakemake report's job runtimes and timeline
RUN_ATTRS = ("source_stamp",)  # h5 attributes that hold a source file's mtime
TEXT_SUFFIXES = (".csv", ".tsv", ".md", ".txt", ".log", ".html")


class Runs:
    def __init__(self, first: Path, second: Path):
        self.roots = (first.resolve(), second.resolve())

    def neutral(self, value, side: int):
        """A JSON value with timing keys dropped and the run folder's path replaced."""
        if isinstance(value, dict):
            return {k: self.neutral(v, side) for k, v in value.items() if not TIMING_KEYS.search(k)}
        if isinstance(value, list):
            return [self.neutral(v, side) for v in value]
        if isinstance(value, str):
            return value.replace(str(self.roots[side]), "<run>")
        return value

    def text(self, path: Path, side: int) -> list[str]:
        """A text file's lines, the run folder's path replaced, without the report's job runtimes."""
        text = path.read_text().replace(str(self.roots[side]), "<run>")
        return [line for line in text.splitlines() if not RUNTIME_LINE.search(line)]

    def json_rows(self, path: Path, side: int):
        text = path.read_text()
        rows = (
            [json.loads(line) for line in text.splitlines() if line.strip()]
            if path.suffix == ".jsonl"
            else [json.loads(text)]
        )
        return self.neutral(rows, side)

    def explain(self, rel: str) -> str:
        a, b = (root / rel for root in self.roots)
        if a.suffix in (".json", ".jsonl"):
            same = self.json_rows(a, 0) == self.json_rows(b, 1)
            return "same but timing or paths" if same else "CONTENT DIFFERS"
        if a.suffix in TEXT_SUFFIXES:
            same = self.text(a, 0) == self.text(b, 1)
            return "same but paths or job runtimes" if same else "CONTENT DIFFERS"
        if a.suffix == ".h5":
            differs = h5_difference(a, b, self)
            return "same frames (source mtimes, paths)" if differs is None else f"CONTENT DIFFERS: {differs}"
        if a.suffix == ".safetensors":
            return "same tensors and metadata" if safetensors_parts(a) == safetensors_parts(b) else "CONTENT DIFFERS"
        if a.suffix == ".pt":
            return checkpoint_difference(a, b, self)
        return "CONTENT DIFFERS (bytes)"


def digest(path: Path) -> bytes:
    return hashlib.sha256(path.read_bytes()).digest()


def run_files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for d in ("results", "resources") for p in (root / d).rglob("*") if p.is_file()}


def safetensors_parts(path: Path):
    raw = path.read_bytes()
    length = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + length])
    metadata = header.pop("__metadata__", {})
    return header, metadata, raw[8 + length :]


def same_array(u, v, runs: Runs) -> bool:
    import numpy as np

    u, v = np.asarray(u), np.asarray(v)
    if u.dtype == object:
        return u.shape == v.shape and all(same_array(p, q, runs) for p, q in zip(u.ravel(), v.ravel()))
    if u.dtype.kind in "SU":
        as_text = [np.char.replace(x.astype(str), str(root), "<run>") for x, root in zip((u, v), runs.roots)]
        return np.array_equal(*as_text)
    return np.array_equal(u, v)


def h5_difference(a: Path, b: Path, runs: Runs) -> str | None:
    """None when every dataset and attribute is equal (paths replaced, RUN_ATTRS skipped)."""
    import h5py

    with h5py.File(a) as f, h5py.File(b) as g:
        names = []
        f.visititems(lambda name, obj: names.append(name))
        for name in names:
            if name not in g:
                return f"{name} missing"
            left, right = f[name], g[name]
            if isinstance(left, h5py.Dataset) and not same_array(left[()], right[()], runs):
                return f"dataset {name}"
            for key in set(left.attrs) - set(RUN_ATTRS):
                if key not in right.attrs or not same_array(left.attrs[key], right.attrs[key], runs):
                    return f"attribute {name}.{key}"
    return None


def checkpoint_difference(a: Path, b: Path, runs: Runs) -> str:
    import torch

    left, right = (torch.load(p, map_location="cpu", weights_only=True) for p in (a, b))
    differs = [k for k in left if k != "metrics" and not same_object(left[k], right.get(k), runs)]
    metrics = runs.neutral(left.get("metrics"), 0) == runs.neutral(right.get("metrics"), 1)
    if not differs and metrics:
        return "same but timing in its metrics"
    return f"CONTENT DIFFERS: {differs + ([] if metrics else ['metrics'])}"


def same_object(u, v, runs: Runs) -> bool:
    import torch

    if isinstance(u, torch.Tensor):
        return isinstance(v, torch.Tensor) and torch.equal(u, v)
    if isinstance(u, dict):
        return isinstance(v, dict) and u.keys() == v.keys() and all(same_object(u[k], v[k], runs) for k in u)
    if isinstance(u, (list, tuple)):
        return isinstance(v, (list, tuple)) and len(u) == len(v) and all(same_object(p, q, runs) for p, q in zip(u, v))
    return runs.neutral(u, 0) == runs.neutral(v, 1)


def compare(first: Path, second: Path) -> dict:
    runs = Runs(first, second)
    files = [run_files(root) for root in runs.roots]
    common = sorted(files[0] & files[1])
    changed = [rel for rel in common if digest(runs.roots[0] / rel) != digest(runs.roots[1] / rel)]
    return {
        "files": [len(f) for f in files],
        "identical": len(common) - len(changed),
        "only_first": sorted(files[0] - files[1]),
        "only_second": sorted(files[1] - files[0]),
        "differ": {rel: runs.explain(rel) for rel in changed},
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("first", type=Path)
    p.add_argument("second", type=Path)
    args = p.parse_args(argv)
    report = compare(args.first, args.second)
    print(
        f"{report['files'][0]} / {report['files'][1]} files; {report['identical']} identical bytes; "
        f"{len(report['differ'])} differ; only in the first {report['only_first']}; "
        f"only in the second {report['only_second']}"
    )
    for rel, why in report["differ"].items():
        print(f"{rel}: {why}")
    bad = report["only_first"] or report["only_second"] or any("DIFFERS" in why for why in report["differ"].values())
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
