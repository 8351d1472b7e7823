"""The datasets as they are published: one reader per layout (svitt.data.formats), the cases of the
real releases that failed before (DiDeMo's '@' ids, SSv2's lists of ground-truth videos, WebVid
on disk in its download script's layout), the recall with several ground-truth videos per text
checked by hand and against Singularity's itm_eval, and BERT's published file naming."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from svitt.data import download as dl
from svitt.data import formats
from svitt.data import frames as fr
from svitt.data.datasets import FrameStore, RetrievalDataset
from svitt.data.mp4 import write_mp4
from svitt.data.transforms import EvalTransform
from svitt.evaluation.metrics import rerank_metrics, retrieval_metrics

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("extract_cli", REPO / "workflow_scripts" / "extract_frames.py")
extract_cli = importlib.util.module_from_spec(spec)
spec.loader.exec_module(extract_cli)


def video(path: Path, level: int = 100, frames: int = 4) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_mp4(path, np.full((frames, 32, 32, 3), level, np.uint8), 8)
    return path


def write_json(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj))
    return path


def read_failures(path: Path) -> dict[str, str]:
    import csv

    with open(path, newline="") as handle:
        return {row["id"]: row["reason"] for row in csv.DictReader(handle)}


# ------------------------------------------------------------------------------------------------
# Sniffing: a layout named from the header or the first entry
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, content, layout",
    [
        ("w.csv", "videoid,contentUrl,duration,page_dir,name\n1,http://x/1.mp4,PT1S,d,a\n", "webvid_csv"),
        ("g.csv", "id,url,caption\nx,http://x,a\n", "generic_csv"),
        ("u.tsv", "video_uid\tsplit\nabc\tval\n", "uid_table"),
        (
            "e.csv",
            "clip_idx\tvideo_uid\tvideo_dur\tnarration_source\tnarration_ind\tnarration_time\tclip_start\t"
            "clip_end\tclip_text\ttag_verb\ttag_noun\n0\tu\t9\tp\t0\t1\t-0.5\t1.5\t#C C x\t[1]\t[2]\n",
            "egoclip_tsv",
        ),
        ("r.json", [{"video": ["1.webm", "2.webm"], "caption": "pushing pen"}], "retrieval_json"),
        ("q.json", [{"video": "v.mp4", "question": "what?", "answer": "dog", "question_id": 3}], "qa_json"),
        ("a.json", ["dog", "cat"], "answer_list"),
        ("m.json", {"0": {"query": {}, "choices": {}, "answer": 1, "types": 1}}, "egomcq_json"),
        (
            "n.json",
            {
                "version": "2.0",
                "date": "230105",
                "description": "NLQ",
                "metadata": "s3://x",
                "videos": [{"video_uid": "u", "clips": []}],
            },
            "nlq_json",
        ),
    ],
)
def test_each_layout_is_named_from_its_first_entry(tmp_path, name, content, layout):
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    assert formats.sniff(path) == layout


def test_a_long_list_is_sniffed_from_its_prefix(tmp_path):
    """AGQA's and WebVid's lists are hundreds of MB: only the first entry is decoded (a list whose
    tail is not even valid JSON is still named), and an entry longer than the first read is grown into."""
    path = tmp_path / "big.json"
    path.write_text('[{"video": "a.mp4", "question": "' + "x" * 100_000 + '", "answer": "y"}, {"broken": ')
    assert formats.sniff(path) == "qa_json"


def test_a_file_in_no_layout_names_the_file_what_it_holds_and_what_is_accepted(tmp_path):
    path = write_json(tmp_path / "ret.json", [{"clip": "a", "text": "b"}])
    with pytest.raises(formats.InputError) as error:
        formats.check_layout(path, ("retrieval_json",), "a retrieval test split")
    message = str(error.value)
    assert str(path) in message and "a list of objects with keys ['clip', 'text']" in message
    assert 'retrieval JSON list [{"video": ..., "caption": ...}]' in message
    qa = write_json(tmp_path / "qa.json", [{"video": "v", "question": "q", "answer": "a"}])
    with pytest.raises(
        formats.InputError,
        match=r"qa.json: found a QA JSON list .*; as a retrieval test split "
        r"it must be one of: retrieval JSON list",
    ):
        formats.check_layout(qa, ("retrieval_json",), "a retrieval test split")


def test_a_dataset_is_checked_for_each_of_its_uses(tmp_path):
    answers = write_json(tmp_path / "answers.json", ["dog"])
    qa = write_json(tmp_path / "qa.json", [{"video": "v", "question": "q", "answer": "dog"}])
    entry = {"annotations": str(qa), "train_annotations": str(qa), "answer_list": str(answers)}
    formats.check_dataset("msrvtt_qa", entry, ["qa"])  # the right layouts: no error
    with pytest.raises(formats.InputError, match=r"dataset 'msrvtt_qa', annotations: .*as a retrieval test split"):
        formats.check_dataset("msrvtt_qa", entry, ["qa", "retrieval"])
    entry["answer_list"] = str(qa)
    with pytest.raises(formats.InputError, match=r"dataset 'msrvtt_qa', answer_list: .*QA answer list"):
        formats.check_dataset("msrvtt_qa", entry, ["qa"])


def test_answer_lists_and_multi_video_questions_are_refused_by_name(tmp_path):
    vqa = write_json(tmp_path / "vqa.json", [{"video": "v", "question": "q", "answer": ["a", "b"]}])
    with pytest.raises(formats.InputError, match=r"entry 0 has an answer list \['a', 'b'\]"):
        formats.read_qa(vqa)


# ------------------------------------------------------------------------------------------------
# Videos on disk under their published names
# ------------------------------------------------------------------------------------------------
def test_didemo_videos_are_found_by_their_real_names(tmp_path):
    """DiDeMo's Flickr names hold '@': the folder is searched for the name as published, not the
    name download.py would give it (54322086_N00_...-<hash>)."""
    folder = tmp_path / "didemo"
    name = "54322086@N00_2408598493_274c77d26a.mp4"
    video(folder / name)
    assert dl.find_local_video(folder, name) == folder / name
    assert dl.find_local_video(folder, "54322086@N00_2408598493_274c77d26a") == folder / name
    annotation = write_json(
        tmp_path / "didemo_ret_test.json", [{"video": name, "caption": ["first sentence", "second one"]}]
    )
    out, failures = tmp_path / "s.h5", tmp_path / "f.csv"
    assert (
        extract_cli.main(
            [
                "--videos",
                str(folder),
                "--ids",
                str(annotation),
                "--out",
                str(out),
                "--failures",
                str(failures),
                "--no-progress",
            ]
        )
        == 0
    )
    data = RetrievalDataset(out, annotation, 2, EvalTransform(32), paragraph=True)
    assert data.video_ids == [name] and data.texts == ["first sentence second one"]


def test_the_published_extension_or_another_one_on_disk(tmp_path):
    folder = tmp_path / "v"
    video(folder / "clip.mp4")
    assert dl.find_local_video(folder, "clip.mov") == folder / "clip.mp4"  # annotation says .mov, disk .mp4
    assert dl.find_local_video(folder, "../v/clip.mp4") is None  # never outside the folder by its raw name


@pytest.mark.parametrize(
    "fmt, codec, ext", [("mpeg", "mpeg1video", ".mpg"), ("asf", "wmv2", ".wmv"), ("3gp", "h263", ".3gp")]
)
def test_didemo_originals_in_other_containers_are_found_and_decoded(tmp_path, fmt, codec, ext):
    """DiDeMo's Flickr originals come as .mpg, .wmv, .3gp, ... while Singularity's annotations name
    .mp4 copies: the video is found under its own container and decoded."""
    import av

    folder = tmp_path / "didemo"
    folder.mkdir()
    stem = "10015567@N08_3655084291_d8b58466fa"
    with av.open(str(folder / f"{stem}{ext}"), "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=25)
        stream.width, stream.height, stream.pix_fmt = 176, 144, "yuv420p"
        for i in range(12):
            frame = av.VideoFrame.from_ndarray(np.full((144, 176, 3), 20 * i, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    annotation = write_json(tmp_path / "a.json", [{"video": f"{stem}.mp4", "caption": ["one", "two"]}])
    out, failures = tmp_path / "s.h5", tmp_path / "f.csv"
    assert (
        extract_cli.main(
            [
                "--videos",
                str(folder),
                "--ids",
                str(annotation),
                "--out",
                str(out),
                "--failures",
                str(failures),
                "--frames",
                "4",
                "--no-progress",
            ]
        )
        == 0
    )
    store = FrameStore(out)
    assert list(store.shard_of) == [f"{stem}.mp4"] and store.num_frames(f"{stem}.mp4") == 4


def test_webvid_on_disk_in_the_download_scripts_layout(tmp_path):
    """m-bain/webvid's download.py saves videos/<page_dir>/<videoid>.mp4."""
    folder = tmp_path / "videos"
    video(folder / "006001_006050" / "1066692580.mp4")
    video(folder / "1066692581.mp4")  # a flat copy is found too
    csv_path = tmp_path / "results_2M_train.csv"
    csv_path.write_text(
        "videoid,contentUrl,duration,page_dir,name\n"
        "1066692580,https://x/1.mp4,PT00H00M14S,006001_006050,a caption\n"
        "1066692581,https://x/2.mp4,PT00H00M10S,006001_006050,another\n"
    )
    refs = formats.read_video_list(csv_path)
    assert [r.hint for r in refs] == ["006001_006050/1066692580.mp4", "006001_006050/1066692581.mp4"]
    out, failures = tmp_path / "s.h5", tmp_path / "f.csv"
    assert (
        extract_cli.main(
            [
                "--videos",
                str(folder),
                "--ids",
                str(csv_path),
                "--out",
                str(out),
                "--failures",
                str(failures),
                "--no-progress",
            ]
        )
        == 0
    )
    assert sorted(FrameStore(out).shard_of) == ["1066692580", "1066692581"]


def test_a_missing_video_reports_the_closest_names_there(tmp_path):
    folder = tmp_path / "videos"
    for name in ("video7010.mp4", "video7011.mp4", "other.mp4"):
        video(folder / name)
    found, missing = fr.local_sources(folder, ["video701.mp4"])
    assert found == {} and len(missing) == 1
    reason = missing[0][1]
    assert reason.startswith(f"not found in folder {folder} (looked for video701.<mp4|webm")
    assert "closest names there: video7010, video7011" in reason


# ------------------------------------------------------------------------------------------------
# SSv2: several ground-truth videos per caption
# ------------------------------------------------------------------------------------------------
@pytest.fixture()
def ssv2(tmp_path):
    folder = tmp_path / "ssv2"
    for i, name in enumerate(("137878.webm", "151151.webm", "2.webm", "3.webm")):
        from svitt.data.miniatures import write_webm

        folder.mkdir(exist_ok=True)
        write_webm(folder / name, np.full((6, 32, 32, 3), 40 * i, np.uint8), 8)
    val = write_json(
        tmp_path / "ssv2_ret_label_val_small.json",
        [
            {"video": ["137878.webm", "151151.webm"], "caption": "pushing pen from left to right"},
            {"video": ["2.webm", "3.webm", "gone.webm"], "caption": "spinning cube"},
        ],
    )
    train = write_json(tmp_path / "ssv2_ret_label_train.json", [{"video": "2.webm", "caption": "spinning cube"}])
    return folder, val, train


def test_ssv2_lists_of_videos_are_extracted_and_a_failed_item_costs_no_other(ssv2, tmp_path):
    folder, val, train = ssv2
    out, failures = tmp_path / "s.h5", tmp_path / "f.csv"
    assert (
        extract_cli.main(
            [
                "--videos",
                str(folder),
                "--ids",
                str(val),
                str(train),
                "--out",
                str(out),
                "--failures",
                str(failures),
                "--max-failed-fraction",
                "0.3",
                "--no-progress",
            ]
        )
        == 0
    )
    assert sorted(FrameStore(out).shard_of) == ["137878.webm", "151151.webm", "2.webm", "3.webm"]
    assert list(read_failures(failures)) == ["gone.webm"]
    data = RetrievalDataset(out, val, 2, EvalTransform(32))
    assert data.texts == ["pushing pen from left to right", "spinning cube"]
    assert data.text_videos == [[0, 1], [2, 3]] and data.multi_video_gt
    assert data.video_to_texts == [[0], [0], [1], [1]] and data.missing == ["gone.webm"]


def test_recall_with_several_ground_truth_videos_by_hand():
    """Text 0's ground truth is videos {0, 1}, text 1's video 2.
    t2v: text 0's best ground truth (video 1, 0.8) beats video 2 (0.3): rank 0; text 1's video 2
    (0.7) beats 0.5 and 0.2: rank 0. v2t: video 0's text 0 (0.1) is beaten by text 1 (0.5): rank 1;
    videos 1 and 2 rank their text first."""
    sim = np.array([[0.1, 0.8, 0.3], [0.5, 0.2, 0.7]])
    metrics = retrieval_metrics(sim, [[0, 1], [2]])
    assert metrics["t2v_r1"] == 100.0
    assert metrics["v2t_r1"] == pytest.approx(200 / 3) and metrics["v2t_r5"] == 100.0
    # with one ground truth per text (video 0 for text 0) text 0 ranks third
    assert retrieval_metrics(np.array([[0.1, 0.8], [0.5, 0.2]]), [0, 1])["t2v_r1"] == 0.0
    with pytest.raises(ValueError, match="1 of 4 videos have no ground-truth text"):
        retrieval_metrics(np.hstack([sim, [[0.9], [0.0]]]), [[0, 1], [2]])
    with pytest.raises(ValueError, match=r"text_to_video\[1\] is empty"):
        retrieval_metrics(sim, [[0, 1, 2], []])


def _singularity_itm_eval(scores_t2i, txt2img, img2txt):
    """Singularity's itm_eval recall loops (tasks/retrieval_utils.py), restated: the rank of a text
    is the smallest argsort position of its ground-truth images, and of an image its texts'."""

    def recall(ranks):
        return [100.0 * np.mean(np.asarray(ranks) < k) for k in (1, 5, 10)]

    t_ranks = [min(np.where(np.argsort(row)[::-1] == g)[0][0] for g in txt2img[i]) for i, row in enumerate(scores_t2i)]
    i_ranks = [
        min(np.where(np.argsort(row)[::-1] == t)[0][0] for t in img2txt[v]) for v, row in enumerate(scores_t2i.T)
    ]
    return recall(t_ranks), recall(i_ranks)


def test_recall_with_several_ground_truth_videos_agrees_with_singularity():
    rng = np.random.default_rng(0)
    groups = [list(range(k, k + size)) for k, size in ((0, 3), (3, 1), (4, 2), (6, 4), (10, 2))]
    sim = rng.normal(size=(len(groups), 12))
    ours = retrieval_metrics(sim, groups)
    img2txt = [[t for t, g in enumerate(groups) if v in g] for v in range(12)]
    t2v, v2t = _singularity_itm_eval(sim, groups, img2txt)
    assert [ours[f"t2v_r{k}"] for k in (1, 5, 10)] == pytest.approx(t2v)
    assert [ours[f"v2t_r{k}"] for k in (1, 5, 10)] == pytest.approx(v2t)
    # re-ranking the top-k by a matching score that puts a ground truth first: every text at rank 0
    k = 4
    top = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    vtm_t2v = np.array([[10.0 if j in groups[i] else 0.0 for j in row] for i, row in enumerate(top)])
    top_v = np.argsort(-sim.T, axis=1, kind="stable")[:, :k]
    vtm_v2t = np.zeros(top_v.shape)
    reranked = rerank_metrics(sim, vtm_t2v, vtm_v2t, groups, k)
    in_top = [any(j in groups[i] for j in row) for i, row in enumerate(top)]
    assert reranked["t2v_r1"] == pytest.approx(100.0 * np.mean(in_top))


# ------------------------------------------------------------------------------------------------
# A failed shard keeps what it extracted
# ------------------------------------------------------------------------------------------------
def test_a_failed_shard_keeps_its_videos_and_the_rerun_extracts_only_the_rest(tmp_path):
    folder = tmp_path / "videos"
    for i in range(3):
        video(folder / f"v{i}.mp4", level=50 * i)
    listing = write_json(tmp_path / "ret.json", [{"video": f"v{i}.mp4", "caption": "c"} for i in range(4)])
    out, failures = tmp_path / "s.h5", tmp_path / "f.csv"
    args = [
        "--videos",
        str(folder),
        "--ids",
        str(listing),
        "--out",
        str(out),
        "--failures",
        str(failures),
        "--max-failed-fraction",
        "0.1",
        "--no-progress",
    ]
    assert extract_cli.main(args) == 1  # v3 is missing: 1 of 4 failed, above 0.1
    partial = fr.partial_path(out)
    assert not out.exists() and sorted(FrameStore(partial).shard_of) == ["v0.mp4", "v1.mp4", "v2.mp4"]
    kept = {k: FrameStore(partial).attrs(k)["source_stamp"] for k in ("v0.mp4", "v1.mp4")}
    video(folder / "v3.mp4", level=200)
    video(folder / "v1.mp4", level=120)  # changed since: extracted again, not copied
    calls = []
    original = fr.run_job
    fr.run_job = lambda job, cfg: calls.append(job.id) or original(job, cfg)
    try:
        assert extract_cli.main(args) == 0
    finally:
        fr.run_job = original
    assert sorted(calls) == ["v1.mp4", "v3.mp4"] and not partial.exists()
    store = FrameStore(out)
    assert sorted(store.shard_of) == ["v0.mp4", "v1.mp4", "v2.mp4", "v3.mp4"]
    assert store.attrs("v0.mp4")["source_stamp"] == kept["v0.mp4"]
    assert store.attrs("v1.mp4")["source_stamp"] != kept["v1.mp4"]


# ------------------------------------------------------------------------------------------------
# Weights as published
# ------------------------------------------------------------------------------------------------
def test_bert_base_uncased_published_naming_loads(tmp_path):
    """The hub's bert-base-uncased files name LayerNorms gamma / beta (transformers renames them
    on load): the text encoder gets exactly those values."""
    from safetensors.torch import load_file

    from svitt.models.published import write_bert_folder
    from svitt.models.svitt import build_model

    folder = write_bert_folder(
        tmp_path / "bert",
        ["a dog runs"],
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=40,
    )
    state = load_file(str(folder / "model.safetensors"))
    assert "bert.embeddings.LayerNorm.gamma" in state and "bert.embeddings.LayerNorm.weight" not in state
    vocab = (folder / "vocab.txt").read_text().splitlines()
    assert len(vocab) == 30522 and [vocab[i] for i in (0, 100, 101, 102, 103)] == [
        "[PAD]",
        "[UNK]",
        "[CLS]",
        "[SEP]",
        "[MASK]",
    ]
    model = build_model(
        {
            "video": {"preset": "tiny", "frames": 2},
            "embed_dim": 16,
            "text_weights": str(folder),
            "text": {
                "preset": "tiny",
                "width": 32,
                "depth": 4,
                "heads": 2,
                "intermediate_size": 64,
                "fusion_layers": 1,
                "max_position_embeddings": 40,
                "vocab_size": 30522,
            },
        }
    )
    loaded = model.state_dict()
    assert torch.equal(loaded["text_encoder.embeddings.LayerNorm.weight"], state["bert.embeddings.LayerNorm.gamma"])
    assert torch.equal(
        loaded["text_encoder.encoder.layer.3.output.LayerNorm.bias"],
        state["bert.encoder.layer.3.output.LayerNorm.beta"],
    )


@pytest.mark.parametrize("layout", ["timm", "hf"])
def test_beit_b_weights_in_both_published_layouts_load_at_full_size(tmp_path, layout):
    """Random BEiT-B/16 weights at the real size in timm's file layout (a state dict .pth with a
    21841-class head) and in Hugging Face's BeitForImageClassification folder: the paper's video
    encoder loads each, with the query / value biases, the layer scales, the per-layer bias
    tables (tiled over T = 4) and the pooling norm (fc_norm / pooler.layernorm) where they belong."""
    from safetensors.torch import load_file

    from svitt.models import published
    from svitt.models.video_encoder import VideoEncoder
    from svitt.models.weights import load_state_dict_file

    if layout == "timm":
        path = published.write_timm_beit(tmp_path / "beit.pth")
        source = torch.load(path, weights_only=True)
        q_bias, gamma, norm = (source["blocks.11.attn.q_bias"], source["blocks.11.gamma_1"], source["fc_norm.weight"])
        table = source["blocks.0.attn.relative_position_bias_table"]
    else:
        path = published.write_hf_beit(tmp_path / "beit")
        source = load_file(str(path / "model.safetensors"))
        prefix = next(k for k in source if k.endswith("layer.11.attention.attention.query.bias"))
        q_bias = source[prefix]
        gamma = source[next(k for k in source if k.endswith("layer.11.lambda_1"))]
        norm = source[next(k for k in source if "pooler.layernorm.weight" in k)]
        table = source[
            next(
                k
                for k in source
                if k.endswith("layer.0.attention.attention.relative_position_bias.relative_position_bias_table")
            )
        ]
    assert table.shape == (732, 12)  # (2*14-1)^2 + 3 rows: BEiT-B/16 at 224 px
    encoder = VideoEncoder.from_config({"preset": "beit_base", "frames": 4})
    encoder.load_image_weights(load_state_dict_file(path))
    loaded = encoder.state_dict()
    assert torch.equal(loaded["blocks.11.attn.q_bias"], q_bias)
    assert torch.equal(loaded["blocks.11.gamma_1"], gamma) and torch.equal(loaded["norm.weight"], norm)
    # T = 4: the spatial table tiled over the 7 temporal offsets, the 3 CLS rows kept
    assert loaded["blocks.0.attn.relative_position_bias_table"].shape == (7 * 729 + 3, 12)


def test_an_annotation_in_no_layout_stops_the_workflow_before_any_job(tmp_path):
    """configs/paper.yaml with DiDeMo's test split replaced by a file of another layout (here a QA
    list): Snakemake stops while reading the config, naming the dataset, the file, what it holds and
    what a retrieval test split must be."""
    from tests.helpers.workflow import copy_workflow, paper_inputs, snakemake

    workdir = copy_workflow(tmp_path / "w")
    paper_inputs(workdir)
    write_json(workdir / "data/anno/didemo_ret_test.json", [{"video": "x.mp4", "question": "q", "answer": "a"}])
    result = snakemake(workdir, "-n", "all", "--configfile", "configs/paper.yaml", check=False)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "dataset 'didemo', annotations: data/anno/didemo_ret_test.json: found a QA JSON list" in output
    assert "as a retrieval test split it must be one of: retrieval JSON list" in output
    assert "Job stats" not in output  # nothing was planned, let alone run
