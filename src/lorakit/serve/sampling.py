"""Choosing the next token from a row of logits: greedy, temperature and nucleus (top-p).

Every request owns a :class:`Sampler`, so a request's random draws depend only on its own
``seed``, never on which other requests happen to share its decode step.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch


@dataclass
class Sampler:
    """Samples one request's tokens.

    Attributes:
        temperature: 0 picks the most likely token (greedy); above 0 divides the logits.
        top_p: keep the smallest set of most likely tokens whose probability adds up to
            at least ``top_p`` (1.0 keeps all).
        seed: seeds this request's generator; None draws a fresh seed.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    generator: torch.Generator = field(init=False, repr=False)

    def __post_init__(self) -> None:
        seed = self.seed if self.seed is not None else random.SystemRandom().randrange(2**63)
        self.generator = torch.Generator().manual_seed(seed)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    def sample(self, logits: torch.Tensor) -> int:
        """Pick a token id from ``logits: (vocab,)`` (any float dtype; computed in fp32)."""
        if self.greedy:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits.float() / self.temperature, dim=-1)
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


def pick_tokens(logits: torch.Tensor, samplers: list[Sampler]) -> list[int]:
    """One token per row of ``logits: (rows, vocab)``; the greedy rows share one argmax."""
    greedy_ids = torch.argmax(logits, dim=-1).tolist()
    return [greedy_ids[i] if s.greedy else s.sample(logits[i]) for i, s in enumerate(samplers)]
