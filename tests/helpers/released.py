"""Checkpoints in the layout of the released SViTT code (github JerryYLi/svitt), built by hand.

`released_state_dict` writes one of this project's models under the names the released model
(models/sparse_xbeit.py, sparse_xbert.py, xbert.py, model_*.py) gives its tensors: Hugging Face BEiT
with separate q / k / v (no k bias) and a persistent 3D relative_position_index buffer per layer,
BERT with its position_ids buffer and an MLM / LM head whose decoder is tied to the word
embeddings. `released_video_reference` computes the released video tower's outputs from such a
state dict (dense attention, CLS-attention pruning as in BeitLayer.sparsify) without this project's
model code.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# The model-relevant part of a stored config, as the released YAMLs write it (configs/*.yaml).
RELEASED_CONFIG = {
    "vit_type": "beit",
    "image_res": 32,
    "embed_dim": 16,
    "temp": 0.07,
    "text_encoder": "bert-base-uncased",
    "bert_config": "configs/config_bert.json",
    "video_input": {"num_frames": 2, "reader": "decord", "sample_type": "rand", "num_frames_test": 2},
    "vision_encoder_args": {
        "token_keep_rate": 0.5,
        "token_keep_strategy": "cls_attn",
        "token_drop_loc": [0],
        "sparse_local_attn": 1,
        "sparse_random_attn": 1,
        "attn_block_size": 5,
    },
    "text_encoder_args": {"fusion_layer": 2, "num_attention_heads": 2, "token_keep_rate": 0.25, "token_drop_loc": [2]},
    "joint_encoder_args": {"token_keep_rate": 0.1, "token_drop_loc_xmodal": [1]},
    "max_txt_l": {"image": 32, "video": 32},
    "max_q_len": 25,
    "max_a_len": 5,
}
# This project's model config for RELEASED_CONFIG at the widths tiny_model() uses, every setting
# on the released code's side (docs/fidelity.md).
TINY_RELEASED_MODEL = {
    "video": dict(
        frames=2,
        image_size=32,
        patch_size=8,
        depth=2,
        width=16,
        heads=2,
        mlp_ratio=2.0,
        local_blocks=1,
        random_blocks=1,
        block_size=5,
        visual_keep=0.5,
        prune_layers=[1],
        drop_path=0.1,
        init_std=0.02,
        layer_norm_eps=1e-12,
        pooling="mean",
        fusion_norm="separate",
        prune_score="raw",
        temporal_resize="interpolate_nearest",
    ),
    "text": dict(
        vocab_size=40,
        width=16,
        depth=4,
        heads=2,
        intermediate_size=32,
        fusion_layers=2,
        max_position_embeddings=24,
        multimodal_keep=0.25,
        multimodal_prune_layers=[1],
        question_pruning=False,
    ),
    "embed_dim": 16,
}


def perturbed(model, seed=0, scale=0.05):
    """Random non-trivial weights everywhere (fresh models zero their biases and tables)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model


def released_relative_position_index(window: tuple[int, int, int]) -> torch.Tensor:
    """BeitRelativePositionBias3D's buffer: offsets (query - key) shifted to >= 0 and flattened with
    strides ((2H-1)(2W-1), 2W-1, 1); then CLS->token, token->CLS, CLS->CLS after the offsets."""
    coords = torch.stack(torch.meshgrid(*[torch.arange(w) for w in window], indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + torch.tensor([w - 1 for w in window])
    sizes = [2 * w - 1 for w in window]
    offsets = rel[..., 0] * sizes[1] * sizes[2] + rel[..., 1] * sizes[2] + rel[..., 2]
    n = math.prod(sizes)
    index = torch.zeros(offsets.shape[0] + 1, offsets.shape[0] + 1, dtype=torch.long)
    index[1:, 1:] = offsets
    index[0, 1:], index[1:, 0], index[0, 0] = n, n + 1, n + 2
    return index


def _video(ours: dict, grid) -> dict:
    out = {
        "vision_encoder.embeddings.cls_token": ours["video_encoder.cls_token"],
        "vision_encoder.embeddings.patch_embeddings.projection.weight": ours["video_encoder.patch_embed.proj.weight"],
        "vision_encoder.embeddings.patch_embeddings.projection.bias": ours["video_encoder.patch_embed.proj.bias"],
    }
    depth = 1 + max(int(k.split(".")[2]) for k in ours if k.startswith("video_encoder.blocks."))
    for i in range(depth):
        src, dst = f"video_encoder.blocks.{i}.", f"vision_encoder.encoder.layer.{i}."
        q, k, v = ours[src + "attn.qkv.weight"].chunk(3, dim=0)
        att = dst + "attention.attention."
        out.update(
            {
                att + "query.weight": q,
                att + "query.bias": ours[src + "attn.q_bias"],
                att + "key.weight": k,
                att + "value.weight": v,
                att + "value.bias": ours[src + "attn.v_bias"],
                att + "relative_position_bias.relative_position_bias_table": ours[
                    src + "attn.relative_position_bias_table"
                ],
                att + "relative_position_bias.relative_position_index": released_relative_position_index(grid),
                dst + "lambda_1": ours[src + "gamma_1"],
                dst + "lambda_2": ours[src + "gamma_2"],
            }
        )
        for theirs, mine in (
            ("attention.output.dense", "attn.proj"),
            ("layernorm_before", "norm1"),
            ("layernorm_after", "norm2"),
            ("intermediate.dense", "mlp.fc1"),
            ("output.dense", "mlp.fc2"),
        ):
            for p in ("weight", "bias"):
                out[f"{dst}{theirs}.{p}"] = ours[f"{src}{mine}.{p}"]
    return out


def _bert(ours: dict, source: str, target: str, layers: str = "encoder.layer.") -> dict:
    """Our BERT names (HF's) under `source` -> `target`, plus HF's position_ids buffer."""
    out = {
        target + "encoder.layer." + k[len(source + layers) :]: v
        for k, v in ours.items()
        if k.startswith(source + layers)
    }
    out.update({target + k[len(source) :]: v for k, v in ours.items() if k.startswith(source + "embeddings.")})
    length = ours[source + "embeddings.position_embeddings.weight"].shape[0]
    out[target + "embeddings.position_ids"] = torch.arange(length).expand(1, -1)
    return out


def _lm_head(words: torch.Tensor, dense_w, dense_b, norm_w, norm_b, bias, prefix: str) -> dict:
    return {
        prefix + "transform.dense.weight": dense_w,
        prefix + "transform.dense.bias": dense_b,
        prefix + "transform.LayerNorm.weight": norm_w,
        prefix + "transform.LayerNorm.bias": norm_b,
        prefix + "bias": bias,
        prefix + "decoder.weight": words,
        prefix + "decoder.bias": bias,
    }


def released_state_dict(model, kind: str) -> dict:
    """One of our models (SViTT for pretrain / retrieval, VideoQA for qa) in the released naming."""
    ours = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out = _video(ours, model.video_encoder.grid)
    out["vision_layernorm.weight"] = ours["video_encoder.fusion_norm.weight"]
    out["vision_layernorm.bias"] = ours["video_encoder.fusion_norm.bias"]
    if kind != "qa":  # the released QA model deletes BEiT's pooler
        out["vision_encoder.pooler.layernorm.weight"] = ours["video_encoder.norm.weight"]
        out["vision_encoder.pooler.layernorm.bias"] = ours["video_encoder.norm.bias"]
        out.update(
            {
                "vision_proj.weight": ours["vision_proj.weight"],
                "vision_proj.bias": ours["vision_proj.bias"],
                "text_proj.weight": ours["text_proj.weight"],
                "text_proj.bias": ours["text_proj.bias"],
                "temp": ours["temp"],
                "itm_head.weight": ours["vtm_head.weight"],
                "itm_head.bias": ours["vtm_head.bias"],
            }
        )
    text = "text_encoder.bert." if kind == "pretrain" else "text_encoder."
    out.update(_bert(ours, "text_encoder.", text))
    if kind == "pretrain":
        out.update(
            _lm_head(
                out[text + "embeddings.word_embeddings.weight"],
                ours["mlm_head.transform.dense.weight"],
                ours["mlm_head.transform.dense.bias"],
                ours["mlm_head.transform.LayerNorm.weight"],
                ours["mlm_head.transform.LayerNorm.bias"],
                ours["mlm_head.bias"],
                "text_encoder.cls.predictions.",
            )
        )
    if kind == "qa":
        out.update(_bert(ours, "answer_decoder.", "text_decoder.bert.", layers="layer."))
        out.update(
            _lm_head(
                out["text_decoder.bert.embeddings.word_embeddings.weight"],
                ours["answer_decoder.transform.0.weight"],
                ours["answer_decoder.transform.0.bias"],
                ours["answer_decoder.transform.2.weight"],
                ours["answer_decoder.transform.2.bias"],
                ours["answer_decoder.bias"],
                "text_decoder.cls.predictions.",
            )
        )
    return out


def released_video_reference(
    state: dict, video: torch.Tensor, eps: float, keep_rate: float, drop_loc, heads: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The released video tower on a clip [B, T, 3, H, W] with dense attention: HF BEiT layers
    (pre-norm, layer scale), the 3D bias looked up through the checkpoint's relative_position_index
    at the kept tokens' positions, BeitLayer.sparsify after the layers in drop_loc (top ceil(q N) by
    the head-mean CLS attention, kept in order), then (vision_layernorm of every token, the pooler's
    LayerNorm of the mean regional token)."""
    p = "vision_encoder."
    b, t = video.shape[:2]
    w = state[p + "embeddings.patch_embeddings.projection.weight"]
    x = F.conv2d(video.flatten(0, 1), w, state[p + "embeddings.patch_embeddings.projection.bias"], stride=w.shape[-1])
    x = x.flatten(2).transpose(1, 2).reshape(b, -1, w.shape[0])  # (b t) n d -> b (t n) d
    x = torch.cat([state[p + "embeddings.cls_token"].expand(b, -1, -1), x], 1)
    idx = torch.arange(x.shape[1])[None].expand(b, -1)  # positions in the index buffer, CLS = 0
    layer = 0
    while f"{p}encoder.layer.{layer}.layernorm_before.weight" in state:
        lp = f"{p}encoder.layer.{layer}."

        def ln(h, name, lp=lp):
            return F.layer_norm(h, h.shape[-1:], state[lp + name + ".weight"], state[lp + name + ".bias"], eps)

        a = lp + "attention.attention."
        h = ln(x, "layernorm_before")

        def split(y):
            return y.view(b, y.shape[1], heads, -1).transpose(1, 2)

        q = split(F.linear(h, state[a + "query.weight"], state[a + "query.bias"]))
        k = split(F.linear(h, state[a + "key.weight"]))
        v = split(F.linear(h, state[a + "value.weight"], state[a + "value.bias"]))
        index = state[a + "relative_position_bias.relative_position_index"]
        table = state[a + "relative_position_bias.relative_position_bias_table"]
        bias = torch.stack([table[index[i][:, i]].permute(2, 0, 1) for i in idx])  # [B, heads, n, n]
        probs = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + bias).softmax(-1)
        out = (probs @ v).transpose(1, 2).reshape(b, -1, x.shape[-1])
        out = F.linear(out, state[lp + "attention.output.dense.weight"], state[lp + "attention.output.dense.bias"])
        x = x + state[lp + "lambda_1"] * out
        mlp = F.gelu(
            F.linear(
                ln(x, "layernorm_after"), state[lp + "intermediate.dense.weight"], state[lp + "intermediate.dense.bias"]
            )
        )
        x = x + state[lp + "lambda_2"] * F.linear(
            mlp, state[lp + "output.dense.weight"], state[lp + "output.dense.bias"]
        )
        if layer in drop_loc and keep_rate < 1:
            cls_attn = probs.mean(1)[:, 0, 1:]
            keep = cls_attn.topk(math.ceil(keep_rate * cls_attn.shape[1]), dim=1).indices.sort(dim=1).values
            x = torch.cat([x[:, :1], torch.gather(x[:, 1:], 1, keep[..., None].expand(-1, -1, x.shape[-1]))], 1)
            idx = torch.cat([idx[:, :1], torch.gather(idx[:, 1:], 1, keep)], 1)
        layer += 1
    fusion = F.layer_norm(x, x.shape[-1:], state["vision_layernorm.weight"], state["vision_layernorm.bias"], 1e-12)
    pooled = F.layer_norm(
        x[:, 1:].mean(1), x.shape[-1:], state[p + "pooler.layernorm.weight"], state[p + "pooler.layernorm.bias"], eps
    )
    return fusion, pooled
