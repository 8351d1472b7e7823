"""grad_accum keeps the contrastive batch: svitt.training.grad_cache against one large batch (fp64)."""

import pytest
import torch

import svitt
from svitt.training.grad_cache import cached_step

OBJECTIVES = {"pretrain": ("vtc", "vtm", "mlm"), "ego": ("egonce", "vtm", "mlm")}
WEIGHTS = {"vtc": 1.0, "egonce": 1.0, "vtm": 1.0, "mlm": 1.0}


def _model(dropout=0.0, **video):
    torch.manual_seed(0)
    model = svitt.build_model(
        {
            "video": {"preset": "tiny", "frames": 4, **video},
            "text": {"preset": "tiny", "vocab_size": 40, "dropout": dropout},
            "embed_dim": 16,
        }
    )
    return model.double().train()


def _micro_batches(sizes=(4, 4, 4, 4), lengths=(7, 9, 5, 9)):
    torch.manual_seed(1)
    batches = []
    for n, length in zip(sizes, lengths):
        ids = torch.randint(5, 40, (n, length))
        mask = torch.ones(n, length, dtype=torch.long)
        mask[0, length - 2 :] = 0  # some padding inside a micro-batch too
        ids[mask == 0] = 0
        labels = torch.where((torch.rand(n, length) < 0.3) & mask.bool(), ids, -100)
        batches.append(
            {
                "video": torch.randn(n, 4, 3, 32, 32, dtype=torch.float64),
                "input_ids": ids,
                "attention_mask": mask,
                "mlm_ids": torch.where(labels >= 0, 4, ids),
                "mlm_labels": labels,
                "nouns": (torch.rand(n, 6) < 0.3).double(),
                "verbs": (torch.rand(n, 4) < 0.4).double(),
            }
        )
    return batches


def _collate(batches):
    """One batch, texts padded to the longest (what the collator does for a large batch)."""
    length = max(b["input_ids"].shape[1] for b in batches)
    pad = {"input_ids": 0, "attention_mask": 0, "mlm_ids": 0, "mlm_labels": -100}
    out = {}
    for key in batches[0]:
        parts = [
            b[key] if key not in pad else torch.nn.functional.pad(b[key], (0, length - b[key].shape[1]), value=pad[key])
            for b in batches
        ]
        out[key] = torch.cat(parts)
    return out


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _large_batch(model, batch, objectives):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)
    losses = model(objectives=objectives, **batch)
    sum(losses[k] for k in objectives).backward()
    return {k: float(v.detach()) for k, v in losses.items()}, _grads(model)


def _cached(model, batches, objectives):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)
    losses = cached_step(model, batches, objectives, WEIGHTS)
    return losses, _grads(model)


@pytest.mark.parametrize("kind", ["pretrain", "ego"])
def test_four_micro_batches_give_the_loss_and_gradients_of_one_large_batch(kind):
    model, batches, objectives = _model(), _micro_batches(), OBJECTIVES[kind]
    big_losses, big_grads = _large_batch(model, _collate(batches), objectives)
    losses, grads = _cached(model, batches, objectives)
    for key in objectives:
        assert losses[key] == pytest.approx(big_losses[key], rel=1e-10, abs=1e-12), key
    assert set(grads) == set(big_grads)
    for name in big_grads:
        torch.testing.assert_close(grads[name], big_grads[name], rtol=1e-8, atol=1e-12, msg=name)


def test_plain_accumulation_would_not_match():
    """Why the cache is needed: per-micro-batch losses see 3 negatives instead of 15."""
    model, batches = _model(), _micro_batches()
    big_losses, _ = _large_batch(model, _collate(batches), OBJECTIVES["pretrain"])
    torch.manual_seed(7)
    plain = sum(float(model(objectives=("vtc",), **b)["vtc"].detach()) for b in batches) / len(batches)
    assert abs(plain - big_losses["vtc"]) > 0.1


def test_one_micro_batch_replays_dropout_and_random_blocks_exactly():
    model = _model(local_blocks=1, random_blocks=1, block_size=4, drop_path=0.2, dropout=0.1)
    batch = _micro_batches(sizes=(6,), lengths=(8,))
    model.video_encoder.layout_generator.manual_seed(3)
    big_losses, big_grads = _large_batch(model, batch[0], OBJECTIVES["pretrain"])
    model.video_encoder.layout_generator.manual_seed(3)
    losses, grads = _cached(model, batch, OBJECTIVES["pretrain"])
    for key in OBJECTIVES["pretrain"]:
        assert losses[key] == pytest.approx(big_losses[key], rel=1e-10), key
    for name in big_grads:
        torch.testing.assert_close(grads[name], big_grads[name], rtol=1e-8, atol=1e-12, msg=name)
