"""Choosing the next token from a row of logits: greedy, temperature and nucleus (top-p),
and the log-probabilities a request may ask for.

Every request owns a :class:`Sampler`, so a request's random draws depend only on its own
``seed``, never on which other requests happen to share its decode step.

Numerically safe for every accepted temperature: the logits are shifted so their maximum
is 0 before they are divided, so the largest scaled logit is exactly 0 and the others are
negative or ``-inf`` (never ``inf`` or NaN), whatever the temperature. A temperature below
:data:`GREEDY_BELOW` is treated as greedy, as vLLM does (its ``_SAMPLING_EPS``). A row
whose logits are not finite (an adapter gone wrong) fails alone: :func:`pick_tokens`
returns an error for that row and tokens for the others.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from lorakit.errors import LorakitError

GREEDY_BELOW = 1e-5  # temperatures under this pick the most likely token


class NonFiniteLogits(LorakitError):
    """The model produced NaN or infinite logits for one request's row."""


@dataclass
class Sampler:
    """Samples one request's tokens.

    Attributes:
        temperature: below :data:`GREEDY_BELOW` picks the most likely token (greedy);
            above, divides the logits.
        top_p: keep the smallest set of most likely tokens whose probability adds up to
            at least ``top_p`` (1.0 keeps all).
        seed: seeds this request's generator (any int64); None draws a fresh seed.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    generator: torch.Generator = field(init=False, repr=False)

    def __post_init__(self) -> None:
        seed = self.seed if self.seed is not None else random.SystemRandom().randrange(2**63)
        self.generator = torch.Generator().manual_seed(seed % 2**64)  # torch takes [0, 2**64)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    def sample(self, logits: torch.Tensor) -> int:
        """Pick a token id from finite ``logits: (vocab,)`` (any float dtype; computed in fp32)."""
        if self.greedy:
            return int(torch.argmax(logits))
        logits = logits.float()
        scaled = (logits - logits.max()) / self.temperature  # max is 0: no overflow for any temperature
        probs = torch.softmax(scaled, dim=-1)
        if self.top_p < 1.0:
            probs = nucleus(probs, self.top_p)
        return int(torch.multinomial(probs, 1, generator=self.generator))


def nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero every token outside the top-p nucleus of ``probs: (vocab,)`` and renormalise.

    The nucleus is the smallest prefix of tokens sorted by probability whose mass reaches
    ``top_p`` (Holtzman et al., 2019, "The Curious Case of Neural Text Degeneration").
    """
    sorted_probs, order = torch.sort(probs, descending=True)
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    sorted_probs[mass_before >= top_p] = 0.0
    kept = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return kept / kept.sum()


def pick_tokens(logits: torch.Tensor, samplers: list[Sampler]) -> list[int | Exception]:
    """One token per row of ``logits: (rows, vocab)``; the greedy rows share one argmax.

    A row whose logits hold NaN or infinity gets a :class:`NonFiniteLogits` instead of a
    token (its request fails, the other rows go on); so does a row whose sampler fails.
    """
    finite = torch.isfinite(logits).all(dim=-1).tolist()
    greedy_ids = torch.argmax(logits, dim=-1).tolist()
    picked: list[int | Exception] = []
    for i, sampler in enumerate(samplers):
        if not finite[i]:
            picked.append(NonFiniteLogits("the model produced NaN or infinite logits for this request; "
                                          "its adapter's weights are likely broken: reload it from a good file"))
        elif sampler.greedy:
            picked.append(greedy_ids[i])
        else:
            try:
                picked.append(sampler.sample(logits[i]))
            except RuntimeError as err:  # noqa: PERF203 - one row's failure stays that row's
                picked.append(NonFiniteLogits(f"sampling failed for this request: {err}"))
    return picked


@dataclass
class TokenLogprob:
    """One generated token's log-probability and the most likely alternatives.

    Attributes:
        token: the token id chosen.
        logprob: its natural-log probability under the model (before temperature and top-p);
            None for a prompt's first token, which nothing precedes.
        top: ``(token id, logprob)`` of the ``k`` most likely tokens, most likely first.
    """

    token: int
    logprob: float | None
    top: list[tuple[int, float]]


def token_logprob(logits: torch.Tensor, token: int, k: int) -> TokenLogprob:
    """The log-probability of ``token`` and the top ``k`` under ``logits: (vocab,)``.

    Log-probabilities are of the model's own distribution (``log_softmax`` of the raw
    logits), as OpenAI and vLLM report them, whatever temperature the request samples at.
    """
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    top: list[tuple[int, float]] = []
    if k > 0:
        values, ids = torch.topk(logprobs, min(k, logprobs.shape[-1]))
        top = list(zip(ids.tolist(), values.tolist()))
    return TokenLogprob(token=token, logprob=float(logprobs[token]), top=top)


def prompt_logprobs(logits: torch.Tensor, ids: list[int], k: int) -> list[TokenLogprob]:
    """Each prompt token's log-probability given the tokens before it, and the top ``k`` there
    (``echo`` with ``logprobs``, as a loglikelihood evaluation asks). ``logits: (len(ids), vocab)``
    are the prompt's own, position t predicting token t + 1; the first token has no logprob.

    Raises:
        NonFiniteLogits: some of the prompt's logits are NaN or infinite.
    """
    if not bool(torch.isfinite(logits[: len(ids) - 1]).all()):
        raise NonFiniteLogits("the model produced NaN or infinite logits for this prompt; "
                              "its adapter's weights are likely broken: reload it from a good file")
    entries = [TokenLogprob(token=ids[0], logprob=None, top=[])]
    for t in range(1, len(ids)):
        entries.append(token_logprob(logits[t - 1], ids[t], k))
    return entries
