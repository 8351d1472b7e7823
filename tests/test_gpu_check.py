"""benchmarks/gpu_check.py: its dry run (the real run's code on the CPU, tiny sizes, gloo) passes
every check, and what goes wrong (a result beyond tolerance, out-of-memory, an exception, a dead
worker, the deadline) is reported while the remaining checks still run."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks/gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


gc = _load()
DRY = gc.PROFILES["dry"]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "gpu_check.json"
    proc = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", "--dry", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, json.loads(out.read_text()), out


def _items(report, part):
    return {item["name"]: item for item in report["parts"][part]}


def test_dry_run_runs_every_planned_item_and_passes(dry_run):
    proc, report, out = dry_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert report["mode"] == "dry" and report["torch"] == torch.__version__
    for part in gc.PARTS:
        assert list(_items(report, part)) == [i.name for i in gc.PLAN if i.part == part]
        assert {item["status"] for item in report["parts"][part]} == {"ok"}, part
    assert report["summary"] == {"ok": len(gc.PLAN), "skipped_checks": report["summary"]["skipped_checks"]}
    markdown = out.with_suffix(".md").read_text()
    for heading in ("## Correctness", "## One attention layer", "## Training step"):
        assert heading in markdown


def test_dry_kernel_checks_cover_full_and_pruned_counts_and_say_why_flex_has_no_cpu_backward(dry_run):
    _, report, _ = dry_run
    items = _items(report, "correctness")
    # 4 x 4 x 4 patches (G = 8): 64 tokens and ceil(0.7 * 64) = 45 at T = 4; 256 and 128 - 1 at T = 16
    # (0.5 * 256 = 128 is a multiple of G: one fewer, so the last block is partial).
    sizes = {c["size"].split(" B=")[0] for c in items["gather_kernel"]["checks"]}
    assert sizes == {"T=4 N-1=64", "T=4 N-1=45", "T=8 N-1=128", "T=8 N-1=77", "T=16 N-1=256", "T=16 N-1=127"}
    assert len(items["gather_kernel"]["checks"]) == 6 * 6  # output, CLS attention, 4 gradients
    for check in items["gather_kernel"]["checks"]:
        assert check["status"] == "ok" and check["error"] <= 1e-10
    for frames in (4, 8, 16):
        for check in items[f"flex_T{frames}"]["checks"]:
            if check["what"] in ("flex output", "flex CLS attention"):
                assert check["status"] == "ok" and check["error"] <= 1e-4
            else:  # the gradients: torch has no FlexAttention backward on the CPU
                assert check["status"] == "skip" and "backward on CPU" in check["reason"]
    statuses = {c["what"]: c["status"] for name in ("precision", "ddp", "gpu_lock") for c in items[name]["checks"]}
    assert set(statuses.values()) == {"ok"} and len(statuses) == 12 + 5 + 6


def test_dry_attention_and_training_parts_measure_every_configuration(dry_run):
    _, report, _ = dry_run
    for frames in (4, 8, 16):
        rows = {r["variant"]: r for r in _items(report, "attention")[f"layer_T{frames}"]["rows"]}
        assert rows["flex"]["status"] == "skip"
        for variant in ("dense", "sdpa_nobias", "gather"):
            assert rows[variant]["seconds"] > 0 and rows[variant]["peak_bytes"] > 0
        assert rows["dense"]["time_vs_dense"] == 1.0
    training = _items(report, "training")
    for frames in (4, 8, 16):
        for mode in ("dense", "hybrid"):
            item = training[f"{mode}_T{frames}"]
            assert item["batch"] in DRY.batches and item["batch"] <= max(item["predicted_max_batch"], 2)
            assert item["clips_per_s"] > 0 and item["step_peak_bytes_per_clip"] > 0
            assert item["precision"] == "bf16" and set(item["losses"]) == {"vtc", "vtm", "mlm", "loss"}
        assert training[f"hybrid_T{frames}"]["visual_keep"] == {4: 0.7, 8: 0.6, 16: 0.5}[frames]
        assert training[f"hybrid_T{frames}"]["kernel"] == "gather"
    for k_r in (3, 5):
        ego = training[f"ego_k{k_r}"]
        assert ego["batch"] == 8 and ego["precision"] == "fp16" and ego["blocks"] == [1, k_r, 8]
        assert set(ego["losses"]) == {"egonce", "vtm", "mlm", "loss"}
    assert set(report["paper"]) == {"T4", "T8", "T16"}  # Ego's GB need CUDA's allocator


def test_a_result_beyond_tolerance_is_a_failure_with_its_size_and_error():
    want = torch.tensor([[1.0, -4.0], [2.0, 0.5]])
    got = want.clone()
    got[1, 0] += 0.02
    check = gc.compare("flex grad k", "T=16 N-1=1567", got, want, 1e-3)
    assert check == {
        "what": "flex grad k",
        "size": "T=16 N-1=1567",
        "error": pytest.approx(0.02 / 4),
        "tolerance": 1e-3,
        "status": "fail",
    }
    assert gc.compare("x", "s", got, want, 0.01)["status"] == "ok"
    got[0, 0] = float("nan")
    nan = gc.compare("x", "s", got, want, 1.0)
    assert nan["status"] == "fail" and nan["error"] == math.inf


def test_out_of_memory_moves_to_the_next_smaller_batch_and_is_reported():
    tried = []

    def run(batch):
        tried.append(batch)
        if batch > 4:
            raise torch.OutOfMemoryError(f"CUDA out of memory at batch {batch}")
        return {"batch": batch}

    result, ooms, stopped = gc.largest_fitting(run, [8, 6, 4, 2], "cpu", lambda: 100.0)
    assert result == {"batch": 4} and tried == [8, 6, 4] and stopped is None
    assert [o["batch"] for o in ooms] == [8, 6] and "batch 8" in ooms[0]["error"]
    result, ooms, stopped = gc.largest_fitting(run, [8, 6], "cpu", lambda: 100.0)
    assert result is None and len(ooms) == 2 and stopped == "out of memory at every batch"


def test_other_errors_of_a_batch_attempt_are_not_taken_for_out_of_memory():
    def run(batch):
        raise ValueError(f"bad batch {batch}")

    with pytest.raises(ValueError, match="bad batch 8"):
        gc.largest_fitting(run, [8, 4], "cpu", lambda: 100.0)


def test_the_batch_prediction_is_linear_in_the_probes_and_stays_on_the_ladder():
    # 100 bytes fixed + 50 per clip; 90% of 1000 free bytes fits (900 - 100) / 50 = 16 clips.
    predicted, candidates = gc.predict_batch({2: 200, 4: 300}, 1000, (2, 4, 8, 12, 16, 24, 32))
    assert predicted == 16 and candidates == [16, 12, 8, 4, 2]
    _, candidates = gc.predict_batch({2: 200, 4: 300}, 100, (2, 4, 8))
    assert candidates == [2]  # nothing predicted to fit: the smallest batch is still tried


def test_items_whose_planned_time_no_longer_fits_are_skipped_and_said_so():
    results = []  # planned (dry): environment 0.5 s, gpu_lock 6 s
    gc.run_items(DRY, ["environment", "gpu_lock"], time.time() + 3, results.append)
    assert [r["name"] for r in results] == ["environment", "gpu_lock"]
    assert results[0]["status"] == "ok"
    assert results[1]["status"] == "skip" and results[1]["reason"].startswith("budget")


def test_an_item_that_raises_is_its_own_error_and_the_next_item_still_runs():
    bad = dataclasses.replace(DRY, layer=DRY.layer._replace(local_blocks=2))
    results = []
    gc.run_items(bad, ["gather_kernel", "environment"], time.time() + 60, results.append)
    assert results[0]["status"] == "error"
    assert "local_blocks (K_l) must be a positive odd number, got 2" in results[0]["error"]
    assert results[1]["status"] == "ok"


def test_a_dead_worker_costs_its_item_and_a_new_worker_runs_the_rest():
    results = gc.run_part(DRY, "correctness", ["no_such_item", "environment"], time.time() + 120)
    assert [r["name"] for r in results] == ["no_such_item", "environment"]
    assert results[0]["status"] == "error" and "worker exited with status 1" in results[0]["error"]
    assert "KeyError: 'no_such_item'" in results[0]["stderr"]
    assert results[1]["status"] == "ok"


def test_a_part_with_no_time_left_starts_no_worker_and_says_so():
    start = time.monotonic()
    results = gc.run_part(DRY, "training", ["dense_T4", "ego_k3"], time.time() + 1)
    assert [(r["name"], r["status"]) for r in results] == [("dense_T4", "skip"), ("ego_k3", "skip")]
    assert all(r["reason"].startswith("budget") for r in results)
    assert time.monotonic() - start < 1  # no worker process was started


def test_the_real_runs_plan_fits_in_eight_minutes():
    plan = gc.plan_summary(gc.PROFILES["cuda"])
    assert plan["total"] < 8 * 60 and plan["total"] <= gc.DEFAULT_BUDGET_S["cuda"]
    assert sum(p["total"] for k, p in plan.items() if k != "total") == plan["total"]


def test_the_readme_and_the_makefile_give_the_same_command():
    command = "PYTHONPATH=. python benchmarks/gpu_check.py --out benchmarks/results/gpu_check.json"
    assert command in (ROOT / "README.md").read_text()
    # Under `make test` the child make would announce its directory; a clean environment and
    # --no-print-directory keep its output to the command alone.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}
    make = subprocess.run(
        ["make", "-n", "--no-print-directory", "gpu-check", "PYTHON=python"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
    )
    assert make.stdout.strip() == command
