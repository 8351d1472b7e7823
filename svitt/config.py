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
