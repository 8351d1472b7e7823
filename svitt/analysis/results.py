"""Reading the workflow's result files for figures and tables (no plotting, no torch).

Results come as {name: path or [paths]}: one file per seed of the same model.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

ORDERS = ("normal", "shuffled", "reversed")


def read_json(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"result file {path} does not exist: run the rule that writes it first")
    return json.loads(path.read_text())


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"metrics file {path} does not exist: run the stage that writes it first")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def as_runs(results: dict) -> dict[str, list[Path]]:
    """{name: path | [paths]} -> {name: [paths]}; at least one name with one file."""
    runs = {
        name: [Path(p) for p in ([paths] if isinstance(paths, (str, Path)) else paths)]
        for name, paths in results.items()
    }
    if not runs or not all(runs.values()):
        raise ValueError(f"no result files to plot (got {results!r})")
    return runs


def load_runs(results: dict) -> dict[str, list[dict]]:
    return {name: [read_json(p) for p in paths] for name, paths in as_runs(results).items()}


def pick(result: dict, key: str, default=math.nan) -> float:
    """result["a"]["b"] for key "a.b"; `default` when absent."""
    value = result
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return default
        value = value[part]
    return float(value) if isinstance(value, (int, float)) else default


def mean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan
