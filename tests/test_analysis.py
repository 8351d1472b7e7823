"""Figures and tables from result files, sweep points, pruning maps (the analysis CLIs on the
shared demo pipeline)."""

import json
import math

import pytest
import torch

from svitt.analysis.efficiency import edges
from svitt.analysis.tables import cell
from svitt.data.pipeline import load_tokenizer
from svitt.evaluation.probing import combine
from svitt.models.sparsity import kept_count
from svitt.models.svitt import SViTT
from svitt.training.checkpoint import export_model
from tests.conftest import script

PNG = b"\x89PNG\r\n\x1a\n"


def _retrieval(r1, reversed_twins, exact=50.0):
    """A retrieval result as svitt.evaluation.retrieval.run writes it, with three frame orders."""

    def one(shift):
        metrics = {"t2v_r1": r1 - shift, "t2v_r5": r1 + 10, "t2v_r10": r1 + 20, "t2v_mean": r1 + 10 - shift / 3}
        twins = {"time_reversed": reversed_twins - 2 * shift, "event_order": 50.0 + shift}
        fused = {k: v + 1 for k, v in metrics.items()}
        return {
            "metrics": metrics,
            "metrics_vtm": dict(metrics),
            "metrics_vtm_itc": fused,
            "twins": twins,
            "twins_vtm": dict(twins),
            "num_videos": 8,
            "chance_r1": 12.5,
            "frames": 4,
        }

    out = combine({"normal": one(0), "shuffled": one(6), "reversed": one(3)}, frames=4, seed=0)
    out["twins_exact_reversal"] = {"itc": exact, "vtm": exact}
    return out


def _write(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return str(path)


def test_cell_shows_the_mean_then_each_seed():
    assert cell([40.0, 50.0]) == "45.0 (40.0, 50.0)"
    assert cell([61.25]) == "61.2"
    assert cell([math.nan]) == "–"


def test_tables_are_regenerated_from_the_result_files(tmp_path):
    runs = {
        "stage1": [_write(tmp_path / f"s{seed}/stage1.json", _retrieval(40.0 + 10 * seed, 60.0)) for seed in (0, 1)],
        "stage2": [_write(tmp_path / "s0/stage2.json", _retrieval(30.0, 82.0))],
    }
    mcq = _write(
        tmp_path / "egoclip.json",
        combine(
            {o: {"metrics": {"inter": 40.0, "intra": 25.0}} for o in ("normal", "shuffled", "reversed")},
            frames=4,
            seed=0,
        ),
    )
    qa = _write(
        tmp_path / "qa.json",
        combine(
            {o: {"metrics": {"accuracy": a}} for o, a in (("normal", 41.0), ("shuffled", 40.0), ("reversed", 40.5))},
            frames=4,
            seed=0,
        ),
    )
    args = [
        "--out-dir",
        str(tmp_path / "tables"),
        "--egomcq",
        f"egoclip={mcq}",
        "--qa",
        f"msrvtt_qa:stage3={qa}",
        "--retrieval",
    ]
    args += [f"demo:{name}={p}" for name, paths in runs.items() for p in paths]
    assert script("tables").main(args) == 0
    results = (tmp_path / "tables/results.md").read_text()
    assert "| stage1 | 4 | 45.0 (40.0, 50.0) | 55.0 (50.0, 60.0) |" in results  # R@1, R@5: mean (seed 0, seed 1)
    # R@1..mean, R@1..mean (VTM), R@1 and mean (VTM+ITC)
    assert "| stage2 | 4 | 30.0 | 40.0 | 50.0 | 40.0 | 30.0 | 40.0 | 50.0 | 40.0 | 31.0 | 41.0 |" in results
    assert "| stage2 | 82.0 | 50.0 | 50.0 |" in results  # twins: time-reversed, event-order, exact reversal
    assert "| stage2 | mean recall | 40.0 | 38.0 | 39.0 | 2.0 | 1.0 |" in results  # probing, Δ = normal - order
    assert "| egoclip | 40.0 | 25.0 |" in results
    assert "| stage3 | 41.0 |" in results and "| stage3 | accuracy | 41.0 | 40.0 | 40.5 | 1.0 | 0.5 |" in results
    for name in ("retrieval_demo", "twins_demo", "probing_demo", "egomcq", "probing_egomcq"):
        assert (tmp_path / f"tables/{name}.html").read_text().startswith("<!DOCTYPE html>")
        assert (tmp_path / f"tables/{name}.csv").exists()


def test_the_retrieval_table_says_whether_its_models_were_finetuned(tmp_path):
    from svitt.analysis.tables import retrieval_table

    zero_shot = _write(tmp_path / "stage3.json", {**_retrieval(30.0, 50.0), "stage": "stage3"})
    finetuned = _write(tmp_path / "ft.json", {**_retrieval(30.0, 50.0), "stage": "retrieval/demo/stage3"})
    assert retrieval_table({"stage3": [zero_shot]}, "demo").title.startswith("Zero-shot text-to-video")
    assert retrieval_table({"stage3": [finetuned]}, "demo").title.startswith("Finetuned text-to-video")


def test_every_figure_draws_from_result_files(tmp_path):
    plot = script("plot").main
    runs = [f"stage1={_write(tmp_path / f's{seed}/stage1.json', _retrieval(40.0 + seed, 60.0))}" for seed in (0, 1)]
    late = f"stage1={_write(tmp_path / 'late.json', _retrieval(38.0, 50.0))}"
    qa = _write(
        tmp_path / "qa.json",
        combine({o: {"metrics": {"accuracy": 40.0}} for o in ("normal", "shuffled", "reversed")}, frames=4, seed=0),
    )
    figures = {
        "retrieval": ["retrieval", *runs],
        "probing": ["probing", *runs],
        "control": ["control", *runs, "--late", late],
        "probing_qa": ["probing", "--task", "qa", f"stage3={qa}"],
        "ablation": ["ablation", runs[0].replace("stage1=", "4:single="), runs[1].replace("stage1=", "4:expansion=")],
    }
    points = []
    for name, settings, valid in (
        ("edge_1_1_8", {"local_blocks": 1, "random_blocks": 1, "block_size": 8}, True),
        ("edge_2_1_8", {"local_blocks": 2, "random_blocks": 1, "block_size": 8}, False),
        ("keep_0.5_0.5", {"visual_keep": 0.5, "multimodal_keep": 0.5}, True),
        ("keep_0.7_1", {"visual_keep": 0.7, "multimodal_keep": 1.0}, True),
    ):
        base = {
            "local_blocks": None,
            "random_blocks": None,
            "block_size": None,
            "visual_keep": 1.0,
            "multimodal_keep": 1.0,
        }
        record = {"point": name, "stage": "stage1", "frames": 4, "valid": valid, "settings": {**base, **settings}}
        record.update(
            {"metrics": {"t2v_mean": 30.0}, "edges": 4000, "gflops": 0.02} if valid else {"reason": "K_l = 2: even"}
        )
        points.append(f"stage1/{name}={_write(tmp_path / f'sweep/{name}.json', record)}")
    figures["sweep_edge"] = ["sweep", "--kind", "edge", *[p for p in points if "/edge" in p], "--reference", runs[0]]
    figures["sweep_keep"] = ["sweep", "--kind", "keep", *[p for p in points if "/keep" in p]]
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"step": s, "loss": 3.0 / s, "vtc": 1.0 / s}) + "\n" for s in (1, 2, 3)))
    figures["training"] = ["training", f"stage1={metrics}", f"stage2={metrics}"]
    for name, args in figures.items():
        assert plot([*args, "--out", str(tmp_path / f"{name}.png")]) == 0
        assert (tmp_path / f"{name}.png").read_bytes()[:8] == PNG, name


def test_a_figure_without_its_results_names_the_missing_file(tmp_path):
    missing = tmp_path / "results/eval/retrieval/demo/stage9.json"
    with pytest.raises(FileNotFoundError, match=f"result file {missing} does not exist"):
        script("plot").main(["retrieval", f"stage9={missing}", "--out", str(tmp_path / "f.png")])
    assert not (tmp_path / "f.png").exists()
    old = _write(tmp_path / "old.json", {"metrics": {"t2v_mean": 1.0}})  # evaluated before frame orders existed
    with pytest.raises(ValueError, match="hold no frame_orders"):
        script("plot").main(["probing", f"stage1={old}", "--out", str(tmp_path / "f.png")])


# ------------------------------------------------------------------------- on the demo pipeline
@pytest.fixture(scope="module")
def exported(pipeline, tmp_path_factory):
    """An untrained tiny model exported like a stage (model.safetensors + model.json), with
    node sparsity, so the CLIs that read checkpoints can run on the demo pipeline."""
    corpus, _ = pipeline
    torch.manual_seed(0)
    model = SViTT(
        {
            "video": {"preset": "tiny", "frames": 4, "visual_keep": 0.5},
            "text": {"preset": "tiny", "vocab_size": len(load_tokenizer(corpus / "tokenizer")), "multimodal_keep": 0.5},
            "embed_dim": 16,
        }
    )
    out = tmp_path_factory.mktemp("stage")
    export_model(
        model,
        out,
        {
            "name": "stage1",
            "steps": 0,
            "frames": 4,
            "model_config": model.cfg,
            "train_config": {"data": {"mean": [0.5] * 3, "std": [0.5] * 3}},
        },
    )
    return out / "model.safetensors"


def _demo_args(pipeline, exported):
    corpus, res = pipeline
    return [
        "--model",
        str(exported),
        "--shards",
        str(res / "frames/downstream/shard-0.h5"),
        "--annotations",
        str(corpus / "retrieval_test.json"),
        "--tokenizer",
        str(corpus / "tokenizer"),
    ]


def test_sweep_point_reports_metric_edges_and_flops(pipeline, exported, tmp_path):
    out = tmp_path / "edge_1_1_8.json"
    assert (
        script("sweep").main(
            [
                *_demo_args(pipeline, exported),
                "--point",
                "edge_1_1_8",
                "--local-blocks",
                "1",
                "--random-blocks",
                "1",
                "--block-size",
                "8",
                "--config-json",
                '{"rerank_k": 2}',
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    point = json.loads(out.read_text())
    assert point["valid"] and point["metric"] == {"name": "t2v_mean", "value": point["metrics"]["t2v_mean"]}
    assert point["settings"] == {
        "local_blocks": 1,
        "random_blocks": 1,
        "block_size": 8,
        "visual_keep": 0.5,
        "multimodal_keep": 0.5,
    }
    info = json.loads(exported.with_name("model.json").read_text())
    cfg = {
        **info["model_config"],
        "video": {**info["model_config"]["video"], "local_blocks": 1, "random_blocks": 1, "block_size": 8},
    }
    assert point["edges"] == edges(cfg)["edges"] < edges(info["model_config"])["edges"]
    assert point["gflops"] > 0 and set(point["twins"]) == {"time_reversed", "event_order"}


@pytest.mark.parametrize(
    "flags, reason",
    [
        (
            ["--local-blocks", "2", "--random-blocks", "1", "--block-size", "8"],
            "K_l = 2: the local window needs an odd",
        ),
        (
            ["--local-blocks", "1", "--random-blocks", "1", "--block-size", "64"],
            "G = 64 tokens per block: the clip has 32",
        ),
        (["--visual-keep", "0", "--multimodal-keep", "0.5"], r"keep rates \[0.0, 0.5\] must be in \(0, 1\]"),
    ],
)
def test_a_point_the_kernel_cannot_run_says_why(pipeline, exported, tmp_path, flags, reason):
    out = tmp_path / "point.json"
    assert script("sweep").main([*_demo_args(pipeline, exported), "--point", "p", *flags, "--out", str(out)]) == 0
    point = json.loads(out.read_text())
    assert point["valid"] is False and point["stage"] == "stage1"
    assert __import__("re").search(reason, point["reason"]), point["reason"]


def test_pruning_maps_show_what_each_clip_keeps(pipeline, exported, tmp_path):
    corpus, _ = pipeline
    video = sorted((corpus / "videos").glob("test_*.mp4"))[0]
    args = [
        *_demo_args(pipeline, exported),
        "--clips",
        "3",
        "--video",
        str(video),
        "--caption",
        "a clip from a file",
        "--out-figure",
        str(tmp_path / "maps.png"),
        "--out-json",
        str(tmp_path / "maps.json"),
    ]
    assert script("pruning_maps").main(args) == 0
    assert (tmp_path / "maps.png").read_bytes()[:8] == PNG
    maps = json.loads((tmp_path / "maps.json").read_text())
    assert maps["prune_layers"] == [2, 3] and maps["grid"] == [2, 4, 4]
    clips = maps["clips"]
    assert [c["name"] for c in clips][-1] == video.name and clips[-1]["caption"] == "a clip from a file"
    # 32 regional tokens -> ceil(0.5 * 32) = 16 -> 8 after the two visual pruning layers, then q_m = 0.5
    for clip in clips:
        assert [len(kept) for kept in clip["visual"]] == [kept_count(32, 0.5), kept_count(16, 0.5)] == [16, 8]
        assert set(clip["visual"][1]) <= set(clip["visual"][0])  # a pruned token never comes back
        assert len(clip["text"]) == kept_count(8, 0.5) and set(clip["text"]) <= set(clip["visual"][1])
    assert len({json.dumps(c["visual"]) for c in clips[:3]}) > 1  # different clips, different maps


def test_readme_results_replace_only_the_marked_section(tmp_path):
    readme, results = tmp_path / "README.md", tmp_path / "results.md"
    readme.write_text("# T\n\nbefore\n<!-- demo-results:start -->\nold\nrows\n<!-- demo-results:end -->\nafter\n")
    results.write_text("<!-- Generated by workflow_scripts/tables.py; do not edit. -->\n\n| a |\n|---|\n| 1 |\n")
    assert script("readme_results").main(["--results", str(results), "--readme", str(readme)]) == 0
    assert readme.read_text() == (
        "# T\n\nbefore\n<!-- demo-results:start -->\n| a |\n|---|\n| 1 |\n<!-- demo-results:end -->\nafter\n"
    )
    readme.write_text("no markers\n")
    with pytest.raises(ValueError, match="demo-results:start"):
        script("readme_results").main(["--results", str(results), "--readme", str(readme)])
    assert readme.read_text() == "no markers\n"


def test_readme_results_write_a_named_section_and_leave_the_other(tmp_path):
    """--section demo-temporal-results (make readme-temporal) replaces only its own markers' text."""
    readme, results = tmp_path / "README.md", tmp_path / "results.md"
    text = (
        "<!-- demo-results:start -->\ndefault\n<!-- demo-results:end -->\nmid\n"
        "<!-- demo-temporal-results:start -->\nold\n<!-- demo-temporal-results:end -->\n"
    )
    readme.write_text(text)
    results.write_text("| b |\n|---|\n| 2 |\n")
    args = ["--results", str(results), "--readme", str(readme), "--section", "demo-temporal-results"]
    assert script("readme_results").main(args) == 0
    assert readme.read_text() == text.replace("\nold\n", "\n| b |\n|---|\n| 2 |\n")
    other = tmp_path / "other.md"  # several table files: one after the other, a blank line between
    other.write_text("**T**\n\n| c |\n|---|\n| 3 |\n")
    args[1:2] = [str(results), str(other)]
    assert script("readme_results").main(args) == 0
    assert readme.read_text() == text.replace("\nold\n", "\n| b |\n|---|\n| 2 |\n\n**T**\n\n| c |\n|---|\n| 3 |\n")


class _VideoWordModel:
    """Fusion that ignores the text and returns the clip's first token as every position's state,
    and an MLM head that reads it as vocabulary logits: the predicted word is the clip's word."""

    class text_encoder:
        @staticmethod
        def encode(ids, mask):
            return torch.nn.functional.one_hot(ids, 10).float()

    def fuse(self, hidden, mask, video_tokens):
        return video_tokens[:, :1].expand(-1, hidden.shape[1], -1)

    def mlm_logits(self, fused):
        return fused


def test_word_probe_counts_each_group_word_by_hand():
    probe = script("word_probe")
    ids = torch.tensor([[2, 3, 5, 4, 0], [2, 4, 6, 7, 0]])
    groups = {"a": [3, 4], "b": [5, 6, 7]}
    says_4 = torch.nn.functional.one_hot(torch.tensor([[4], [4]]), 10).float()  # both clips "say" word 4
    counts = probe.masked_word_accuracy(
        _VideoWordModel(), ids, torch.ones_like(ids), {"own": says_4}, groups, mask_id=1
    )
    # group a picks 4: row 0 has 3 then 4, row 1 has 4; group b's logits tie, so it picks its first word 5
    assert counts == {"a": {"own": {0: [1, 2], 1: [1, 1]}}, "b": {"own": {0: [1, 2], 1: [0, 1]}}}
    summary = probe.summarise(counts, groups)
    assert summary["a"]["own"] == {
        "all": pytest.approx(200 / 3),
        "count": 3,
        "occurrence_1": 50.0,
        "occurrence_2": 100.0,
    }
    assert summary["b"]["chance"] == pytest.approx(100 / 3)


def test_word_probe_names_a_word_outside_the_vocabulary(tmp_path):
    from svitt.data.demo.corpus import write_vocab

    write_vocab(tmp_path, ["the red circle moves up"])
    tokenizer = load_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="'purple' of group 'colour' is not one token"):
        script("word_probe").group_token_ids(tokenizer, {"colour": ["red", "purple"]})
