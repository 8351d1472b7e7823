"""From HDF5 shards to training batches: tokenizer, collate, and the per-epoch loader.

Batches are dicts of tensors: video [B, T, 3, H, W], input_ids / attention_mask [B, L], and for
EgoClip nouns [B, num_nouns] / verbs [B, num_verbs]; EgoClip's scene-aware negatives are appended
to the batch (B anchors + B negatives), as EgoVLP does. QA batches: the question as input_ids /
attention_mask [B, Lq] and the answer as answer_ids / answer_mask [B, La] ([CLS] answer [SEP]).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import DataLoader

from svitt.data.datasets import EgoClipDataset, QADataset, VideoTextDataset
from svitt.data.samplers import TwinBatchSampler
from svitt.data.transforms import TrainTransform


def load_tokenizer(folder: str | Path):
    """BERT WordPiece tokenizer from a local folder (vocab.txt; e.g. bert-base-uncased)."""
    from transformers import BertTokenizerFast

    folder = Path(folder)
    if not (folder / "vocab.txt").exists() and not (folder / "tokenizer.json").exists():
        raise FileNotFoundError(f"{folder} holds no tokenizer (vocab.txt or tokenizer.json)")
    return BertTokenizerFast.from_pretrained(str(folder), local_files_only=True)


class PairCollator:
    """Stack clips and tokenise captions (picklable, so it runs in DataLoader workers)."""

    def __init__(self, tokenizer, text_len: int):
        self.tokenizer, self.text_len = tokenizer, text_len

    def tokenize(self, texts: list[str]) -> dict:
        tokens = self.tokenizer(
            texts, padding="longest", truncation=True, max_length=self.text_len, return_tensors="pt"
        )
        return {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}

    def __call__(self, items: list[dict]) -> dict:
        prefixes = [""] + (["neg_"] if "neg_video" in items[0] else [])
        rows = [
            (it[p + "video"], it[p + "caption"], it.get(p + "nouns"), it.get(p + "verbs"))
            for p in prefixes
            for it in items
        ]
        batch = {"video": torch.stack([r[0] for r in rows]), **self.tokenize([r[1] for r in rows])}
        if rows[0][2] is not None:
            batch["nouns"] = torch.stack([r[2] for r in rows])
            batch["verbs"] = torch.stack([r[3] for r in rows])
        return batch


class QACollator:
    """Stack clips, tokenise questions (text_len) and answers (answer_len tokens, [CLS] and [SEP]
    included, as Singularity's max_a_len). Raw answers and types ride along for evaluation."""

    def __init__(self, tokenizer, text_len: int, answer_len: int):
        self.tokenizer, self.text_len, self.answer_len = tokenizer, text_len, answer_len
        self.questions = PairCollator(tokenizer, text_len)

    def tokenize_answers(self, answers: list[str]) -> dict:
        tokens = self.tokenizer(
            answers, padding="longest", truncation=True, max_length=self.answer_len, return_tensors="pt"
        )
        return {"answer_ids": tokens["input_ids"], "answer_mask": tokens["attention_mask"]}

    def __call__(self, items: list[dict]) -> dict:
        batch = {
            "video": torch.stack([it["video"] for it in items]),
            **self.questions.tokenize([it["question"] for it in items]),
            **self.tokenize_answers([it["answer"] for it in items]),
        }
        batch["answer"] = [it["answer"] for it in items]
        batch["type"] = [it.get("type", "") for it in items]
        return batch


class TrainLoader:
    """Per-epoch DataLoaders over one sampler; `epoch(e, skip_batches=k)` resumes mid-epoch.

    Augmentation is seeded per (seed, epoch, sample) inside the dataset, so which worker loads a
    sample, or whether the first k batches were skipped, changes nothing."""

    def __init__(self, dataset, sampler, collate, num_workers: int, pin_memory: bool):
        self.dataset, self.sampler, self.collate = dataset, sampler, collate
        self.num_workers, self.pin_memory = num_workers, pin_memory

    @property
    def batches_per_epoch(self) -> int:
        return len(self.sampler)

    def epoch(self, epoch: int, skip_batches: int = 0) -> DataLoader:
        self.sampler.set_epoch(epoch)
        self.dataset.set_epoch(epoch)
        batches = list(self.sampler)[skip_batches:]
        # Its own generator: an iterator draws its base seed from it, and from torch's global RNG
        # (which MLM masking uses) otherwise, so a run resumed mid-epoch would drift from the
        # uninterrupted one by that one extra draw.
        return DataLoader(
            self.dataset,
            batch_sampler=batches,
            collate_fn=self.collate,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            generator=torch.Generator().manual_seed(epoch),
        )


def build_train_loader(cfg: dict, data, tokenizer, batch_size: int, rank: int, world: int) -> TrainLoader:
    """The stage's training data: `cfg` is a resolved stage config, `data` a svitt.training.tasks.TrainData."""
    dcfg, video = cfg["data"], cfg["model"]["video"]
    transform = TrainTransform(
        size=video["image_size"],
        scale=tuple(dcfg["scale"]),
        flip=dcfg["flip"],
        mean=tuple(dcfg["mean"]),
        std=tuple(dcfg["std"]),
    )
    if dcfg["kind"] == "egoclip":
        dataset = EgoClipDataset(
            data.shards,
            data.annotations,
            video["frames"],
            transform,
            num_nouns=dcfg["num_nouns"],
            num_verbs=dcfg["num_verbs"],
            train=True,
            seed=cfg["seed"],
        )
        groups = [None] * len(dataset)
    else:
        dataset = VideoTextDataset(
            data.shards,
            data.annotations,
            video["frames"],
            transform,
            train=True,
            seed=cfg["seed"],
            paragraph=dcfg["paragraph"],
        )
        groups = dataset.groups if dcfg["twin_batches"] else [None] * len(dataset)
    if len(dataset) < batch_size * world:
        raise ValueError(
            f"{len(dataset)} training clips in {data.annotations} cannot fill one batch "
            f"of {batch_size} on each of {world} rank(s)"
        )
    sampler = TwinBatchSampler(groups, batch_size, rank=rank, world_size=world, seed=cfg["seed"], drop_last=True)
    return TrainLoader(
        dataset,
        sampler,
        PairCollator(tokenizer, dcfg["text_len"]),
        dcfg["num_workers"],
        pin_memory=torch.cuda.is_available(),
    )


def build_qa_loader(cfg: dict, data, tokenizer, batch_size: int, rank: int, world: int) -> TrainLoader:
    """A QA finetuning split (`data.annotations`, Singularity's QA layout) as training batches."""
    dcfg, video = cfg["data"], cfg["model"]["video"]
    transform = TrainTransform(
        size=video["image_size"],
        scale=tuple(dcfg["scale"]),
        flip=dcfg["flip"],
        mean=tuple(dcfg["mean"]),
        std=tuple(dcfg["std"]),
    )
    dataset = QADataset(data.shards, data.annotations, video["frames"], transform, train=True, seed=cfg["seed"])
    if len(dataset) < batch_size * world:
        raise ValueError(
            f"{len(dataset)} training questions in {data.annotations} cannot fill one batch "
            f"of {batch_size} on each of {world} rank(s)"
        )
    sampler = TwinBatchSampler(
        [None] * len(dataset), batch_size, rank=rank, world_size=world, seed=cfg["seed"], drop_last=True
    )
    return TrainLoader(
        dataset,
        sampler,
        QACollator(tokenizer, dcfg["text_len"], dcfg["answer_len"]),
        dcfg["num_workers"],
        pin_memory=torch.cuda.is_available(),
    )
