"""configs/paper.yaml resolved through Snakemake, every stage setting against its source.

The expected values are written out here from the papers (SViTT Table 9 and appendix A.3, Table 7
for the sparsity S; SViTT-Ego section 4.1) and the released code where the papers are silent, not
read from the config: a key the workflow resolves differently fails the comparison.
"""

import copy

import pytest
import torch

from svitt.models.relative_position import table_size
from svitt.models.sparsity import edge_count
from svitt.models.svitt import resolve_model_config
from svitt.models.text_encoder import multimodal_keep_rates
from svitt.training.keys import IO_KEYS, resolve_train_config
from tests.helpers.workflow import copy_workflow, paper_inputs, snakemake, stage_configs

# docs/fidelity.md: where the paper's text and the released code differ, the released code (it
# produced the published numbers), written out from models/sparse_xbeit.py, model_retrieval_base.py,
# model_vqa.py, models/utils.py and the HF BEiT config the released code loads.
RELEASED_VIDEO = dict(
    layer_norm_eps=1e-12,  # 3: BeitConfig layer_norm_eps (and vision_layernorm's eps=1e-12)
    pooling="mean",  # 1: BeitPooler with use_mean_pooling (the text says [cls])
    fusion_norm="separate",  # 2: vision_layernorm, a new LayerNorm, before the fusion layers
    prune_score="raw",  # 4: topk of attn.mean(1)[:, 0, 1:] (eq. 10 renormalises over regional tokens)
    temporal_resize="interpolate_nearest",
)  # 7: F.interpolate(mode="nearest") over the offsets
RELEASED_TEXT = dict(question_pruning=False)  # 6: QA questions in multi_modal mode, pruning never applied
BEIT_BASE = dict(
    preset="beit_base",
    image_size=224,
    patch_size=16,
    tubelet_frames=1,
    in_chans=3,
    depth=12,
    width=768,
    heads=12,
    mlp_ratio=4.0,
    qkv_bias=True,
    layer_scale_init=0.1,
    drop_path=0.1,
    prune_layers=[4, 7, 10],
    attention_kernel="auto",
    grad_checkpointing=False,
    seed=0,
    init_std=0.02,
    temporal="joint",  # one space-time sequence per clip (the late-fusion control: "late")
    abs_pos_embed=False,  # timm's beit_base_patch16_224: relative position bias only
    **RELEASED_VIDEO,
)
BERT_BASE = dict(
    preset="bert_base",
    vocab_size=30522,
    width=768,
    depth=12,
    heads=12,
    intermediate_size=3072,
    fusion_layers=3,
    max_position_embeddings=512,
    type_vocab_size=2,
    dropout=0.1,
    layer_norm_eps=1e-12,
    pad_token_id=0,
    multimodal_prune_layers=[1],
    init_std=0.02,
    **RELEASED_TEXT,
)
PRETRAIN = dict(  # Table 9 pretraining columns' shared rows, appendix A.3, released code (mlm, min lr)
    task="pairs",
    objectives={"vtc": 1.0, "vtm": 1.0, "mlm": 1.0},
    epochs=10,
    warmup_epochs=1,
    weight_decay=0.02,
    betas=[0.9, 0.999],
    mlm_prob=0.5,
    min_lr_ratio=0.01,
    egonce_temperature=0.05,
    vtm_hard_fraction=1.0,
    max_steps=None,
    grad_accum=1,
    clip_grad_norm=None,
    precision="auto",
    compile=False,
    device="auto",
    seed=0,
    deterministic=None,
    data=dict(
        kind="webvid",
        text_len=32,
        flip=True,
        scale=[0.5, 1.0],
        mean=[0.5, 0.5, 0.5],
        std=[0.5, 0.5, 0.5],
        twin_batches=False,
        num_nouns=582,
        num_verbs=118,
        paragraph=False,
    ),
)
# Table 9: frames -> batch, lr, (K_l, K_r, G), (q_v, q_m); Table 7: S. Stage 1 is Table 3's dense
# single-frame "1_0" (not in Table 9: its T = 4 column's batch and learning rate).
CHAIN = {
    "stage1": dict(frames=1, batch_size=512, lr=3e-5, blocks=(None, None, None), keep=(1.0, 1.0), sparsity=0.0),
    "stage2": dict(frames=4, batch_size=512, lr=3e-5, blocks=(1, 3, 56), keep=(0.7, 0.1), sparsity=0.80),
    "stage3": dict(frames=8, batch_size=336, lr=1e-5, blocks=(1, 3, 56), keep=(0.6, 0.1), sparsity=0.91),
    "stage4": dict(frames=16, batch_size=192, lr=5e-6, blocks=(1, 3, 56), keep=(0.5, 0.1), sparsity=0.96),
}
INIT = {"stage1": None, "stage2": "stage1", "stage3": "stage2", "stage4": "stage3"}
WEIGHTS = dict(
    video_weights="data/weights/beit_base_patch16_224.in22k_ft_in22k.pth", text_weights="data/bert-base-uncased"
)


def _expected(name, frames, batch_size, lr, blocks, keep, **changes):
    cfg = copy.deepcopy(PRETRAIN)
    video = dict(
        BEIT_BASE,
        frames=frames,
        local_blocks=blocks[0],
        random_blocks=blocks[1],
        block_size=blocks[2],
        visual_keep=keep[0],
    )
    text = dict(BERT_BASE, multimodal_keep=keep[1])
    cfg.update(
        name=name,
        batch_size=batch_size,
        lr=lr,
        model=dict(video=video, text=text, embed_dim=256, temperature=0.07, **WEIGHTS),
    )
    for key, value in changes.items():
        if key == "data":
            cfg["data"].update(value)
        else:
            cfg[key] = value
    return cfg


def _resolved(cfg):
    out = resolve_train_config(cfg)
    out["model"] = resolve_model_config(out["model"])
    for key in IO_KEYS:  # how a stage runs: pretrain.io, passed as flags, not what it learns
        out.pop(key, None)
        out["data"].pop(key, None)
    return out


@pytest.fixture(scope="module")
def paper_dry_run(tmp_path_factory):
    workdir = copy_workflow(tmp_path_factory.mktemp("paper"))
    paper_inputs(workdir)
    return snakemake(workdir, "all", "-n", "-p", "--cores", "1", "--configfile", "configs/paper.yaml").stdout


def test_the_chain_is_table_9s_and_every_setting_resolves_to_the_paper(paper_dry_run):
    stages = stage_configs(paper_dry_run)
    assert set(stages) >= set(CHAIN) | {"egoclip", "egoclip_k5"}
    for name, row in CHAIN.items():
        expected = _expected(name, **{k: v for k, v in row.items() if k != "sparsity"})
        resolved = _resolved(stages[name])
        assert set(resolved) == set(expected), name
        for key in expected:
            assert (
                resolved[key] == pytest.approx(expected[key])
                if isinstance(expected[key], float)
                else resolved[key] == expected[key]
            ), f"{name}.{key}: {resolved[key]!r} != {expected[key]!r}"


@pytest.mark.parametrize("name", list(CHAIN))
def test_each_stage_has_table_7s_sparsity(paper_dry_run, name):
    video = _resolved(stage_configs(paper_dry_run)[name])["model"]
    v, t = video["video"], video["text"]
    counts = edge_count(
        frames=v["frames"],
        local_blocks=v["local_blocks"],
        random_blocks=v["random_blocks"],
        block_size=v["block_size"],
        visual_keep=v["visual_keep"],
        multimodal_keep=multimodal_keep_rates(t),
        text_len=32,
    )
    assert round(counts["sparsity"], 2) == CHAIN[name]["sparsity"]


def test_each_stage_starts_from_the_previous_one(paper_dry_run):
    for name, init in INIT.items():
        command = next(
            line
            for line in paper_dry_run.splitlines()
            if "train.py" in line and f"--out results/pretrain/{name} " in line
        )
        assert (f"--init results/pretrain/{init}/model.safetensors" in command) == (init is not None), name
        if init is None:
            assert "--init" not in command


@pytest.mark.parametrize("name,random_blocks", [("egoclip", 3), ("egoclip_k5", 5)])
def test_svitt_ego_stages_in_both_edge_configurations(paper_dry_run, name, random_blocks):
    """SViTT-Ego 4.1: EgoClip, EgoNCE + VTM + MLM, 4 frames, 8 GPUs x 8 clips, FP16, one warm-up
    epoch, edge sparsity (1, 3, 56) or (1, 5, 56), from image/text weights."""
    expected = _expected(
        name,
        frames=4,
        batch_size=64,
        lr=3e-5,
        blocks=(1, random_blocks, 56),
        keep=(0.7, 0.1),
        objectives={"egonce": 1.0, "vtm": 1.0, "mlm": 1.0},
        precision="fp16",
        data={"kind": "egoclip"},
    )
    resolved = _resolved(stage_configs(paper_dry_run)[name])
    assert resolved == expected


@pytest.mark.parametrize(
    "section,key,value",
    [(s, k, v) for s, d in (("video", RELEASED_VIDEO), ("text", RELEASED_TEXT)) for k, v in d.items()],
)
def test_every_stage_and_finetuning_job_takes_the_released_codes_side(paper_dry_run, section, key, value):
    """docs/fidelity.md points 1-4, 6, 7: each pretraining stage and each finetuning job (whose
    model is its init's) resolves to the released code's behaviour."""
    stages, jobs = stage_configs(paper_dry_run), _finetune_jobs(paper_dry_run)
    for name, cfg in stages.items():
        assert _resolved(cfg)["model"][section][key] == value, name
    for name, entry in jobs.items():
        init = stages[name.split("/")[-1]]
        assert _resolved_finetune(entry, init)["model"][section][key] == value, name


def test_the_multimodal_keep_rate_is_applied_where_the_released_yamls_lose_it(paper_dry_run):
    """Point 8: Table 9's q_m = 0.1 prunes after the first fusion layer of every sparse stage (the
    released YAMLs' joint_encoder_args is never read by their model; the paper's q_m is kept)."""
    for name in ("stage2", "stage3", "stage4", "egoclip", "egoclip_k5"):
        text = _resolved(stage_configs(paper_dry_run)[name])["model"]["text"]
        assert multimodal_keep_rates(text) == [0.1, 1.0, 1.0], name


def test_padding_stays_masked_at_the_papers_token_counts():
    """Point 5: after pruning at T = 4 with q_v = 0.7, 549 / 385 / 270 regional tokens remain, none a
    multiple of G = 56; the block-sparse kernel there equals masked attention over the real tokens
    (the released kernel would let the zero padding take attention)."""
    import math

    from svitt.models import sparse_attention as sa

    counts = [784]
    for _ in range(3):
        counts.append(math.ceil(0.7 * counts[-1]))
    assert counts[1:] == [549, 385, 270] and all(n % 56 for n in counts[1:])
    g = torch.Generator().manual_seed(0)
    n, grid = 549, (4, 14, 14)
    q, k, v = (torch.randn(1, 2, 1 + n, 4, generator=g, dtype=torch.float64) for _ in range(3))
    table = torch.randn(table_size(grid), 2, generator=g, dtype=torch.float64)
    pos = torch.randperm(784, generator=g)[:n].sort().values[None]
    layout = sa.make_layout(n, 56, 1, 3, torch.Generator().manual_seed(1))
    out, _ = sa.gather_attention(q, k, v, table, pos, grid, layout)
    ref, _ = sa.reference_attention(q, k, v, table, pos, grid, layout)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)


def test_the_demo_keeps_this_projects_defaults():
    """config.yaml sets none of the fidelity settings: the demo learns with the normalised [CLS],
    one shared final norm, timm's epsilon, the renormalised pruning score, the symmetric resize and
    pruned QA questions (docs/fidelity.md, the demo column)."""
    import yaml

    from tests.helpers.workflow import REPO

    model = yaml.safe_load((REPO / "config.yaml").read_text())["model"]
    model["text"]["vocab_size"] = 100
    resolved = resolve_model_config(model)
    assert {k: resolved["video"][k] for k in RELEASED_VIDEO} == dict(
        layer_norm_eps=1e-6,
        pooling="cls",
        fusion_norm="shared",
        prune_score="renormalised",
        temporal_resize="symmetric",
    )
    assert resolved["text"]["question_pruning"] is True


def test_no_demo_value_or_path_survives(paper_dry_run):
    assert "resources/demo" not in paper_dry_run
    assert "demo_corpus" not in paper_dry_run
    for cfg in stage_configs(paper_dry_run).values():
        assert cfg["data"].get("scale") in (None, [0.5, 1.0])


def test_overlays_after_the_paper_config_still_merge(tmp_path):
    workdir = copy_workflow(tmp_path)
    paper_inputs(workdir)
    (workdir / "configs/cluster.yaml").write_text("pretrain:\n  defaults:\n    grad_accum: 4\n")
    out = snakemake(
        workdir, "all", "-n", "-p", "--cores", "1", "--configfile", "configs/paper.yaml", "configs/cluster.yaml"
    ).stdout
    stages = stage_configs(out)
    assert stages["stage3"]["grad_accum"] == 4 and stages["stage3"]["mlm_prob"] == 0.5


# ---------------------------------------------------------------------------------- finetuning
# Table 9's finetuning columns (retrieval): T = 4 / 8 / 16 from the chain's stage of that clip
# length, 15 epochs, no warm-up, batch 64 / 48 / 32, lr 1e-5, weight decay 0.02, (1, 3, 56),
# (q_v, q_m) = (0.7, 0.1) / (0.6, 0.1) / (0.5, 0.1); VTC + VTM. DiDeMo: paragraphs of 64 tokens.
FINETUNE_RETRIEVAL = {
    "stage2": dict(frames=4, batch_size=64, keep=(0.7, 0.1)),
    "stage3": dict(frames=8, batch_size=48, keep=(0.6, 0.1)),
    "stage4": dict(frames=16, batch_size=32, keep=(0.5, 0.1)),
}
RETRIEVAL_DATASETS = ("msrvtt", "didemo", "charades", "ssv2_label", "ssv2_template")
# Video QA from the 8-frame stage: 8 frames, batch 128, lr 5e-5, 5 epochs (AGQA 1), question 25
# and answer 5 tokens, a 3-layer decoder from the fusion layers.
QA_DATASETS = ("msrvtt_qa", "anet_qa", "agqa")
FINETUNE_SHARED = dict(  # what every finetuning job shares; the rest are svitt.training.loop's defaults
    epochs=15,
    warmup_epochs=0,
    lr=1e-5,
    weight_decay=0.02,
    betas=[0.9, 0.999],
    mlm_prob=0.15,
    min_lr_ratio=0.0,
    egonce_temperature=0.05,
    vtm_hard_fraction=1.0,
    max_steps=None,
    grad_accum=1,
    clip_grad_norm=None,
    precision="auto",
    compile=False,
    device="auto",
    seed=0,
    deterministic=None,
    data=dict(
        kind="webvid",
        text_len=32,
        flip=True,
        scale=[0.5, 1.0],
        mean=[0.5, 0.5, 0.5],
        std=[0.5, 0.5, 0.5],
        twin_batches=False,
        num_nouns=582,
        num_verbs=118,
        paragraph=False,
    ),
)


def _expected_finetune(name, task, frames, batch_size, keep, **changes):
    cfg = copy.deepcopy(FINETUNE_SHARED)
    video = dict(BEIT_BASE, frames=frames, local_blocks=1, random_blocks=3, block_size=56, visual_keep=keep[0])
    text = dict(BERT_BASE, multimodal_keep=keep[1])
    cfg.update(
        name=name,
        task=task,
        batch_size=batch_size,
        objectives={"vtc": 1.0, "vtm": 1.0} if task == "pairs" else {"qa": 1.0},
        model=dict(video=video, text=text, embed_dim=256, temperature=0.07, video_weights=None, text_weights=None),
    )
    for key, value in changes.items():
        if key == "data":
            cfg["data"].update(value)
        else:
            cfg[key] = value
    return cfg


def _finetune_jobs(dry_run: str) -> dict[str, dict]:
    import json
    import re

    return {
        json.loads(m[1])["name"]: json.loads(m[1])
        for m in re.finditer(r"finetune\.py --config-json '(\{.*?\})'", dry_run)
    }


def _resolved_finetune(entry, init_stage):
    """What finetune.py trains with: the entry over the init's model (its model.json's model_config)."""
    from svitt.training.keys import finetune_config

    return _resolved(finetune_config(entry, resolve_model_config(init_stage["model"])))


def _assert_equal(resolved, expected, name):
    assert set(resolved) == set(expected), name
    for key in expected:
        assert (
            resolved[key] == pytest.approx(expected[key])
            if isinstance(expected[key], float)
            else resolved[key] == expected[key]
        ), f"{name}.{key}: {resolved[key]!r} != {expected[key]!r}"


def test_finetuning_jobs_resolve_to_table_9(paper_dry_run):
    stages, jobs = stage_configs(paper_dry_run), _finetune_jobs(paper_dry_run)
    expected_names = {f"retrieval/{d}/{s}" for d in RETRIEVAL_DATASETS for s in FINETUNE_RETRIEVAL}
    expected_names |= {f"qa/{d}/stage3" for d in QA_DATASETS}
    assert set(jobs) == expected_names
    for stage, row in FINETUNE_RETRIEVAL.items():
        assert stages[stage]["model"]["video"]["frames"] == row["frames"]  # finetuned at its stage's T
        for dataset in RETRIEVAL_DATASETS:
            name = f"retrieval/{dataset}/{stage}"
            data = {"text_len": 64, "paragraph": True} if dataset == "didemo" else {}
            _assert_equal(
                _resolved_finetune(jobs[name], stages[stage]), _expected_finetune(name, "pairs", **row, data=data), name
            )
    for dataset in QA_DATASETS:
        name = f"qa/{dataset}/stage3"
        expected = _expected_finetune(
            name,
            "qa",
            frames=8,
            batch_size=128,
            keep=(0.6, 0.5),
            lr=5e-5,
            epochs=1 if dataset == "agqa" else 5,
            decoder_layers=3,
            data={"text_len": 25, "answer_len": 5},
        )
        _assert_equal(_resolved_finetune(jobs[name], stages["stage3"]), expected, name)


def test_the_curriculum_ablation_overlay_is_table_3s_single_stages(tmp_path):
    """configs/ablation_curriculum.yaml: each single stage is the chain's stage of that T (Table 9
    column, Table 7 sparsity) trained from the image/text weights instead of the previous stage."""
    workdir = copy_workflow(tmp_path)
    paper_inputs(workdir)
    out = snakemake(
        workdir,
        "ablation",
        "paper_figures",
        "-n",
        "-p",
        "--cores",
        "1",
        "--configfile",
        "configs/paper.yaml",
        "configs/ablation_curriculum.yaml",
    ).stdout
    stages = stage_configs(out)
    for single, chain in (("single4", "stage2"), ("single8", "stage3"), ("single16", "stage4")):
        row = {k: v for k, v in CHAIN[chain].items() if k != "sparsity"}
        assert _resolved(stages[single]) == _expected(single, **row), single
        command = next(
            line for line in out.splitlines() if "train.py" in line and f"--out results/pretrain/{single} " in line
        )
        assert "--init" not in command
    assert "results/eval/retrieval/didemo/single16.json" in out and "results/figures/ablation.png" in out


def test_the_temporal_demo_overlay_changes_only_data_position_embedding_and_steps(tmp_path):
    """configs/demo_temporal.yaml on config.yaml: 4096 pretraining clips in 4 shards, the
    position embedding, stage1 for 20 epochs of 32 clips (2560 steps), stage2 at the default demo's
    128 steps, stage3 at 128 instead of 96; every other stage setting as in config.yaml. Seeds 0
    and 1, and the late-fusion control of each stage built by `all` (the default demo builds none)."""
    import re

    import yaml

    workdir = copy_workflow(tmp_path)
    default = stage_configs(snakemake(workdir, "all", "-n", "-p", "--cores", "1").stdout)
    out = snakemake(workdir, "all", "-n", "-p", "--cores", "1", "--configfile", "configs/demo_temporal.yaml").stdout
    temporal = stage_configs(out)
    assert "--train-videos 4096" in out and "shard-003-of-004" in out
    base = yaml.safe_load((workdir / "config.yaml").read_text())["demo_corpus"]["train_videos"]
    for name in ("stage1", "stage2", "stage3"):
        steps = {
            s: cfg["epochs"] * n // cfg["batch_size"]
            for s, cfg, n in (("default", default[name], base), ("temporal", temporal[name], 4096))
        }
        assert steps == {
            "default": {"stage1": 512, "stage2": 128, "stage3": 96}[name],
            "temporal": {"stage1": 2560, "stage2": 128, "stage3": 128}[name],
        }, name
        assert temporal[name]["model"]["video"]["abs_pos_embed"] is True
        assert temporal[name]["batch_size"] == {"stage1": 32}.get(name, default[name]["batch_size"])
        strip = {"epochs", "model", "batch_size"}
        assert {k: v for k, v in temporal[name].items() if k not in strip} == {
            k: v for k, v in default[name].items() if k not in strip
        }, name
        for stage in (f"{name}-seed1", f"{name}_late", f"{name}_late-seed1"):
            late, seed = stage.startswith(f"{name}_late"), 1 if stage.endswith("-seed1") else 0
            cfg = temporal[stage]
            assert cfg["epochs"] == temporal[name]["epochs"] and cfg.get("seed", 0) == seed, stage
            assert cfg["batch_size"] == temporal[name]["batch_size"], stage
            assert cfg["model"]["video"].get("temporal", "joint") == ("late" if late else "joint"), stage
    assert not any("_late" in name for name in default)
    # the twins table: each stage beside its control, both seeds
    tables = re.search(r"workflow_scripts/tables\.py .*", out).group(0)
    rows = re.findall(r"demo_retrieval:(\w+)=results/eval/retrieval/demo_retrieval/([\w-]+)\.json", tables)
    assert [name for name, _ in rows[::2]] == [
        "stage1",
        "stage1_late",
        "stage2",
        "stage2_late",
        "stage3",
        "stage3_late",
    ]
    assert all(path in (name, f"{name}-seed1") for name, path in rows)
    assert "results/figures/control.png" in out


def test_every_file_a_figure_or_table_reads_is_planned_over_two_seeds(tmp_path):
    """`make demo-seeds` (configs/demo_seeds.yaml): the per-seed files that the plot and table
    commands name (name=path) are outputs of planned jobs, e.g. the training curves read
    results/pretrain/stage1-seed1/metrics.jsonl (not a file beside stage1's)."""
    import re

    workdir = copy_workflow(tmp_path)
    out = snakemake(workdir, "all", "-n", "-p", "--cores", "1", "--configfile", "configs/demo_seeds.yaml").stdout
    planned = {p.strip() for line in re.findall(r"^\s+output: (.*)$", out, flags=re.M) for p in line.split(",")}
    read = {
        path
        for command in re.findall(r"workflow_scripts/(?:plot|tables)\.py .*", out)
        for path in re.findall(r"=(results/\S+)", command)
    }
    assert "results/pretrain/stage1-seed1/metrics.jsonl" in read
    assert {
        "results/eval/retrieval_finetuned/demo_retrieval/stage3-seed1.json",
        "results/eval/qa/demo_qa/stage3-seed1.json",
    } <= read  # finetuning has a spread too
    assert read and read <= planned, sorted(read - planned)
    for task, data in (("retrieval", "demo_retrieval"), ("qa", "demo_qa")):  # from seed 1's stage3, with seed 1
        command = next(
            line
            for line in out.splitlines()
            if "finetune.py" in line and f"--out results/finetune/{task}/{data}/stage3-seed1 " in line
        )
        assert '"seed":1' in command and "--init results/pretrain/stage3-seed1/model.safetensors" in command


def test_a_listed_seed_variant_is_finetuned_once_with_its_seed(tmp_path):
    """finetune.qa.stages [stage3, stage3-seed1] with pretrain.seeds [1]: two QA jobs, the second
    from stage3-seed1 with seed 1, and no stage3-seed1-seed1."""
    import re

    workdir = copy_workflow(tmp_path)
    overlay = workdir / "overlay.yaml"
    overlay.write_text("pretrain: {seeds: [1]}\nfinetune: {qa: {stages: [stage3, stage3-seed1]}}\n")
    out = snakemake(workdir, "all", "-n", "-p", "--cores", "1", "--configfile", str(overlay)).stdout
    jobs = sorted(set(re.findall(r"finetune\.py .*--out (results/finetune/qa/\S+)", out)))
    assert jobs == ["results/finetune/qa/demo_qa/stage3", "results/finetune/qa/demo_qa/stage3-seed1"]
    command = next(line for line in out.splitlines() if "--out results/finetune/qa/demo_qa/stage3-seed1 " in line)
    assert '"seed":1' in command
