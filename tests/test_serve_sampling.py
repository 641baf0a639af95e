"""Sampling: nucleus, seeds, greedy, every accepted temperature safe, a row with non-finite
logits failing alone, log-probabilities."""

import pytest
import torch

from lorakit.serve.sampling import NonFiniteLogits, Sampler, nucleus, pick_tokens, prompt_logprobs, token_logprob


def test_nucleus_keeps_the_smallest_set_reaching_top_p():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    kept = nucleus(probs.clone(), 0.8)
    assert torch.allclose(kept, torch.tensor([0.625, 0.375, 0.0, 0.0]))
    assert torch.allclose(nucleus(probs.clone(), 0.81), torch.tensor([0.5, 0.3, 0.15, 0.0]) / 0.95)


def test_sampler_with_a_seed_repeats_and_greedy_takes_the_argmax():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(0))
    draws = [Sampler(temperature=1.0, seed=7).sample(logits) for _ in range(3)]
    assert draws[0] == draws[1] == draws[2]
    sampler = Sampler(temperature=1.0, seed=7)
    assert len({sampler.sample(logits) for _ in range(30)}) > 1  # it does sample
    assert Sampler(temperature=0.0).sample(logits) == int(logits.argmax())


def test_sampling_is_safe_for_every_accepted_temperature():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(1)) * 30
    for temperature in (9e-38, 1e-40, 5e-324, 1e-6):
        assert Sampler(temperature=temperature).greedy
        assert Sampler(temperature=temperature).sample(logits) == int(logits.argmax())
    for temperature in (1e-5, 1e-4, 0.01, 2.0):  # sampled: (logits - max) / t never overflows
        token = Sampler(temperature=temperature, top_p=0.5, seed=3).sample(logits * 1e30)
        assert 0 <= token < 50
    assert Sampler(temperature=1e-5, seed=3).sample(logits) == int(logits.argmax())  # all mass on the max


def test_a_row_with_non_finite_logits_fails_alone():
    logits = torch.randn(4, 20, generator=torch.Generator().manual_seed(2))
    logits[1, 3] = float("nan")
    logits[2, 0] = float("inf")
    picked = pick_tokens(logits, [Sampler(temperature=0.0), Sampler(temperature=0.0), Sampler(temperature=0.7),
                                  Sampler(temperature=0.7, seed=1)])
    assert picked[0] == int(logits[0].argmax()) and isinstance(picked[3], int)
    assert isinstance(picked[1], NonFiniteLogits) and isinstance(picked[2], NonFiniteLogits)


def test_token_logprobs_are_the_raw_log_softmax_and_its_top_k():
    logits = torch.tensor([1.0, 3.0, 2.0, -1.0])
    entry = token_logprob(logits, 2, 2)
    expected = torch.log_softmax(logits, -1)
    assert entry.token == 2 and abs(entry.logprob - float(expected[2])) < 1e-6
    assert [t for t, _ in entry.top] == [1, 2] and abs(entry.top[0][1] - float(expected[1])) < 1e-6
    assert token_logprob(logits, 0, 0).top == []


def test_prompt_logprobs_score_each_token_given_the_ones_before_it():
    logits = torch.tensor([[1.0, 3.0, 2.0], [0.5, 0.0, -1.0], [9.0, 9.0, 9.0]])  # position t predicts token t + 1
    entries = prompt_logprobs(logits, [2, 1, 0], 1)
    assert entries[0].token == 2 and entries[0].logprob is None and entries[0].top == []
    expected = torch.log_softmax(logits, -1)
    assert [e.token for e in entries] == [2, 1, 0]
    assert entries[1].logprob == pytest.approx(float(expected[0, 1])) and entries[1].top[0][0] == 1
    assert entries[2].logprob == pytest.approx(float(expected[1, 0])) and entries[2].top[0][0] == 0
    broken = logits.clone()
    broken[1, 2] = float("nan")
    with pytest.raises(NonFiniteLogits, match="NaN or infinite logits for this prompt"):
        prompt_logprobs(broken, [2, 1, 0], 1)
    last = logits.clone()
    last[2, 0] = float("inf")  # the last position predicts the first generated token: sampling checks it
    assert len(prompt_logprobs(last, [2, 1, 0], 0)) == 3


def test_adjustments_follow_their_formulas():
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0, -2.0, 1.0])
    sampler = Sampler(temperature=0.0, logit_bias={1: 5.0, 4: -100.0}, repetition_penalty=2.0,
                      frequency_penalty=0.5, presence_penalty=0.25, prompt_ids=[0, 1], min_tokens=2,
                      end_ids=frozenset({3}))
    for token in (2, 2, 5):
        sampler.accept(token)
    # bias first; the end token is open again after 2 tokens; repetition over the prompt's and
    # the answer's tokens (positive / 2, negative * 2); frequency and presence over the answer's only
    want = torch.tensor([2.0 / 2, 4.0 / 2, 0.5 / 2 - 0.5 * 2 - 0.25, 3.0, -102.0, 1.0 / 2 - 0.5 - 0.25])
    assert torch.allclose(sampler.adjust(logits), want)
    assert torch.equal(logits, torch.tensor([2.0, -1.0, 0.5, 3.0, -2.0, 1.0]))  # the model's own left as they were
    fresh = Sampler(temperature=0.0, min_tokens=2, end_ids=frozenset({3}))
    assert fresh.adjust(logits)[3] == float("-inf") and fresh.sample(logits) == 0  # the end token held back
    fresh.accept(0)
    fresh.accept(0)
    assert fresh.sample(logits) == 3


def test_top_k_and_min_p_keep_only_the_likeliest():
    logits = torch.tensor([3.0, 2.9, 2.8, 0.0, -1.0, 2.7])
    draws = {Sampler(temperature=1.0, top_k=3, seed=s).sample(logits) for s in range(200)}
    assert draws == {0, 1, 2}
    assert {Sampler(temperature=1.0, top_k=1, seed=s).sample(logits) for s in range(20)} == {0}
    assert len({Sampler(temperature=1.0, top_k=-1, seed=s).sample(logits) for s in range(300)}) >= 5
    probs = torch.softmax(logits, -1)  # min_p 0.5 keeps tokens at least half as likely as the top one
    kept = {i for i in range(6) if probs[i] >= 0.5 * probs.max()}
    assert {Sampler(temperature=1.0, min_p=0.5, seed=s).sample(logits) for s in range(300)} == kept == {0, 1, 2, 5}


def test_a_greedy_row_with_adjustments_takes_the_adjusted_argmax():
    logits = torch.tensor([[0.0, 5.0, 1.0], [0.0, 5.0, 1.0]])
    biased = Sampler(temperature=0.0, logit_bias={2: 10.0})
    assert pick_tokens(logits, [Sampler(temperature=0.0), biased]) == [1, 2]
