"""Evaluation of SViTT models: one module per task, one embedding path, numpy metrics.

    metrics.py    score matrices -> numbers (numpy only: importable without torch)
    loading.py    the one way an evaluation loads an exported model and picks its device
                  (load_for_evaluation; every evaluating script calls it)
    encode.py     the one embedding path: videos, texts, matching scores
    retrieval.py  text-video retrieval (+ temporal twins on the demo corpus)
    egomcq.py     EgoMCQ (SViTT-Ego)
    qa.py         open-ended video QA with an answer decoder (answers ranked from a list)
    nlq.py        Ego4D NLQ: window features and their per-video export, and the grounding task
                  (ground_nlq: a grounder trained on train, evaluated on val, beside a baseline)
    grounding.py  the grounding models (GROUNDERS registry, keyed by evaluation.nlq.grounder.model),
                  their data, training loop and decoding

Public names are re-exported here; the torch-backed ones are imported on first use, so
`from svitt.evaluation import retrieval_metrics` needs numpy only.
"""

from __future__ import annotations

import importlib

from svitt.evaluation.metrics import (
    EGOMCQ_TYPES,
    NLQ_IOUS,
    NLQ_KS,
    RECALL_KS,
    RERANK_CONVENTIONS,
    TWIN_NAMES,
    egomcq_accuracy,
    fused_rerank_scores,
    nlq_metric_names,
    nlq_recall,
    qa_accuracy,
    rerank_candidates,
    rerank_metrics,
    retrieval_metrics,
    temporal_iou,
    twin_accuracy,
)

_LAZY = {
    "video_loader": "encode",
    "embed_videos": "encode",
    "embed_texts": "encode",
    "vtm_scores": "encode",
    "evaluate_retrieval": "retrieval",
    "evaluate_egomcq": "egomcq",
    "evaluate_qa": "qa",
    "window_starts": "nlq",
    "extract_window_features": "nlq",
    "ground_nlq": "nlq",
    "load_for_evaluation": "loading",
    "pick_device": "loading",
    "read_model_info": "loading",
    "GROUNDERS": "grounding",
    "build_grounder": "grounding",
}

TASKS = ("retrieval", "egomcq", "qa")  # modules with SETTINGS, build_dataset(...) and run(...)

__all__ = [
    "TASKS",
    "task",
    "EGOMCQ_TYPES",
    "NLQ_IOUS",
    "NLQ_KS",
    "RECALL_KS",
    "RERANK_CONVENTIONS",
    "TWIN_NAMES",
    "egomcq_accuracy",
    "fused_rerank_scores",
    "nlq_metric_names",
    "nlq_recall",
    "qa_accuracy",
    "rerank_candidates",
    "rerank_metrics",
    "retrieval_metrics",
    "temporal_iou",
    "twin_accuracy",
    *_LAZY,
]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"svitt.evaluation.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'svitt.evaluation' has no attribute {name!r}")


def task(name: str):
    """The evaluation module of a task (SETTINGS, build_dataset, run)."""
    if name not in TASKS:
        raise ValueError(f"unknown evaluation task {name!r}; expected one of {TASKS}")
    return importlib.import_module(f"svitt.evaluation.{name}")
