"""AdaLoRA's budget: which singular directions to keep, scored by importance, on a cubic schedule.

Zhang et al. 2023 (AdaLoRA), §3.2–3.3:

- **sensitivity** of a parameter, ``I(w) = |w · ∂L/∂w|`` (the loss change if w were zeroed);
- smoothed by exponential moving averages (Eq. 8–9)::

      Ī_t = β₁ Ī_{t−1} + (1 − β₁) I_t            (sensitivity)
      Ū_t = β₂ Ū_{t−1} + (1 − β₂) |I_t − Ī_t|    (uncertainty)
      s(w) = Ī_t · Ū_t

- **importance** of direction i of a layer (Eq. 10)::

      S_i = s(λ_i) + mean_j s(P_ji) + mean_j s(Q_ij)

- **budget** b(t), the total number of directions kept over all layers (Eq. 12):
  b(0) for the first ``t_i`` steps, then a cubic decrease
  ``b_T + (b(0) − b_T)·(1 − (t − t_i)/(T − t_i − t_f))³``, then b_T for the final
  ``t_f`` steps, where the kept set is frozen;
- after each step the directions outside the top-b(t) by S have λ set to 0.
"""

from __future__ import annotations

import torch

from lorakit.errors import LorakitError

__all__ = ["RankAllocator", "budget_at"]


def budget_at(step: int, total_steps: int, initial: int, target: int, warmup: int, final: int) -> int:
    """Total directions b(t) kept after ``step`` optimizer steps (AdaLoRA Eq. 12).

    Args:
        step: steps done, 0 ≤ step ≤ total_steps.
        initial, target: b(0) and b_T (initial ≥ target ≥ 1).
        warmup: t_i, steps at b(0) before pruning starts.
        final: t_f, steps at b_T at the end.
    """
    if step <= warmup:
        return initial
    span = total_steps - warmup - final
    if step >= total_steps - final or span <= 0:
        return target
    progress = (step - warmup) / span
    return int(round(target + (initial - target) * (1.0 - progress) ** 3))


class RankAllocator:
    """Scores every direction of every :class:`~lorakit.layers.adalora.AdaLoraAdapter` and prunes to b(t).

    Args:
        adapters: module path -> the adapter of one name at that module.
        target_rank: average directions per module at the end; b_T = target_rank · len(adapters).
        total_steps: T.
        warmup_fraction, final_fraction: t_i / T and t_f / T (the paper's t_i and t_f).
        beta1, beta2: EMA factors of sensitivity and uncertainty (the paper uses 0.85).

    Attributes:
        history: ``(step, budget)`` after each :meth:`step` (for plots and tests).
    """

    def __init__(self, adapters: dict, target_rank: int, total_steps: int, warmup_fraction: float = 0.1,
                 final_fraction: float = 0.2, beta1: float = 0.85, beta2: float = 0.85):
        if not adapters:
            raise LorakitError("AdaLoRA found no layer to allocate ranks to")
        self.adapters = dict(adapters)
        self.initial = sum(adapter.r for adapter in self.adapters.values())
        self.target = target_rank * len(self.adapters)
        if not 1 <= self.target <= self.initial:
            raise LorakitError(f"target rank {target_rank} must lie in [1, init rank]: the total budget "
                               f"{self.target} exceeds the {self.initial} directions there are")
        if not (0 <= warmup_fraction < 1 and 0 <= final_fraction < 1 and warmup_fraction + final_fraction < 1):
            raise LorakitError(f"warmup ({warmup_fraction}) and final ({final_fraction}) fractions must be in "
                               "[0, 1) and sum to less than 1")
        self.total_steps = int(total_steps)
        self.warmup = int(round(warmup_fraction * total_steps))
        self.final = int(round(final_fraction * total_steps))
        self.beta1, self.beta2 = beta1, beta2
        self.sensitivity: dict[tuple[str, str], torch.Tensor] = {}
        self.uncertainty: dict[tuple[str, str], torch.Tensor] = {}
        self.frozen = False
        self.history: list[tuple[int, int]] = []

    # ------------------------------------------------------------------ importance

    @torch.no_grad()
    def _update_importance(self) -> None:
        for path, adapter in self.adapters.items():
            grads = adapter.pop_grad_sums()
            for name, grad in grads.items():
                current = (getattr(adapter, name) * grad).abs()
                key = (path, name)
                if key not in self.sensitivity:
                    self.sensitivity[key] = torch.zeros_like(current)
                    self.uncertainty[key] = torch.zeros_like(current)
                smooth = self.beta1 * self.sensitivity[key] + (1 - self.beta1) * current
                self.uncertainty[key] = self.beta2 * self.uncertainty[key] + (1 - self.beta2) * (current - smooth).abs()
                self.sensitivity[key] = smooth

    def _score(self, path: str, name: str) -> torch.Tensor | None:
        key = (path, name)
        if key not in self.sensitivity:
            return None
        return self.sensitivity[key] * self.uncertainty[key]

    @torch.no_grad()
    def importance(self) -> dict[str, torch.Tensor]:
        """``S: (r,)`` per module path (AdaLoRA Eq. 10); zeros before any gradient was seen."""
        scores = {}
        for path, adapter in self.adapters.items():
            total = torch.zeros(adapter.r, dtype=torch.float32, device=adapter.lam.device)
            lam, P, Q = (self._score(path, n) for n in ("lam", "P", "Q"))
            if lam is not None:
                total += lam.float()
            if P is not None:
                total += P.float().mean(0)
            if Q is not None:
                total += Q.float().mean(1)
            scores[path] = total
        return scores

    # ------------------------------------------------------------------ the step

    @torch.no_grad()
    def step(self, step: int) -> int:
        """Update importance after optimizer step ``step`` (1-based) and prune to b(step).

        Returns the budget b(step). In the final phase the kept set is frozen (λ of pruned
        directions is held at 0 every step).
        """
        self._update_importance()
        budget = budget_at(step, self.total_steps, self.initial, self.target, self.warmup, self.final)
        self.history.append((step, budget))
        if step <= self.warmup:
            return budget
        if not self.frozen:
            scores = self.importance()
            flat = torch.cat([scores[p] for p in self.adapters])
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.all_reduce(flat)  # every process must keep the same directions
            keep = torch.zeros_like(flat, dtype=torch.bool)
            keep[torch.topk(flat, budget).indices] = True
            offset = 0
            for adapter in self.adapters.values():
                adapter.mask.copy_(keep[offset:offset + adapter.r].to(adapter.mask.dtype))
                offset += adapter.r
            self.frozen = step >= self.total_steps - self.final
        for adapter in self.adapters.values():
            adapter.lam.mul_(adapter.mask.to(adapter.lam.dtype))
        return budget

    def ranks(self) -> dict[str, int]:
        """Directions each module keeps now."""
        return {path: adapter.rank for path, adapter in self.adapters.items()}

    # ------------------------------------------------------------------ resume

    def state_dict(self) -> dict[str, torch.Tensor]:
        """What a resumed run needs to prune as this one would: each layer's mask, the EMAs of
        sensitivity and uncertainty (``"<kind>.<P|lam|Q>.<module path>"``), the final phase's freeze
        and the budget history."""
        tensors = {f"mask.{path}": adapter.mask for path, adapter in self.adapters.items()}
        for kind, table in (("sensitivity", self.sensitivity), ("uncertainty", self.uncertainty)):
            tensors.update({f"{kind}.{name}.{path}": value for (path, name), value in table.items()})
        tensors["frozen"] = torch.tensor(self.frozen)
        tensors["history"] = torch.tensor(self.history, dtype=torch.int64).reshape(-1, 2)
        return tensors

    @torch.no_grad()
    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`state_dict` gave (the same modules, ranks and steps)."""
        for key, value in tensors.items():
            kind, _, rest = key.partition(".")
            if kind == "mask":
                mask = self.adapters[rest].mask
                mask.copy_(value.to(mask.device, mask.dtype))
            elif kind in ("sensitivity", "uncertainty"):
                name, _, path = rest.partition(".")
                table = self.sensitivity if kind == "sensitivity" else self.uncertainty
                table[(path, name)] = value.to(self.adapters[path].lam.device)
        self.frozen = bool(tensors["frozen"])
        self.history = [tuple(row) for row in tensors["history"].tolist()]
