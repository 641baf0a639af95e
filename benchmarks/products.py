"""The rank-r products of a LoRA layer: each as written, against computed as its transpose.

A LoRA layer's forward and backward multiply by its factors in three products whose result has
only r columns: ``z = x·Aᵀ``, ``g_z = g·B`` and ``∂B = gᵀ·z``. :mod:`lorakit.layers.skinny`
computes each as the transpose of a product with r *rows* (``(A·xᵀ)ᵀ``, ``(Bᵀ·gᵀ)ᵀ``,
``(zᵀ·g)ᵀ``), the same numbers. This times both on SmolLM2-135M's three layer shapes (576→576
attention, 576→1536 gate/up, 1536→576 down), 4×128 = 512 tokens, rank 8, fp32, the two forms
alternating; microseconds per product, median of the repetitions.

``python -m benchmarks products [--quick]``.
"""

from __future__ import annotations

import statistics

import torch

from benchmarks import harness
from lorakit.layers.skinny import down, grad_down, grad_up

SHAPES = [(576, 576), (576, 1536), (1536, 576)]  # (in, out)
TOKENS, RANK, REPS, INNER = 512, 8, 9, 20
QUICK_TOKENS, QUICK_REPS, QUICK_INNER = 32, 2, 2

PRODUCTS = {  # name: (as written, as its transpose), each a function of (x, g, A, B, z)
    "z = x·Aᵀ": (lambda x, g, A, B, z: x @ A.t(), lambda x, g, A, B, z: down(x, A)),
    "g_z = g·B": (lambda x, g, A, B, z: g @ B, lambda x, g, A, B, z: grad_down(g, B)),
    "∂B = gᵀ·z": (lambda x, g, A, B, z: g.t() @ z, lambda x, g, A, B, z: grad_up(g, z)),
}


def run(quick: bool = False) -> dict:
    tokens, reps, inner = (QUICK_TOKENS, QUICK_REPS, QUICK_INNER) if quick else (TOKENS, harness.reps(REPS), INNER)
    gen = torch.Generator().manual_seed(0)
    shapes = {}
    for d_in, d_out in SHAPES:
        x, g = torch.randn(tokens, d_in, generator=gen), torch.randn(tokens, d_out, generator=gen)
        A, B = torch.randn(RANK, d_in, generator=gen), torch.randn(d_out, RANK, generator=gen)
        z = torch.randn(tokens, RANK, generator=gen)
        calls = {}
        for name, (plain, skinny) in PRODUCTS.items():
            calls[(name, "plain")] = lambda f=plain: f(x, g, A, B, z)
            calls[(name, "transposed")] = lambda f=skinny: f(x, g, A, B, z)
        samples = harness.interleaved(calls, reps=reps, warmup=1, inner=inner)
        row = {}
        for name in PRODUCTS:
            plain_us = statistics.median(samples[(name, "plain")]) * 1e6
            skinny_us = statistics.median(samples[(name, "transposed")]) * 1e6
            row[name] = {"plain_us": round(plain_us, 1), "transposed_us": round(skinny_us, 1),
                         "transposed_vs_plain": harness.ratio(skinny_us, plain_us)}
        shapes[f"{d_in}->{d_out}"] = row
    return {"machine": harness.machine(), "tokens": tokens, "rank": RANK, "reps": reps, "shapes": shapes}


def markdown(result: dict) -> str:
    """The ``## The rank-r products`` section of BENCHMARKS.md."""
    rows = [[layer, name, r["plain_us"], r["transposed_us"], r["transposed_vs_plain"]]
            for layer, products in result["shapes"].items() for name, r in products.items()]
    return f"""{harness.title("The rank-r products", result["machine"])}

`python -m benchmarks products`. Machine: {harness.describe(result['machine'])}

The three products of a LoRA layer whose result has r = {result['rank']} columns, as written and as
`lorakit.layers.skinny` computes them (the transpose of a product with r rows: the same numbers),
{result['tokens']} tokens, fp32, SmolLM2-135M's layer shapes; µs per product, median of {result['reps']}
repetitions, the two forms alternating. The training step and the unmerged forward use the second form.

{harness.table(["layer (in->out)", "product", "as written µs", "as its transpose µs", "transpose / written"], rows)}"""


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(run(quick="--quick" in sys.argv[1:]), indent=2))
