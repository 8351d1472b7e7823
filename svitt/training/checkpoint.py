"""Checkpoints: atomic training-state files for resume, and the exported model of a stage.

Training state (`checkpoint.pt`): model, optimiser, scaler, step/epoch position, every RNG the run
draws from, and the resolved config; read back with torch.load(weights_only=True).
Exported model: `model.safetensors` (weights) + `model.json` (config and provenance).
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import torch

from svitt.io import atomic_path, atomic_write_json, write_safetensors


def atomic_torch_save(obj, path: str | Path):
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def config_digest(cfg: dict) -> str:
    """Stable digest of a config (key order and number formatting do not matter)."""
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:16]


def capture_rng(layout_generator: torch.Generator) -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "layout": layout_generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict, layout_generator: torch.Generator):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    layout_generator.set_state(state["layout"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_training_state(path: str | Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def export_model(model: torch.nn.Module, out_dir: str | Path, info: dict):
    """Write model.safetensors then model.json (the JSON last: its presence marks completion)."""
    out_dir = Path(out_dir)
    write_safetensors(
        out_dir / "model.safetensors",
        model.state_dict(),
        {"format": "pt", "svitt": json.dumps(info.get("model_config", {}))},
    )
    atomic_write_json(out_dir / "model.json", info)


def load_exported(weights: str | Path, frames: int | None = None, overrides: dict | None = None):
    """An exported SViTT model (model.safetensors with model.json beside it).

    frames: evaluate at another clip length (the temporal bias is resized, eq. 23-27, by the model's
    video.temporal_resize rule); overrides: model.video / model.text keys to change (e.g. keep rates
    at test time). A QA model (train_config task "qa") comes back as a VideoQA, any other as SViTT.
    Returns (model, info)."""
    from safetensors.torch import load_file

    from svitt.models.answer_decoder import VideoQA
    from svitt.models.svitt import SViTT
    from svitt.models.weights import adapt_svitt_state_dict

    weights = Path(weights)
    info_path = weights.with_name("model.json")
    if not info_path.exists():
        raise FileNotFoundError(f"{info_path} is missing: it holds the config of {weights}")
    info = json.loads(info_path.read_text())
    cfg = json.loads(json.dumps(info["model_config"]))
    cfg["video_weights"] = cfg["text_weights"] = None  # weights come from the file below
    for section, values in (overrides or {}).items():
        cfg[section].update(values)
    if frames is not None:
        cfg["video"]["frames"] = frames
    train = info.get("train_config", {})
    model = VideoQA(cfg, train["decoder_layers"]) if train.get("task") == "qa" else SViTT(cfg)
    model.load_state_dict(adapt_svitt_state_dict(load_file(str(weights)), model))
    return model.eval(), info
