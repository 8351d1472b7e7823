"""Figures of the workflow, one function per figure; each reads plain JSON/JSONL results."""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from svitt.io import atomic_path  # noqa: E402


def read_jsonl(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _save(fig, out: str | Path):
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight", format=Path(out).suffix.lstrip(".") or "png")
    plt.close(fig)


def plot_training_curves(metrics: dict[str, str | Path], out: str | Path):
    """Loss per objective over optimiser steps, stages laid end to end in the given order.
    metrics: {stage name: metrics.jsonl}."""
    rows = {name: read_jsonl(path) for name, path in metrics.items()}
    keys = sorted({k for rs in rows.values() for r in rs for k in r}
                  & {"loss", "vtc", "egonce", "vtm", "mlm"}, key=["loss", "vtc", "egonce", "vtm", "mlm"].index)
    if not keys:
        raise ValueError(f"no loss columns in {list(metrics.values())}")
    fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 3.2), squeeze=False)
    offset = 0
    for name, rs in rows.items():
        if not rs:
            continue
        steps = [offset + r["step"] for r in rs]
        for ax, key in zip(axes[0], keys):
            values = [r.get(key) for r in rs]
            if any(v is not None for v in values):
                ax.plot(steps, values, label=name, lw=1.2)
        offset = steps[-1]
        for ax in axes[0]:
            ax.axvline(offset, color="0.85", lw=0.8, zorder=0)
    for ax, key in zip(axes[0], keys):
        ax.set_title({"loss": "total loss", "vtc": "VTC (InfoNCE)", "egonce": "EgoNCE",
                      "vtm": "VTM", "mlm": "MLM"}[key])
        ax.set_xlabel("optimiser step (stages end to end)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Pretraining curriculum: training losses")
    _save(fig, out)


def plot_retrieval(results: dict[str, str | Path], out: str | Path):
    """Zero-shot text-to-video recall and temporal twin accuracy per checkpoint.
    results: {checkpoint name: evaluation JSON of svitt.evaluation.evaluate_retrieval}."""
    data = {name: json.loads(Path(p).read_text()) for name, p in results.items()}
    names = list(data)
    fig, (ax_r, ax_t) = plt.subplots(1, 2, figsize=(10, 3.6))
    chance = next(iter(data.values()))["chance_r1"] if data else 0
    _grouped_bars(ax_r, names, {"R@" + k.split("_r")[1]: [data[n]["metrics"][k] for n in names]
                                for k in ("t2v_r1", "t2v_r5", "t2v_r10")},
                  chance=chance, ylabel="text-to-video recall (%)",
                  title="Zero-shot retrieval (test split)", rotation=20, chance_label="chance R@1")
    kinds = [k for k in ("time_reversed", "event_order") if any(k in d.get("twins", {}) for d in data.values())]
    _grouped_bars(ax_t, names, {kind.replace("_", "-") + " twins":
                                [data[n].get("twins", {}).get(kind, float("nan")) for n in names]
                                for kind in kinds},
                  chance=50, ylabel="caption chosen correctly (%)",
                  title="Temporal twins: own caption vs twin's", rotation=20)
    _save(fig, out)


def _grouped_bars(ax, names: list[str], series: dict[str, list[float]], chance: float, ylabel: str,
                  title: str, rotation: float = 0, chance_label: str | None = None):
    """Percentages per checkpoint, one bar per series side by side, with the chance level."""
    width = 0.8 / max(1, len(series))
    for i, (label, values) in enumerate(series.items()):
        ax.bar([j + (i - (len(series) - 1) / 2) * width for j in range(len(names))], values, width,
               label=label)
    ax.axhline(chance, color="k", ls=":", lw=1, label=chance_label or f"chance ({chance:g}%)")
    ax.set_ylim(0, 118)  # headroom: the legend sits above the 100% line, clear of the bars
    ax.set_yticks(range(0, 101, 20))
    ax.set_xticks(range(len(names)), names, rotation=rotation)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7, loc="upper center", ncol=len(series) + 1, frameon=False,
              columnspacing=1.0, handlelength=1.5)


def plot_egomcq(results: dict[str, str | Path], out: str | Path):
    """EgoMCQ inter- and intra-video accuracy per checkpoint (chance 20%)."""
    data = {name: json.loads(Path(p).read_text()) for name, p in results.items()}
    names = list(data)
    fig, ax = plt.subplots(figsize=(4 + len(names), 3.4))
    _grouped_bars(ax, names, {f"{kind}-video": [data[n]["metrics"][kind] for n in names]
                              for kind in ("inter", "intra")},
                  chance=20, ylabel="accuracy (%)", title="EgoMCQ")
    _save(fig, out)


def plot_sparsity(models: dict[str, str | Path], out: str | Path):
    """Attention edges and overall sparsity S (appendix eq. 19) of each stage's model."""
    info = {name: json.loads(Path(p).read_text()) for name, p in models.items()}
    names = list(info)
    fig, ax = plt.subplots(figsize=(4 + len(names), 3.4))
    ax.bar(names, [info[n]["edges"] / 1e3 for n in names], color="tab:blue")
    ax.set_ylabel("attention edges (thousands)")
    ax2 = ax.twinx()
    ax2.plot(names, [info[n]["sparsity"] for n in names], "o-", color="tab:red")
    ax2.set_ylim(0, 1)
    ax2.set_ylabel("sparsity S", color="tab:red")
    ax.set_xticks(range(len(names)), [f"{n}\nT={info[n]['frames']}" for n in names])
    ax.set_title("Edges and sparsity per stage")
    _save(fig, out)
