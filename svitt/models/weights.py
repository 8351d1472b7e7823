"""Loading and adapting weights: image BEiT -> video encoder, BERT -> text encoder, stage -> stage.

Only tensors are ever read: safetensors, or torch.load(..., weights_only=True).
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch

from svitt.models.relative_position import resize_table, table_size

TABLE_KEY = "relative_position_bias_table"


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors / .pt / .pth / .bin file, or of a Hugging Face model folder."""
    path = Path(path)
    if path.is_dir():
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (path / name).exists():
                return load_state_dict_file(path / name)
        raise FileNotFoundError(f"{path} holds neither model.safetensors nor pytorch_model.bin")
    if not path.exists():
        raise FileNotFoundError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "omegaconf" in str(error):  # {"model", "config": DictConfig, ...} of the released SViTT code
            raise ValueError(
                f"{path} holds an OmegaConf config, as checkpoints of the released SViTT code do: "
                f"convert it with workflow_scripts/import_released.py (svitt.models.released)"
            ) from None
        raise
    for key in ("model", "module", "state_dict"):  # common wrappers of published checkpoints
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict (got {type(state).__name__})")
    return state


# Hugging Face BEiT -> timm names. Both the hub checkpoints' names (transformers 4) and
# transformers 5's are accepted.
_HF_BEIT_RULES = [
    (r"^(beit\.)?embeddings\.cls_token$", "cls_token"),
    (r"^(beit\.)?embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"^(beit\.)?(encoder\.layer|layers)\.(\d+)\.", r"blocks.\3."),
    (r"\.attention\.attention\.relative_position_bias\.", ".attn."),
    (r"\.relative_position_bias\.relative_position_bias_table", ".attn.relative_position_bias_table"),
    (r"\.attention\.output\.dense\.", ".attn.proj."),
    (r"\.attention\.o_proj\.", ".attn.proj."),
    (r"\.layernorm_before\.", ".norm1."),
    (r"\.layernorm_after\.", ".norm2."),
    (r"\.intermediate\.dense\.", ".mlp.fc1."),
    (r"\.output\.dense\.", ".mlp.fc2."),
    (r"\.lambda_1$", ".gamma_1"),
    (r"\.lambda_2$", ".gamma_2"),
    (r"^(beit\.)?pooler\.layernorm\.", "norm."),
    (r"^(beit\.)?layernorm\.", "norm."),
]
_HF_QKV = re.compile(r"^blocks\.(\d+)\.attention\.(attention\.)?(query|key|value|q_proj|k_proj|v_proj)\.(weight|bias)$")


def _hf_beit_to_timm(state_dict: dict) -> dict:
    out, qkv = {}, {}
    for key, value in state_dict.items():
        for pattern, repl in _HF_BEIT_RULES:
            key = re.sub(pattern, repl, key)
        m = _HF_QKV.match(key)
        if m:
            qkv[(int(m.group(1)), m.group(3)[0], m.group(4))] = value
        else:
            out[key] = value
    for (layer, which, kind), value in qkv.items():
        if kind == "weight" and which == "q":
            out[f"blocks.{layer}.attn.qkv.weight"] = torch.cat([qkv[(layer, c, "weight")] for c in "qkv"], dim=0)
        elif kind == "bias" and which in "qv":
            out[f"blocks.{layer}.attn.{which}_bias"] = value
    return out


def _is_hf_beit(state_dict: dict) -> bool:
    return any(k.startswith(("beit.", "embeddings.patch_embeddings", "layers.", "encoder.layer.")) for k in state_dict)


def _table_frames(rows: int, spatial: tuple[int, int]) -> int:
    """Temporal extent of a relative position table with `rows` rows for the spatial grid."""
    h, w = spatial
    per_offset = (2 * h - 1) * (2 * w - 1)
    offsets, rest = divmod(rows - 3, per_offset)
    if rest or offsets % 2 == 0:
        raise ValueError(
            f"relative position table with {rows} rows does not fit the spatial grid "
            f"{h}x{w} (expected (2T-1)*{per_offset}+3 rows)"
        )
    return (offsets + 1) // 2


POS_KEY = "pos_embed"


def resize_pos_embed(
    value: torch.Tensor, src_grid: tuple[int, int, int], dst_grid: tuple[int, int, int]
) -> torch.Tensor:
    """An absolute position embedding [1, 1 + T H W, D] on src_grid -> dst_grid along time:
    eq. 22 (a 2D embedding, src T = 1, duplicated over time) and eq. 23 (nearest neighbour in time,
    time slots aligned by their centres: destination slot t takes source slot
    floor((t + 1/2) T_src / T_dst)). The spatial grid and the CLS entry are kept."""
    (t_src, h, w), t_dst = src_grid, dst_grid[0]
    if tuple(src_grid[1:]) != tuple(dst_grid[1:]) or value.shape[1] != 1 + t_src * h * w:
        raise ValueError(
            f"{POS_KEY} of shape {tuple(value.shape)} does not fit the grid {tuple(src_grid)} "
            f"or cannot be resized to {tuple(dst_grid)} (image_size / patch_size must match)"
        )
    grid = value[:, 1:].reshape(1, t_src, h * w, value.shape[-1])
    source = [(2 * t + 1) * t_src // (2 * t_dst) for t in range(t_dst)]
    return torch.cat([value[:, :1], grid[:, source].reshape(1, t_dst * h * w, -1)], dim=1)


def _pos_grid(value: torch.Tensor, spatial: tuple[int, int]) -> tuple[int, int, int]:
    frames, rest = divmod(value.shape[1] - 1, spatial[0] * spatial[1])
    if rest or frames < 1:
        raise ValueError(f"{POS_KEY} of shape {tuple(value.shape)} does not fit the spatial grid {spatial}")
    return (frames,) + tuple(spatial)


def _inflate_patch_embed(weight: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """[D, C, p, p] image kernel -> [D, C * tubelet, p, p], split evenly over the tubelet's frames
    so a static clip embeds exactly as the image does."""
    if weight.shape == target.shape:
        return weight
    tubelet, rest = divmod(target.shape[1], weight.shape[1])
    if rest or weight.shape[0] != target.shape[0] or weight.shape[2:] != target.shape[2:]:
        raise ValueError(
            f"patch_embed.proj.weight has shape {tuple(weight.shape)}, "
            f"which cannot be inflated to {tuple(target.shape)}"
        )
    return weight.repeat(1, tubelet, 1, 1) / tubelet


def video_checkpoint_filter_fn(state_dict: dict, model: torch.nn.Module) -> dict:
    """Adapt an image BEiT (timm or HF) or a video encoder checkpoint to `model` (a VideoEncoder):
    relative position tables are tiled/resized over time, the patch embedding inflated over
    tubelets, classifier heads dropped, the final norm (the clip summary's) taken from `fc_norm` or
    `norm`; a separate fusion norm (video.fusion_norm) keeps its fresh init, as the released model's
    vision_layernorm does."""
    if _is_hf_beit(state_dict):
        state_dict = _hf_beit_to_timm(state_dict)
    target = model.state_dict()
    out = {}
    for key, value in state_dict.items():
        if key.startswith(("head.", "lm_head.", "classifier.")) or "relative_position_index" in key:
            continue
        if key.startswith("fc_norm."):
            key = "norm." + key[len("fc_norm.") :]
        if key not in target:
            continue
        if key.endswith(TABLE_KEY):
            grid = model.grid
            value = resize_table(
                value, (_table_frames(value.shape[0], grid[1:]),) + grid[1:], grid, model.cfg["temporal_resize"]
            )
        elif key == "patch_embed.proj.weight":
            value = _inflate_patch_embed(value, target[key])
        elif key == POS_KEY:
            value = resize_pos_embed(value, _pos_grid(value, model.grid[1:]), model.grid)
        out[key] = value
    if POS_KEY in target and POS_KEY not in out:  # BEiT has none: the embedding keeps its init
        out[POS_KEY] = target[POS_KEY]
    if "norm.weight" not in out and "norm.weight" in target:  # e.g. a checkpoint without final norm
        out["norm.weight"], out["norm.bias"] = target["norm.weight"], target["norm.bias"]
    for key in ("fusion_norm.weight", "fusion_norm.bias"):  # video.fusion_norm separate: new, as released
        if key in target and key not in out:
            out[key] = target[key]
    missing = sorted(set(target) - set(out))
    if missing:
        raise ValueError(
            f"checkpoint is not a BEiT image/video encoder of this layout: missing "
            f"{len(missing)} tensors, e.g. {missing[:6]}"
        )
    _check_shapes(out, target, "video encoder")
    return out


def _check_shapes(source: dict, target: dict, what: str):
    bad = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(target[k].shape)}"
        for k, v in source.items()
        if k in target and v.shape != target[k].shape
    ]
    if bad:
        raise ValueError(
            f"{what} checkpoint does not fit the model ({len(bad)} tensors disagree):\n  " + "\n  ".join(bad)
        )


def bert_checkpoint_filter_fn(state_dict: dict, prefix_map: dict[str, str]) -> dict:
    """HF BERT (BertModel / BertForMaskedLM / BertForPreTraining) -> our names via prefix_map,
    e.g. {"bert.": "text_encoder.", "cls.predictions.": "mlm_head."}. Pooler and NSP heads dropped.
    The legacy LayerNorm names of the published bert-base-uncased files (`LayerNorm.gamma` /
    `.beta`, which transformers renames on load) become `.weight` / `.bias`."""
    out = {}
    for key, value in state_dict.items():
        if key.startswith(("bert.pooler.", "pooler.", "cls.seq_relationship.")) or key.endswith("position_ids"):
            continue
        key = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", key))
        if not key.startswith(("bert.", "cls.")):
            key = "bert." + key
        for old, new in prefix_map.items():
            if key.startswith(old):
                out[new + key[len(old) :]] = value
                break
    return out


def adapt_svitt_state_dict(state_dict: dict, model: torch.nn.Module) -> dict:
    """A previous stage's SViTT state dict -> this model (SViTT or VideoQA): the temporal axis of every video
    relative position table is resized (eq. 23-27); any other shape mismatch is an error naming
    the tensors."""
    target = model.state_dict()
    grid = model.video_encoder.grid
    out = {}
    for key, value in state_dict.items():
        if key.endswith(TABLE_KEY) and key.startswith("video_encoder.") and key in target:
            if value.shape[0] != table_size(grid):
                value = resize_table(
                    value,
                    (_table_frames(value.shape[0], grid[1:]),) + grid[1:],
                    grid,
                    model.video_encoder.cfg["temporal_resize"],
                )
        elif key == "video_encoder." + POS_KEY and key in target and value.shape != target[key].shape:
            value = resize_pos_embed(value, _pos_grid(value, grid[1:]), grid)
        elif key == "video_encoder.patch_embed.proj.weight" and key in target:
            if value.shape != target[key].shape:
                raise ValueError(
                    f"{key}: checkpoint {tuple(value.shape)} vs model "
                    f"{tuple(target[key].shape)} (tubelet_frames or patch_size differ)"
                )
        out[key] = value
    missing = sorted(set(target) - set(out))
    unexpected = sorted(set(out) - set(target))
    if missing or unexpected:
        raise ValueError(
            f"checkpoint is from another architecture: missing {missing[:10]}"
            f"{' ...' if len(missing) > 10 else ''}, unexpected {unexpected[:10]}"
            f"{' ...' if len(unexpected) > 10 else ''}"
        )
    _check_shapes(out, target, "SViTT")
    return out
