"""Stage config validation, the learning-rate schedule and precision selection."""

import math

import pytest
import torch

from svitt.training.keys import resolve_train_config
from svitt.training.precision import resolve_precision
from svitt.training.scheduler import cosine_lr

STAGE = {
    "name": "stage1",
    "model": {
        "video": {"preset": "tiny", "frames": 4},
        "text": {"preset": "tiny", "vocab_size": None},
        "embed_dim": 32,
    },
    "objectives": {"vtc": 1.0, "vtm": 1.0, "mlm": 1.0},
    "epochs": 2,
    "batch_size": 8,
    "lr": 1e-4,
}


def test_defaults_fill_the_optional_keys():
    cfg = resolve_train_config(STAGE)
    assert cfg["weight_decay"] == 0.02 and cfg["betas"] == [0.9, 0.999]
    assert cfg["data"]["text_len"] == 32 and cfg["data"]["flip"] is True


@pytest.mark.parametrize("key", ["name", "model", "objectives", "epochs", "batch_size", "lr"])
def test_a_missing_required_key_is_named(key):
    cfg = {k: v for k, v in STAGE.items() if k != key}
    with pytest.raises(ValueError, match=f"missing the required key '{key}'"):
        resolve_train_config(cfg)


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("epochs", "10", r"stage.epochs must be int, got '10'"),
        ("lr", None, r"stage.lr must be int or float"),
        ("compile", 1, r"stage.compile must be bool"),
        ("batch_size", True, r"stage.batch_size must be int, got True"),
        ("data", {"flip": "no"}, r"stage.data.flip must be bool"),
        ("data", {"frames": 4}, r"unknown stage.data key\(s\) \['frames'\]"),
        ("optimizer", "adam", r"unknown stage key\(s\) \['optimizer'\]"),
        ("objectives", {"itc": 1.0}, r"objectives \['itc'\]"),
        ("objectives", {"egonce": 1.0}, r"needs data.kind 'egoclip'"),
        ("precision", "fp8", r"precision must be one of"),
        ("model", {"video": {"preset": "tiny", "frames": 3}, "text": {}}, r"frames 3 is not divisible"),
    ],
)
def test_a_wrong_value_is_named(key, value, match):
    with pytest.raises(ValueError, match=match):
        resolve_train_config({**STAGE, key: value})


def test_cosine_schedule_with_warmup_by_hand():
    base, total, warm = 1e-3, 10, 2
    lrs = [cosine_lr(s, total, warm, base) for s in range(total)]
    assert lrs[0] == pytest.approx(base / 2) and lrs[1] == pytest.approx(base)
    # after warm-up: 0.5 * base * (1 + cos(pi * (s - 2) / 8))
    for s in range(2, total):
        assert lrs[s] == pytest.approx(0.5 * base * (1 + math.cos(math.pi * (s - 2) / 8)))
    assert cosine_lr(total, total, warm, base, min_lr=1e-5) == pytest.approx(1e-5)


def test_precision_auto_is_fp32_on_cpu_and_an_explicit_policy_is_kept():
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"
    assert resolve_precision("fp16", torch.device("cpu")) == "fp16"  # SViTT-Ego's policy, rehearsed on a CPU
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("fp8", torch.device("cpu"))


def test_fp16_on_a_cpu_autocasts_to_bfloat16_and_scales_the_loss():
    """The fp16 policy on a CPU: 16-bit autocast (bfloat16: the CPU's float16 products are emulated,
    ~70x slower), the loss scaled by the scaler (its first scale 2**16), and the unscaled gradient
    equals the float32 one within 16-bit precision. On CUDA the dtype is float16."""
    from svitt.training.precision import autocast, autocast_dtype, grad_scaler

    torch.manual_seed(0)
    layer, x = torch.nn.Linear(16, 4), torch.randn(8, 16)
    device = torch.device("cpu")
    assert autocast_dtype("fp16", torch.device("cuda")) == torch.float16
    assert autocast_dtype("fp32", device) is None
    with autocast("fp16", device):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    scaler = grad_scaler("fp16", device)
    assert scaler.is_enabled() and scaler.get_scale() == 2.0**16
    scaler.scale(out.float().pow(2).mean()).backward()
    scaler.unscale_(torch.optim.SGD(layer.parameters(), lr=0.1))
    fp16_grad = layer.weight.grad.clone()
    layer.zero_grad()
    layer(x).pow(2).mean().backward()
    assert torch.allclose(fp16_grad, layer.weight.grad, rtol=2e-2, atol=2e-3)
