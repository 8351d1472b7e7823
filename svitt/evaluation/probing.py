"""Temporal probing (SViTT Table 14): one evaluation per frame order, and the differences.

A task's `run` calls `over_frame_orders` with a function that evaluates one order. Every pass
starts from the same random-block layouts (the generator is reseeded), so the frame order is the
only thing that differs between passes. The combined result is the normal pass's result (its keys
unchanged) plus `frame_orders` {order: metrics}, `frame_order_deltas` {order: normal - order}
(positive when the order hurts, the paper's Delta) and `frame_permutations` {order: indices}.
"""

from __future__ import annotations

from collections.abc import Callable

from svitt.evaluation.encode import FRAME_ORDERS, frame_permutation

RESULT_KEYS = ("metrics", "metrics_vtm", "metrics_vtm_itc", "twins", "twins_vtm", "twins_exact_reversal")


def check_frame_orders(orders) -> list[str]:
    """A list of distinct frame orders that starts with "normal" (the reference of the deltas)."""
    orders = list(orders)
    bad = [o for o in orders if o not in FRAME_ORDERS]
    if bad or not orders or orders[0] != "normal" or len(set(orders)) != len(orders):
        raise ValueError(
            f"frame_orders must be distinct entries of {FRAME_ORDERS} starting with 'normal', got {orders}"
        )
    return orders


def reset_layouts(model) -> None:
    """Reseed the random-block generator of the video encoder (edge sparsity) to its config seed."""
    encoder = model.video_encoder
    encoder.layout_generator.manual_seed(int(encoder.cfg["seed"]))


def over_frame_orders(model, orders, evaluate: Callable[[str], object]) -> dict:
    """evaluate(order) for each order -> {order: that pass's output}."""
    outputs = {}
    for order in check_frame_orders(orders):
        reset_layouts(model)
        outputs[order] = evaluate(order)
    return outputs


def _numeric(tree: dict) -> dict:
    return {k: v for k, v in tree.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def combine(results: dict[str, dict], frames: int, seed: int) -> dict:
    """{order: result} -> the normal result with frame_orders, frame_order_deltas and
    frame_permutations added."""
    normal = results["normal"]
    out = dict(normal)
    out["frame_orders"] = {order: {k: r[k] for k in RESULT_KEYS if k in r} for order, r in results.items()}
    out["frame_order_deltas"] = {
        order: {
            key: {m: normal[key][m] - v for m, v in _numeric(r[key]).items() if m in normal[key]}
            for key in RESULT_KEYS
            if key in r and key in normal and key != "twins_exact_reversal"
        }
        for order, r in results.items()
        if order != "normal"
    }
    out["frame_permutations"] = {order: frame_permutation(frames, order, seed) for order in results}
    out["shuffle_seed"] = seed
    return out
