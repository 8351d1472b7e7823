"""The assembled SViTT model: video encoder, text/fusion encoder, projections and heads.

forward() computes the pretraining losses (VTC or EgoNCE, VTM, MLM; paper appendix A.3) so that
DistributedDataParallel sees the whole computation in one call. encode_video / encode_text /
fuse / vtm_score are the pieces evaluation uses.
"""

from __future__ import annotations

import copy
import dataclasses

import torch
import torch.nn as nn
import torch.nn.functional as F

from svitt.config import check_keys
from svitt.models import losses
from svitt.models.objectives import (  # noqa: F401 (OBJECTIVES: re-exported)
    DEFAULT_SETTINGS,
    OBJECTIVES,
    LossSettings,
    check_objectives,
    compute_losses,
)
from svitt.models.text_encoder import TextEncoder, resolve_text_config
from svitt.models.video_encoder import VideoEncoder, resolve_video_config

VTM_SCORES = ("log_odds", "match_logit")
MODEL_DEFAULTS = dict(  # every key of the `model` section, documented here once
    video={},  # svitt.models.video_encoder.VIDEO_DEFAULTS
    text={},  # svitt.models.text_encoder.TEXT_DEFAULTS
    embed_dim=256,  # joint video-text embedding space of VTC / EgoNCE
    temperature=0.07,  # initial learnable temperature, clamped to [0.001, 0.5]
    video_weights=None,  # timm / HF BEiT image checkpoint (file), inflated on load
    text_weights=None,  # HF BERT checkpoint (file or folder)
)


def resolve_model_config(cfg: dict) -> dict:
    """Complete and validate a `model` config section (keys: MODEL_DEFAULTS and the encoders')."""
    check_keys(cfg, MODEL_DEFAULTS, "model")
    out = copy.deepcopy(MODEL_DEFAULTS)
    out.update(copy.deepcopy(cfg))
    out["video"] = resolve_video_config(out["video"])
    out["text"] = resolve_text_config(out["text"])
    if not isinstance(out["embed_dim"], int) or out["embed_dim"] < 1:
        raise ValueError(f"model.embed_dim must be a positive integer, got {out['embed_dim']!r}")
    if not 0.001 <= float(out["temperature"]) <= 0.5:
        raise ValueError(f"model.temperature {out['temperature']!r} must be in [0.001, 0.5]")
    return out


class MLMHead(nn.Module):
    """BERT's masked-LM head (names as HF `cls.predictions`); the decoder weight is the word
    embedding matrix, passed in (tied, as in BERT)."""

    def __init__(self, width: int, vocab_size: int, eps: float):
        super().__init__()
        self.transform = nn.Module()
        self.transform.dense = nn.Linear(width, width)
        self.transform.LayerNorm = nn.LayerNorm(width, eps=eps)
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, x, decoder_weight):
        x = self.transform.LayerNorm(F.gelu(self.transform.dense(x)))
        return F.linear(x, decoder_weight, self.bias)


class SViTT(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        cfg = resolve_model_config(cfg)
        self.cfg = cfg
        self.video_encoder = VideoEncoder(cfg["video"])
        self.text_encoder = TextEncoder(cfg["text"], video_width=self.video_encoder.width)
        text_width = cfg["text"]["width"]
        self.vision_proj = nn.Linear(self.video_encoder.width, cfg["embed_dim"])
        self.text_proj = nn.Linear(text_width, cfg["embed_dim"])
        self.temp = nn.Parameter(torch.tensor(float(cfg["temperature"])))
        self.vtm_head = nn.Linear(text_width, 2)
        self.mlm_head = MLMHead(text_width, cfg["text"]["vocab_size"], cfg["text"]["layer_norm_eps"])

    # -- pieces -------------------------------------------------------------------------------
    def encode_video(self, video: torch.Tensor):
        """video [B, T, 3, H, W] -> (fusion tokens [B, 1 + N', Dv], emb [B, E]): the embedding projects
        the clip summary (video.pooling: the normed CLS or the normed mean token)."""
        tokens, summary = self.video_encoder.outputs(self.video_encoder(video))
        return tokens, F.normalize(self.vision_proj(summary), dim=-1)

    def video_summary(self, video: torch.Tensor) -> torch.Tensor:
        """video [B, T, 3, H, W] -> the clip summary [B, Dv] the embedding projects (video.pooling)."""
        return self.video_encoder.outputs(self.video_encoder(video))[1]

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """-> (text hidden [B, L, Dt], emb [B, E])."""
        hidden = self.text_encoder.encode(input_ids, attention_mask)
        return hidden, F.normalize(self.text_proj(hidden[:, 0]), dim=-1)

    def fuse(self, text_hidden, attention_mask, video_tokens):
        return self.text_encoder.fuse(text_hidden, attention_mask, video_tokens)

    def vtm_score(self, text_hidden, attention_mask, video_tokens, kind: str = "log_odds") -> torch.Tensor:
        """Matching score per pair [B]: "log_odds" (match minus no-match logit, the log-odds of
        p(match)) or "match_logit" (the match logit alone, what Singularity ranks by)."""
        if kind not in VTM_SCORES:
            raise ValueError(f"vtm score kind must be one of {VTM_SCORES}, got {kind!r}")
        logits = self.vtm_head(self.fuse(text_hidden, attention_mask, video_tokens)[:, 0])
        return logits[:, 1] - logits[:, 0] if kind == "log_odds" else logits[:, 1]

    def mlm_logits(self, fused: torch.Tensor) -> torch.Tensor:
        """fused [B, L, Dt] -> vocabulary logits [B, L, V]."""
        return self.mlm_head(fused, self.text_encoder.embeddings.word_embeddings.weight)

    def no_weight_decay(self) -> set[str]:
        """The video encoder's (CLS token, relative position tables) and the temperature."""
        return {f"video_encoder.{name}" for name in self.video_encoder.no_weight_decay()} | {"temp"}

    def temperature(self) -> torch.Tensor:
        return losses.clamp_temperature(self.temp)

    # -- pretraining losses ---------------------------------------------------------------------
    def forward(
        self,
        video,
        input_ids,
        attention_mask,
        objectives=("vtc", "vtm", "mlm"),
        nouns=None,
        verbs=None,
        mlm_ids=None,
        mlm_labels=None,
        settings: LossSettings = DEFAULT_SETTINGS,
        **setting_values,
    ):
        """Losses for a batch of pairs. video [B, T, 3, H, W]; input_ids/attention_mask [B, L].

        objectives: any of svitt.models.objectives.OBJECTIVES: "vtc" (InfoNCE), "egonce" (needs
        nouns/verbs multi-hot), "vtm", "mlm" (needs mlm_ids and mlm_labels from losses.mask_tokens).
        settings: LossSettings; its fields may also be given as keywords (egonce_temperature=...,
        vtm_hard_fraction=...), which replace the settings'. Returns {name: loss}.
        """
        check_objectives(objectives)
        settings = dataclasses.replace(settings, **setting_values)
        feats = self.features(video, input_ids, attention_mask, mlm_ids if "mlm" in objectives else None)
        batch = {"attention_mask": attention_mask, "nouns": nouns, "verbs": verbs, "mlm_labels": mlm_labels}
        return self.losses(feats, batch, objectives, settings)

    def features(self, video, input_ids, attention_mask, mlm_ids=None) -> dict:
        """What the encoders compute, per clip (svitt.training.grad_cache caches these between micro-batches):
        video_tokens [B, 1 + N', Dv], video_emb [B, E], text_hidden [B, L, Dt], text_emb [B, E],
        and with mlm_ids the masked text's hidden states masked_hidden [B, L, Dt]."""
        video_tokens, video_emb = self.encode_video(video)
        text_hidden, text_emb = self.encode_text(input_ids, attention_mask)
        out = {"video_tokens": video_tokens, "video_emb": video_emb, "text_hidden": text_hidden, "text_emb": text_emb}
        if mlm_ids is not None:
            out["masked_hidden"] = self.text_encoder.encode(mlm_ids, attention_mask)
        return out

    def losses(self, feats: dict, batch: dict, objectives, settings: LossSettings = DEFAULT_SETTINGS) -> dict:
        """The objectives from the encoders' features (`features`) of one whole batch; batch: the
        losses' other inputs (attention_mask, and as the objectives need: nouns, verbs, mlm_labels).
        Each objective's loss is its row of svitt.models.objectives.OBJECTIVE_TABLE."""
        return compute_losses(self, feats, batch, objectives, settings)

    def _vtm_loss(self, video_tokens, video_emb, text_hidden, text_emb, attention_mask, positives, hard_fraction=1.0):
        """Positive pairs plus one hard negative text per video and one hard negative video per
        text, drawn from the in-batch similarity (ALBEF / Singularity)."""
        with torch.no_grad():
            sim = video_emb @ text_emb.T / self.temperature()
        neg_text, neg_video = losses.vtm_hard_negatives(sim, positives_mask=positives, hard_fraction=hard_fraction)
        # index_select, not x[idx]: a negative drawn twice accumulates two gradient rows, which
        # advanced indexing's CPU backward adds in a thread-dependent order (runs would differ).
        texts = torch.cat([text_hidden, text_hidden.index_select(0, neg_text), text_hidden])
        masks = torch.cat([attention_mask, attention_mask.index_select(0, neg_text), attention_mask])
        videos = torch.cat([video_tokens, video_tokens, video_tokens.index_select(0, neg_video)])
        logits = self.vtm_head(self.fuse(texts, masks, videos)[:, 0])
        b = video_tokens.shape[0]
        return losses.vtm_loss(logits[:b], logits[b:])

    # -- weights --------------------------------------------------------------------------------
    def load_pretrained_weights(self, video_weights=None, text_weights=None):
        """Image BEiT weights into the video encoder and BERT weights into the text encoder."""
        from svitt.models.weights import bert_checkpoint_filter_fn, load_state_dict_file

        video_weights = video_weights or self.cfg["video_weights"]
        text_weights = text_weights or self.cfg["text_weights"]
        if video_weights:
            self.video_encoder.load_image_weights(load_state_dict_file(video_weights))
        if text_weights:
            state = bert_checkpoint_filter_fn(
                load_state_dict_file(text_weights), {"bert.": "text_encoder.", "cls.predictions.": "mlm_head."}
            )
            state.pop("mlm_head.decoder.weight", None)  # tied to the word embeddings
            if "mlm_head.decoder.bias" in state:
                state["mlm_head.bias"] = state.pop("mlm_head.decoder.bias")
            result = self.load_state_dict(state, strict=False)
            bad = [k for k in result.missing_keys if k.startswith("text_encoder.") and ".crossattention." not in k]
            if bad or result.unexpected_keys:
                raise ValueError(
                    f"BERT weights {text_weights} do not fit the text encoder: missing "
                    f"{bad[:8]}, unexpected {result.unexpected_keys[:8]}"
                )

    def load_stage_checkpoint(self, state_dict: dict):
        """A previous curriculum stage's weights, with the temporal bias resized (eq. 23-27)."""
        from svitt.models.weights import adapt_svitt_state_dict

        self.load_state_dict(adapt_svitt_state_dict(state_dict, self))


def build_model(cfg: dict) -> SViTT:
    """The full SViTT model from the `model` section of the YAML config."""
    model = SViTT(cfg)
    if model.cfg["video_weights"] or model.cfg["text_weights"]:
        model.load_pretrained_weights()
    return model
