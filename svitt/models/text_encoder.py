"""BERT text encoder f_t whose last layers are the multimodal encoder f_m (Singularity/ALBEF layout).

Layers 0 .. depth - fusion_layers - 1 are text-only; the last `fusion_layers` layers add a
cross-attention from text queries to video tokens after their self-attention. Parameter names
follow Hugging Face's BertModel, so `bert-base-uncased` weights load by stripping the "bert."
prefix; the cross-attention weights are new.

Multimodal node sparsity (eq. 12-13): after the fusion layers in `multimodal_prune_layers`
(default: the first only, one multimodal sparsification step as in the paper's Sec. 5.2 and the
released code, which prunes once after BERT layer 9), the text [CLS] query's cross-attention
(mean over heads) keeps the top ceil(q_m N) regional video tokens for the next fusion layers; the
video CLS token is always kept.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from svitt.config import merge_preset
from svitt.models.token_pruning import gather_tokens, select_tokens

TEXT_PRESETS = {
    "bert_base": dict(
        vocab_size=30522,
        width=768,
        depth=12,
        heads=12,
        intermediate_size=3072,
        fusion_layers=3,
        max_position_embeddings=512,
    ),
    "tiny": dict(
        width=64,
        depth=4,
        heads=2,
        intermediate_size=128,
        fusion_layers=2,
        max_position_embeddings=64,
        dropout=0.0,
        init_std=0.1,
    ),
}

TEXT_DEFAULTS = dict(  # every key of model.text, documented here once
    preset=None,  # "bert_base" or "tiny": a set of the keys below; explicit keys override it
    vocab_size=30522,  # must cover the tokenizer (the workflow's null = the tokenizer's size)
    width=768,
    depth=12,  # BERT layers, text-only and fusion together
    heads=12,
    intermediate_size=3072,
    fusion_layers=3,  # the last layers gain cross-attention to video tokens (multimodal encoder)
    max_position_embeddings=512,  # longest text
    type_vocab_size=2,
    dropout=0.1,
    layer_norm_eps=1e-12,
    pad_token_id=0,
    multimodal_keep=1.0,  # q_m: keep rate at each multimodal prune layer (a number or one per layer)
    multimodal_prune_layers=[1],  # fusion layers (1-indexed) after which video tokens are pruned
    init_std=0.02,  # BERT's initializer_range; from-scratch tiny models train faster with more
    question_pruning=True,  # QA: multimodal pruning while fusing a question with its video; the released
    # code encodes questions in its BERT's multi_modal mode, which computes the pruning but never applies it
)


def resolve_text_config(cfg: dict) -> dict:
    cfg = merge_preset(cfg, TEXT_DEFAULTS, TEXT_PRESETS, "text")
    for key in ("vocab_size", "width", "depth", "heads", "intermediate_size", "max_position_embeddings"):
        if not isinstance(cfg[key], int) or isinstance(cfg[key], bool) or cfg[key] < 1:
            raise ValueError(f"text.{key} must be a positive integer, got {cfg[key]!r}")
    if cfg["width"] % cfg["heads"]:
        raise ValueError(f"text.width {cfg['width']} is not divisible by heads {cfg['heads']}")
    if not 0 <= cfg["fusion_layers"] <= cfg["depth"]:
        raise ValueError(f"text.fusion_layers {cfg['fusion_layers']} must be in 0..depth ({cfg['depth']})")
    multimodal_keep_rates(cfg)
    if not isinstance(cfg["question_pruning"], bool):
        raise ValueError(f"text.question_pruning must be true or false, got {cfg['question_pruning']!r}")
    return cfg


def multimodal_keep_rates(cfg: dict) -> list[float]:
    """The keep rate applied after each fusion layer ([fusion_layers] floats, 1.0 = no pruning),
    from multimodal_keep (a number, or one rate per entry of multimodal_prune_layers)."""
    layers = list(cfg["multimodal_prune_layers"] or [])
    keep = cfg["multimodal_keep"]
    rates = keep if isinstance(keep, (list, tuple)) else [keep] * len(layers)
    if len(rates) != len(layers):
        raise ValueError(
            f"text.multimodal_keep has {len(rates)} entries but multimodal_prune_layers has "
            f"{len(layers)} ({layers}); give one keep rate per prune layer or a number"
        )
    out = [1.0] * cfg["fusion_layers"]
    for layer, rate in zip(layers, rates):
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 < rate <= 1:
            raise ValueError(f"text.multimodal_keep {rate!r} must be a keep rate in (0, 1]")
        if rate < 1 and not (isinstance(layer, int) and 1 <= layer < cfg["fusion_layers"]):
            raise ValueError(
                f"text.multimodal_prune_layers entry {layer!r} must be a fusion layer in "
                f"1..{cfg['fusion_layers'] - 1} (pruning after the last one has no effect)"
            )
        if rate < 1:
            out[layer - 1] = float(rate)
    return out


class BertEmbeddings(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg["vocab_size"], cfg["width"], padding_idx=cfg["pad_token_id"])
        self.position_embeddings = nn.Embedding(cfg["max_position_embeddings"], cfg["width"])
        self.token_type_embeddings = nn.Embedding(cfg["type_vocab_size"], cfg["width"])
        self.LayerNorm = nn.LayerNorm(cfg["width"], eps=cfg["layer_norm_eps"])
        self.dropout = nn.Dropout(cfg["dropout"])

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = (
            self.word_embeddings(input_ids)
            + self.position_embeddings(positions)[None]
            + self.token_type_embeddings.weight[0]
        )
        return self.dropout(self.LayerNorm(x))


class BertSelfAttention(nn.Module):
    """Multi-head attention; keys/values may come from another modality (`kv_width`)."""

    def __init__(self, width: int, heads: int, dropout: float, kv_width: int | None = None):
        super().__init__()
        kv_width = kv_width or width
        self.heads = heads
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(kv_width, width)
        self.value = nn.Linear(kv_width, width)
        self.dropout_p = dropout

    def _split(self, x):
        b, n, d = x.shape
        return x.view(b, n, self.heads, d // self.heads).transpose(1, 2)

    def forward(self, x, kv, kv_mask, need_cls_attn=False):
        """x [B, L, D], kv [B, M, Dkv], kv_mask additive [B, 1, 1 or L, M] or None.

        Returns (out [B, L, D], attention of query 0 over keys [B, M] or None).
        """
        q, k, v = self._split(self.query(x)), self._split(self.key(kv)), self._split(self.value(kv))
        drop = self.dropout_p if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=kv_mask, dropout_p=drop)
        cls_attn = None
        if need_cls_attn:
            logits = (q[:, :, :1] @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
            if kv_mask is not None:
                logits = logits + kv_mask[:, :, :1]
            cls_attn = logits.float().softmax(-1)[:, :, 0].mean(1)
        b, h, n, d = out.shape
        return out.transpose(1, 2).reshape(b, n, h * d), cls_attn


class BertSelfOutput(nn.Module):
    def __init__(self, width: int, eps: float, dropout: float):
        super().__init__()
        self.dense = nn.Linear(width, width)
        self.LayerNorm = nn.LayerNorm(width, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, hidden, residual):
        return self.LayerNorm(self.dropout(self.dense(hidden)) + residual)


class BertAttention(nn.Module):
    def __init__(self, cfg: dict, kv_width: int | None = None):
        super().__init__()
        self.self = BertSelfAttention(cfg["width"], cfg["heads"], cfg["dropout"], kv_width)
        self.output = BertSelfOutput(cfg["width"], cfg["layer_norm_eps"], cfg["dropout"])

    def forward(self, x, kv, kv_mask, need_cls_attn=False):
        out, cls_attn = self.self(x, kv, kv_mask, need_cls_attn)
        return self.output(out, x), cls_attn


class BertIntermediate(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.dense = nn.Linear(cfg["width"], cfg["intermediate_size"])

    def forward(self, x):
        return F.gelu(self.dense(x))


class BertOutput(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.dense = nn.Linear(cfg["intermediate_size"], cfg["width"])
        self.LayerNorm = nn.LayerNorm(cfg["width"], eps=cfg["layer_norm_eps"])
        self.dropout = nn.Dropout(cfg["dropout"])

    def forward(self, hidden, residual):
        return self.LayerNorm(self.dropout(self.dense(hidden)) + residual)


class BertLayer(nn.Module):
    def __init__(self, cfg: dict, cross_kv_width: int | None = None):
        super().__init__()
        self.attention = BertAttention(cfg)
        self.crossattention = BertAttention(cfg, cross_kv_width) if cross_kv_width else None
        self.intermediate = BertIntermediate(cfg)
        self.output = BertOutput(cfg)

    def forward(self, x, self_mask, video=None, video_mask=None, need_cls_attn=False):
        """Returns (x [B, L, D], text-CLS cross-attention over video tokens [B, M] or None)."""
        x, _ = self.attention(x, x, self_mask)
        cls_attn = None
        if self.crossattention is not None:
            x, cls_attn = self.crossattention(x, video, video_mask, need_cls_attn)
        return self.output(self.intermediate(x), x), cls_attn


class BertEncoder(nn.Module):
    def __init__(self, cfg: dict, video_width: int):
        super().__init__()
        first_fusion = cfg["depth"] - cfg["fusion_layers"]
        self.layer = nn.ModuleList(
            BertLayer(cfg, video_width if i >= first_fusion else None) for i in range(cfg["depth"])
        )


def additive_mask(mask: torch.Tensor, dtype) -> torch.Tensor:
    """[B, M] 1/0 keep mask -> additive [B, 1, 1, M]."""
    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


class TextEncoder(nn.Module):
    """BERT with fusion layers.

    encode(input_ids [B, L], attention_mask [B, L]) -> text hidden [B, L, D] (text-only layers);
    fuse(text_hidden, attention_mask, video [B, 1 + N, Dv]) -> multimodal hidden [B, L, D].
    """

    def __init__(self, cfg: dict, video_width: int):
        super().__init__()
        cfg = resolve_text_config(cfg)
        self.cfg = cfg
        self.first_fusion = cfg["depth"] - cfg["fusion_layers"]
        self.embeddings = BertEmbeddings(cfg)
        self.encoder = BertEncoder(cfg, video_width)
        self.apply(self._init_weights)

    def _init_weights(self, m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=self.cfg["init_std"])
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
        if isinstance(m, nn.Embedding) and m.padding_idx is not None:
            m.weight.data[m.padding_idx].zero_()

    def check_input(self, input_ids: torch.Tensor):
        limit = self.cfg["max_position_embeddings"]
        if input_ids.dim() != 2 or input_ids.shape[1] > limit:
            raise ValueError(
                f"input_ids must be [B, L] with L <= max_position_embeddings ({limit}), got {list(input_ids.shape)}"
            )

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        self.check_input(input_ids)
        x = self.embeddings(input_ids)
        mask = additive_mask(attention_mask, x.dtype)
        for layer in self.encoder.layer[: self.first_fusion]:
            x, _ = layer(x, mask)
        return x

    def fuse(
        self,
        text: torch.Tensor,
        attention_mask: torch.Tensor,
        video: torch.Tensor,
        video_mask: torch.Tensor | None = None,
        return_kept: bool = False,
        prune: bool = True,
    ):
        """Fusion layers over text [B, L, D] and video tokens [B, 1 + N, Dv] (CLS first).

        After each fusion layer with a keep rate q < 1 (multimodal_keep_rates), the next layers see
        only the video CLS plus the top ceil(q N) regional tokens by text-[CLS] cross-attention;
        prune=False keeps every token (QA questions with text.question_pruning false).
        """
        rates = multimodal_keep_rates(self.cfg) if prune else [1.0] * self.cfg["fusion_layers"]
        mask = additive_mask(attention_mask, text.dtype)
        if video_mask is None:
            video_mask = torch.ones(video.shape[:2], dtype=torch.long, device=video.device)
        x = text
        layers = self.encoder.layer[self.first_fusion :]
        kept = torch.arange(video.shape[1] - 1, device=video.device)[None].expand(video.shape[0], -1)
        for i, layer in enumerate(layers):
            prune = rates[i] < 1.0
            x, cls_attn = layer(x, mask, video, additive_mask(video_mask, x.dtype), need_cls_attn=prune)
            if prune:
                index = select_tokens(cls_attn[:, 1:].detach(), rates[i])
                video = torch.cat([video[:, :1], gather_tokens(video[:, 1:], index)], dim=1)
                video_mask = torch.cat([video_mask[:, :1], torch.gather(video_mask[:, 1:], 1, index)], 1)
                kept = torch.gather(kept, 1, index)
        return (x, kept) if return_kept else x
