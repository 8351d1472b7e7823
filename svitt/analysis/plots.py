"""Figures of the workflow, one function per figure; each reads plain JSON/JSONL results.

Every figure takes {name: [result file, ...]}: one file per seed of the same model. Bars show the
mean over the files and a dot per file, so a figure of two seeds shows both values. A missing
file is an error that names it; nothing is drawn from no data.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from svitt.analysis.results import ORDERS, as_runs, load_runs, mean, pick, read_json, read_jsonl
from svitt.io import atomic_path
from svitt.models.objectives import OBJECTIVE_TABLE

# The total first, then every objective in the registry's order (a new one gets its panel).
LOSS_NAMES = {"loss": "total loss", **{o.name: o.label for o in OBJECTIVE_TABLE}}
TWIN_KINDS = {"time_reversed": "time-reversed twins", "event_order": "event-order twins"}


def _save(fig, out: str | Path):
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight", format=Path(out).suffix.lstrip(".") or "png")
    plt.close(fig)


# ------------------------------------------------------------------------------------ helpers
def _grouped_bars(
    ax,
    names: list[str],
    series: dict[str, list[list[float]]],
    chance: float | None,
    ylabel: str,
    title: str,
    rotation: float = 0,
    chance_label: str | None = None,
    ymax: float = 100,
):
    """Bars of the mean of each name's values (one list per name, one value per seed) with a dot
    per value, one bar per series side by side, and the chance level.

    The y range leaves a band above `ymax` for the legend, so no bar or dot is hidden behind it."""
    width = 0.8 / max(1, len(series))
    for i, (label, per_name) in enumerate(series.items()):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(names))]
        bars = ax.bar(xs, [mean(v) for v in per_name], width, label=label)
        for x, values in zip(xs, per_name):
            if len(values) > 1:
                ax.plot([x] * len(values), values, "o", ms=3, color="k", mfc=bars.patches[0].get_facecolor(), zorder=3)
    handles = 0
    if chance is not None:
        ax.axhline(chance, color="k", ls=":", lw=1, label=chance_label or f"chance ({chance:g}%)")
        handles = 1
    ax.set_ylim(0, ymax * 1.18)
    ax.set_yticks([ymax * k / 5 for k in range(6)])
    ax.set_xticks(range(len(names)), names, rotation=rotation, ha="right" if rotation else "center")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(
        fontsize=7, loc="upper center", ncol=len(series) + handles, frameon=False, columnspacing=1.0, handlelength=1.5
    )


def _seeds_note(runs: dict[str, list]) -> str:
    counts = sorted({len(v) for v in runs.values()})
    if counts == [1]:
        return "one run per model"
    return f"bars: mean of {'/'.join(map(str, counts))} seeds, dots: each seed"


# ------------------------------------------------------------------------------------ figures
def plot_training_curves(metrics: dict, out: str | Path):
    """Loss per objective over optimiser steps, stages laid end to end in the given order.
    metrics: {stage name: metrics.jsonl or [one per seed]} (seeds drawn as separate lines)."""
    runs = {name: [read_jsonl(p) for p in paths] for name, paths in as_runs(metrics).items()}
    order = list(LOSS_NAMES)
    keys = sorted({k for rs in runs.values() for r in rs for row in r for k in row} & set(order), key=order.index)
    if not keys:
        raise ValueError(f"no loss columns in {[str(p) for ps in as_runs(metrics).values() for p in ps]}")
    fig, axes = plt.subplots(
        1, len(keys), figsize=(3.3 * len(keys) + 1.2, 3.3), squeeze=False, sharex=True, layout="constrained"
    )
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    seeds = max(len(v) for v in runs.values())
    offsets = [0] * seeds
    for color, (name, per_seed) in zip(colors * 4, runs.items()):
        for seed, rows in enumerate(per_seed):
            if not rows:
                continue
            steps = [offsets[seed] + r["step"] for r in rows]
            for ax, key in zip(axes[0], keys):
                points = [(s, r[key]) for s, r in zip(steps, rows) if r.get(key) is not None]
                if points:
                    label = name if seed == 0 else None
                    ax.plot(*zip(*points), color=color, lw=1.2, ls="-" if seed == 0 else "--", label=label)
            offsets[seed] = steps[-1]
        for ax in axes[0]:
            ax.axvline(offsets[0], color="0.85", lw=0.8, zorder=0)
    for ax, key in zip(axes[0], keys):
        ax.set_title(LOSS_NAMES[key], fontsize=10)
        ax.set_xlabel("optimiser step (stages end to end)")
        ax.set_ylabel("loss (nats)")
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    for ax in axes[0][1:]:  # stages without the first panel's objective (EgoNCE vs VTC)
        for h, label in zip(*ax.get_legend_handles_labels()):
            if label not in labels:
                handles.append(h)
                labels.append(label)
    fig.legend(handles, labels, loc="outside right upper", fontsize=8, title="stage", title_fontsize=8)
    note = "" if seeds == 1 else " (solid: first seed, dashed: other seeds)"
    fig.suptitle(f"Pretraining curriculum: training losses{note}", fontsize=11)
    _save(fig, out)


def plot_retrieval(results: dict, out: str | Path):
    """Zero-shot text-to-video recall (contrastive scores) and temporal twin accuracy per model.
    results: {model name: evaluation JSON or [one per seed]} of svitt.evaluation.retrieval."""
    runs = load_runs(results)
    names = list(runs)
    fig, (ax_r, ax_t) = plt.subplots(1, 2, figsize=(max(10, 1.6 * len(names) + 6), 3.8), layout="constrained")
    chance = next(iter(runs.values()))[0]["chance_r1"]
    _grouped_bars(
        ax_r,
        names,
        {f"R@{k}": [[pick(r, f"metrics.t2v_r{k}") for r in runs[n]] for n in names] for k in (1, 5, 10)},
        chance=chance,
        ylabel="text-to-video recall (%)",
        title="Zero-shot retrieval (test split)",
        rotation=20,
        chance_label="chance R@1",
    )
    twins = {
        f"{label}": [[pick(r, f"twins.{kind}") for r in runs[n]] for n in names]
        for kind, label in TWIN_KINDS.items()
        if any(kind in r.get("twins", {}) for rs in runs.values() for r in rs)
    }
    if any(
        pick(r, "twins_exact_reversal.itc") == pick(r, "twins_exact_reversal.itc") for rs in runs.values() for r in rs
    ):
        twins["exact reversal of the clip"] = [[pick(r, "twins_exact_reversal.itc") for r in runs[n]] for n in names]
    if twins:
        _grouped_bars(
            ax_t,
            names,
            twins,
            chance=50,
            ylabel="caption chosen correctly (%)",
            title="Temporal twins: own caption vs twin's",
            rotation=20,
        )
    else:
        ax_t.text(0.5, 0.5, "no temporal twins in this dataset", ha="center", va="center", transform=ax_t.transAxes)
        ax_t.set_axis_off()
    fig.suptitle(f"Retrieval per model ({_seeds_note(runs)})", fontsize=10)
    _save(fig, out)


def plot_egomcq(results: dict, out: str | Path):
    """EgoMCQ inter- and intra-video accuracy per model (chance 20%)."""
    runs = load_runs(results)
    names = list(runs)
    fig, ax = plt.subplots(figsize=(4 + len(names), 3.6), layout="constrained")
    _grouped_bars(
        ax,
        names,
        {
            f"{kind}-video": [[pick(r, f"metrics.{kind}") for r in runs[n]] for n in names]
            for kind in ("inter", "intra")
        },
        chance=20,
        ylabel="accuracy (%)",
        title=f"EgoMCQ ({_seeds_note(runs)})",
    )
    _save(fig, out)


def plot_sparsity(models: dict, out: str | Path):
    """Attention edges and overall sparsity S (appendix eq. 19) of each stage's model."""
    info = {name: runs[0] for name, runs in load_runs(models).items()}
    names = list(info)
    fig, ax = plt.subplots(figsize=(4 + len(names), 3.6), layout="constrained")
    ax.bar(names, [info[n]["edges"] / 1e3 for n in names], color="tab:blue")
    ax.set_ylabel("attention edges (thousands)", color="tab:blue")
    ax2 = ax.twinx()
    ax2.plot(names, [info[n]["sparsity"] for n in names], "o-", color="tab:red")
    ax2.set_ylim(0, 1)
    ax2.set_ylabel("sparsity S (fraction of dense edges removed)", color="tab:red")
    ax.set_xticks(range(len(names)), [f"{n}\nT={info[n]['frames']}" for n in names])
    ax.set_title("Edges and sparsity per stage (appendix eq. 17-19)")
    _save(fig, out)


PROBING_PANELS = {  # per task: (key under a frame order's results, panel title, chance)
    "retrieval": [
        ("metrics.t2v_mean", "retrieval: mean of R@1/5/10 (%)", None),
        ("twins.time_reversed", "time-reversed twins (%)", 50),
        ("twins.event_order", "event-order twins (%)", 50),
    ],
    "egomcq": [
        ("metrics.inter", "EgoMCQ inter-video accuracy (%)", 20),
        ("metrics.intra", "EgoMCQ intra-video accuracy (%)", 20),
    ],
}


def _metric_panels(runs) -> list[tuple]:
    """One panel per numeric metric of a task without a fixed layout (e.g. QA accuracy)."""
    first = next(iter(runs.values()))[0].get("metrics", {})
    return [(f"metrics.{k}", f"{k} (%)", None) for k, v in sorted(first.items()) if isinstance(v, (int, float))]


def plot_probing(results: dict, out: str | Path, task: str = "retrieval"):
    """Temporal probing (SViTT Table 14): each model's metrics with its frames in normal, shuffled
    and reversed order; the text above each group is normal minus shuffled (the paper's Delta)."""
    runs = load_runs(results)
    names = list(runs)
    panels = [
        p
        for p in PROBING_PANELS.get(task) or _metric_panels(runs)
        if any(not math.isnan(pick(r, f"frame_orders.normal.{p[0]}")) for rs in runs.values() for r in rs)
    ]
    if not panels or not all("frame_orders" in r for rs in runs.values() for r in rs):
        raise ValueError(
            f"the results {[str(p) for ps in as_runs(results).values() for p in ps]} hold no "
            "frame_orders (evaluate with evaluation.<task>.frame_orders)"
        )
    fig, axes = plt.subplots(
        1, len(panels), figsize=(max(4.2, 1.3 * len(names) + 2) * len(panels), 3.8), squeeze=False, layout="constrained"
    )
    for ax, (key, title, chance) in zip(axes[0], panels):
        series = {
            order: [[pick(r, f"frame_orders.{order}.{key}") for r in runs[n]] for n in names]
            for order in ORDERS
            if any(order in r["frame_orders"] for rs in runs.values() for r in rs)
        }
        _grouped_bars(ax, names, series, chance=chance, ylabel=title, title=title.split(" (")[0], rotation=20)
        if "shuffled" in series:
            for j, n in enumerate(names):
                delta = mean(
                    [pick(r, f"frame_orders.normal.{key}") - pick(r, f"frame_orders.shuffled.{key}") for r in runs[n]]
                )
                ax.text(j, 101, f"Δ {delta:+.1f}", ha="center", va="bottom", fontsize=7)
    fig.suptitle(
        f"Temporal probing: frames in normal / shuffled / reversed order ({_seeds_note(runs)}; Δ = normal − shuffled)",
        fontsize=10,
    )
    _save(fig, out)


def plot_control(joint: dict, late: dict, out: str | Path):
    """Each curriculum stage beside its order-blind late-fusion control (same steps): retrieval,
    and twins on the exact reversal of each clip, where the control is at 50% by construction."""
    joint_runs, late_runs = load_runs(joint), load_runs(late)
    names = list(joint_runs)
    missing = [n for n in names if n not in late_runs]
    if missing:
        raise ValueError(f"stages {missing} have no late-fusion control results (have {sorted(late_runs)})")
    panels = [
        ("metrics.t2v_mean", "retrieval: mean of R@1/5/10 (%)", None),
        ("twins_exact_reversal.itc", "time-reversed twins, exact reversal (%)", 50),
        ("twins.event_order", "event-order twins (%)", 50),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), layout="constrained")
    for ax, (key, title, chance) in zip(axes, panels):
        _grouped_bars(
            ax,
            names,
            {
                "SViTT (joint space-time)": [[pick(r, key) for r in joint_runs[n]] for n in names],
                "late-fusion control": [[pick(r, key) for r in late_runs[n]] for n in names],
            },
            chance=chance,
            ylabel=title,
            title=title.split(" (")[0],
        )
    fig.suptitle(f"Curriculum vs its order-blind control ({_seeds_note(joint_runs)})", fontsize=10)
    _save(fig, out)


def plot_sweep(
    points: dict, out: str | Path, kind: str, reference: dict | None = None, metric: str = "metrics.t2v_mean"
):
    """Test-time sparsity sweeps of one or more checkpoints (SViTT Figures 4, 5, 7).

    points: {"<stage>/<point name>": sweep point JSON or [one per seed]}; kind "edge" (K_l, K_r, G
    points ordered by edge count, Figure 4) or "keep" (q_v on x, one line per stage and q_m,
    Figures 5 and 7). reference: {stage: evaluation JSON(s)} of the unmodified checkpoints."""
    runs = load_runs(points)
    stages = sorted({r["stage"] for rs in runs.values() for r in rs})
    label = {"metrics.t2v_mean": "text-to-video mean recall (%)"}.get(metric, metric)
    fig, ax = plt.subplots(figsize=(7.5, 4.0), layout="constrained")
    invalid = [(name, rs[0]) for name, rs in runs.items() if not rs[0]["valid"]]
    valid = {name: rs for name, rs in runs.items() if rs[0]["valid"]}
    if kind == "edge":
        names = sorted(valid, key=lambda n: (valid[n][0]["stage"], valid[n][0]["edges"]))
        xs = range(len(names))
        values = [[pick(r, metric) for r in valid[n]] for n in names]
        ax.bar(xs, [mean(v) for v in values], 0.6, color="tab:blue", label=label.split(" (")[0])
        for x, v in zip(xs, values):
            if len(v) > 1:
                ax.plot([x] * len(v), v, "o", ms=3, color="k")
        ticks = [
            f"{valid[n][0]['stage']}\n({valid[n][0]['settings']['local_blocks']}, "
            f"{valid[n][0]['settings']['random_blocks']}, {valid[n][0]['settings']['block_size']})"
            for n in names
        ]
        ax.set_xticks(list(xs), ticks, fontsize=8)
        ax.set_xlim(-0.7, max(len(names), 2) - 0.3)
        ax.set_xlabel("attention blocks (K_l, K_r, G), ordered by edge count")
        ax2 = ax.twinx()
        ax2.plot(
            list(xs),
            [valid[n][0]["edges"] / 1e3 for n in names],
            "s--",
            color="tab:red",
            ms=4,
            label="attention edges (right axis)",
        )
        ax2.set_ylabel("attention edges (thousands)", color="tab:red")
        ax2.set_ylim(0, max([valid[n][0]["edges"] / 1e3 for n in names] + [1]) * 1.25)
        ax2.legend(fontsize=7, loc="upper right", frameon=False)
        title = "Edge sparsity at test time (Figure 4)"
    else:
        for stage in stages:
            by_qm: dict[float, list] = {}
            for name, rs in valid.items():
                if rs[0]["stage"] == stage:
                    by_qm.setdefault(rs[0]["settings"]["multimodal_keep"], []).append(rs)
            for q_m, group in sorted(by_qm.items()):
                group.sort(key=lambda rs: rs[0]["settings"]["visual_keep"])
                ax.plot(
                    [rs[0]["settings"]["visual_keep"] for rs in group],
                    [mean([pick(r, metric) for r in rs]) for rs in group],
                    "o-",
                    label=f"{stage} (T={group[0][0]['frames']}), q_m={q_m:g}",
                )
        ax.set_xlabel("visual keep rate q_v (per pruning layer)")
        ax.set_xlim(1.05, 0.0)  # sparser to the right, as in the paper
        title = "Node sparsity at test time (Figures 5 and 7)"
    for stage, paths in (reference or {}).items():
        value = mean([pick(read_json(p), metric) for p in ([paths] if isinstance(paths, (str, Path)) else paths)])
        ax.axhline(value, color="0.4", ls=":", lw=1)
        ax.annotate(
            f"{stage} as trained",
            (1.0, value),
            xycoords=("axes fraction", "data"),
            ha="right",
            va="bottom",
            fontsize=7,
            color="0.3",
        )
    ax.set_ylim(0, 118)
    ax.set_yticks(range(0, 101, 20))
    ax.set_ylabel(label)
    ax.legend(fontsize=7, loc="upper left", frameon=False, ncol=2)
    if invalid:
        ax.text(
            0.0,
            -0.28 if kind == "edge" else -0.18,
            "not run: " + "; ".join(f"{r['stage']}/{r['point']}: {r['reason']}" for _, r in invalid),
            transform=ax.transAxes,
            fontsize=7,
            va="top",
            wrap=True,
        )
    ax.set_title(title)
    _save(fig, out)


def plot_ablation(entries: dict, out: str | Path, metric: str = "metrics.t2v_mean"):
    """The curriculum ablation in Table 3's layout: per clip length T, single-stage training
    beside the sparse expansion chain. entries: {"<T>:single" or "<T>:expansion": JSON(s)}."""
    runs = load_runs(entries)
    frames = sorted({int(name.split(":")[0]) for name in runs})
    kinds = {"single": "single stage (trained at T only)", "expansion": "sparse expansion (from fewer frames)"}
    bad = [n for n in runs if n.split(":")[-1] not in kinds]
    if bad:
        raise ValueError(f"ablation entries must be named '<T>:single' or '<T>:expansion', got {bad}")
    names = [f"T = {t}" for t in frames]
    series = {
        label: [[pick(r, metric) for r in runs.get(f"{t}:{kind}", [])] for t in frames] for kind, label in kinds.items()
    }
    fig, ax = plt.subplots(figsize=(2 + 1.8 * len(frames), 3.8), layout="constrained")
    _grouped_bars(
        ax,
        names,
        series,
        chance=None,
        ylabel="text-to-video mean recall (%)",
        title=f"Temporal sparse expansion (Table 3; {_seeds_note(runs)})",
    )
    ax.set_xlabel("clip length T (frames)")
    _save(fig, out)


def plot_table(columns: list[str], rows: list[list], out: str | Path, title: str, notes: list[str] = ()):
    """A table rendered as a figure: header row shaded, cells as given, notes below it."""
    row_h, note_h = 0.27, 0.2
    table_h, notes_h = row_h * (len(rows) + 1), note_h * len(notes)
    height = table_h + notes_h + 0.5
    widths = [max(len(str(c)) for c in [column] + [row[i] for row in rows]) for i, column in enumerate(columns)]
    fig = plt.figure(figsize=(max(6.0, 0.09 * sum(widths) + 0.25 * len(columns)), height))
    ax = fig.add_axes((0.01, (notes_h + 0.1) / height, 0.98, table_h / height))
    ax.set_axis_off()
    table = ax.table(
        cellText=[[str(c) for c in row] for row in rows],
        colLabels=columns,
        cellLoc="center",
        colWidths=[w / sum(widths) for w in widths],
        bbox=(0, 0, 1, 1),
    )
    table.auto_set_font_size(False)
    table.set_fontsize(8)
    for (r, _), cell in table.get_celld().items():
        if r == 0:
            cell.set_facecolor("0.88")
            cell.set_text_props(weight="bold")
    fig.text(0.5, 1 - 0.12 / height, title, ha="center", va="top", fontsize=10)
    for i, note in enumerate(notes):
        fig.text(
            0.01, (notes_h - note_h * (i + 0.5)) / height + 0.02 / height, note, fontsize=7, ha="left", va="center"
        )
    _save(fig, out)


def plot_efficiency(report: str | Path, out: str | Path):
    """The efficiency table (efficiency.json of workflow_scripts/efficiency.py) as a figure."""
    from svitt.analysis.tables import efficiency_table

    table = efficiency_table(report)
    plot_table(table.columns, table.rows, out, table.title, table.notes)


def kept_mask(positions: list[int], grid: tuple[int, int, int]):
    """Kept token positions -> bool [T', H', W'] on the tubelet grid."""
    import numpy as np

    mask = np.zeros(int(np.prod(grid)), dtype=bool)
    mask[list(positions)] = True
    return mask.reshape(grid)


def plot_pruning_maps(
    frames,
    maps: list[dict],
    captions: list[str],
    names: list[str],
    grid,
    tubelet: int,
    patch: int,
    layers: list[int],
    info: dict,
    out: str | Path,
    max_columns: int = 8,
):
    """Figures 6 and 8: per clip, its frames, the patches kept after each visual pruning layer
    (pruned ones greyed out) and the text-guided selection for its caption.

    frames: [B, T, H, W, 3] floats in [0, 1]; maps: per clip {"visual": [positions per layer],
    "text": positions} on the tubelet grid (T', H', W'); one column per tubelet (its first frame),
    at most max_columns of them, evenly spread."""
    import numpy as np

    slots = grid[0]
    shown = min(slots, max_columns)
    columns = sorted({round(i * (slots - 1) / max(1, shown - 1)) for i in range(shown)})
    rows = 2 + len(layers)
    total = int(np.prod(grid))
    fig = plt.figure(figsize=(1.1 * len(columns) + 0.6, (1.1 * rows + 0.45) * len(maps) + 0.3), layout="constrained")
    subfigs = np.atleast_1d(fig.subfigures(len(maps), 1))
    for sub, clip, m, caption, name in zip(subfigs, frames, maps, captions, names):
        steps = [("frames", np.ones(grid, dtype=bool))]
        steps += [
            (f"after layer {layer}\n{len(kept)}/{total} kept", kept_mask(kept, grid))
            for layer, kept in zip(layers, m["visual"])
        ]
        steps.append((f"text-guided\n{len(m['text'])}/{total} kept", kept_mask(m["text"], grid)))
        axes = sub.subplots(rows, len(columns), squeeze=False)
        for r, (label, mask) in enumerate(steps):
            for k, t in enumerate(columns):
                ax = axes[r][k]
                image = clip[t * tubelet]
                pixel_mask = np.kron(mask[t], np.ones((patch, patch), dtype=bool))[..., None]
                ax.imshow(np.where(pixel_mask, image, 0.15 * image + 0.85 * 0.5), interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                if k == 0:
                    ax.set_ylabel(label, fontsize=7)
                if r == 0:
                    span = f"{t * tubelet}-{t * tubelet + tubelet - 1}" if tubelet > 1 else f"{t}"
                    ax.set_title(f"frames {span}" if tubelet > 1 else f"frame {span}", fontsize=7)
        sub.suptitle(f'{name}: "{caption}"', fontsize=8)
    fig.suptitle(
        f"Pruning maps of {info['stage']} (q_v = {info['q_v']}, q_m = {info['q_m']}); grey: pruned patches", fontsize=9
    )
    _save(fig, out)
