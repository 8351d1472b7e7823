"""The one way an evaluation loads an exported model and picks its device.

Every script that evaluates a model (evaluate.py, sweep.py, nlq_features.py, ground.py,
pruning_maps.py, word_probe.py, vtm_negatives.py) calls `load_for_evaluation`:

    loaded = load_for_evaluation("results/pretrain/stage1/model.safetensors", device="auto")
    loaded.model, loaded.info, loaded.device, loaded.transform(), loaded.tokenizer

- The model is an export of the training loop (svitt.training.checkpoint.export_model):
  `model.safetensors` (weights, read with safetensors: no pickle) and `model.json` beside it
  (config and provenance). A folder holding the two can be given instead of the weights file.
- The model is built on the CPU, its weights loaded there, put in eval mode, then moved to the
  device (what every evaluation did before running; on the CPU the move is a no-op).
- Devices follow the workflow's convention (`--device auto|cpu|cuda`, as svitt.distributed's
  init_distributed): "auto" is the GPU where torch sees one, else the CPU; "cuda" without a GPU
  is an error.
- kind "qa" loads a finetuned VideoQA strictly (a model of any other task is an error, and so is
  another clip length); kind "svitt" (the default) loads any export, a QA model as a VideoQA,
  with the temporal bias resized to `frames` and `overrides` applied to its config.

Importing this module does not import torch (sweep.py checks a point from model.json first).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEVICES = ("auto", "cpu", "cuda")
KINDS = ("svitt", "qa")
WEIGHTS_NAME, INFO_NAME = "model.safetensors", "model.json"


def pick_device(device: str = "auto"):
    """torch.device of an evaluation: "auto" -> cuda where torch sees a GPU, else cpu; "cpu";
    "cuda" (or "cuda:N"), which must exist."""
    import torch

    name = str(device)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.split(":")[0] not in ("cpu", "cuda"):
        raise ValueError(f"device must be one of {DEVICES} (or cuda:N), got {device!r}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} was requested but torch sees no CUDA device")
    return torch.device(name)


def weights_path(model: str | Path) -> Path:
    """The model.safetensors of `model` (that file, or a folder holding it); an error naming
    the path when it is missing."""
    path = Path(model)
    if path.is_dir():
        path = path / WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist: expected an exported model ({WEIGHTS_NAME} with "
            f"{INFO_NAME} beside it, as the training loop writes)"
        )
    return path


def read_model_info(model: str | Path) -> dict:
    """The model.json beside an exported model's weights (no torch needed)."""
    weights = weights_path(model)
    info_path = weights.with_name(INFO_NAME)
    if not info_path.exists():
        raise FileNotFoundError(f"{info_path} is missing: it holds the config of {weights}")
    try:
        info = json.loads(info_path.read_text())
    except ValueError as error:
        raise ValueError(f"{info_path} is not JSON ({error}): expected the {INFO_NAME} of an exported model") from None
    if not isinstance(info, dict) or "model_config" not in info:
        raise ValueError(f"{info_path} has no model_config: not the {INFO_NAME} of an exported SViTT model")
    return info


@dataclass
class LoadedModel:
    """A model ready to evaluate: in eval mode, on `device`."""

    model: Any  # SViTT or VideoQA
    info: dict  # its model.json: name, frames, model_config, train_config, ...
    device: Any  # torch.device
    path: Path  # the weights file
    tokenizer: Any = None  # loaded when a tokenizer folder was given

    @property
    def cfg(self) -> dict:
        """The model's resolved config (after frames / overrides)."""
        return self.model.cfg

    @property
    def data_config(self) -> dict:
        """The `data` section the model was trained with (normalisation)."""
        return self.info["train_config"]["data"]

    def transform(self):
        """The evaluation transform of the model: its image size, normalised as in training."""
        from svitt.data.transforms import EvalTransform

        data = self.data_config
        return EvalTransform(size=self.cfg["video"]["image_size"], mean=tuple(data["mean"]), std=tuple(data["std"]))

    def __iter__(self):  # model, device = load_for_evaluation(...)
        return iter((self.model, self.device))


def check_safetensors(weights: Path) -> None:
    """An error naming the file when it is not a safetensors file (its header is read, no tensor)."""
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="pt"):
            pass
    except Exception as error:  # safetensors' own errors do not name the file
        raise ValueError(f"{weights} is not a safetensors file of an exported model ({error})") from None


def _load_svitt(weights: Path, frames, overrides):
    """svitt.training.checkpoint.load_exported, the loader the training loop's exports are read
    back with: SViTT (or VideoQA for a QA export) with the temporal bias resized to `frames`."""
    from svitt.training.checkpoint import load_exported

    return load_exported(weights, frames=frames, overrides=overrides)


def _load_qa(weights: Path, frames, overrides):
    """A finetuned VideoQA, strictly: its task must be qa, its clip length the trained one."""
    from safetensors.torch import load_file

    from svitt.models.answer_decoder import VideoQA

    info = read_model_info(weights)
    train_cfg = info.get("train_config", {})
    if train_cfg.get("task") != "qa":
        raise ValueError(f"{weights} is a {train_cfg.get('task', 'pairs')!r} model, not a finetuned QA model")
    if frames is not None and frames != info["model_config"]["video"]["frames"]:
        raise ValueError(
            f"{weights} was finetuned with {info['model_config']['video']['frames']} frames; "
            f"evaluating it with {frames} is not supported"
        )
    if overrides:
        raise ValueError(f"{weights}: config overrides are not supported for a finetuned QA model")
    model = VideoQA(info["model_config"], train_cfg["decoder_layers"])
    model.load_state_dict(load_file(str(weights)))
    return model.eval(), info


_LOADERS = {"svitt": _load_svitt, "qa": _load_qa}


def load_model(model: str | Path, frames: int | None = None, overrides: dict | None = None, kind: str = "svitt"):
    """(model in eval mode on the CPU, its model.json) of an exported model; see load_for_evaluation."""
    if kind not in _LOADERS:
        raise ValueError(f"unknown model kind {kind!r}; expected one of {KINDS}")
    weights = weights_path(model)
    read_model_info(weights)  # a clear error for a missing or foreign model.json
    check_safetensors(weights)
    try:
        return _LOADERS[kind](weights, frames, overrides)
    except (RuntimeError, ValueError) as error:  # load_state_dict / adapt_svitt_state_dict: keys, shapes
        if "state_dict" not in str(error) and "does not fit" not in str(error):
            raise
        raise ValueError(f"the weights of {weights} do not fit the model its {INFO_NAME} describes: {error}") from None


def load_for_evaluation(
    model: str | Path,
    device: str = "auto",
    *,
    frames: int | None = None,
    overrides: dict | None = None,
    kind: str = "svitt",
    tokenizer: str | Path | None = None,
) -> LoadedModel:
    """An exported model ready to evaluate (module docstring): built and loaded on the CPU, in
    eval mode, moved to the device `device` picks (pick_device).

    model: model.safetensors (model.json beside it) or their folder; frames: evaluate at another
    clip length (the temporal bias is resized, eq. 23-27); overrides: model.video / model.text
    keys to change (e.g. keep rates at test time); kind: "svitt" or "qa" (a finetuned VideoQA,
    checked); tokenizer: a tokenizer folder to load with it. Unpacks as (model, device)."""
    target = pick_device(device)
    built, info = load_model(model, frames=frames, overrides=overrides, kind=kind)
    loaded_tokenizer = None
    if tokenizer is not None:
        from svitt.data.pipeline import load_tokenizer

        loaded_tokenizer = load_tokenizer(tokenizer)
    return LoadedModel(built.to(target), info, target, weights_path(model), loaded_tokenizer)
