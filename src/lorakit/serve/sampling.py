"""Choosing the next token from a row of logits: greedy, temperature, top-k, min-p and nucleus
(top-p), after the adjustments a request may ask for (vLLM's sampling parameters: logit bias,
repetition / frequency / presence penalties, a minimum length), and the log-probabilities a
request may ask for.

The order is vLLM's: the logit bias and the minimum length's mask (end tokens at ``-inf``
until ``min_tokens`` are generated) first, then the penalties (repetition over the prompt's
and the answer's tokens: a positive logit divided by it, a negative one multiplied;
frequency times each token's count in the answer and presence once per token seen there,
both subtracted), then temperature, top-k, min-p (tokens under ``min_p`` times the most
likely one's probability dropped) and top-p. A greedy request takes the most likely token
after the adjustments. Reported log-probabilities are the model's own, before any of them.

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
        top_k: keep the ``top_k`` most likely tokens (0 or -1 keeps all).
        min_p: drop tokens less likely than ``min_p`` times the most likely one.
        repetition_penalty, frequency_penalty, presence_penalty: see the module docstring
            (1.0, 0.0, 0.0: none).
        logit_bias: ``{token id: added to its logit}``.
        min_tokens: end tokens (``end_ids``) cannot be picked before this many are generated.
        prompt_ids: the prompt, for the repetition penalty.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    min_tokens: int = 0
    end_ids: frozenset[int] = frozenset()
    prompt_ids: list[int] = field(default_factory=list, repr=False)
    generator: torch.Generator = field(init=False, repr=False)

    def __post_init__(self) -> None:
        seed = self.seed if self.seed is not None else random.SystemRandom().randrange(2**63)
        self.generator = torch.Generator().manual_seed(seed % 2**64)  # torch takes [0, 2**64)
        self.counts: dict[int, int] = {}  # the answer's tokens so far, with their counts
        self.generated = 0
        self.adjusts = bool(self.logit_bias or (self.min_tokens and self.end_ids) or self.repetition_penalty != 1.0
                            or self.frequency_penalty or self.presence_penalty)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    def accept(self, token: int) -> None:
        """Count one token of the answer (for the penalties and the minimum length)."""
        self.counts[token] = self.counts.get(token, 0) + 1
        self.generated += 1

    def adjust(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits: (vocab,)`` with the bias, the minimum length's mask and the penalties applied
        (a new fp32 tensor; the model's own are left for the log-probabilities)."""
        logits = logits.float().clone()
        if self.logit_bias:
            ids = torch.tensor(list(self.logit_bias), device=logits.device)
            logits[ids] += torch.tensor(list(self.logit_bias.values()), device=logits.device)
        if self.generated < self.min_tokens and self.end_ids:
            logits[torch.tensor(sorted(self.end_ids), device=logits.device)] = float("-inf")
        if self.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(self.prompt_ids) | set(self.counts)), dtype=torch.long,
                                device=logits.device)
            values = logits[seen]
            logits[seen] = torch.where(values > 0, values / self.repetition_penalty, values * self.repetition_penalty)
        if self.counts and (self.frequency_penalty or self.presence_penalty):
            ids = torch.tensor(list(self.counts), device=logits.device)
            counts = torch.tensor(list(self.counts.values()), dtype=logits.dtype, device=logits.device)
            logits[ids] -= self.frequency_penalty * counts + self.presence_penalty
        return logits

    def sample(self, logits: torch.Tensor) -> int:
        """Pick a token id from finite ``logits: (vocab,)`` (any float dtype; computed in fp32),
        adjusted as the request asks."""
        if self.adjusts:
            logits = self.adjust(logits)
        if self.greedy:
            return int(torch.argmax(logits))
        logits = logits.float()
        scaled = (logits - logits.max()) / self.temperature  # max is 0: no overflow for any temperature
        if 0 < self.top_k < scaled.shape[-1]:
            scaled = scaled.masked_fill(scaled < torch.topk(scaled, self.top_k).values[-1], float("-inf"))
        probs = torch.softmax(scaled, dim=-1)
        if self.min_p > 0:
            probs = probs.masked_fill(probs < self.min_p * probs.max(), 0.0)
            probs = probs / probs.sum()
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
        elif sampler.greedy and not sampler.adjusts:
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
