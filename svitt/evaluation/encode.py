"""The one embedding path of every evaluation: videos, texts, matching scores (torch)."""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm


def video_loader(dataset, batch_size: int, num_workers: int):
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)


def embed_videos(model, dataset, batch_size: int = 16, num_workers: int = 0, device="cpu",
                 keep_tokens: bool = False, progress: bool = True):
    """Video embeddings [Nv, E] (and, with keep_tokens, the fusion tokens [Nv, 1 + N', D])."""
    embs, tokens = [], []
    with torch.no_grad():
        for batch in tqdm(video_loader(dataset, batch_size, num_workers), desc="videos",
                          disable=not progress):
            tok, emb = model.encode_video(batch["video"].to(device))
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
            ids = tokens["input_ids"][start:start + batch_size].to(device)
            mask = tokens["attention_mask"][start:start + batch_size].to(device)
            h, emb = model.encode_text(ids, mask)
            embs.append(emb.float().cpu())
            hidden.append(h.float().cpu())
    return torch.cat(embs), torch.cat(hidden), tokens["attention_mask"]


def vtm_scores(model, text_hidden, text_mask, video_tokens, pairs, batch_size: int = 64, device="cpu",
               kind: str = "log_odds"):
    """Matching scores [P] of (text i, video j) pairs [(i, j), ...] through the fusion layers
    (kind: svitt.models.svitt.VTM_SCORES)."""
    out = []
    with torch.no_grad():
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start:start + batch_size]
            t = torch.tensor([p[0] for p in chunk])
            v = torch.tensor([p[1] for p in chunk])
            out.append(model.vtm_score(text_hidden[t].to(device), text_mask[t].to(device),
                                       video_tokens[v].to(device), kind=kind).float().cpu())
    return torch.cat(out) if out else torch.zeros(0)
