"""Open-ended video QA of a finetuned VideoQA model (Singularity's protocol).

Every question is scored against the dataset's whole answer list: the `rerank_k` answers whose
first token the decoder finds likeliest are scored as whole sequences (`scoring`, one of
svitt.models.answer_decoder.SCORING_RULES), and the best one is the prediction. Accuracy is exact
string match, overall and per question type. Questions whose answer is not in the list stay in
the count (they can never be right) and are reported.
"""

from __future__ import annotations

import torch
from tqdm import tqdm

from svitt.evaluation.encode import FRAME_ORDERS, reorder_frames, video_loader
from svitt.evaluation.metrics import qa_accuracy
from svitt.evaluation.probing import combine, over_frame_orders

# evaluation.qa defaults (Singularity's k_test 128); text_len / answer_len None: as the model was
# trained (its model.json), so a question is tokenised the way the decoder learnt it.
SETTINGS = {
    "batch_size": 32,
    "rerank_k": 128,
    "scoring": "sequence",
    "text_len": None,
    "answer_len": None,
    "frame_orders": list(FRAME_ORDERS),
    "shuffle_seed": 0,
}


MODEL_KIND = "qa"  # svitt.evaluation.loading: a finetuned VideoQA, checked


def load_model(weights, frames: int | None = None):
    """A finetuned VideoQA model (model.safetensors with model.json beside it): (model, info), on
    the CPU; svitt.evaluation.loading.load_for_evaluation(..., kind="qa") is what scripts call."""
    from svitt.evaluation.loading import load_model as load

    return load(weights, frames=frames, kind="qa")


def build_dataset(shards, annotations, frames: int, transform, settings: dict | None = None, answer_list=None):
    from svitt.data.datasets import QADataset

    if answer_list is None:
        raise ValueError("QA evaluation needs the dataset's answer list (--answer-list)")
    return QADataset(shards, annotations, frames, transform, answer_list=answer_list)


def run(model, dataset, collator, settings: dict, device="cpu", progress: bool = True) -> dict:
    """QA under each of settings["frame_orders"] (svitt.evaluation.probing)."""
    settings = {**SETTINGS, **settings}
    seed = settings["shuffle_seed"]
    results = over_frame_orders(
        model,
        settings["frame_orders"],
        lambda order: evaluate_qa(
            model,
            dataset,
            collator,
            batch_size=settings["batch_size"],
            rerank_k=settings["rerank_k"],
            scoring=settings["scoring"],
            answer_len=settings["answer_len"],
            device=device,
            progress=progress,
            frame_order=order,
            shuffle_seed=seed,
        ),
    )
    return combine(results, model.video_encoder.cfg["frames"], seed)


def _collate(items: list[dict]) -> dict:
    return {"video": torch.stack([it["video"] for it in items]), "question": [it["question"] for it in items]}


def evaluate_qa(
    model,
    dataset,
    collator,
    batch_size: int = 32,
    rerank_k: int = 128,
    scoring: str = "sequence",
    answer_len: int = 5,
    num_workers: int = 0,
    device="cpu",
    progress: bool = True,
    frame_order: str = "normal",
    shuffle_seed: int = 0,
) -> dict:
    """Accuracy of a VideoQA model on a QADataset; collator tokenises questions (PairCollator);
    frame_order: the order the model sees each clip's frames in (encode.FRAME_ORDERS)."""
    from svitt.models.answer_decoder import SCORING_RULES

    model = model.to(device).eval()
    answers = collator.tokenizer(
        dataset.answer_list, padding="longest", truncation=True, max_length=answer_len, return_tensors="pt"
    )
    answer_ids, answer_mask = answers["input_ids"].to(device), answers["attention_mask"].to(device)
    k = min(rerank_k, len(dataset.answer_list))
    predictions = []
    loader = video_loader(dataset, batch_size, num_workers, collate_fn=_collate)  # the one clip path (encode.py)
    with torch.no_grad():
        for batch in tqdm(loader, desc="QA", disable=not progress):
            question = collator.tokenize(batch["question"])
            video = reorder_frames(batch["video"], frame_order, shuffle_seed).to(device)
            scores = model.rank(
                video,
                question["input_ids"].to(device),
                question["attention_mask"].to(device),
                answer_ids,
                answer_mask,
                k,
                scoring,
            )
            predictions += [dataset.answer_list[i] for i in scores.argmax(1).tolist()]  # ties: listed first
    types = dataset.types
    has_types = any(t is not None for t in types)
    unanswerable = [dataset.items[i] for i in dataset.unanswerable]
    return {
        "num_questions": len(dataset),
        "metrics": qa_accuracy(predictions, dataset.answers, types if has_types else None),
        "counts": {t: types.count(t) for t in sorted({t for t in types if t is not None})},
        "answer_list_size": len(dataset.answer_list),
        "rerank_k": k,
        "scoring": scoring,
        "scoring_rule": SCORING_RULES[scoring],
        "ties": "the answer listed first",
        "unanswerable": len(unanswerable),
        "unanswerable_examples": [
            {"video": q["video"], "question": q["question"], "answer": q["answer"]} for q in unanswerable[:10]
        ],
        "predictions": predictions,  # in the annotation's order (questions with frames)
        "frame_order": frame_order,
    }
