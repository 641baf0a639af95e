"""Spectrum of ΔW = W_ft − W and the rank keeping 90/95/99% of its energy (seed 003)."""

import pytest
import torch

from lorakit.analysis import delta_spectrum
from lorakit.errors import LorakitError


def test_rank_r_update_has_rank_r_at_every_energy():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(30, 20, generator=g, dtype=torch.float64)
    delta = torch.randn(30, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 20, generator=g, dtype=torch.float64)
    s = delta_spectrum(W, W + delta)
    assert s.ranks == {0.9: s.ranks[0.9], 0.95: s.ranks[0.95], 0.99: 3} and s.ranks[0.9] <= 3
    assert s.full_rank == 20
    assert float(s.sigma[3]) < 1e-10
    assert s.delta_norm == pytest.approx(float(torch.linalg.matrix_norm(delta)))
    assert s.relative_change == pytest.approx(s.delta_norm / float(torch.linalg.matrix_norm(W)))


def test_known_singular_values_give_known_ranks():
    # σ² = 50, 30, 15, 4, 1 (sum 100): 90% needs 3 (95%), 95% needs 3, 99% needs 4.
    sigma = torch.tensor([50.0, 30, 15, 4, 1], dtype=torch.float64).sqrt()
    Q, _ = torch.linalg.qr(torch.randn(5, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    W = torch.zeros(5, 5, dtype=torch.float64) + torch.eye(5, dtype=torch.float64)
    s = delta_spectrum(W, W + (Q * sigma) @ Q.T)
    assert s.ranks == {0.9: 3, 0.95: 3, 0.99: 4}
    torch.testing.assert_close(s.energy(), torch.tensor([0.5, 0.8, 0.95, 0.99, 1.0], dtype=torch.float64))


def test_unchanged_weight_gives_rank_zero():
    W = torch.ones(4, 3)
    assert delta_spectrum(W, W.clone()).ranks == {0.9: 0, 0.95: 0, 0.99: 0}


def test_shape_mismatch_and_bad_energy_raise():
    with pytest.raises(LorakitError, match=r"\(4, 3\) but W_tuned is \(3, 4\)"):
        delta_spectrum(torch.ones(4, 3), torch.ones(3, 4))
    with pytest.raises(LorakitError, match="1.5"):
        delta_spectrum(torch.ones(4, 3), torch.zeros(4, 3), energies=(1.5,))
