"""Subspace similarity φ (LoRA §7.2, Eq. 4) on matrices whose answer is known."""

import pytest
import torch

from lorakit.analysis import adapter_similarity, random_baseline, subspace_similarity
from lorakit.errors import LorakitError


def _orthonormal_rows(n: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    return Q.T  # (k, n)


def test_identical_subspaces_give_one_everywhere_on_the_diagonal():
    A = torch.randn(8, 64, generator=torch.Generator().manual_seed(1))
    phi = subspace_similarity(A, A)
    assert phi.shape == (8, 8)
    torch.testing.assert_close(phi.diagonal(), torch.ones(8, dtype=torch.float64))


def test_same_row_space_in_another_basis_gives_one_at_full_rank():
    A = torch.randn(6, 40, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    mix = torch.randn(6, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    phi = subspace_similarity(A, mix @ A)  # same span, other singular vectors
    assert phi[-1, -1] == pytest.approx(1.0, abs=1e-12)
    assert phi[0, 0] < 0.999  # the individual top directions differ


def test_orthogonal_subspaces_give_zero():
    Q = _orthonormal_rows(50, 20)
    phi = subspace_similarity(Q[:8], Q[8:20])
    assert phi.shape == (8, 12)
    assert float(phi.abs().max()) < 1e-12


def test_nested_subspace_is_contained_so_phi_is_one_at_the_smaller_rank():
    # A1 spans the first 4 directions of A2's 16, with its own singular values.
    Q = _orthonormal_rows(64, 16, seed=4)
    A2 = torch.diag(torch.linspace(16, 1, 16, dtype=torch.float64)) @ Q
    A1 = torch.diag(torch.tensor([4.0, 3, 2, 1], dtype=torch.float64)) @ Q[:4]
    phi = subspace_similarity(A1, A2)
    assert phi[0, 0] == pytest.approx(1.0)  # both top directions are Q[0]
    assert phi[3, 3] == pytest.approx(1.0)
    assert phi[3, 15] == pytest.approx(1.0)  # min(i, j) = 4: all of A1 lies in A2
    assert phi[1, 0] == pytest.approx(1.0)  # A2's top direction lies in A1's top-2


def test_half_overlap_is_one_half():
    Q = _orthonormal_rows(30, 4, seed=5)
    A1 = Q[[0, 1]] * torch.tensor([[2.0], [1.0]], dtype=torch.float64)
    A2 = Q[[0, 2]] * torch.tensor([[2.0], [1.0]], dtype=torch.float64)
    phi = subspace_similarity(A1, A2)
    assert phi[1, 1] == pytest.approx(0.5)  # one of two directions shared
    assert phi[0, 0] == pytest.approx(1.0)


def test_random_subspaces_are_near_the_baseline():
    n = 400
    g = torch.Generator().manual_seed(6)
    phi = subspace_similarity(torch.randn(8, n, generator=g), torch.randn(64, n, generator=g))
    assert random_baseline(8, 64, n) == pytest.approx(64 / 400)
    assert abs(float(phi[-1, -1]) - 64 / 400) < 0.08


def test_scale_and_sign_do_not_matter():
    A = torch.randn(5, 20, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(subspace_similarity(A, -3.0 * A), subspace_similarity(A, A))


def test_width_mismatch_names_the_shapes():
    with pytest.raises(LorakitError, match=r"\(4, 10\).*\(4, 12\)"):
        subspace_similarity(torch.randn(4, 10), torch.randn(4, 12))


def test_adapter_similarity_by_module_with_pattern_and_factor_B():
    g = torch.Generator().manual_seed(8)
    f1 = {"l.0.query": (torch.randn(4, 16, generator=g), torch.randn(12, 4, generator=g)),
          "l.0.value": (torch.randn(4, 16, generator=g), torch.randn(12, 4, generator=g))}
    grown = torch.cat([f1["l.0.query"][0], torch.randn(4, 16, generator=g)])  # A1's rows plus 4 more
    f2 = {"l.0.query": (grown, torch.randn(12, 8, generator=g)),
          "l.0.value": (torch.randn(8, 16, generator=g), f1["l.0.value"][1])}
    res = adapter_similarity(f1, f2, module="query")
    assert [r.path for r in res] == ["l.0.query"]
    assert res[0].ranks == (4, 8)
    assert float(res[0].phi[-1, -1]) == pytest.approx(1.0)  # A1's rows are inside A2's
    res_b = adapter_similarity(f1, f2, module="value", factor="B")
    assert float(res_b[0].phi[-1, -1]) == pytest.approx(1.0)  # identical B
    assert res_b[0].dim == 12
    with pytest.raises(LorakitError, match="share no module matching 'key'"):
        adapter_similarity(f1, f2, module="key")
    with pytest.raises(LorakitError, match="factor 'C'"):
        adapter_similarity(f1, f2, factor="C")


def test_delta_factor_orders_input_directions_by_how_much_the_update_uses_them():
    Q = _orthonormal_rows(40, 3, seed=9)  # A's rows: three orthonormal input directions, equally strong
    U = _orthonormal_rows(30, 3, seed=10).T  # (30, 3) orthonormal output directions
    B1 = U * torch.tensor([1.0, 5.0, 2.0], dtype=torch.float64)  # ΔW uses Q[1] most, then Q[2], then Q[0]
    f1 = {"m": (Q, B1)}
    f2 = {"m": (Q[[1]], U[:, :1])}  # a rank-1 adapter along Q[1]
    phi = adapter_similarity(f1, f2, factor="delta")[0].phi
    assert phi.shape == (3, 1)
    assert float(phi[0, 0]) == pytest.approx(1.0)  # both updates' top input direction is Q[1]
    assert float(phi[2, 0]) == pytest.approx(1.0)
    f3 = {"m": (Q[[0]], U[:, :1])}
    assert float(adapter_similarity(f1, f3, factor="delta")[0].phi[0, 0]) == pytest.approx(0.0, abs=1e-12)


def test_lora_on_expert_parameters_is_left_out_with_a_warning_not_misread(tmp_path):
    """A PEFT adapter's fused experts stack every expert's rows in one A (under a nested key path):
    not compared as one module, and said so; an adapter of experts alone is one clear error."""
    peft = pytest.importorskip("peft")
    from lorakit.analysis.similarity import compare_adapters
    from tiny_models import tiny_mixtral

    experts = ["experts.gate_up_proj", "experts.down_proj"]
    for name, targets in (("both", ["q_proj"]), ("experts", [])):
        peft.get_peft_model(tiny_mixtral(), peft.LoraConfig(r=2, target_modules=targets, target_parameters=experts,
                                                            init_lora_weights=False)).save_pretrained(tmp_path / name)
    with pytest.warns(UserWarning, match="left out 4 LoRA on parameters"):
        rows = compare_adapters(tmp_path / "both", tmp_path / "both")
    assert [row.path for row in rows] == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    with pytest.raises(LorakitError, match="holds LoRA on parameters only"):
        compare_adapters(tmp_path / "experts", tmp_path / "experts")
