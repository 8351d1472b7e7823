"""The one embedding path of every evaluation: videos, texts, matching scores (torch).

Every video reaches the model through `encode_clips`, which can present its frames in another
order (temporal probing, SViTT Table 14): "normal" (as sampled), "reversed", or "shuffled" by one
fixed permutation drawn from a seed (the same for every clip of that length, recorded in results).
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

FRAME_ORDERS = ("normal", "shuffled", "reversed")


def frame_permutation(frames: int, order: str, seed: int = 0) -> list[int]:
    """Indices of the frames of a `frames`-frame clip in `order`.

    shuffled: a permutation drawn from `seed`, redrawn while it is the identity or the reversal
    (possible from 3 frames on; with 2 frames the only shuffle is the reversal)."""
    if order not in FRAME_ORDERS:
        raise ValueError(f"frame order must be one of {FRAME_ORDERS}, got {order!r}")
    identity, reverse = list(range(frames)), list(range(frames))[::-1]
    if order == "normal":
        return identity
    if order == "reversed" or frames < 3:
        return reverse
    generator = torch.Generator().manual_seed(int(seed))
    while True:
        perm = torch.randperm(frames, generator=generator).tolist()
        if perm not in (identity, reverse):
            return perm


def reorder_frames(video: torch.Tensor, order: str, seed: int = 0) -> torch.Tensor:
    """video [..., T, C, H, W] with its frames (dim -4) in `order`."""
    if order == "normal":
        return video
    index = torch.tensor(frame_permutation(video.shape[-4], order, seed), device=video.device)
    return video.index_select(video.dim() - 4, index)


def encode_clips(model, video: torch.Tensor, frame_order: str = "normal", seed: int = 0):
    """model.encode_video of clips [B, T, 3, H, W] with their frames in `frame_order`:
    (tokens [B, 1 + N', D], emb [B, E])."""
    return model.encode_video(reorder_frames(video, frame_order, seed))


def video_loader(dataset, batch_size: int, num_workers: int, collate_fn=None):
    """The dataset's clips in order (collate_fn: for items with more than tensors, e.g. QA's)."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate_fn)


def embed_videos(
    model,
    dataset,
    batch_size: int = 16,
    num_workers: int = 0,
    device="cpu",
    keep_tokens: bool = False,
    progress: bool = True,
    frame_order: str = "normal",
    shuffle_seed: int = 0,
):
    """Video embeddings [Nv, E] (and, with keep_tokens, the fusion tokens [Nv, 1 + N', D])."""
    embs, tokens = [], []
    with torch.no_grad():
        for batch in tqdm(
            video_loader(dataset, batch_size, num_workers), desc=f"videos ({frame_order})", disable=not progress
        ):
            tok, emb = encode_clips(model, batch["video"].to(device), frame_order, shuffle_seed)
            embs.append(emb.float().cpu())
            if keep_tokens:
                tokens.append(tok.float().cpu())
    return torch.cat(embs), (torch.cat(tokens) if keep_tokens else None)


def embed_texts(model, collator, texts: list[str], batch_size: int = 64, device="cpu"):
    """Text embeddings [Nt, E], text hidden states [Nt, L, D] and masks [Nt, L] (padded to the
    longest text of all)."""
    tokens = collator.tokenize(texts)
    embs, hidden = [], []
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            ids = tokens["input_ids"][start : start + batch_size].to(device)
            mask = tokens["attention_mask"][start : start + batch_size].to(device)
            h, emb = model.encode_text(ids, mask)
            embs.append(emb.float().cpu())
            hidden.append(h.float().cpu())
    return torch.cat(embs), torch.cat(hidden), tokens["attention_mask"]


def vtm_scores(
    model, text_hidden, text_mask, video_tokens, pairs, batch_size: int = 64, device="cpu", kind: str = "log_odds"
):
    """Matching scores [P] of (text i, video j) pairs [(i, j), ...] through the fusion layers
    (kind: svitt.models.svitt.VTM_SCORES)."""
    out = []
    with torch.no_grad():
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start : start + batch_size]
            t = torch.tensor([p[0] for p in chunk])
            v = torch.tensor([p[1] for p in chunk])
            out.append(
                model.vtm_score(
                    text_hidden[t].to(device), text_mask[t].to(device), video_tokens[v].to(device), kind=kind
                )
                .float()
                .cpu()
            )
    return torch.cat(out) if out else torch.zeros(0)
