"""Config layering and spelling: YAML numbers, `standalone:` overlays, canonical params, CLI flags.

Pure Python (PyYAML at most): rules/common.smk calls these with what Snakemake read
(workflow.overwrite_configfiles, workflow.config_settings), and tests call them directly.
"""

from __future__ import annotations

import json
import re

# YAML 1.1 reads 1e-5 (no dot) as a string; users write learning rates that way.
_SCIENTIFIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def numbers(obj):
    """Strings in scientific notation ("1e-5") -> floats, everywhere in a config."""
    if isinstance(obj, dict):
        return {k: numbers(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [numbers(v) for v in obj]
    if isinstance(obj, str) and _SCIENTIFIC.fullmatch(obj):
        return float(obj)
    return obj


def merge(target: dict, overlay: dict) -> dict:
    """Snakemake's config merge (as snakemake.utils.update_config): nested mappings key by key,
    anything else (lists included) replaced. Updates `target` in place and returns it."""

    def _merge(into, over):
        for key, value in over.items():
            if not isinstance(into, dict):
                into = {}
            if isinstance(value, dict):
                into[key] = _merge(into.get(key, {}), value)
            else:
                into[key] = value
        return into

    _merge(target, overlay)
    return target


def standalone_layers(overlays: list[dict], settings: dict) -> dict | None:
    """The config when an overlay says `standalone: true`, else None (Snakemake's merge stands).

    A --configfile overlay with `standalone: true` (configs/paper.yaml) replaces config.yaml
    instead of merging into it: Snakemake merges nested dicts key by key, so an overlay would
    otherwise inherit every demo key it does not set (crop scales, warm-up, demo datasets).
    Overlays given after it still merge on top of it, and `settings` (--config key=value) last.

    overlays: the --configfile files' contents, in command-line order; settings: the --config dict.
    """
    layers = [layer or {} for layer in overlays]
    standalone = [i for i, layer in enumerate(layers) if layer.get("standalone")]
    if not standalone:
        return None
    merged: dict = {}
    for layer in layers[standalone[-1] :]:
        merge(merged, layer)
    return merge(merged, dict(settings or {}))


def canonical(obj) -> str:
    """One spelling per config slice: key order, YAML layout and number format do not matter,
    so only real edits change a rule's params (and rerun it)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def cli_flags(settings: dict, skip=()) -> str:
    """{"max_bytes": 5} -> "--max-bytes 5", keys sorted: a canonical string for params."""
    return " ".join(f"--{k.replace('_', '-')} {v}" for k, v in sorted(settings.items()) if k not in skip)


def by_name(entries) -> dict[str, dict]:
    """A list of names or {name: ..., settings} -> {name: settings}, in list order."""
    out = {}
    for entry in entries:
        entry = {"name": entry} if isinstance(entry, str) else dict(entry)
        out[entry.pop("name")] = entry
    return out
