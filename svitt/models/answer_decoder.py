"""Open-ended video QA (Singularity / ALBEF): the question goes through the text and fusion layers
with the video, and a causal BERT decoder over the answer tokens cross-attends to the fused question
states. Answers are ranked from a fixed list: the top-k by first-token probability, then the whole
answer sequence. The decoder's layers start from the last fusion layers of the pretrained model.

    qa = VideoQA.from_svitt(stage_model, decoder_layers=3)    # the finetuning start
    losses = qa(video, input_ids, attention_mask, answer_ids, answer_mask)   # {"qa": loss}
    scores = qa.rank(video, input_ids, attention_mask, answer_ids, answer_mask, k=128)   # [B, A]
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from svitt.models.text_encoder import BertEmbeddings, BertLayer, TextEncoder, additive_mask
from svitt.models.video_encoder import VideoEncoder

# How a candidate answer's score is computed from the decoder (named in every QA result JSON).
SCORING_RULES = {
    "sequence": "sum over the answer's tokens of log p(token | question, previous tokens)",
    "singularity": "Singularity's rank_answer: log p(first token) added to the sequence log-likelihood "
    "(the first token counted twice)",
}


class AnswerDecoder(nn.Module):
    def __init__(self, text_cfg: dict, num_layers: int = 3):
        super().__init__()
        width = text_cfg["width"]
        self.embeddings = BertEmbeddings(text_cfg)
        self.layer = nn.ModuleList(BertLayer(text_cfg, cross_kv_width=width) for _ in range(num_layers))
        self.transform = nn.Sequential(
            nn.Linear(width, width), nn.GELU(), nn.LayerNorm(width, eps=text_cfg["layer_norm_eps"])
        )
        self.bias = nn.Parameter(torch.zeros(text_cfg["vocab_size"]))

    @classmethod
    def from_pretrained_fusion(cls, model, num_layers: int = 3) -> "AnswerDecoder":
        """Copy embeddings, the last `num_layers` text layers and the MLM transform of an SViTT
        model (Singularity moves BERT layers 9-11 to decoder layers 0-2 the same way).
        Cross-attention weights are copied where their shapes fit (video width == text width, as
        in BEiT-B + BERT-base, and the tiny presets) and freshly initialised otherwise."""
        text = model.text_encoder
        decoder = cls(text.cfg, num_layers)
        decoder.embeddings.load_state_dict(text.embeddings.state_dict())
        for target, source in zip(decoder.layer, text.encoder.layer[-num_layers:]):
            state = {
                k: v
                for k, v in source.state_dict().items()
                if k in target.state_dict() and v.shape == target.state_dict()[k].shape
            }
            target.load_state_dict(state, strict=False)
        head = model.mlm_head
        decoder.transform[0].load_state_dict(head.transform.dense.state_dict())
        decoder.transform[2].load_state_dict(head.transform.LayerNorm.state_dict())
        decoder.bias.data.copy_(head.bias.data)
        return decoder

    def logits(self, answer_ids, answer_mask, question, question_mask):
        """answer_ids [B, L] -> next-token logits [B, L, V] given question states [B, Lq, D]."""
        x = self.embeddings(answer_ids)
        length = answer_ids.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool, device=x.device).tril()
        keep = causal[None] & answer_mask[:, None, :].bool()
        self_mask = (~keep[:, None]).to(x.dtype) * torch.finfo(x.dtype).min
        cross_mask = additive_mask(question_mask, x.dtype)
        for layer in self.layer:
            x, _ = layer(x, self_mask, question, cross_mask)
        return F.linear(self.transform(x), self.embeddings.word_embeddings.weight, self.bias)

    def token_nll(self, answer_ids, answer_mask, question, question_mask):
        """-log p of every answer token after the first ([CLS]) position: [B, L - 1], 0 at padding."""
        logits = self.logits(answer_ids, answer_mask, question, question_mask)[:, :-1]
        labels = answer_ids[:, 1:].masked_fill(answer_mask[:, 1:] == 0, -100)
        nll = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100, reduction="none"
        )
        return nll.view(labels.shape)

    def loss(self, answer_ids, answer_mask, question, question_mask):
        """Teacher-forced answer loss: -log p(answer) summed over its tokens, averaged over the
        batch (Singularity's reduction; padding ignored)."""
        return self.token_nll(answer_ids, answer_mask, question, question_mask).sum(1).mean()

    @torch.no_grad()
    def rank_answers(
        self,
        question,
        question_mask,
        answer_ids,
        answer_mask,
        k: int | None = None,
        scoring: str = "sequence",
        chunk: int = 512,
    ):
        """Scores [B, A] of the A candidate answers (token ids [A, La], [CLS] first) for B questions.

        The k answers whose first token is likeliest are scored fully by `scoring` (SCORING_RULES;
        ALBEF/Singularity's rank_answer), the others get -inf; k=None scores every answer.
        `chunk` bounds the (question, answer) pairs decoded at once (memory, not results)."""
        if scoring not in SCORING_RULES:
            raise ValueError(f"scoring must be one of {sorted(SCORING_RULES)}, got {scoring!r}")
        b, a = question.shape[0], answer_ids.shape[0]
        start = answer_ids[:1, :1].expand(b, 1)
        first = self.logits(start, torch.ones_like(start), question, question_mask)[:, 0].float()
        first_logp = first.log_softmax(-1)[:, answer_ids[:, 1]]  # [B, A]
        k = a if k is None else min(k, a)
        top = first_logp.topk(k, dim=1).indices  # [B, k]
        rows = torch.arange(b * k, device=question.device)
        ids, mask = answer_ids[top.flatten()], answer_mask[top.flatten()]  # [B * k, La]
        logp = torch.cat(
            [
                -self.token_nll(ids[r], mask[r], question[r // k], question_mask[r // k]).sum(1)
                for r in rows.split(chunk)
            ]
        ).view(b, k)
        if scoring == "singularity":
            logp = logp + first_logp.gather(1, top)
        scores = torch.full((b, a), float("-inf"), device=question.device)
        return scores.scatter(1, top, logp)


class VideoQA(nn.Module):
    """SViTT for open-ended video QA: video encoder, text + fusion encoder, answer decoder.

    Parameter names: video_encoder.*, text_encoder.* (as in SViTT) and answer_decoder.*; the
    contrastive projections and the VTM / MLM heads are not part of it (the MLM head lives on
    as the decoder's output layer)."""

    def __init__(self, cfg: dict, decoder_layers: int | None = None):
        """A fresh model of a resolved `model` config; decoder_layers defaults to the model's
        fusion layers (3 for BERT-base, as Singularity and SViTT use)."""
        super().__init__()
        from svitt.models.svitt import resolve_model_config

        self.cfg = resolve_model_config(cfg)
        self.decoder_layers = int(decoder_layers or self.cfg["text"]["fusion_layers"])
        if self.decoder_layers < 1:
            raise ValueError(f"decoder_layers must be >= 1, got {decoder_layers}")
        self.video_encoder = VideoEncoder(self.cfg["video"])
        self.text_encoder = TextEncoder(self.cfg["text"], video_width=self.video_encoder.width)
        self.answer_decoder = AnswerDecoder(self.text_encoder.cfg, self.decoder_layers)

    @classmethod
    def from_svitt(cls, model, decoder_layers: int | None = None) -> "VideoQA":
        """The finetuning start: an SViTT model's encoders, and a decoder from its fusion layers."""
        qa = cls(model.cfg, decoder_layers)
        qa.video_encoder.load_state_dict(model.video_encoder.state_dict())
        qa.video_encoder.layout_generator.set_state(model.video_encoder.layout_generator.get_state())
        qa.text_encoder.load_state_dict(model.text_encoder.state_dict())
        qa.answer_decoder = AnswerDecoder.from_pretrained_fusion(model, qa.decoder_layers)
        return qa

    def no_weight_decay(self) -> set[str]:
        """As SViTT's: the video encoder's CLS token and relative position tables."""
        return {f"video_encoder.{name}" for name in self.video_encoder.no_weight_decay()}

    def question_states(self, video, input_ids, attention_mask):
        """video [B, T, 3, H, W], question ids/mask [B, Lq] -> fused question states [B, Lq, D]
        (multimodal pruning as text.question_pruning says)."""
        tokens = self.video_encoder.fusion_tokens(self.video_encoder(video))
        hidden = self.text_encoder.encode(input_ids, attention_mask)
        return self.text_encoder.fuse(hidden, attention_mask, tokens, prune=self.text_encoder.cfg["question_pruning"])

    def forward(self, video, input_ids, attention_mask, answer_ids, answer_mask):
        """{"qa": answer generation loss} for a batch of (video, question, answer)."""
        states = self.question_states(video, input_ids, attention_mask)
        return {"qa": self.answer_decoder.loss(answer_ids, answer_mask, states, attention_mask)}

    @torch.no_grad()
    def rank(
        self, video, input_ids, attention_mask, answer_ids, answer_mask, k: int | None = None, scoring: str = "sequence"
    ):
        """Scores [B, A] of the answer list (AnswerDecoder.rank_answers)."""
        states = self.question_states(video, input_ids, attention_mask)
        return self.answer_decoder.rank_answers(states, attention_mask, answer_ids, answer_mask, k, scoring)
