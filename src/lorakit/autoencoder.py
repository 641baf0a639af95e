"""A linear autoencoder learns the SVD's subspace (seed 003).

Seed 003: with a linear encoder h = W_e·x, a linear decoder x̂ = W_d·h, an r-wide
bottleneck and a squared-error loss, the optimum spans the same subspace as the top-r
left singular vectors of X (Baldi & Hornik, 1989): "linear autoencoder = learned
SVD/PCA decomposition". :func:`linear_autoencoder_subspace` trains one by gradient
descent so that :func:`lorakit.lowrank.principal_angles` can compare the two.
"""

from __future__ import annotations

import torch

from lorakit.errors import LorakitError
from lorakit.lowrank import as_matrix, check_rank

__all__ = ["linear_autoencoder_subspace"]


def linear_autoencoder_subspace(X, r: int, steps: int = 500, lr: float = 0.02, seed: int = 0):
    """Train a linear autoencoder with an r-wide bottleneck on ``X`` and return its decoder's basis.

    Args:
        X: ``(m, N)`` data, one sample per column (seed 003's X ≈ W_d·W_e·X). Not centred:
            the subspace compared is that of the SVD of X; centre X yourself for PCA's.
        r: bottleneck width, 1 ≤ r ≤ min(m, N).
        steps: full-batch Adam steps.
        lr: Adam learning rate. X is scaled to unit root-mean-square first (which leaves
            the subspace unchanged), so one rate suits data of any scale.
        seed: seeds the random initial weights.

    Returns:
        ``(m, r)`` orthonormal basis of the decoder's column space (QR of W_d: (m, r)),
        numpy for numpy input, else a tensor on X's device in X's dtype. Its principal
        angles to the top-r left singular vectors of X go to 0 as training converges,
        fastest when σ_r is well above σ_{r+1}.
    """
    x = as_matrix(X, "X")
    dtype = x.dtype
    m, n_samples = x.shape
    r = check_rank(r, m, n_samples, "r")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise LorakitError(f"steps must be a positive integer, got {steps!r}")
    if not lr > 0:
        raise LorakitError(f"lr must be > 0, got {lr!r}")
    rms = x.square().mean().sqrt()
    if float(rms) == 0.0:
        raise LorakitError("X is all zeros; it spans no subspace to learn")
    x = (x / rms).float()

    gen = torch.Generator(device=x.device).manual_seed(int(seed))
    encoder = (torch.randn(r, m, generator=gen, device=x.device) / m**0.5).requires_grad_()
    decoder = (torch.randn(m, r, generator=gen, device=x.device) / r**0.5).requires_grad_()
    optimizer = torch.optim.Adam([encoder, decoder], lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            loss = (decoder @ (encoder @ x) - x).square().mean()
            loss.backward()
            optimizer.step()

    basis, _ = torch.linalg.qr(decoder.detach().to(dtype))
    return basis if isinstance(X, torch.Tensor) else basis.cpu().numpy()
