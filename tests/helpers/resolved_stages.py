"""Every pretraining stage (and seed variant) of a config, resolved as the pretrain rule resolves
it (svitt.workflow.stages.stage_config), as JSON: tests/data/resolved_stages.json holds these for
config.yaml, configs/paper.yaml and the paper's ablation overlay as resolved before `like:` existed,
and tests/test_workflow_settings.py checks the configs still resolve to them.

    python tests/helpers/resolved_stages.py REPO > tests/data/resolved_stages.json
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import yaml

CONFIGS = {
    "demo": ["config.yaml"],
    "paper": ["configs/paper.yaml"],
    "paper+ablation_curriculum": ["configs/paper.yaml", "configs/ablation_curriculum.yaml"],
    "demo_seeds": ["config.yaml", "configs/demo_seeds.yaml"],
    "demo_temporal": ["config.yaml", "configs/demo_temporal.yaml"],
}
_SCIENTIFIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _numbers(obj):
    if isinstance(obj, dict):
        return {k: _numbers(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_numbers(v) for v in obj]
    return float(obj) if isinstance(obj, str) and _SCIENTIFIC.fullmatch(obj) else obj


def load(repo: Path, files: list[str]) -> dict:
    """The config Snakemake's rules see: config.yaml or a standalone file, overlays merged on top
    (nested dicts key by key), numbers fixed, validated with the schema's defaults."""
    from snakemake.utils import update_config, validate

    config: dict = {}
    for name in files:
        layer = yaml.safe_load((repo / name).read_text()) or {}
        if layer.get("standalone"):
            config = {}
        update_config(config, layer)
    config = _numbers(config)
    validate(config, str(repo / "schemas/config.schema.yaml"), set_default=True)
    return config


def resolved(repo: Path) -> dict[str, dict[str, dict]]:
    sys.path.insert(0, str(repo))
    from svitt.workflow.stages import all_stage_names, stage_config, with_control

    out = {}
    for tag, files in CONFIGS.items():
        config = load(repo, files)
        out[tag] = {name: stage_config(config, name) for name in all_stage_names(with_control(config))}
    return out


if __name__ == "__main__":
    print(json.dumps(resolved(Path(sys.argv[1]).resolve()), indent=1, sort_keys=True))
