"""Small helpers for plain-dict configs: defaults, presets, unknown-key errors."""

from __future__ import annotations

import copy


def check_keys(cfg: dict, known: dict | set, section: str):
    unknown = sorted(set(cfg) - set(known))
    if unknown:
        raise ValueError(f"unknown {section} config key(s) {unknown}; expected keys: {sorted(known)}")


def merge_preset(cfg: dict, defaults: dict, presets: dict, section: str) -> dict:
    """defaults <- preset (cfg['preset']) <- explicit keys of cfg; unknown keys are an error."""
    if not isinstance(cfg, dict):
        raise TypeError(f"{section} config must be a mapping, got {type(cfg).__name__}")
    check_keys(cfg, defaults, section)
    preset = cfg.get("preset")
    if preset is not None and preset not in presets:
        raise ValueError(f"{section}.preset {preset!r} is unknown; expected one of {sorted(presets)}")
    merged = copy.deepcopy(defaults)
    if preset is not None:
        merged.update(copy.deepcopy(presets[preset]))
    merged.update(copy.deepcopy(cfg))
    return merged


def str_to_bool(text: str) -> bool:
    """'true' / 'false' (any case, as YAML and the workflow's flags spell them) -> bool."""
    value = str(text).strip().lower()
    if value not in ("true", "false"):
        raise ValueError(f"expected true or false, got {text!r}")
    return value == "true"


def add_io_arguments(parser, what: str = "run") -> None:
    """The io flags of the training CLIs (svitt.training.keys.IO_KEYS): how a run goes, not what it learns."""
    io = parser.add_argument_group(
        "io settings",
        f"override the config's; they change how the {what} runs, not what it learns, so a checkpoint stays resumable",
    )
    io.add_argument("--checkpoint-every", type=int, help="optimiser steps between checkpoints")
    io.add_argument("--log-every", type=int, help="optimiser steps between metrics.jsonl rows")
    io.add_argument("--num-workers", type=int, help="DataLoader processes per rank")
    io.add_argument(
        "--keep-checkpoint",
        type=str_to_bool,
        metavar="{true,false}",
        help="keep checkpoint.pt once the model is exported (default true; model weights only)",
    )
