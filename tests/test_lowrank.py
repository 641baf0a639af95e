"""lorakit.lowrank and lorakit.autoencoder: the seeds' numbers, then properties."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lorakit import lowrank
from lorakit.autoencoder import linear_autoencoder_subspace
from lorakit.errors import LorakitError

SEED_A = [[3.0, 2.0, 1.0], [0.0, 2.0, 1.0], [0.0, 0.0, 1.0]]  # seed 000


# ---------------------------------------------------------------- seed 000's worked example


def test_seed_000_singular_values_and_rank():
    assert lowrank.numerical_rank(SEED_A) == 3
    np.testing.assert_allclose(lowrank.singular_values(SEED_A), [4.04, 1.70, 0.87], atol=0.005)


def test_seed_000_svd_factors_match_the_printed_ones():
    U, S, Vh = lowrank.truncated_svd(np.array(SEED_A), 3)
    seed_U = [[0.91, 0.42, 0.02], [0.41, -0.87, -0.26], [0.09, -0.24, 0.97]]
    seed_V = [[0.67, 0.73, 0.08], [0.65, -0.54, -0.53], [0.35, -0.41, 0.84]]  # printed as V, then ᵀ
    np.testing.assert_allclose(U, seed_U, atol=0.01)  # the seed rounds -0.876 to -0.87
    np.testing.assert_allclose(Vh.T, seed_V, atol=0.005)
    np.testing.assert_allclose(U @ np.diag(S) @ Vh, SEED_A, atol=1e-12)


def test_seed_000_rank_2_approximation_to_two_decimals():
    B, C = lowrank.factorize(np.array(SEED_A), 2)
    approx = B @ C.T
    # The seed multiplied factors rounded to two decimals. Exactly, A_2[0, 0] = 2.9983
    # (seed: 2.99) and A_2[1, 2] = 1.1878, which the seed prints as 1.1 (the issue as
    # 1.10): a dropped digit, since even its own rounded factors give 1.186.
    seed = np.array([[2.99, 2.01, 0.98], [0.02, 1.88, 1.19], [-0.07, 0.45, 0.29]])
    np.testing.assert_allclose(approx, seed, atol=0.01)
    assert round(approx[1, 2], 2) == 1.19
    np.testing.assert_allclose(approx[[0, 0, 1, 1, 2, 2, 2], [1, 2, 0, 1, 0, 1, 2]].round(2),
                               [2.01, 0.98, 0.02, 1.88, -0.07, 0.45, 0.29])


def test_seed_000_error_is_sigma_3():
    err = lowrank.approximation_error(SEED_A, 2)
    s3 = lowrank.singular_values(SEED_A)[2]
    assert err.frobenius == pytest.approx(s3, rel=1e-12)
    assert err.spectral == pytest.approx(s3, rel=1e-12)
    assert err.frobenius_bound == err.spectral_bound == pytest.approx(s3, rel=1e-12)
    assert err.norm == pytest.approx(math.sqrt(20))  # ‖A‖_F² = 9 + 4 + 1 + 4 + 1 + 1
    assert err.energy == pytest.approx(1 - s3**2 / 20)


# ---------------------------------------------------------------- storage (seeds 000, 004)


@pytest.mark.parametrize(
    "m, n, r, factored, saved_percent",
    [(5000, 100, 20, 102_000, 80), (5000, 100, 10, 51_000, 90), (512, 64, 8, 4_608, 86)],
)
def test_storage_matches_the_seeds(m, n, r, factored, saved_percent):
    s = lowrank.storage(m, n, r)
    assert s.full == m * n
    assert s.factored == factored
    assert round(s.saved_percent) == saved_percent


def test_storage_of_a_factorisation_larger_than_the_matrix_is_a_negative_saving():
    assert lowrank.storage(3, 3, 2).saved == pytest.approx(1 - 12 / 9)


# ---------------------------------------------------------------- rank (seed 001)


@pytest.mark.parametrize(
    "A, rank",
    [
        ([[1, 2, 3], [2, 4, 6], [3, 6, 9]], 1),
        ([[1, 2, 3], [2, 4, 6], [1, 3, 5]], 2),
        ([[1, 0, 0], [0, 1, 0], [1, 1, 0]], 2),
    ],
)
def test_seed_001_ranks(A, rank):
    assert lowrank.numerical_rank(A) == rank
    assert lowrank.numerical_rank(torch.tensor(A, dtype=torch.float32)) == rank
    assert lowrank.numerical_rank(np.array(A)) == np.linalg.matrix_rank(np.array(A))


def test_numerical_rank_tolerance_follows_dtype_and_tol():
    rank1 = torch.outer(torch.arange(1.0, 6.0, dtype=torch.float64), torch.arange(1.0, 5.0, dtype=torch.float64))
    noisy = rank1 + 1e-9 * torch.eye(5, 4, dtype=torch.float64)
    assert lowrank.numerical_rank(noisy.float()) == 1  # below float32's tolerance
    assert lowrank.numerical_rank(noisy.double()) == 4  # above float64's
    assert lowrank.numerical_rank(noisy.double(), tol=1e-6) == 1
    assert lowrank.numerical_rank(np.zeros((3, 2))) == 0


# ---------------------------------------------------------------- choose_rank


def test_choose_rank_by_energy():
    sigma = [3.0, 2.0, 1.0, 0.5]  # σ² = 9, 4, 1, 0.25: cumulative 63%, 91%, 98%, 100%
    assert lowrank.choose_rank(sigma, 0.5) == 1
    assert lowrank.choose_rank(sigma, 0.9) == 2
    assert lowrank.choose_rank(sigma, 0.95) == 3
    assert lowrank.choose_rank(sigma[::-1], 0.95) == 3  # any order
    assert lowrank.choose_rank(sigma, 1.0) == 4
    A = np.diag(sigma)
    assert lowrank.choose_rank(A, 0.95) == lowrank.choose_rank(torch.tensor(A), 0.95) == 3


@pytest.mark.parametrize("energy", [0, -0.1, 1.5, float("nan"), "0.9"])
def test_choose_rank_rejects_bad_energy(energy):
    with pytest.raises(LorakitError, match="energy"):
        lowrank.choose_rank([1.0, 0.5], energy)


def test_choose_rank_rejects_zero_matrix_and_negative_sigma():
    with pytest.raises(LorakitError, match="all zeros"):
        lowrank.choose_rank(np.zeros((2, 2)))
    with pytest.raises(LorakitError, match="-1.0"):
        lowrank.choose_rank([2.0, -1.0])


# ---------------------------------------------------------------- input kinds and validation


@pytest.mark.parametrize("kind", ["float32", "float64", "numpy32", "numpy64", "int"])
def test_accepts_tensors_and_arrays_and_returns_the_same_kind(kind):
    A = np.array(SEED_A)
    data = {
        "float32": torch.tensor(A, dtype=torch.float32),
        "float64": torch.tensor(A, dtype=torch.float64),
        "numpy32": A.astype(np.float32),
        "numpy64": A,
        "int": A.astype(np.int64),
    }[kind]
    B, C = lowrank.factorize(data, 2)
    U, S, Vh = lowrank.randomized_svd(data, 2)
    assert B.shape == (3, 2) and C.shape == (3, 2) and U.shape == (3, 2) and Vh.shape == (2, 3)
    assert isinstance(B, torch.Tensor) == isinstance(data, torch.Tensor)
    if isinstance(data, torch.Tensor):
        assert B.dtype == data.dtype and B.device == data.device
    tol = 1e-5 if "32" in kind else 1e-10
    np.testing.assert_allclose(np.asarray(S, dtype=np.float64), [4.04235, 1.70283], atol=max(tol, 1e-5))
    np.testing.assert_allclose(np.asarray(B @ C.T, dtype=np.float64)[1, 2], 1.18780, atol=1e-4)


def test_half_precision_is_computed_in_float32():
    B, C = lowrank.factorize(torch.tensor(SEED_A, dtype=torch.bfloat16), 2)
    assert B.dtype == torch.float32


@pytest.mark.cuda
def test_cuda_tensors_stay_on_the_gpu():
    A = torch.tensor(SEED_A, device="cuda")
    B, C = lowrank.factorize(A, 2)
    U, S, Vh = lowrank.randomized_svd(A, 2)
    assert B.device.type == C.device.type == U.device.type == "cuda"
    torch.testing.assert_close(S.cpu(), torch.tensor([4.04235, 1.70283]), atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "A, message",
    [
        ([[1.0, float("nan")], [0.0, 1.0]], r"NaN/Inf value\(s\), the first nan at row 0, column 1"),
        ([[1.0, 2.0], [float("inf"), 1.0]], "the first inf at row 1, column 0"),
        (np.zeros((0, 3)), r"empty \(shape \(0, 3\)\)"),
        (np.zeros((2, 2, 2)), r"3 dimension\(s\) with shape \(2, 2, 2\)"),
        (np.zeros(3), r"1 dimension\(s\)"),
        (np.array([["a", "b"]]), "dtype <U1"),
        (np.array([[1 + 1j]]), "complex"),
    ],
)
def test_bad_matrices_are_named(A, message):
    with pytest.raises(LorakitError, match=message):
        lowrank.factorize(A, 1)


@pytest.mark.parametrize("r", [0, -1, 4, 2.0, True])
def test_rank_out_of_range_is_named(r):
    with pytest.raises(LorakitError, match=f"rank {r!r}|rank must be an integer, got {r!r}"):
        lowrank.truncated_svd(SEED_A, r)
    with pytest.raises(LorakitError):
        lowrank.randomized_svd(SEED_A, r)


def test_rank_error_says_the_allowed_range():
    with pytest.raises(LorakitError, match=r"rank 4 is out of range for a 3×3 matrix; choose 1 ≤ rank ≤ 3"):
        lowrank.factorize(SEED_A, 4)


def test_splits_share_sigma_differently_but_give_the_same_product():
    U, S, Vh = lowrank.truncated_svd(np.array(SEED_A), 2)
    for split, (b, c) in {"right": (U, Vh.T * S), "left": (U * S, Vh.T), "sqrt": (U * S**0.5, Vh.T * S**0.5)}.items():
        B, C = lowrank.factorize(np.array(SEED_A), 2, split=split)
        np.testing.assert_allclose(B, b)
        np.testing.assert_allclose(C, c)
    with pytest.raises(LorakitError, match="'middle' is not one of"):
        lowrank.factorize(SEED_A, 2, split="middle")


def test_approximation_error_of_a_given_approximation():
    err = lowrank.approximation_error(SEED_A, 2, approx=np.zeros((3, 3)))
    assert err.frobenius == pytest.approx(math.sqrt(20))
    assert err.frobenius > err.frobenius_bound
    with pytest.raises(LorakitError, match=r"approx has shape \(2, 2\) but A has \(3, 3\)"):
        lowrank.approximation_error(SEED_A, 2, approx=np.zeros((2, 2)))


def test_full_rank_has_zero_bound():
    err = lowrank.approximation_error(SEED_A, 3)
    assert err.frobenius_bound == err.spectral_bound == 0.0
    assert err.frobenius < 1e-12


# ---------------------------------------------------------------- properties (Eckart–Young)


@st.composite
def matrices(draw):
    m = draw(st.integers(1, 12))
    n = draw(st.integers(1, 12))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    # Mixed scales so that spectra are not all alike; a few exactly low-rank ones.
    A = rng.standard_normal((m, n)) * draw(st.sampled_from([1e-3, 1.0, 1e3]))
    if draw(st.booleans()) and min(m, n) > 1:
        k = draw(st.integers(1, min(m, n) - 1))
        A = rng.standard_normal((m, k)) @ rng.standard_normal((k, n))
    r = draw(st.integers(1, min(m, n)))
    return A, r


@settings(max_examples=150, deadline=None)
@given(matrices())
def test_factorize_attains_the_eckart_young_bound(case):
    A, r = case
    B, C = lowrank.factorize(A, r)
    error = np.linalg.norm(A - B @ C.T)
    sigma = np.linalg.svd(A, compute_uv=False)
    bound = np.sqrt(np.sum(sigma[r:] ** 2))
    scale = np.linalg.norm(A)
    # Never better than the bound (up to float64 rounding of A's own size) ...
    assert error >= bound - 1e-12 * scale
    # ... and equal to it within 1e-5 relative (absolute near 0: r ≥ the rank).
    assert error == pytest.approx(bound, rel=1e-5, abs=1e-12 * scale)
    spectral = np.linalg.norm(A - B @ C.T, 2)
    assert spectral == pytest.approx(sigma[r] if r < len(sigma) else 0.0, rel=1e-5, abs=1e-12 * scale)


@settings(max_examples=40, deadline=None)
@given(
    m=st.integers(20, 80),
    n=st.integers(20, 80),
    r=st.integers(1, 10),
    decay=st.sampled_from(["power", "exponential"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_randomized_svd_is_within_one_percent_of_the_bound(m, n, r, decay, seed):
    rng = np.random.default_rng(seed)
    p = min(m, n)
    i = np.arange(1, p + 1)
    sigma = 1.0 / i if decay == "power" else 0.8**i
    U, _ = np.linalg.qr(rng.standard_normal((m, p)))
    V, _ = np.linalg.qr(rng.standard_normal((n, p)))
    A = (U * sigma) @ V.T
    Ur, Sr, Vhr = lowrank.randomized_svd(A, r, seed=seed % 1000)
    error = np.linalg.norm(A - (Ur * Sr) @ Vhr)
    bound = np.sqrt(np.sum(sigma[r:] ** 2))
    assert bound * (1 - 1e-9) <= error <= 1.01 * bound
    np.testing.assert_allclose(Ur.T @ Ur, np.eye(r), atol=1e-10)


def test_randomized_svd_float32_4096_style_spectrum_and_determinism():
    g = torch.Generator().manual_seed(0)
    n, r = 300, 20
    U, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
    V, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
    sigma = 1.0 / torch.arange(1, n + 1, dtype=torch.float32)
    A = (U * sigma) @ V.T
    Ur, Sr, Vhr = lowrank.randomized_svd(A, r)
    assert Ur.dtype == torch.float32
    error = float(torch.linalg.matrix_norm(A - (Ur * Sr) @ Vhr))
    bound = float(sigma[r:].double().square().sum().sqrt())
    assert error <= 1.01 * bound
    again = lowrank.randomized_svd(A, r)
    torch.testing.assert_close(again[0], Ur, rtol=0, atol=0)
    # Same signs as the exact SVD (sign convention), so the factors agree, not just the product.
    Ue, Se, Vhe = lowrank.truncated_svd(A, 3)
    torch.testing.assert_close(Ur[:, :3], Ue, atol=1e-3, rtol=0)


def test_randomized_svd_rejects_bad_settings():
    with pytest.raises(LorakitError, match="oversample must be an integer ≥ 0, got -1"):
        lowrank.randomized_svd(SEED_A, 1, oversample=-1)
    with pytest.raises(LorakitError, match="power_iters must be an integer ≥ 0, got 1.5"):
        lowrank.randomized_svd(SEED_A, 1, power_iters=1.5)


# ---------------------------------------------------------------- seed 003: autoencoder = SVD subspace


def _gapped_data(m=32, n_samples=256, r=4, seed=1):
    """X: (m, N) with σ = 10, 8, 6, 5 then 0.3: a clear gap after r = 4."""
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n_samples, m, generator=g, dtype=torch.float64))
    sigma = torch.tensor([10.0, 8.0, 6.0, 5.0][:r] + [0.3] * (m - r), dtype=torch.float64)
    return (U * sigma) @ V.T


def test_principal_angles_basics():
    e = np.eye(3)
    np.testing.assert_allclose(lowrank.principal_angles(e[:, :2], e[:, :2]), [0, 0], atol=1e-7)
    np.testing.assert_allclose(lowrank.principal_angles(e[:, :1], e[:, 1:2]), [np.pi / 2])
    # span{e1, e2} vs span{e1, (e2 + e3)/√2}: angles 0 and 45°, any basis scaling.
    other = np.array([[2.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    np.testing.assert_allclose(lowrank.principal_angles(e[:, :2], other), [0, np.pi / 4], atol=1e-7)
    with pytest.raises(LorakitError, match="U1 has 3 rows but U2 has 2"):
        lowrank.principal_angles(e, np.eye(2))


def test_linear_autoencoder_learns_the_svd_subspace():
    X = _gapped_data()
    basis = linear_autoencoder_subspace(X, 4, steps=500, seed=0)
    assert basis.shape == (32, 4) and basis.dtype == torch.float64
    torch.testing.assert_close(basis.T @ basis, torch.eye(4, dtype=torch.float64), atol=1e-6, rtol=0)
    U, _, _ = lowrank.truncated_svd(X, 4)
    angles = lowrank.principal_angles(basis, U)
    assert float(angles.max()) < 0.01  # radians: under 0.6°
    # A test that can fail: the same comparison against the wrong subspace is far off.
    U5, _, _ = lowrank.truncated_svd(X, 5)
    assert float(lowrank.principal_angles(basis, U5[:, 1:]).max()) > 1.0
    # ... and the autoencoder barely started after a few steps.
    early = linear_autoencoder_subspace(X, 4, steps=3, seed=0)
    assert float(lowrank.principal_angles(early, U).max()) > 0.3


def test_linear_autoencoder_accepts_numpy_and_rejects_bad_input():
    X = _gapped_data(m=10, n_samples=40, r=2).numpy()
    basis = linear_autoencoder_subspace(X, 2, steps=300)
    assert isinstance(basis, np.ndarray) and basis.shape == (10, 2)
    with pytest.raises(LorakitError, match="r 11 is out of range"):
        linear_autoencoder_subspace(X, 11)
    with pytest.raises(LorakitError, match="all zeros"):
        linear_autoencoder_subspace(np.zeros((3, 3)), 1)
    with pytest.raises(LorakitError, match="steps must be a positive integer, got 0"):
        linear_autoencoder_subspace(X, 1, steps=0)
