"""Video QA: answer ranking against hand-computed log-likelihoods (both scoring rules), accuracy by
hand, the QA dataset's errors, and the evaluation of a VideoQA model on demo data."""

import json
import math

import pytest
import torch

import svitt
from svitt.data.datasets import QADataset
from svitt.data.pipeline import PairCollator, QACollator, load_tokenizer
from svitt.data.transforms import EvalTransform
from svitt.evaluation import evaluate_qa, qa_accuracy
from svitt.models.answer_decoder import AnswerDecoder, VideoQA

PAD, CLS, SEP, X, Y, Z, OTHER = range(7)
# p(next token | prefix) for question 0 and question 1 (the rest of each row's mass on OTHER)
TABLES = [
    {(CLS,): {X: 0.6, Y: 0.3, Z: 0.05}, (CLS, X): {SEP: 0.3}, (CLS, Y): {SEP: 0.8}, (CLS, Z): {SEP: 1.0}},
    {(CLS,): {X: 0.2, Y: 0.1, Z: 0.7}, (CLS, X): {SEP: 0.9}, (CLS, Y): {SEP: 0.5}, (CLS, Z): {SEP: 0.1}},
]
ANSWERS = torch.tensor([[CLS, X, SEP], [CLS, Y, SEP], [CLS, Z, SEP]])
# By hand, log p(answer) = sum of its tokens' log p; Singularity adds log p(first token) again:
SEQUENCE = [
    [math.log(0.6 * 0.3), math.log(0.3 * 0.8), math.log(0.05 * 1.0)],
    [math.log(0.2 * 0.9), math.log(0.1 * 0.5), math.log(0.7 * 0.1)],
]
SINGULARITY = [
    [math.log(0.6 * 0.6 * 0.3), math.log(0.3 * 0.3 * 0.8), math.log(0.05 * 0.05 * 1.0)],
    [math.log(0.2 * 0.2 * 0.9), math.log(0.1 * 0.1 * 0.5), math.log(0.7 * 0.7 * 0.1)],
]


class TableDecoder(AnswerDecoder):
    """A decoder whose next-token distribution is the table of its question (question[b, 0, 0])."""

    def __init__(self):
        nn_cfg = dict(
            vocab_size=7,
            width=8,
            heads=2,
            intermediate_size=8,
            max_position_embeddings=8,
            type_vocab_size=2,
            dropout=0.0,
            layer_norm_eps=1e-12,
            pad_token_id=0,
        )
        super().__init__(nn_cfg, num_layers=1)

    def logits(self, answer_ids, answer_mask, question, question_mask):
        out = torch.full((*answer_ids.shape, 7), -30.0)
        for b in range(answer_ids.shape[0]):
            table = TABLES[int(question[b, 0, 0])]
            for t in range(answer_ids.shape[1]):
                probs = torch.zeros(7)
                for token, p in table.get(tuple(answer_ids[b, : t + 1].tolist()), {}).items():
                    probs[token] = p
                probs[OTHER] = 1.0 - probs.sum()
                out[b, t] = probs.clamp_min(1e-12).log()
        return out


@pytest.mark.parametrize("scoring,expected", [("sequence", SEQUENCE), ("singularity", SINGULARITY)])
def test_answers_are_ranked_by_the_hand_computed_log_likelihood(scoring, expected):
    question = torch.tensor([0.0, 1.0]).view(2, 1, 1).expand(2, 3, 8)
    qmask = torch.ones(2, 3, dtype=torch.long)
    scores = TableDecoder().rank_answers(question, qmask, ANSWERS, torch.ones_like(ANSWERS), scoring=scoring)
    torch.testing.assert_close(scores, torch.tensor(expected), rtol=0, atol=1e-5)


def test_the_two_rules_can_pick_different_answers_and_k_keeps_the_likeliest_first_tokens():
    question = torch.zeros(1, 3, 8)
    qmask = torch.ones(1, 3, dtype=torch.long)
    decoder, mask = TableDecoder(), torch.ones_like(ANSWERS)
    # question 0: "y" is the likelier answer (0.24 > 0.18), but Singularity's double-counted first
    # token prefers "x" (0.108 > 0.072)
    assert decoder.rank_answers(question, qmask, ANSWERS, mask, scoring="sequence").argmax().item() == 1
    assert decoder.rank_answers(question, qmask, ANSWERS, mask, scoring="singularity").argmax().item() == 0
    top2 = decoder.rank_answers(question, qmask, ANSWERS, mask, k=2)
    assert torch.isfinite(top2).tolist() == [[True, True, False]]  # z's first token is the least likely
    assert top2[0, :2].tolist() == pytest.approx(SEQUENCE[0][:2], abs=1e-5)
    with pytest.raises(ValueError, match="scoring must be one of"):
        decoder.rank_answers(question, qmask, ANSWERS, mask, scoring="mean")


def test_a_real_decoder_scores_the_prefix_by_prefix_likelihood_in_any_chunking():
    """Both rules against one forward pass per prefix (no causal mask involved), padded answers."""
    torch.manual_seed(0)
    cfg = dict(
        vocab_size=30,
        width=16,
        heads=2,
        intermediate_size=32,
        max_position_embeddings=10,
        type_vocab_size=2,
        dropout=0.0,
        layer_norm_eps=1e-12,
        pad_token_id=0,
    )
    decoder = AnswerDecoder(cfg, num_layers=2).eval()
    question, qmask = torch.randn(3, 4, 16), torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]])
    answers = torch.tensor([[2, 7, 3, 0], [2, 9, 11, 3], [2, 7, 12, 3], [2, 5, 3, 0]])
    amask = (answers != 0).long()
    sequence = decoder.rank_answers(question, qmask, answers, amask, chunk=5)
    singularity = decoder.rank_answers(question, qmask, answers, amask, scoring="singularity", chunk=1)
    for b in range(3):
        for a in range(4):
            n = int(amask[a].sum())
            logps = []
            with torch.no_grad():
                for t in range(1, n):  # log p(token t | tokens < t)
                    prefix = answers[a : a + 1, :t]
                    out = decoder.logits(prefix, torch.ones_like(prefix), question[b : b + 1], qmask[b : b + 1])
                    logps.append(out[0, -1].log_softmax(-1)[answers[a, t]].item())
            assert sequence[b, a].item() == pytest.approx(sum(logps), abs=1e-4)
            assert singularity[b, a].item() == pytest.approx(sum(logps) + logps[0], abs=1e-4)


def test_qa_accuracy_by_hand():
    predictions = ["red circle", "left", "yes", "no", "blue square"]
    answers = ["red circle", "right", "yes", "yes", "blue square"]
    types = ["first", "direction", "before", "before", None]
    assert qa_accuracy(predictions, answers) == {"overall": 60.0}
    assert qa_accuracy(predictions, answers, types) == {
        "overall": 60.0,
        "before": 50.0,
        "direction": 0.0,
        "first": 100.0,
    }
    assert qa_accuracy(["Red"], ["red"]) == {"overall": 0.0}  # exact match
    with pytest.raises(ValueError, match="one length, got 2 and 1"):
        qa_accuracy(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="one entry per question"):
        qa_accuracy(["a"], ["a"], ["t", "u"])


@pytest.mark.parametrize(
    "entry,key",
    [
        ({"question": "q", "answer": "a"}, "video"),
        ({"video": "v", "answer": "a"}, "question"),
        ({"video": "v", "question": "q"}, "answer"),
    ],
)
def test_an_entry_without_a_key_is_an_error_naming_file_entry_and_key(pipeline, tmp_path, entry, key):
    corpus, res = pipeline
    good = json.loads((corpus / "qa_test.json").read_text())[0]
    path = tmp_path / "qa.json"
    path.write_text(json.dumps([good, good, entry]))
    with pytest.raises(ValueError, match=rf"{path}: entry 2 has no '{key}' key"):
        QADataset(res / "frames/downstream", path, 4, EvalTransform(32))


@pytest.fixture(scope="module")
def qa_model(pipeline):
    corpus, _ = pipeline
    tokenizer = load_tokenizer(corpus / "tokenizer")
    torch.manual_seed(0)
    model = svitt.build_model(
        {
            "video": {"preset": "tiny", "frames": 4},
            "text": {"preset": "tiny", "vocab_size": len(tokenizer)},
            "embed_dim": 16,
        }
    )
    return VideoQA.from_svitt(model), tokenizer


def test_the_decoder_starts_from_the_fusion_layers(pipeline, qa_model):
    corpus, _ = pipeline
    torch.manual_seed(0)
    model = svitt.build_model(
        {
            "video": {"preset": "tiny", "frames": 4},
            "text": {"preset": "tiny", "vocab_size": len(qa_model[1])},
            "embed_dim": 16,
        }
    )
    qa = VideoQA.from_svitt(model, decoder_layers=2)
    fusion = model.text_encoder.encoder.layer[-2:]
    for target, source in zip(qa.answer_decoder.layer, fusion):
        for name, tensor in source.state_dict().items():
            torch.testing.assert_close(target.state_dict()[name], tensor, rtol=0, atol=0)
    torch.testing.assert_close(qa.answer_decoder.bias, model.mlm_head.bias, rtol=0, atol=0)
    assert not any(name.startswith(("vtm_head", "mlm_head", "vision_proj")) for name in qa.state_dict())


def test_every_parameter_learns_from_the_answer_loss(qa_model):
    """So DDP runs without find_unused_parameters (svitt.training.tasks.QATask)."""
    model, tokenizer = qa_model
    ids = torch.randint(5, len(tokenizer), (2, 6))
    answers = torch.tensor([[2, 7, 3], [2, 9, 3]])
    model.zero_grad()
    model(torch.randn(2, 4, 3, 32, 32), ids, torch.ones_like(ids), answers, torch.ones_like(answers))["qa"].backward()
    assert [name for name, p in model.named_parameters() if p.grad is None] == []
    model.zero_grad(set_to_none=True)


def test_qa_evaluation_counts_answers_missing_from_the_list(pipeline, qa_model, tmp_path):
    corpus, res = pipeline
    model, tokenizer = qa_model
    answers = json.loads((corpus / "qa_answers.json").read_text())
    test = json.loads((corpus / "qa_test.json").read_text())
    dropped = test[0]["answer"]
    (tmp_path / "answers.json").write_text(json.dumps([a for a in answers if a != dropped]))
    data = QADataset(
        res / "frames/downstream", corpus / "qa_test.json", 4, EvalTransform(32), answer_list=tmp_path / "answers.json"
    )
    missing = [q for q in test if q["answer"] == dropped]
    assert len(data.unanswerable) == len(missing) >= 1
    result = evaluate_qa(model, data, PairCollator(tokenizer, 25), batch_size=4, rerank_k=3, progress=False)
    assert result["unanswerable"] == len(missing) and result["num_questions"] == len(test)
    assert result["unanswerable_examples"][0]["answer"] == dropped
    assert result["metrics"] == qa_accuracy(
        result["predictions"], [q["answer"] for q in test], [q["type"] for q in test]
    )
    assert all(p != dropped and p in data.answer_list for p in result["predictions"])
    assert set(result["counts"]) == {q["type"] for q in test} and result["scoring"] == "sequence"
    assert result["rerank_k"] == 3


def test_qa_batches_hold_question_and_answer_tokens(pipeline):
    corpus, res = pipeline
    tokenizer = load_tokenizer(corpus / "tokenizer")
    data = QADataset(res / "frames/downstream", corpus / "qa_train.json", 4, EvalTransform(32), train=True, seed=0)
    batch = QACollator(tokenizer, text_len=6, answer_len=3)([data[0], data[1]])
    assert batch["input_ids"].shape == (2, 6) and batch["answer_ids"].shape[1] <= 3
    assert batch["answer_ids"][:, 0].tolist() == [tokenizer.cls_token_id] * 2
    assert batch["answer"] == [data[0]["answer"], data[1]["answer"]] and batch["type"][0] in (
        "first",
        "second",
        "direction",
        "before",
    )


def test_grad_accum_on_the_qa_task_gives_the_gradients_of_the_whole_batch(qa_model):
    """The answer loss is a mean of per-question terms: plain accumulation over equal micro-batches
    (svitt.training.tasks.QATask, no grad cache) is exact."""
    import copy

    from svitt.training.loop import TrainState, _optimizer_step
    from svitt.training.tasks import QATask

    model, tokenizer = qa_model
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(5, len(tokenizer), (4, 6), generator=g)
    answers = torch.randint(5, len(tokenizer), (4, 3), generator=g)
    answers[:, 0], answers[:, -1] = 2, 3
    batch = {
        "video": torch.randn(4, 4, 3, 32, 32, generator=g),
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "answer_ids": answers,
        "answer_mask": torch.ones_like(answers),
    }
    grads, losses = [], []
    for accum in (1, 2):
        net = copy.deepcopy(model).eval()  # no dropout: both runs see the same function
        micro = [{k: v.chunk(accum)[i] for k, v in batch.items()} for i in range(accum)]
        cfg = {"objectives": {"qa": 1.0}, "grad_accum": accum, "clip_grad_norm": None}
        optimizer = torch.optim.SGD(net.parameters(), lr=0.0)
        state = TrainState(
            cfg, QATask(), net, optimizer, torch.amp.GradScaler("cpu", enabled=False), tokenizer, "cpu", "fp32"
        )
        parts, clips = _optimizer_step(state, iter(micro))
        assert clips == 4
        losses.append(parts["qa"])
        grads.append({n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None})
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6, msg=name)
