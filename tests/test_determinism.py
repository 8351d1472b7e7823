"""Same seed, same machine, same numbers: the training forward/backward repeats bit for bit.

At the demo's batch size (64) the VTM hard negatives repeat clips, and advanced indexing's CPU
backward (x[idx] -> index_put with accumulation) adds the repeated rows in a thread-dependent order:
two clean demo runs differed from step 3 on. At batch 8 the rows rarely collide, so this runs at 64.
"""

import pytest
import torch

import svitt

BATCH = 64


@pytest.fixture(scope="module")
def model_and_batch():
    torch.manual_seed(0)
    model = svitt.build_model(
        {"video": {"preset": "tiny", "frames": 4}, "text": {"preset": "tiny", "vocab_size": 40}, "embed_dim": 16}
    )
    batch = {
        "video": torch.randn(BATCH, 4, 3, 32, 32),
        "input_ids": torch.randint(5, 40, (BATCH, 12)),
        "attention_mask": torch.ones(BATCH, 12, dtype=torch.long),
        "nouns": (torch.rand(BATCH, 6) < 0.3).float(),
        "verbs": (torch.rand(BATCH, 4) < 0.3).float(),
    }
    batch["mlm_ids"] = batch["input_ids"].clone()
    batch["mlm_labels"] = torch.where(torch.rand(BATCH, 12) < 0.3, batch["input_ids"], -100)
    return model.train(), batch


def _gradients(model, batch, objectives):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # negatives are sampled from torch's RNG
    model.video_encoder.layout_generator.manual_seed(2)
    losses = model(objectives=objectives, **batch)
    sum(losses.values()).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("objectives", [("vtc", "vtm", "mlm"), ("egonce", "vtm", "mlm")])
def test_gradients_repeat_bit_for_bit_at_the_demo_batch_size(model_and_batch, objectives):
    model, batch = model_and_batch
    first = _gradients(model, batch, objectives)
    for _ in range(2):
        again = _gradients(model, batch, objectives)
        differ = [name for name in first if not torch.equal(first[name], again[name])]
        assert not differ, f"{len(differ)} gradients differ between identical passes, e.g. {differ[:3]}"


def test_an_exported_model_is_the_same_file_in_every_process(tmp_path):
    """safetensors writes its metadata map in no fixed order (a hash map seeded per process): the
    export sorts the header, so the same weights give the same bytes from any process."""
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import sys, torch\nfrom svitt.training.checkpoint import export_model\ntorch.manual_seed(0)\n"
        "export_model(torch.nn.Linear(4, 3), sys.argv[1], {'model_config': {'video': {'frames': 4}}})\n"
    )
    root = Path(__file__).resolve().parents[1]
    files = []
    for k in range(4):
        subprocess.run(
            [sys.executable, "-c", code, str(tmp_path / str(k))],
            check=True,
            cwd=root,
            env={"PYTHONPATH": str(root), "PATH": ""},
        )
        files.append((tmp_path / str(k) / "model.safetensors").read_bytes())
    assert all(f == files[0] for f in files)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "0" / "model.safetensors"), "pt") as handle:
        assert handle.metadata()["format"] == "pt" and list(handle.keys()) == ["bias", "weight"]


def test_written_safetensors_are_the_same_file_in_every_process(tmp_path):
    """The grounder's file has three metadata keys: written by svitt.io.write_safetensors, four
    processes write the same bytes (safetensors orders its metadata map differently per process)."""
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import sys, torch\nfrom svitt.io import write_safetensors\ntorch.manual_seed(0)\n"
        "write_safetensors(sys.argv[1], torch.nn.Linear(4, 3).state_dict(), "
        "{'settings': '{}', 'video_dim': '64', 'text_dim': '32'})\n"
    )
    root = Path(__file__).resolve().parents[1]
    for k in range(4):
        subprocess.run(
            [sys.executable, "-c", code, str(tmp_path / f"{k}.safetensors")],
            check=True,
            cwd=root,
            env={"PYTHONPATH": str(root), "PATH": ""},
        )
    files = [(tmp_path / f"{k}.safetensors").read_bytes() for k in range(4)]
    assert all(f == files[0] for f in files)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "0.safetensors"), "pt") as handle:
        assert handle.metadata() == {"settings": "{}", "video_dim": "64", "text_dim": "32"}
