"""The analysis rules through Snakemake at test size (tests/configs/test.yaml): the late-fusion control's
stages, one sweep job per point, and (slow) `all` + `paper_figures` end to end."""

import json
import re

import pytest
import yaml

from tests.helpers.workflow import copy_workflow
from tests.test_workflow import planned_jobs, snakemake


def _pretrain_configs(out: str) -> dict:
    stages = {}
    for match in re.finditer(r"--config-json '(\{.*?\})'.*?--out results/pretrain/(\w+)", out):
        cfg = json.loads(match.group(1))
        if "model" in cfg:
            stages[match.group(2)] = (cfg, match.group(0))
    return stages


def test_the_control_twins_each_curriculum_stage(tmp_path):
    workdir = copy_workflow(tmp_path)  # the demo's control: all three curriculum stages
    out = snakemake(workdir, "-n", "-p", "paper_figures", "--cores", "1").stdout
    stages = _pretrain_configs(out)
    for name in ("stage1", "stage2", "stage3"):
        joint, late = stages[name][0], stages[f"{name}_late"][0]
        assert late["model"]["video"]["temporal"] == "late" and "temporal" not in joint["model"]["video"]
        # same data, steps and optimisation: everything but the temporal mode and the name
        for cfg in (joint, late):
            cfg["model"]["video"].pop("temporal", None)
            cfg.pop("name")
        assert joint == late
    assert "--init results/pretrain/stage2_late/model.safetensors" in stages["stage3_late"][1]
    assert "--init" not in stages["stage1_late"][1]


def test_a_control_of_a_stage_without_its_init_is_an_error(tmp_path):
    workdir = copy_workflow(tmp_path)
    cfg = yaml.safe_load((workdir / "tests/configs/test.yaml").read_text())
    cfg["analysis"]["control"]["stages"] = ["stage2"]
    (workdir / "configs/bad.yaml").write_text(yaml.safe_dump(cfg))
    result = snakemake(workdir, "-n", "paper_figures", "--configfile", "configs/bad.yaml", check=False)
    assert result.returncode != 0
    assert "analysis.control.stages has 'stage2' but not its init 'stage1'" in result.stdout + result.stderr


def test_every_sweep_point_is_its_own_job(tmp_path):
    workdir = copy_workflow(tmp_path)
    out = snakemake(
        workdir,
        "-n",
        "results/figures/sweep_edge_full.png",
        "results/figures/sweep_keep_full.png",
        "--cores",
        "1",
        "--configfile",
        "tests/configs/test.yaml",
    ).stdout
    points = set(re.findall(r"wildcards: point=(\S+), stage=(\w+)", out)) | {
        (p, s) for s, p in re.findall(r"wildcards: stage=(\w+), point=(\S+)", out)
    }
    grid = yaml.safe_load((workdir / "tests/configs/test.yaml").read_text())["analysis"]["paper_sweep"]
    expected = {f"edge_{a}_{b}_{c}" for a, b, c in grid["edge"]} | {f"keep_{v:g}_{m:g}" for v, m in grid["keep"]}
    assert points == {(p, "stage1") for p in expected}


@pytest.fixture
def run(test_dag):
    return test_dag  # `all paper_figures` at test size, run once and shared with tests/test_workflow.py


@pytest.mark.slow
class TestEndToEnd:
    """`all` and `paper_figures` at test size (the session's one run)."""

    def test_every_figure_and_table_is_drawn(self, run):
        figures = [
            "training_curves",
            "sparsity",
            "efficiency",
            "retrieval_demo_retrieval",
            "probing_demo_retrieval",
            "egomcq",
            "probing_egomcq",
            "pruning_maps",
            "sweep_edge",
            "sweep_keep",
            "efficiency_full",
            "sweep_edge_full",
            "sweep_keep_full",
            "control",
            "ablation",
        ]
        for name in figures:
            assert (run / f"results/figures/{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        for table in [
            "retrieval_demo_retrieval",
            "twins_demo_retrieval",
            "probing_demo_retrieval",
            "egomcq",
            "probing_egomcq",
            "efficiency",
        ]:
            assert (run / f"results/tables/{table}.md").exists() and (run / f"results/tables/{table}.html").exists()

    def test_the_results_table_is_the_result_files(self, run):
        results = (run / "results/tables/results.md").read_text()
        for stage in ("stage1", "stage2", "stage3"):
            metrics = json.loads((run / f"results/eval/retrieval/demo_retrieval/{stage}.json").read_text())["metrics"]
            row = (
                f"| {stage} | "
                + {"stage1": "4", "stage2": "8", "stage3": "16"}[stage]
                + " | "
                + " | ".join(f"{metrics[k]:.1f}" for k in ("t2v_r1", "t2v_r5", "t2v_r10", "t2v_mean"))
                + " |"
            )
            assert row in results, row

    def test_the_control_is_at_50_percent_by_construction(self, run):
        for stage in ("stage1_late", "stage2_late"):  # tests/configs/test.yaml's control
            result = json.loads((run / f"results/eval/retrieval/demo_retrieval/{stage}.json").read_text())
            assert result["twins_exact_reversal"] == {"itc": 50.0, "vtm": 50.0}, stage
            deltas = [
                v for order in result["frame_order_deltas"].values() for group in order.values() for v in group.values()
            ]
            assert deltas and all(v == 0.0 for v in deltas), stage

    def test_an_unrunnable_sweep_point_says_why(self, run):
        point = json.loads((run / "results/analysis/sweep/stage1/edge_1_1_64.json").read_text())
        assert point["valid"] is False and "G = 64" in point["reason"]
        valid = json.loads((run / "results/analysis/sweep/stage1/edge_1_1_8.json").read_text())
        assert valid["valid"] and valid["edges"] > 0 and valid["gflops"] > 0

    def test_a_point_added_to_the_grid_runs_alone(self, run):
        assert planned_jobs(run, "tests/configs/test.yaml") == set()
        cfg = yaml.safe_load((run / "tests/configs/test.yaml").read_text())
        cfg["analysis"]["sweep"]["edge"].append([1, 0, 8])
        (run / "configs/more.yaml").write_text(yaml.safe_dump(cfg))
        assert planned_jobs(run, "configs/more.yaml") == {
            ("sweep_point", "stage=stage1, point=edge_1_0_8"),
            ("plot_sweep", "kind=edge, suffix="),
        }

    def test_the_vtm_negatives_diagnostic_reads_a_trained_stage(self, run, tmp_path):
        from collections import Counter

        from tests.conftest import script

        annotations = run / "resources/demo/retrieval_test.json"
        out = tmp_path / "stage1.json"
        assert (
            script("vtm_negatives").main(
                [
                    "--model",
                    str(run / "results/pretrain/stage1/model.safetensors"),
                    "--shards",
                    *map(str, sorted((run / "resources/frames/demo_retrieval").glob("shard-*.h5"))),
                    "--annotations",
                    str(annotations),
                    "--tokenizer",
                    str(run / "resources/demo/tokenizer"),
                    "--out",
                    str(out),
                ]
            )
            == 0
        )
        result = json.loads(out.read_text())
        items = json.loads(annotations.read_text())
        n, sizes = len(items), Counter(item["family"] for item in items)
        family_pairs = sum(size * (size - 1) for size in sizes.values())  # ordered pairs in one family
        assert result["share_of_clips"]["family"] == pytest.approx(family_pairs / (n * (n - 1)))
        assert sum(result["share_of_clips"].values()) == pytest.approx(1.0)
        assert sum(result["negative_mass"].values()) == pytest.approx(1.0, abs=1e-5)
        for head in ("itc", "vtm"):
            accuracy = result[f"pairwise_acc_{head}"]
            assert all((v is None) == (result["share_of_clips"][k] == 0) for k, v in accuracy.items()), head
            assert all(0 <= v <= 100 for v in accuracy.values() if v is not None), head
        assert all(-1.0 <= v <= 1.0 + 1e-6 for side in result["cosine"].values() for v in side.values())

    def test_the_report_holds_every_figure_and_table(self, run):
        snakemake(run, "--report", "report.html", "--configfile", "tests/configs/test.yaml")
        html = (run / "report.html").read_text(errors="replace")
        for name in [
            "pruning_maps.png",
            "probing_demo_retrieval.png",
            "sweep_edge.png",
            "efficiency.png",
            "retrieval_demo_retrieval.html",
            "twins_demo_retrieval.html",
            "efficiency.html",
        ]:
            assert name in html, name
        assert "This report was produced by the configuration below" in html
