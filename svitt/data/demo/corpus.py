"""The corpus writers: render both worlds in worker processes and write every file in its
published layout (WebVid CSV, retrieval / QA JSONs, egoclip.csv, egomcq.json, NLQ JSONs, a
WordPiece vocabulary), built under a temporary name and swapped in whole."""

from __future__ import annotations

import csv
import json
import multiprocessing
import os
import re
import shutil
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path

import numpy as np
from tqdm import tqdm

from svitt.data.demo.ego import (
    EGO_NOUN_LIST,
    EGO_VERB_LIST,
    ego_rows,
    ego_uid,
    make_egomcq,
    make_nlq,
    plan_ego_video,
    render_ego_video,
)
from svitt.data.demo.scene import DemoGeometry, DemoSizes
from svitt.data.demo.twins import Clip, plan_clips, qa_pairs, render_family
from svitt.data.formats import EGOCLIP_HEADER
from svitt.data.mp4 import write_mp4

FORMAT_VERSION = 1
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def basic_tokens(text: str) -> list[str]:
    """Lower-cased words and single punctuation marks, as BERT's basic tokenizer splits them."""
    return re.findall(r"[a-z0-9]+|[^\sa-z0-9]", text.lower())


def write_vocab(folder: Path, texts) -> Path:
    """A WordPiece vocab ([PAD]=0, [UNK], [CLS], [SEP], [MASK], then every word) + tokenizer config.

    Load with `BertTokenizerFast.from_pretrained(folder)` or `BertTokenizerFast(vocab=str(vocab))`.
    (transformers 5 silently ignores `vocab_file=`: every token becomes [UNK].)
    """
    words = {"#", "c"}
    for text in texts:
        words.update(basic_tokens(text))
    folder.mkdir(parents=True, exist_ok=True)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(SPECIAL_TOKENS + sorted(words)) + "\n", encoding="utf-8")
    config = {
        "tokenizer_class": "BertTokenizer",
        "do_lower_case": True,
        "model_max_length": 32,
        "pad_token": "[PAD]",
        "unk_token": "[UNK]",
        "cls_token": "[CLS]",
        "sep_token": "[SEP]",
        "mask_token": "[MASK]",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return vocab


def load_tokenizer(folder: str | Path):
    """The demo corpus's BERT WordPiece tokenizer, offline."""
    from transformers import BertTokenizerFast

    return BertTokenizerFast.from_pretrained(str(folder), local_files_only=True)


def parallel_map(fn, jobs: list, workers: int, desc: str, progress: bool) -> list:
    """fn over jobs in worker processes (PyAV encoding holds the GIL, threads do not scale)."""
    bar = tqdm(total=len(jobs), desc=desc, disable=not progress)
    try:
        if workers <= 1 or len(jobs) <= 1:
            out = []
            for job in jobs:
                out.append(fn(job))
                bar.update(1)
            return out
        context = multiprocessing.get_context("forkserver")
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            out = []
            for result in pool.map(fn, jobs, chunksize=max(1, len(jobs) // (8 * workers))):
                out.append(result)
                bar.update(1)
            return out
    finally:
        bar.close()


def _render_family_job(job) -> None:
    prefix, a, b, seed, geo = job
    for variant, frames in render_family(a, b, geo, np.random.default_rng(seed)).items():
        write_mp4(f"{prefix}_{variant}.mp4", frames, geo.fps)


def _render_ego_job(job) -> None:
    """One ego video: a single mp4, or EgoVLP-style chunks <uid>/<k>.mp4 of ego_chunk_seconds."""
    target, plan, seconds, geo = job
    frames = render_ego_video(plan, seconds, geo)
    if geo.ego_chunk_seconds and geo.ego_chunk_seconds > 0:
        per_chunk = int(round(geo.ego_chunk_seconds * geo.ego_fps))
        target.mkdir()
        for c, start in enumerate(range(0, len(frames), per_chunk)):
            write_mp4(target / f"{c}.mp4", frames[start : start + per_chunk], geo.ego_fps)
    else:
        write_mp4(target.with_suffix(".mp4"), frames, geo.ego_fps)


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=1) + "\n", encoding="utf-8")


def _write_csv(path: Path, header: list[str], rows, delimiter: str = ",") -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, delimiter=delimiter, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def _iso_duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"PT{s // 3600:02d}H{s % 3600 // 60:02d}M{s % 60:02d}S"


def make_demo_corpus(
    out_dir: str | Path,
    seed: int = 0,
    sizes: DemoSizes | None = None,
    geometry: DemoGeometry | None = None,
    workers: int = 1,
    progress: bool = True,
) -> dict:
    """Generate the corpus into `out_dir` (built under a temporary name, then renamed).

    Returns the summary also written to `corpus.json`. See docs/data.md for the layout.
    """
    sizes, geo = sizes or DemoSizes(), geometry or DemoGeometry()
    _check_geometry(geo)
    final = Path(out_dir).resolve()
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "videos").mkdir(parents=True)
    (tmp / "ego_videos").mkdir()
    rng = np.random.default_rng(seed)
    try:
        summary = _generate(tmp, final, seed, sizes, geo, rng, workers, progress)
        _write_json(tmp / "corpus.json", summary)
        _swap_in(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary


def _check_geometry(geo: DemoGeometry) -> None:
    if geo.frames < 4 or geo.frames % 2:
        raise ValueError(f"--frames must be an even number >= 4, got {geo.frames}")
    if geo.size % 2 or geo.size < geo.object_size * 2 + geo.travel:
        raise ValueError(
            f"--size {geo.size} must be even and >= 2 * object size + travel ({2 * geo.object_size + geo.travel})"
        )


def _swap_in(tmp: Path, final: Path) -> None:
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def _generate(
    tmp: Path,
    final: Path,
    seed: int,
    sizes: DemoSizes,
    geo: DemoGeometry,
    rng: np.random.Generator,
    workers: int,
    progress: bool,
) -> dict:
    clips, events = plan_clips(sizes, rng)
    # The finetune split draws from its own generator: adding it changes no other part of the corpus.
    extra = np.random.default_rng([seed, 1])
    family_seeds = {key: int((extra if key[0] == "finetune" else rng).integers(2**63)) for key in events}

    jobs = [
        (tmp / "videos" / f"{split}_{family:05d}", *events[(split, family)], family_seeds[(split, family)], geo)
        for split, family in events
    ]
    parallel_map(_render_family_job, jobs, workers, "demo clips (families of 4)", progress)
    url = {c.id: (final / "videos" / f"{c.id}.mp4").as_uri() for c in clips}
    duration = _iso_duration(geo.frames / geo.fps)

    train = [c for c in clips if c.split == "train"]
    _write_csv(
        tmp / "webvid_train.csv",
        ["videoid", "contentUrl", "duration", "page_dir", "name", "family", "variant"],
        [[c.id, url[c.id], duration, "demo", c.caption, f"train_{c.family:05d}", c.variant] for c in train],
    )
    for name, splits in (("downstream_videos.csv", ("test", "qa", "finetune")), ("qa_videos.csv", ("qa",))):
        _write_csv(
            tmp / name, ["id", "url", "caption"], [[c.id, url[c.id], c.caption] for c in clips if c.split in splits]
        )
    _write_retrieval(tmp, [c for c in clips if c.split == "test"], [c for c in clips if c.split == "finetune"])
    texts = [c.caption for c in clips]
    texts += _write_qa(tmp, [c for c in clips if c.split == "qa"], sizes, rng)
    ego_texts, ego_summary = _write_ego(tmp, final, sizes, geo, rng, workers, progress)
    texts += ego_texts
    vocab = write_vocab(tmp / "tokenizer", texts)
    return {
        "format_version": FORMAT_VERSION,
        "seed": seed,
        "sizes": asdict(sizes),
        "geometry": asdict(geo),
        "videos": {split: sum(c.split == split for c in clips) for split in ("train", "test", "qa", "finetune")},
        "ego": ego_summary,
        "vocab_size": len(vocab.read_text().split("\n")) - 1,
        "variants": {
            "fwd": "A then B",
            "rev": "fwd reversed in time",
            "swap": "B then A",
            "swaprev": "swap reversed in time",
        },
    }


def _write_retrieval(tmp: Path, test: list[Clip], finetune: list[Clip]) -> None:
    twin = {"fwd": ("rev", "swap"), "rev": ("fwd", "swaprev"), "swap": ("swaprev", "fwd"), "swaprev": ("swap", "rev")}
    items, pairs, paragraphs = [], [], []
    for c in test:
        rev_id = f"test_{c.family:05d}_{twin[c.variant][0]}"
        order_id = f"test_{c.family:05d}_{twin[c.variant][1]}"
        items.append(
            {
                "video": c.id,
                "caption": c.caption,
                "family": f"test_{c.family:05d}",
                "variant": c.variant,
                "reverse_twin": rev_id,
                "order_twin": order_id,
            }
        )
        paragraphs.append({"video": c.id, "caption": [c.first.sentence() + ".", "then " + c.second.sentence() + "."]})
        if c.variant in ("fwd", "swap"):
            pairs.append({"a": c.id, "b": rev_id, "kind": "reverse"})
        if c.variant in ("fwd", "rev"):
            pairs.append({"a": c.id, "b": order_id, "kind": "order"})
    _write_json(tmp / "retrieval_test.json", items)
    _write_json(tmp / "retrieval_test_didemo.json", paragraphs)
    _write_json(tmp / "twins_test.json", pairs)
    _write_json(
        tmp / "retrieval_train.json",
        [
            {"video": c.id, "caption": c.caption, "family": f"finetune_{c.family:05d}", "variant": c.variant}
            for c in finetune
        ],
    )


def _write_qa(tmp: Path, qa_clips: list[Clip], sizes: DemoSizes, rng: np.random.Generator) -> list[str]:
    families = sorted({c.family for c in qa_clips})
    n_test = max(1, len(families) // 4) if len(families) > 1 else 0
    test_families = set(families[len(families) - n_test :])
    splits = {"train": [], "test": []}
    for c in qa_clips:
        splits["test" if c.family in test_families else "train"] += qa_pairs(c, sizes.qa_questions_per_video, rng)
    answers = sorted({q["answer"] for qs in splits.values() for q in qs})
    _write_json(tmp / "qa_train.json", splits["train"])
    _write_json(tmp / "qa_test.json", splits["test"])
    _write_json(tmp / "qa_answers.json", answers)
    return [q["question"] for qs in splits.values() for q in qs] + answers


def _write_ego(
    tmp: Path, final: Path, sizes: DemoSizes, geo: DemoGeometry, rng: np.random.Generator, workers: int, progress: bool
):
    n_videos = sizes.ego_train_videos + sizes.ego_mcq_videos
    if n_videos == 0:
        _write_csv(tmp / "egoclip.csv", EGOCLIP_HEADER, [], delimiter="\t")
        _write_json(tmp / "egomcq.json", {})
        _write_json(tmp / "ego_taxonomy.json", {"nouns": EGO_NOUN_LIST, "verbs": EGO_VERB_LIST})
        for split in ("train", "val"):
            _write_json(tmp / f"nlq_{split}.json", make_nlq({}, split, sizes.ego_seconds, geo))
        return [], {"videos": 0}
    uids = [ego_uid(rng) for _ in range(n_videos)]
    plans = [plan_ego_video(sizes.ego_seconds, geo, rng) for _ in uids]

    jobs = [(tmp / "ego_videos" / uid, plan, sizes.ego_seconds, geo) for uid, plan in zip(uids, plans)]
    parallel_map(_render_ego_job, jobs, workers, "ego videos", progress)
    rows = {uid: ego_rows(uid, sizes.ego_seconds, plan["actions"]) for uid, plan in zip(uids, plans)}
    train_uids, mcq_uids = uids[: sizes.ego_train_videos], uids[sizes.ego_train_videos :]
    egoclip = [r for uid in train_uids for r in rows[uid]]
    _write_csv(
        tmp / "egoclip.csv",
        EGOCLIP_HEADER,
        [[i] + [r[c] for c in EGOCLIP_HEADER[1:]] for i, r in enumerate(egoclip)],
        delimiter="\t",
    )
    mcq = make_egomcq({u: rows[u] for u in mcq_uids}, sizes.ego_mcq_questions, rng)
    _write_json(tmp / "egomcq.json", mcq)
    _write_json(tmp / "ego_taxonomy.json", {"nouns": EGO_NOUN_LIST, "verbs": EGO_VERB_LIST})
    texts = [r["clip_text"] for uid in uids for r in rows[uid]]
    nlq_queries = {}
    for split, split_uids in (("train", train_uids), ("val", mcq_uids)):
        nlq = make_nlq({u: p for u, p in zip(uids, plans) if u in split_uids}, split, sizes.ego_seconds, geo)
        _write_json(tmp / f"nlq_{split}.json", nlq)
        nlq_queries[split] = [
            q["query"]
            for v in nlq["videos"]
            for c in v["clips"]
            for a in c["annotations"]
            for q in a["language_queries"]
        ]
        texts += nlq_queries[split]
    summary = {
        "videos": n_videos,
        "train_videos": train_uids,
        "mcq_videos": mcq_uids,
        "egoclip_rows": len(egoclip),
        "egomcq_questions": len(mcq),
        "nlq_queries": {k: len(v) for k, v in nlq_queries.items()},
        "chunk_seconds": geo.ego_chunk_seconds,
        "folder": str(final / "ego_videos"),
    }
    return texts, summary
