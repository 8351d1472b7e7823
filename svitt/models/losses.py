"""Pre-training losses of SViTT / SViTT-Ego as pure functions (no model code).

- VTC: symmetric InfoNCE (paper appendix A.3, eq. 28-29), `info_nce`.
- EgoNCE (EgoVLP; SViTT-Ego): positives share >= 1 noun and >= 1 verb, plus the diagonal, `egonce`.
- VTM: hard negatives sampled from the similarity matrix (ALBEF / Singularity), `vtm_hard_negatives`,
  and the binary matching loss (eq. 30), `vtm_loss`.
- MLM: BERT 80/10/10 masking, `mask_tokens`, and the masked cross-entropy (eq. 31), `mlm_loss`.
- Learnable temperature range, `clamp_temperature`.

Embeddings passed to the contrastive losses are expected L2-normalised already (the model does it);
these functions never normalise. Under torch.distributed the contrastive losses gather embeddings
(and tags) from all ranks with `svitt.distributed.gather_with_grad` and compute the loss over the
full batch; see that module for why DDP's gradient averaging then needs no rescaling.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F

from svitt.distributed import gather_with_grad

TEMPERATURE_MIN = 0.001
TEMPERATURE_MAX = 0.5
IGNORE_INDEX = -100  # label of tokens that are not predicted (PyTorch / HF convention)


# ----------------------------------------------------------------------------- helpers


def clamp_temperature(temperature):
    """Clamp a (learnable) temperature to [0.001, 0.5] (ALBEF / Singularity range).

    Accepts a float (returns a float) or a tensor (returns a new tensor). The model owns the
    parameter (init 0.07) and typically applies this under no_grad after each optimiser step:
    `with torch.no_grad(): model.temp.copy_(clamp_temperature(model.temp))`.
    """
    if isinstance(temperature, torch.Tensor):
        return temperature.clamp(TEMPERATURE_MIN, TEMPERATURE_MAX)
    return float(min(max(float(temperature), TEMPERATURE_MIN), TEMPERATURE_MAX))


def _check_temperature(temperature) -> None:
    if isinstance(temperature, torch.Tensor):
        if temperature.dim() != 0:
            raise ValueError(f"temperature must be a float or a 0-dim tensor, got shape {tuple(temperature.shape)}")
        value = float(temperature.detach())
    else:
        value = float(temperature)
    if not value > 0:
        raise ValueError(f"temperature must be > 0, got {value}")


def _check_pair(video_emb: torch.Tensor, text_emb: torch.Tensor) -> None:
    if video_emb.dim() != 2 or text_emb.dim() != 2:
        raise ValueError(
            f"expected video_emb [B, D] and text_emb [B, D], got {tuple(video_emb.shape)} and {tuple(text_emb.shape)}"
        )
    if video_emb.shape != text_emb.shape:
        raise ValueError(
            f"video_emb and text_emb must have the same shape [B, D], got {tuple(video_emb.shape)} "
            f"and {tuple(text_emb.shape)}"
        )


def _check_tags(tags: torch.Tensor, name: str, batch: int) -> torch.Tensor:
    """Multi-hot [B, num_tags] (bool / int / float) -> float tensor."""
    if not isinstance(tags, torch.Tensor) or tags.dim() != 2 or tags.shape[0] != batch:
        shape = tuple(tags.shape) if isinstance(tags, torch.Tensor) else type(tags).__name__
        raise ValueError(f"{name} must be a multi-hot tensor [B={batch}, num_{name}], got {shape}")
    tags = tags.float()
    if ((tags != 0) & (tags != 1)).any():
        raise ValueError(f"{name} must be multi-hot (entries 0 or 1), got values {torch.unique(tags).tolist()}")
    return tags


# ----------------------------------------------------------------------------- VTC / EgoNCE


def info_nce(video_emb: torch.Tensor, text_emb: torch.Tensor, temperature) -> torch.Tensor:
    """Symmetric InfoNCE (paper eq. 28-29): CE(v->t) + CE(t->v), each a mean over the batch.

    video_emb, text_emb: [B, D], already L2-normalised, row i of each is a positive pair.
    temperature: float or 0-dim tensor (learnable). logits = v @ t.T / temperature.
    Under torch.distributed both are gathered over ranks first (B becomes the global batch).
    Returns a 0-dim tensor.
    """
    _check_pair(video_emb, text_emb)
    _check_temperature(temperature)
    video_emb = gather_with_grad(video_emb)
    text_emb = gather_with_grad(text_emb)
    logits_v2t = video_emb @ text_emb.t() / temperature  # [B, B]
    targets = torch.arange(logits_v2t.shape[0], device=logits_v2t.device)
    return F.cross_entropy(logits_v2t, targets) + F.cross_entropy(logits_v2t.t(), targets)


def log_positive_mass(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Row-wise log sum_{j in pos(i)} softmax(logits_i)_j, computed stably with logsumexp."""
    positive_logits = logits.masked_fill(~positives, float("-inf"))
    return torch.logsumexp(positive_logits, dim=1) - torch.logsumexp(logits, dim=1)


def action_positives(nouns: torch.Tensor, verbs: torch.Tensor) -> torch.Tensor:
    """EgoVLP's action-aware positives [B, B]: pairs sharing >= 1 noun and >= 1 verb, and the
    diagonal. nouns [B, num_nouns], verbs [B, num_verbs] multi-hot."""
    nouns, verbs = nouns.float(), verbs.float()
    share = ((nouns @ nouns.t()) > 0) & ((verbs @ verbs.t()) > 0)
    return share | torch.eye(share.shape[0], dtype=torch.bool, device=share.device)


def egonce(
    video_emb: torch.Tensor,
    text_emb: torch.Tensor,
    nouns: torch.Tensor,
    verbs: torch.Tensor,
    temperature=0.05,
) -> torch.Tensor:
    """EgoNCE of EgoVLP (used by SViTT-Ego): InfoNCE with action-aware positives.

    video_emb, text_emb: [B, D], L2-normalised; nouns [B, num_nouns], verbs [B, num_verbs] multi-hot.
    Positives: pairs (i, j) sharing >= 1 noun AND >= 1 verb, plus the diagonal (i, i).
    Per direction: -mean_i log sum_{j in pos(i)} softmax(sim_i / tau)_j, over text->video rows and
    video->text rows; the two are summed. The mask is symmetric, so both directions use it as is.
    With no shared tags this is exactly `info_nce`. Under torch.distributed embeddings and tags
    are gathered over ranks. Scene-aware hard negatives are a data-side matter (they are simply
    extra rows in the batch). Returns a 0-dim tensor.
    """
    _check_pair(video_emb, text_emb)
    _check_temperature(temperature)
    batch = video_emb.shape[0]
    nouns = _check_tags(nouns, "nouns", batch).to(video_emb.device)
    verbs = _check_tags(verbs, "verbs", batch).to(video_emb.device)

    video_emb = gather_with_grad(video_emb)
    text_emb = gather_with_grad(text_emb)
    nouns = gather_with_grad(nouns)
    verbs = gather_with_grad(verbs)

    positives = action_positives(nouns, verbs)

    logits_t2v = text_emb @ video_emb.t() / temperature  # rows: texts, columns: videos
    loss_t2v = -log_positive_mass(logits_t2v, positives).mean()
    loss_v2t = -log_positive_mass(logits_t2v.t(), positives.t()).mean()
    return loss_t2v + loss_v2t


# ----------------------------------------------------------------------------- VTM


def _sample_negatives(sim: torch.Tensor, excluded: torch.Tensor, generator, hard_fraction: float = 1.0) -> torch.Tensor:
    """One index per row drawn from softmax(sim_i) over the entries not excluded, mixed with the
    uniform distribution over them: hard_fraction * softmax + (1 - hard_fraction) * uniform.

    A row whose every off-diagonal entry is excluded (all candidates are tag-positives) falls back
    to sampling among all off-diagonal entries: a distinct pair is still a usable negative, and
    failing the whole training step on such a batch would be worse.
    """
    batch = sim.shape[0]
    diagonal = torch.eye(batch, dtype=torch.bool, device=sim.device)
    excluded = excluded | diagonal
    all_excluded = excluded.all(dim=1, keepdim=True)
    excluded = torch.where(all_excluded, diagonal, excluded)
    weights = torch.softmax(sim.masked_fill(excluded, float("-inf")), dim=1)
    if hard_fraction < 1.0:  # one draw from the mixture: the RNG stream is the same for every fraction
        allowed = (~excluded).to(weights.dtype)
        weights = hard_fraction * weights + (1.0 - hard_fraction) * allowed / allowed.sum(1, keepdim=True)
    return torch.multinomial(weights, 1, generator=generator).squeeze(1)


@torch.no_grad()
def vtm_hard_negatives(
    sim_v2t: torch.Tensor,
    generator: torch.Generator | None = None,
    positives_mask: torch.Tensor | None = None,
    hard_fraction: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ALBEF / Singularity hard-negative sampling for video-text matching.

    sim_v2t: [B, B] similarity (video rows, text columns), typically v @ t.T / temperature.
    For each video i a negative text is drawn from softmax(sim_v2t[i]) with the diagonal (and
    positives_mask[i]) zeroed; for each text j a negative video from softmax(sim_v2t[:, j]) likewise.
    positives_mask: optional bool [B, B] of extra pairs that must not be drawn (e.g. EgoNCE tag
    positives); rows where it leaves no candidate fall back to any off-diagonal entry.
    generator: a torch.Generator on sim's device for reproducible draws.
    hard_fraction: the share of the sampling distribution that follows the similarity; the rest is
    uniform over the candidates (1.0: ALBEF / Singularity). With a similarity whose nearest
    neighbours differ from the positive only in what the encoders cannot see yet, pure hard
    negatives give the matching head nothing it can learn (docs/vtm.md).
    Returns (neg_text_idx_for_video [B], neg_video_idx_for_text [B]), int64.
    B = 1 has no negative at all and raises ValueError.
    """
    if sim_v2t.dim() != 2 or sim_v2t.shape[0] != sim_v2t.shape[1]:
        raise ValueError(f"sim_v2t must be a square [B, B] matrix, got shape {tuple(sim_v2t.shape)}")
    batch = sim_v2t.shape[0]
    if batch < 2:
        raise ValueError(f"VTM hard negatives need a batch of at least 2 pairs, got B={batch}")
    if not torch.isfinite(sim_v2t).all():
        raise ValueError("sim_v2t contains NaN or inf; cannot sample hard negatives from it")
    if positives_mask is None:
        positives_mask = torch.zeros(batch, batch, dtype=torch.bool, device=sim_v2t.device)
    elif positives_mask.shape != sim_v2t.shape:
        raise ValueError(
            f"positives_mask must have the shape of sim_v2t {tuple(sim_v2t.shape)}, got {tuple(positives_mask.shape)}"
        )
    if isinstance(hard_fraction, bool) or not 0.0 <= float(hard_fraction) <= 1.0:
        raise ValueError(f"hard_fraction must be a number in [0, 1], got {hard_fraction!r}")
    positives_mask = positives_mask.to(device=sim_v2t.device, dtype=torch.bool)
    sim = sim_v2t.float()
    neg_text_for_video = _sample_negatives(sim, positives_mask, generator, float(hard_fraction))
    neg_video_for_text = _sample_negatives(sim.t(), positives_mask.t(), generator, float(hard_fraction))
    return neg_text_for_video, neg_video_for_text


def vtm_loss(logits_pos: torch.Tensor, logits_neg: torch.Tensor) -> torch.Tensor:
    """Video-text matching cross-entropy (eq. 30, as a mean).

    logits_pos: [B, 2] for the B matched pairs (label 1); logits_neg: [2B, 2] for the B
    (video, hard-negative text) plus B (hard-negative video, text) pairs (label 0).
    Returns the mean cross-entropy over the 3B pairs.
    """
    if logits_pos.dim() != 2 or logits_pos.shape[1] != 2:
        raise ValueError(f"logits_pos must be [B, 2], got {tuple(logits_pos.shape)}")
    if logits_neg.dim() != 2 or logits_neg.shape[1] != 2 or logits_neg.shape[0] != 2 * logits_pos.shape[0]:
        raise ValueError(
            f"logits_neg must be [2B, 2] = [{2 * logits_pos.shape[0]}, 2] for B={logits_pos.shape[0]}, "
            f"got {tuple(logits_neg.shape)}"
        )
    logits = torch.cat([logits_pos, logits_neg], dim=0)
    labels = torch.cat(
        [
            torch.ones(logits_pos.shape[0], dtype=torch.long, device=logits.device),
            torch.zeros(logits_neg.shape[0], dtype=torch.long, device=logits.device),
        ]
    )
    return F.cross_entropy(logits, labels)


# ----------------------------------------------------------------------------- MLM


def mask_tokens(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    vocab_size: int,
    mask_token_id: int,
    special_ids: Iterable[int],
    mask_prob: float,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: choose tokens with probability mask_prob, then 80% -> [MASK], 10% -> a random
    token id from [0, vocab_size) (as BERT / HF do), 10% unchanged.

    input_ids, attention_mask: [B, L]; padding (attention_mask == 0) and special_ids are never chosen.
    generator: a torch.Generator on input_ids' device for reproducible masks.
    Returns (masked_ids [B, L], labels [B, L]) with labels = original id where chosen, -100 elsewhere.
    The input is not modified.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, L], got shape {tuple(input_ids.shape)}")
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask must match input_ids {tuple(input_ids.shape)}, got {tuple(attention_mask.shape)}"
        )
    if not 0.0 <= mask_prob <= 1.0:
        raise ValueError(f"mask_prob must be in [0, 1], got {mask_prob}")
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    if not 0 <= mask_token_id < vocab_size:
        raise ValueError(f"mask_token_id must be in [0, vocab_size={vocab_size}), got {mask_token_id}")

    device = input_ids.device
    special = torch.tensor(sorted(set(int(i) for i in special_ids)), dtype=input_ids.dtype, device=device)
    maskable = attention_mask.bool() & ~torch.isin(input_ids, special)
    chosen = maskable & (torch.rand(input_ids.shape, generator=generator, device=device) < mask_prob)

    replacement_draw = torch.rand(input_ids.shape, generator=generator, device=device)
    to_mask_token = chosen & (replacement_draw < 0.8)
    to_random = chosen & (replacement_draw >= 0.8) & (replacement_draw < 0.9)
    random_ids = torch.randint(vocab_size, input_ids.shape, generator=generator, device=device, dtype=input_ids.dtype)

    masked_ids = input_ids.clone()
    masked_ids[to_mask_token] = mask_token_id
    masked_ids[to_random] = random_ids[to_random]
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    return masked_ids, labels


def mlm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Masked-LM cross-entropy (eq. 31, as a mean over masked tokens), ignoring labels == -100.

    logits: [B, L, V]; labels: [B, L]. A batch with no masked token returns 0 (still attached to
    the graph, so DDP sees every parameter used) instead of PyTorch's NaN.
    """
    if logits.dim() != 3 or logits.shape[:2] != labels.shape:
        raise ValueError(
            f"expected logits [B, L, V] and labels [B, L], got {tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    if not (labels != IGNORE_INDEX).any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX)
