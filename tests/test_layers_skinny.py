"""The rank-r products computed as their transposes equal the plain products."""

import pytest
import torch

from lorakit.layers.skinny import down, grad_down, grad_up


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n,d_in,d_out,r", [(1, 5, 7, 1), (37, 64, 96, 8), (256, 96, 48, 16)])
def test_products_equal_the_plain_ones(dtype, n, d_in, d_out, r):
    gen = torch.Generator().manual_seed(n + r)
    x, g = torch.randn(n, d_in, generator=gen, dtype=dtype), torch.randn(n, d_out, generator=gen, dtype=dtype)
    A, B = torch.randn(r, d_in, generator=gen, dtype=dtype), torch.randn(d_out, r, generator=gen, dtype=dtype)
    z = down(x, A)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    assert z.shape == (n, r)
    torch.testing.assert_close(z, x @ A.t(), **tol)
    torch.testing.assert_close(grad_down(g, B), g @ B, **tol)
    torch.testing.assert_close(grad_up(g, z), g.t() @ z, **tol)
    # the results are views whose transposes are contiguous: what the next products read
    assert z.t().is_contiguous() and grad_down(g, B).t().is_contiguous()


def test_a_non_contiguous_input():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40, 30, generator=gen)[:, :24]  # rows with a stride of 30
    A = torch.randn(4, 24, generator=gen)
    torch.testing.assert_close(down(x, A), x @ A.t())
