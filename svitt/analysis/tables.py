"""Result tables from the workflow's JSON files: Markdown (README), HTML (the Snakemake report)
and CSV. Each cell is the mean over a model's result files (one per seed) followed by each value
in brackets when there are several, e.g. "67.5 (65.0, 70.0)".

A table is (title, columns, rows, notes); rows hold strings.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass, field

from svitt.analysis.results import ORDERS, load_runs, mean, pick, read_json


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)
    labels: int = 1  # leading columns that name a row (left-aligned); the rest are numbers

    def markdown(self) -> str:
        lines = [
            f"**{self.title}**",
            "",
            "| " + " | ".join(self.columns) + " |",
            "|" + "|".join(["---"] * self.labels + ["---:"] * (len(self.columns) - self.labels)) + "|",
        ]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        lines += [""] + [f"*{note}*" for note in self.notes]
        return "\n".join(lines).rstrip() + "\n"

    def html(self) -> str:
        head = "".join(f"<th>{html.escape(c)}</th>" for c in self.columns)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in self.rows)
        notes = "".join(f"<p>{html.escape(n)}</p>" for n in self.notes)
        return (
            f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(self.title)}</title>"
            "<style>body{font-family:sans-serif;font-size:14px}table{border-collapse:collapse}"
            "th,td{border:1px solid #bbb;padding:3px 8px;text-align:right}th{background:#eee}"
            "td:first-child,th:first-child{text-align:left}p{font-size:12px;color:#444}</style></head>"
            f"<body><h3>{html.escape(self.title)}</h3><table><tr>{head}</tr>{body}</table>{notes}</body></html>\n"
        )


def cell(values: list[float], digits: int = 1) -> str:
    """Mean, and each value in brackets when there are several; '–' when there is none."""
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return "–"
    text = f"{mean(finite):.{digits}f}"
    if len(values) > 1:
        text += " (" + ", ".join("–" if math.isnan(v) else f"{v:.{digits}f}" for v in values) + ")"
    return text


def _rows(runs: dict[str, list[dict]], keys: list[str], digits: int = 1) -> list[list[str]]:
    return [[name] + [cell([pick(r, k) for r in rs], digits) for k in keys] for name, rs in runs.items()]


def _seeds(runs) -> str:
    counts = sorted({len(v) for v in runs.values()})
    return (
        "One run per model."
        if counts == [1]
        else f"Each cell: mean over {'/'.join(map(str, counts))} seeds, then each seed's value in brackets."
    )


def retrieval_table(results: dict, dataset: str) -> Table:
    runs = load_runs(results)
    keys = (
        ["frames"]
        + [f"metrics.t2v_r{k}" for k in (1, 5, 10)]
        + ["metrics.t2v_mean"]
        + [f"metrics_vtm.t2v_r{k}" for k in (1, 5, 10)]
        + ["metrics_vtm.t2v_mean"]
        + ["metrics_vtm_itc.t2v_r1", "metrics_vtm_itc.t2v_mean"]
    )
    columns = [
        "model",
        "T",
        "R@1",
        "R@5",
        "R@10",
        "mean",
        "R@1 (VTM)",
        "R@5 (VTM)",
        "R@10 (VTM)",
        "mean (VTM)",
        "R@1 (VTM+ITC)",
        "mean (VTM+ITC)",
    ]
    rows = _rows(runs, keys)
    for row in rows:
        row[1] = row[1].split(".")[0]
    chance = next(iter(runs.values()))[0]["chance_r1"]
    # a finetuned model's stage is "retrieval/<dataset>/<stage>" (workflow_scripts/finetune.py)
    finetuned = all(str(r.get("stage", "")).startswith("retrieval/") for rs in runs.values() for r in rs)
    return Table(
        f"{'Finetuned' if finetuned else 'Zero-shot'} text-to-video retrieval on {dataset} (%)",
        columns,
        rows,
        [
            f"Contrastive scores; then the top-k re-ranked by the matching head alone (VTM, Singularity's "
            f"protocol) and by the matching score plus the contrastive logit (VTM+ITC). Chance R@1 = "
            f"{chance:.1f}%. " + _seeds(runs)
        ],
    )


def twins_table(results: dict, dataset: str) -> Table:
    runs = load_runs(results)
    keys = [
        "twins.time_reversed",
        "twins.event_order",
        "twins_exact_reversal.itc",
        "twins_vtm.time_reversed",
        "twins_vtm.event_order",
        "twins_exact_reversal.vtm",
    ]
    columns = [
        "model",
        "time-reversed",
        "event-order",
        "exact reversal",
        "time-reversed (VTM)",
        "event-order (VTM)",
        "exact reversal (VTM)",
    ]
    return Table(
        f"Temporal twins on {dataset}: own caption chosen over the twin's (%)",
        columns,
        _rows(runs, keys),
        [
            "Chance 50%. Time-reversed / event-order: each video against its twin's caption (the twin's own "
            "file). Exact reversal: the clip and its frames in reverse order, so an order-blind model scores "
            "exactly 50%. " + _seeds(runs)
        ],
    )


def egomcq_table(results: dict) -> Table:
    runs = load_runs(results)
    return Table(
        "EgoMCQ accuracy (%)",
        ["model", "inter-video", "intra-video"],
        _rows(runs, ["metrics.inter", "metrics.intra"]),
        ["5 choices: chance 20%. " + _seeds(runs)],
    )


def qa_table(results: dict, dataset: str) -> Table:
    """Any QA result with a flat `metrics` dict (columns: its keys, sorted)."""
    runs = load_runs(results)
    keys = sorted(
        {k for rs in runs.values() for r in rs for k, v in r.get("metrics", {}).items() if isinstance(v, (int, float))}
    )
    return Table(
        f"Video question answering on {dataset} (%)",
        ["model"] + keys,
        _rows(runs, [f"metrics.{k}" for k in keys]),
        [_seeds(runs)],
    )


def probed(results: dict) -> bool:
    """Whether every result file holds more than one frame order (svitt.evaluation.probing)."""
    return all(len(r.get("frame_orders", {})) > 1 for rs in load_runs(results).values() for r in rs)


PROBED = {
    "retrieval": [
        ("metrics.t2v_mean", "mean recall"),
        ("twins.time_reversed", "time-reversed twins"),
        ("twins.event_order", "event-order twins"),
    ],
    "egomcq": [("metrics.inter", "inter-video"), ("metrics.intra", "intra-video")],
}


def probing_table(results: dict, task: str, dataset: str) -> Table:
    """Temporal probing (SViTT Table 14): each metric under each frame order and normal - order."""
    runs = load_runs(results)
    columns = ["model", "metric", "normal", "shuffled", "reversed", "Δ shuffled", "Δ reversed"]
    first = next(iter(runs.values()))[0].get("metrics", {})
    probed = PROBED.get(task) or [(f"metrics.{k}", k) for k, v in sorted(first.items()) if isinstance(v, (int, float))]
    rows = []
    for name, rs in runs.items():
        for key, label in probed:
            if all(math.isnan(pick(r, f"frame_orders.normal.{key}")) for r in rs):
                continue
            values = [cell([pick(r, f"frame_orders.{o}.{key}") for r in rs]) for o in ORDERS]
            deltas = [
                cell([pick(r, f"frame_orders.normal.{key}") - pick(r, f"frame_orders.{o}.{key}") for r in rs])
                for o in ORDERS[1:]
            ]
            rows.append([name, label] + values + deltas)
    return Table(
        f"Temporal probing on {dataset}: frames in normal / shuffled / reversed order (%)",
        columns,
        rows,
        [
            "Δ = normal − order (positive: the model uses frame order). Shuffled: one fixed permutation per "
            "clip length (seed in each result file). " + _seeds(runs)
        ],
        labels=2,
    )


def number(value, digits: int) -> str:
    """Fixed digits; small values (below 1) with 3 significant digits instead, so a tiny model's
    costs do not print as 0.00."""
    if value is None:
        return "–"
    return (
        f"{value:.{digits}f}" if abs(value) >= 1 or value == 0 or digits == 2 and abs(value) >= 0.1 else f"{value:.3g}"
    )


def efficiency_table(path) -> Table:
    data = read_json(path)
    columns = [
        "T",
        "sparsity",
        "(K_l, K_r, G)",
        "(q_v, q_m)",
        "edges (M)",
        "Table 7's count",
        "paper",
        "S",
        "Table 7's count",
        "paper",
        "GFLOPs",
        "paper",
        "memory (GB/clip)",
        "paper",
    ]
    rows = []
    for r in data["rows"]:
        blocks = "–" if r["block_size"] is None else f"({r['local_blocks']}, {r['random_blocks']}, {r['block_size']})"
        keep = (
            "–"
            if r["visual_keep"] == 1 and r["multimodal_keep"] == 1
            else f"({r['visual_keep']:g}, {r['multimodal_keep']:g})"
        )
        rows.append(
            [
                str(r["frames"]),
                r["mode"],
                blocks,
                keep,
                number(r["edges_m"], 2),
                number(r["edges_m_table7"], 2),
                number(r["paper_edges_m"], 2),
                f"{r['sparsity']:.2f}",
                f"{r['sparsity_table7']:.2f}",
                number(r["paper_sparsity"], 2),
                number(r["gflops"], 1),
                number(r["paper_gflops"], 1),
                number(r.get("memory_gb"), 2),
                number(r["paper_memory_gb"], 2),
            ]
        )
    notes = [
        ("ok: " if c["ok"] else "FAILS: ") + f"{c['check']}: expected {c['expected']}, got {c['got']}."
        for c in data["checks"]
    ]
    if not data["paper_size"]:
        notes.append("Not the paper's model size: no paper numbers or checks.")
    notes += [
        f"Edges: {data['conventions']['edges_m']}; Table 7's count: {data['conventions']['edges_m_table7']}.",
        f"GFLOPs: {data['conventions']['gflops']}.",
        f"Memory: {data['conventions']['memory_gb']}"
        + ("." if data["memory"] else "; not measured in this table (see the paper_figures target)."),
    ]
    return Table(f"Efficiency at {data['model_name']} size (SViTT Tables 2 and 7)", columns, rows, notes, labels=4)
