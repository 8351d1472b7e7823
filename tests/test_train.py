"""The training engine on real demo data: a stage end to end, exact resume after SIGKILL,
preemption, DDP equivalence, and the errors bad input gets."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import svitt.models.svitt as svitt_model
from svitt.training.checkpoint import load_exported
from svitt.training.loop import PREEMPTED_EXIT_CODE, NonFiniteLoss, train
from svitt.training.tasks import PairsTask, TrainData

ROOT = Path(__file__).resolve().parents[1]


def stage(**over):
    cfg = {
        "name": "stage1",
        "model": {
            "video": {"preset": "tiny", "frames": 4},
            "text": {"preset": "tiny", "vocab_size": None},
            "embed_dim": 16,
        },
        "objectives": {"vtc": 1.0, "vtm": 1.0, "mlm": 1.0},
        "mlm_prob": 0.3,
        "epochs": 4,
        "batch_size": 4,
        "lr": 1e-3,
        "warmup_epochs": 0.5,
        "log_every": 1,
        "checkpoint_every": 2,
        "data": {"flip": False, "twin_batches": True, "num_workers": 0},
    }
    cfg.update(over)
    return cfg


def data(pipeline, **over):
    corpus, res = pipeline
    fields = {
        "shards": [str(res / "frames/webvid/shard-0.h5")],
        "annotations": str(corpus / "webvid_train.csv"),
        "tokenizer": str(corpus / "tokenizer"),
    }
    return TrainData(**{**fields, **over})


def losses(out_dir):
    rows = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


@pytest.fixture(scope="module")
def reference(pipeline, tmp_path_factory):
    """An uninterrupted 8-step run (4 epochs x 2 batches of 4)."""
    out = tmp_path_factory.mktemp("reference")
    train(stage(), data(pipeline), out, progress=False)
    return out


def test_a_stage_trains_and_exports_model_and_metrics(reference):
    steps = losses(reference)
    assert sorted(steps) == list(range(1, 9))
    info = json.loads((reference / "model.json").read_text())
    assert info["steps"] == 8 and info["frames"] == 4 and 0 <= info["sparsity"] < 1
    model, _ = load_exported(reference / "model.safetensors")
    assert model.cfg["text"]["vocab_size"] == info["model_config"]["text"]["vocab_size"]
    assert set(load_file(reference / "model.safetensors")) == set(model.state_dict())
    # the settings where the released code differs (docs/fidelity.md) are recorded, at their defaults
    video, text = info["model_config"]["video"], info["model_config"]["text"]
    assert {
        k: video[k] for k in ("pooling", "fusion_norm", "layer_norm_eps", "prune_score", "temporal_resize")
    } == dict(
        pooling="cls",
        fusion_norm="shared",
        layer_norm_eps=1e-6,
        prune_score="renormalised",
        temporal_resize="symmetric",
    )
    assert text["question_pruning"] is True


def test_the_checkpoint_is_the_same_whatever_python_random_held_before(pipeline, reference, tmp_path):
    """The checkpoint stores Python's `random` state with torch's: seeded by the stage's seed, two runs
    of one seed write the same state (two clean demo runs differed in it, and only in it)."""
    import random

    random.seed(12345)  # another process's state, as an unseeded interpreter would start with
    train(stage(), data(pipeline), tmp_path, progress=False)
    ours, theirs = (torch.load(p / "checkpoint.pt", weights_only=True)["rng"] for p in (tmp_path, reference))
    assert ours["python"] == theirs["python"]
    assert torch.equal(ours["torch"], theirs["torch"]) and torch.equal(ours["layout"], theirs["layout"])


def test_a_finished_run_keeps_only_what_a_re_export_needs(pipeline, reference, tmp_path):
    """The finished checkpoint holds the model, not the optimiser state (two thirds of the bytes);
    resumed with the same config it trains no step and exports the same weights; with
    keep_checkpoint false it is removed once the model is exported."""
    saved = torch.load(reference / "checkpoint.pt", weights_only=True)
    assert saved["step"] == 8 and saved["optimizer"] is None
    for name in ("checkpoint.pt", "metrics.jsonl"):
        (tmp_path / name).write_bytes((reference / name).read_bytes())
    summary = train(stage(), data(pipeline), tmp_path, progress=False)
    assert summary["steps"] == 8 and sorted(losses(tmp_path)) == list(range(1, 9))
    again, before = load_file(tmp_path / "model.safetensors"), load_file(reference / "model.safetensors")
    assert set(again) == set(before) and all(torch.equal(again[k], before[k]) for k in before)
    out = tmp_path / "dropped"
    train(stage(epochs=1, keep_checkpoint=False), data(pipeline), out, progress=False)
    assert (out / "model.safetensors").exists() and not (out / "checkpoint.pt").exists()


def test_training_reduces_the_loss_on_a_small_set(pipeline, tmp_path):
    # 40 steps: the MLM term starts at ln(vocab), and the demo vocabulary grows with the corpus
    train(stage(epochs=20, checkpoint_every=100), data(pipeline), tmp_path, progress=False)
    steps = losses(tmp_path)
    first, last = steps[1], sum(steps[s] for s in range(38, 41)) / 3
    assert last < 0.8 * first


def _cli(pipeline, out, cfg):
    corpus, res = pipeline
    return [
        sys.executable,
        str(ROOT / "workflow_scripts/train.py"),
        "--config-json",
        json.dumps(cfg),
        "--shards",
        str(res / "frames/webvid/shard-0.h5"),
        "--annotations",
        str(corpus / "webvid_train.csv"),
        "--tokenizer",
        str(corpus / "tokenizer"),
        "--out",
        str(out),
        "--no-progress",
    ]


def _wait_for_step(out, step, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        metrics = out / "metrics.jsonl"
        if metrics.exists() and max(losses(out), default=0) >= step:
            return
        assert proc.poll() is None, "training ended before it could be interrupted"
        time.sleep(0.05)
    raise TimeoutError(f"step {step} not reached")


def test_sigkill_then_resume_gives_the_losses_of_an_uninterrupted_run(pipeline, reference, tmp_path):
    """Also with a data-loading worker where the reference had none: augmentation is seeded per
    (epoch, sample), so neither the kill nor the worker layout changes a loss."""
    cfg = stage(data={"flip": False, "twin_batches": True, "num_workers": 1})
    proc = subprocess.Popen(_cli(pipeline, tmp_path, cfg))
    _wait_for_step(tmp_path, 5, proc)
    proc.kill()
    proc.wait()
    assert not (tmp_path / "model.safetensors").exists()  # nothing that looks finished
    resumed_from = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"]
    assert 2 <= resumed_from < 8
    assert subprocess.run(_cli(pipeline, tmp_path, cfg)).returncode == 0
    expected, got = losses(reference), losses(tmp_path)
    assert sorted(got) == list(range(1, 9))
    for step in range(resumed_from + 1, 9):
        assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), step


def test_sigterm_saves_and_exits_with_the_preemption_code(pipeline, reference, tmp_path):
    proc = subprocess.Popen(_cli(pipeline, tmp_path, stage()))
    _wait_for_step(tmp_path, 3, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == PREEMPTED_EXIT_CODE
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"]
    assert saved == max(losses(tmp_path)) and not (tmp_path / "model.json").exists()
    assert subprocess.run(_cli(pipeline, tmp_path, stage())).returncode == 0
    assert losses(tmp_path)[8] == pytest.approx(losses(reference)[8], rel=1e-5)


def test_io_settings_given_on_resume_keep_the_checkpoint(pipeline, reference, tmp_path):
    """--checkpoint-every / --log-every / --num-workers change how the run goes on, not what it
    learns: the checkpoint is resumed and the losses are the uninterrupted run's."""
    proc = subprocess.Popen(_cli(pipeline, tmp_path, stage()))
    _wait_for_step(tmp_path, 3, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == PREEMPTED_EXIT_CODE
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"]
    io = ["--checkpoint-every", "3", "--log-every", "2", "--num-workers", "1"]
    assert subprocess.run(_cli(pipeline, tmp_path, stage()) + io).returncode == 0
    got = losses(tmp_path)
    resumed_rows = [s for s in range(saved + 1, 9) if s % 2 == 0 or s == 8]  # every 2nd step now
    assert sorted(got) == list(range(1, saved + 1)) + resumed_rows  # a restart would lose odd steps <= saved
    assert got[8] == pytest.approx(losses(reference)[8], rel=1e-5)
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["config"]["checkpoint_every"] == 3


def test_a_resume_in_the_middle_of_an_epoch_is_exact(pipeline, reference, tmp_path, monkeypatch):
    """Preempted at step 3 of 8 (2 steps per epoch: mid-epoch), the rest equals the uninterrupted
    run. (Every DataLoader iterator used to draw its base seed from torch's global RNG: the resumed
    run made one at step 3, the uninterrupted run had not, and the MLM masks drifted apart.)"""
    import svitt.training.loop as engine

    record = engine._record

    def preempt_after_step_2(state, *args):
        row = record(state, *args)
        if state.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # seen at the end of step 3
        return row

    monkeypatch.setattr(engine, "_record", preempt_after_step_2)
    with pytest.raises(engine.Preempted):
        train(stage(), data(pipeline), tmp_path, progress=False)
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 3
    monkeypatch.setattr(engine, "_record", record)
    train(stage(), data(pipeline), tmp_path, progress=False)
    expected, got = losses(reference), losses(tmp_path)
    assert sorted(got) == list(range(1, 9))
    for step in range(1, 9):
        assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), step


class _Clock:
    """svitt.training.loop's `time`, with time() jumped forward once `late` is set."""

    def __init__(self):
        self.late = False

    def time(self):
        return time.time() + (1e6 if self.late else 0.0)

    def __getattr__(self, name):
        return getattr(time, name)


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_the_time_limit_stops_at_an_optimizer_step_and_resumes_exactly(
    pipeline, reference, tmp_path, monkeypatch, grad_accum
):
    """SVITT_STOP_AT (launch.py --save-before on Slurm) passing during step 3's first micro-batch:
    the step is finished (with grad_accum 2 the cached step takes both micro-batches), saved and
    the run stops with Preempted; the resumed run's losses are the uninterrupted run's, in the
    plain path and in the grad-cache path (svitt.training.grad_cache) alike."""
    import svitt.training.loop as engine

    cfg = stage(grad_accum=grad_accum)
    if grad_accum == 1:
        expected = losses(reference)
    else:
        train(cfg, data(pipeline), tmp_path / "reference", progress=False)
        expected = losses(tmp_path / "reference")
    out = tmp_path / "run"
    clock, inputs, calls = _Clock(), PairsTask.inputs, {"n": 0}

    def counted(*args):
        calls["n"] += 1
        if calls["n"] == 2 * grad_accum + 1:  # the first micro-batch of step 3
            clock.late = True
        return inputs(*args)

    monkeypatch.setenv("SVITT_STOP_AT", f"{time.time() + 3600:.0f}")
    monkeypatch.setattr(engine, "time", clock)
    monkeypatch.setattr(PairsTask, "inputs", counted)
    with pytest.raises(engine.Preempted, match="stopped \\(signal or time limit\\) at step 3"):
        train(cfg, data(pipeline), out, progress=False)
    assert calls["n"] == 3 * grad_accum  # step 3 whole, nothing of step 4
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 3
    assert not (out / "model.safetensors").exists()
    monkeypatch.setattr(engine, "time", time)
    monkeypatch.setattr(PairsTask, "inputs", inputs)
    monkeypatch.delenv("SVITT_STOP_AT")
    train(cfg, data(pipeline), out, progress=False)
    got = losses(out)
    assert sorted(got) == list(range(1, 9))
    for step in range(1, 9):
        assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), step


def test_resume_rebuilds_metrics_that_snakemake_deleted(pipeline, reference, tmp_path):
    """Snakemake removes a failed job's outputs (metrics.jsonl among them) and a rerun's outputs
    before it starts; the checkpoint survives, and the rows up to its step come back from it."""
    proc = subprocess.Popen(_cli(pipeline, tmp_path, stage()))
    _wait_for_step(tmp_path, 3, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == PREEMPTED_EXIT_CODE
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"]
    before = (tmp_path / "metrics.jsonl").read_text().splitlines()
    (tmp_path / "metrics.jsonl").unlink()
    assert subprocess.run(_cli(pipeline, tmp_path, stage())).returncode == 0
    after = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert after[:saved] == before[:saved]  # the cut-off run's rows, byte for byte
    expected, got = losses(reference), losses(tmp_path)
    assert sorted(got) == list(range(1, 9))
    for step in range(1, 9):
        assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), step


def test_a_checkpoint_of_another_config_is_not_resumed(pipeline, reference, tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes((reference / "checkpoint.pt").read_bytes())
    train(stage(lr=5e-4, epochs=1), data(pipeline), tmp_path, progress=False)
    assert sorted(losses(tmp_path)) == [1, 2]  # started over


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(pipeline, tmp_path, monkeypatch):
    forward = svitt_model.SViTT.forward
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 4:
            out["vtc"] = out["vtc"] * float("nan")
        return out

    monkeypatch.setattr(svitt_model.SViTT, "forward", poisoned)
    with pytest.raises(NonFiniteLoss, match="non-finite loss at step 3 of stage stage1"):
        train(stage(), data(pipeline), tmp_path, progress=False)
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 2
    assert not (tmp_path / "model.safetensors").exists()


def test_stage_2_starts_from_stage_1_with_the_temporal_bias_resized(pipeline, reference, tmp_path):
    cfg = stage(
        name="stage2",
        epochs=1,
        model={
            "video": {
                "preset": "tiny",
                "frames": 8,
                "local_blocks": 1,
                "random_blocks": 1,
                "block_size": 8,
                "visual_keep": 0.6,
            },
            "text": {"preset": "tiny", "vocab_size": None, "multimodal_keep": 0.5},
            "embed_dim": 16,
        },
    )
    train(cfg, data(pipeline, init=str(reference / "model.safetensors")), tmp_path, progress=False)
    info = json.loads((tmp_path / "model.json").read_text())
    assert info["frames"] == 8 and info["sparsity"] > json.loads((reference / "model.json").read_text())["sparsity"]


def test_init_from_another_architecture_names_the_tensors(pipeline, reference, tmp_path):
    cfg = stage(
        model={
            "video": {"preset": "tiny", "frames": 4},
            "text": {"preset": "tiny", "vocab_size": None},
            "embed_dim": 32,
        }
    )
    with pytest.raises(ValueError, match=r"vision_proj.weight: checkpoint \(16, 64\) vs model \(32, 64\)"):
        train(cfg, data(pipeline, init=str(reference / "model.safetensors")), tmp_path, progress=False)


def test_a_bad_stage_config_fails_before_any_data_loads(tmp_path):
    missing = TrainData(shards=["/nonexistent.h5"], annotations="/nonexistent.csv", tokenizer="/nonexistent")
    with pytest.raises(ValueError, match="stage.epochs must be int"):
        train(stage(epochs="4"), missing, tmp_path, progress=False)


def test_an_empty_dataset_is_an_error_not_a_zero_step_run(pipeline, tmp_path):
    corpus, _ = pipeline
    (tmp_path / "empty.csv").write_text("videoid,contentUrl,name\nnot_there,file:///x.mp4,a caption\n")
    from svitt.data.datasets import EmptyDatasetError

    with pytest.raises(EmptyDatasetError, match="no video of"):
        train(stage(), data(pipeline, annotations=str(tmp_path / "empty.csv")), tmp_path / "out", progress=False)


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_two_gloo_ranks_match_one_process_on_the_combined_batch(tmp_path, grad_accum):
    """VTC gathered over 2 ranks + gradient averaging == one process on the whole batch; with
    grad_accum 2 each rank's half comes in two micro-batches and the contrastive batch stays whole."""
    helper = ROOT / "tests/helpers/ddp_step.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(helper), str(tmp_path / "one.pt")], check=True, env=env)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(helper),
            str(tmp_path / "two.pt"),
            str(grad_accum),
        ],
        check=True,
        env=env,
    )
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-6)
    largest = max(g.abs().max() for g in one["grads"].values() if g is not None)
    for name in one["names"]:
        grad_one, grad_two = one["grads"][name], two["grads"][name]
        if grad_one is None:  # unused by VTC (fusion layers, heads): DDP leaves zeros
            assert grad_two is None or not grad_two.any(), name
            continue
        scale = grad_one.abs().max()
        if scale < 1e-6 * largest:  # zero in exact arithmetic (BERT's key bias under softmax)
            assert grad_two.abs().max() < 1e-6 * largest, name
            continue
        torch.testing.assert_close(grad_two, grad_one, rtol=1e-4, atol=1e-5 * scale, msg=name)
        # AdamW's first step moves each weight by about lr * sign(grad): compare the weights
        # whose gradient is clearly non-zero.
        clear = grad_one.abs() > 1e-3 * scale
        torch.testing.assert_close(
            two["params"][name][clear], one["params"][name][clear], rtol=1e-5, atol=1e-6, msg=name
        )
