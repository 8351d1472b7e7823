"""Video QA answer decoder (Singularity / ALBEF): a causal BERT over the answer tokens that
cross-attends to the multimodal encoder's question states, and ranks a fixed answer list by
likelihood. Its layers are initialised from the fusion layers of the pretrained model.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from svitt.models.text_encoder import BertEmbeddings, BertLayer, additive_mask


class AnswerDecoder(nn.Module):
    def __init__(self, text_cfg: dict, num_layers: int = 3):
        super().__init__()
        width = text_cfg["width"]
        self.embeddings = BertEmbeddings(text_cfg)
        self.layer = nn.ModuleList(BertLayer(text_cfg, cross_kv_width=width) for _ in range(num_layers))
        self.transform = nn.Sequential(nn.Linear(width, width), nn.GELU(),
                                       nn.LayerNorm(width, eps=text_cfg["layer_norm_eps"]))
        self.bias = nn.Parameter(torch.zeros(text_cfg["vocab_size"]))

    @classmethod
    def from_pretrained_fusion(cls, model, num_layers: int = 3) -> "AnswerDecoder":
        """Copy embeddings, the last `num_layers` text layers and the MLM transform of an SViTT
        model. Cross-attention weights are copied where their shapes fit (video width == text
        width, as in BEiT-B + BERT-base) and freshly initialised otherwise."""
        text = model.text_encoder
        decoder = cls(text.cfg, num_layers)
        decoder.embeddings.load_state_dict(text.embeddings.state_dict())
        for target, source in zip(decoder.layer, text.encoder.layer[-num_layers:]):
            state = {k: v for k, v in source.state_dict().items()
                     if k in target.state_dict() and v.shape == target.state_dict()[k].shape}
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

    def loss(self, answer_ids, answer_mask, question, question_mask):
        """Teacher-forced language-model loss of the answers (padding ignored)."""
        logits = self.logits(answer_ids, answer_mask, question, question_mask)[:, :-1]
        labels = answer_ids[:, 1:].masked_fill(answer_mask[:, 1:] == 0, -100)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                               ignore_index=-100)

    @torch.no_grad()
    def rank_answers(self, question, question_mask, answer_ids, answer_mask, k: int | None = None):
        """Scores [B, A]: log-likelihood of each of the A answers (token ids [A, La] starting with
        [CLS]). With k, only the k answers whose first token is likeliest are scored fully
        (ALBEF's rank_answer); the rest get -inf."""
        b, a = question.shape[0], answer_ids.shape[0]
        first = self.logits(answer_ids[:1, :1].expand(b, 1), answer_mask[:1, :1].expand(b, 1),
                            question, question_mask)[:, 0].log_softmax(-1)
        first_scores = first[:, answer_ids[:, 1]]  # [B, A]
        k = a if k is None else min(k, a)
        top = first_scores.topk(k, dim=1).indices  # [B, k]
        ids, mask = answer_ids[top].flatten(0, 1), answer_mask[top].flatten(0, 1)
        q = question.repeat_interleave(k, 0)
        qm = question_mask.repeat_interleave(k, 0)
        logp = self.logits(ids, mask, q, qm)[:, :-1].log_softmax(-1)
        token_logp = logp.gather(-1, ids[:, 1:, None])[..., 0] * mask[:, 1:]
        scores = torch.full((b, a), float("-inf"), device=question.device)
        scores.scatter_(1, top, token_logp.sum(1).view(b, k))
        return scores
