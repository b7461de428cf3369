"""Scoring in the engine: every number against an uncached full forward of the model itself, with a
GPT-2-sized vocabulary, dropout on in the config (eval mode must be on), batches that need padding
and requests longer than the context."""

from __future__ import annotations

import math

import pytest
import torch

from microgpt_cli.errors import MicroGPTError
from microgpt_cli.infer.engine import Engine
from microgpt_cli.infer.scoring import Scorer
from microgpt_cli.model.gpt import GPT

from conftest import tiny_model

VOCAB = 50257
EOT = 50256


@pytest.fixture(scope="module")
def model() -> GPT:
    return tiny_model(VOCAB, dropout=0.3, position="rope", n_layer=1)  # context 16


def random_ids(generator: torch.Generator, n: int) -> list[int]:
    return torch.randint(0, VOCAB, (n,), generator=generator).tolist()


def full_forward_logprobs(model: GPT, ids: list[int]) -> torch.Tensor:
    """log p(ids[i + 1] | ids[: i + 1]) for every i, from one uncached forward in eval mode."""
    model.eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids[:-1]]))[0].float()
    return torch.log_softmax(logits, dim=-1)


def test_continuations_match_a_full_forward_in_any_batch(model: GPT) -> None:
    g = torch.Generator().manual_seed(0)
    context = model.config.context
    # Short and long contexts (past the context: the window reads its last tokens), one-token
    # contexts, and a continuation as long as the whole context.
    shapes = [(3, 2), (20, 5), (1, 1), (1, context), (7, 1), (context + 9, 3), (5, 4)]
    requests = [(random_ids(g, n), random_ids(g, k)) for n, k in shapes]
    requests.append((requests[0][0], [int(full_forward_logprobs(model, requests[0][0] + [0])[-1].argmax())]))
    model.train()  # the engine's copy must score in eval mode whatever the model was left in
    scored = Scorer(Engine(model), batch_size=3).score(requests, top_k=4)
    for (ctx, cont), result in zip(requests, scored):
        window = (ctx + cont)[-(context + 1) :]  # what the harness's hf model reads too
        logprobs = full_forward_logprobs(model, window)[-len(cont) :]
        expected = logprobs.gather(-1, torch.tensor(cont)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(result.logprobs), expected, atol=2e-5, rtol=0)
        assert result.greedy == (logprobs.argmax(-1) == torch.tensor(cont)).tolist()
        top_values, top_ids = logprobs.topk(4, dim=-1)
        assert [[i for i, _ in row] for row in result.top] == top_ids.tolist()
        torch.testing.assert_close(torch.tensor([[v for _, v in row] for row in result.top]), top_values,
                                   atol=2e-5, rtol=0)
        assert result.logprob == pytest.approx(float(expected.double().sum()), abs=1e-4)
    assert scored[-1].is_greedy and not scored[1].is_greedy
    # Batched with others (padded) or alone: the same numbers.
    alone = Scorer(Engine(model), batch_size=1).score(requests)
    for a, b in zip(alone, scored):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5) and a.greedy == b.greedy
        assert a.top == [[]] * len(a.logprobs)


@pytest.mark.parametrize("position", ["learned", "rope"])
def test_answers_after_one_context_are_packed_and_score_what_they_score_alone(position: str) -> None:
    """Four answers after one question are read as one row (the question once); each answer's
    numbers are what it gets alone, in an unpacked forward, next to rows that are not packed."""
    model = tiny_model(VOCAB, dropout=0.3, position=position)
    g = torch.Generator().manual_seed(3)
    question, other = random_ids(g, 6), random_ids(g, 9)
    requests = [(question, random_ids(g, n)) for n in (3, 1, 4, 2)] + [(other, random_ids(g, 2))]
    scorer = Scorer(Engine(model), batch_size=2)
    sequences = [(ctx + cont, len(ctx)) for ctx, cont in requests]
    windows = [w for r, (ids, first) in enumerate(sequences) for w in scorer._windows(r, ids, first, 16)]
    assert [len(row.members) for row in scorer._pack(windows)] == [4, 1]  # the question is read once
    packed = scorer.score(requests, top_k=2)
    for request, result in zip(requests, packed):
        (alone,) = scorer.score([request], top_k=2)
        assert result.logprobs == pytest.approx(alone.logprobs, abs=1e-5) and result.greedy == alone.greedy
        assert [i for i, _ in result.top[0]] == [i for i, _ in alone.top[0]]


def test_rolling_scores_every_token_once_in_the_harness_windows(model: GPT) -> None:
    lm_eval_utils = pytest.importorskip("lm_eval.utils")
    g = torch.Generator().manual_seed(1)
    context = model.config.context
    documents = [random_ids(g, n) for n in (1, 5, context, context + 1, 2 * context + 3)]
    scorer = Scorer(Engine(model), batch_size=4)
    for document, result in zip(documents, scorer.rolling(documents, prefix=EOT)):
        assert len(result.logprobs) == len(document)
        # lm-evaluation-harness's own windows (its `hf` model's), each scored by a full forward.
        expected = []
        for ctx, cont in map(lm_eval_utils.make_disjoint_window,
                             lm_eval_utils.get_rolling_token_windows(document, EOT, context, 1)):
            logprobs = full_forward_logprobs(model, (ctx + cont)[-(context + 1) :])[-len(cont) :]
            expected += logprobs.gather(-1, torch.tensor(cont)[:, None])[:, 0].tolist()
        assert result.logprobs == pytest.approx(expected, abs=2e-5)
    # Stride 1: each token is read with the full context before it.
    document = documents[-1]
    (result,) = scorer.rolling([document], prefix=None, stride=1)
    ids = document
    for p in range(1, len(ids)):
        start = max(0, p - context)
        expected_p = full_forward_logprobs(model, ids[start : p + 1])[-1, ids[p]]
        assert result.logprobs[p - 1] == pytest.approx(float(expected_p), abs=2e-5)


def test_int8_weights_score_within_a_small_tolerance(model: GPT) -> None:
    g = torch.Generator().manual_seed(2)
    documents = [random_ids(g, n) for n in (10, 40)]
    exact = Scorer(Engine(model)).rolling(documents, prefix=EOT)
    int8 = Scorer(Engine(model, quantize="int8")).rolling(documents, prefix=EOT)
    for a, b in zip(exact, int8):
        difference = (torch.tensor(a.logprobs) - torch.tensor(b.logprobs)).abs()
        assert 0 < difference.max() < 0.02 and difference.mean() < 0.005


def test_bad_requests_are_clear_errors(model: GPT) -> None:
    scorer = Scorer(Engine(model))
    with pytest.raises(MicroGPTError, match="context"):
        scorer.score([([], [1, 2])])
    with pytest.raises(MicroGPTError, match="stride"):
        scorer.rolling([[1, 2]], prefix=EOT, stride=model.config.context + 1)
    assert scorer.rolling([[]], prefix=EOT)[0].logprobs == []
    assert scorer.rolling([[5]], prefix=None)[0].logprobs == []


def test_log_probabilities_match_log_softmax_even_for_impossible_tokens() -> None:
    """logprob_columns against log_softmax: ordinary logits, a transposed (tied-head) layout, and a
    row whose token sits at -inf, where the top-k values must still be numbers (not NaN)."""
    from microgpt_cli.infer.scoring import logprob_columns

    torch.manual_seed(0)
    rows = torch.randn(6, 200) * 30  # 6 positions over a vocabulary of 200
    rows[3] = -math.inf  # position 3 allows token 2 only, and its token is 5
    rows[3, 2] = 0.0
    tokens = torch.randint(0, 200, (6,))
    tokens[3] = 5
    for layout in (rows, rows.t().contiguous().t()):
        reference = torch.log_softmax(layout, dim=-1)
        logprobs, greedy, top_ids, top_values = logprob_columns(layout, tokens, top_k=3)
        torch.testing.assert_close(logprobs, reference.gather(-1, tokens[:, None])[:, 0], atol=1e-5, rtol=0)
        assert logprobs[3] == -math.inf and not top_values.isnan().any() and top_values[3, 0] == 0.0
        torch.testing.assert_close(top_values, reference.topk(3, dim=-1).values, atol=1e-5, rtol=0)
        assert torch.equal(top_ids, layout.topk(3, dim=-1).indices)
        assert torch.equal(greedy, layout.argmax(-1) == tokens)
