"""Combining adapters: lorakit's ``combine`` against PEFT's ``add_weighted_adapter``, per method.

The embedded SmolLM2-135M, two rank-8 adapters (B non-zero) on all 210 linear layers of its
blocks, weights 0.6 / 0.4, density 0.5, result at rank 8. Each contender adds the combined
adapter and deletes it again; only the add is timed. Methods: ``cat`` (PEFT ``cat``), ``svd``,
``magnitude_prune``, ``ties``, ``dare_linear``, ``dare_ties`` (PEFT: the ``*_svd`` forms, the
same ΔW-level maths; lorakit's results equal PEFT's, see tests/test_combination.py).
``python -m benchmarks combine [--quick]``.
"""

from __future__ import annotations

import copy

import torch

from benchmarks import harness

RANK = 8
WEIGHTS = {"a": 0.6, "b": 0.4}
DENSITY = 0.5
METHODS = {"cat": "cat", "svd": "svd", "magnitude_prune": "magnitude_prune_svd", "ties": "ties_svd",
           "dare_linear": "dare_linear_svd", "dare_ties": "dare_ties_svd"}


def _models(base):
    """The same two random adapters on a lorakit model and a PEFT model."""
    import peft

    from lorakit import LoraConfig
    from lorakit.model import add_adapter, attach, lora_layers

    lk = attach(copy.deepcopy(base), LoraConfig(r=RANK, alpha=16, target_modules="all-linear", init="random"), "a")
    add_adapter(lk, LoraConfig(r=RANK, alpha=16, target_modules="all-linear", init="random"), "b")
    config = peft.LoraConfig(r=RANK, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)
    pf = peft.get_peft_model(copy.deepcopy(base), config, adapter_name="a")
    pf.add_adapter("b", config)
    modules = dict(pf.base_model.model.named_modules())
    with torch.no_grad():  # PEFT's factors := lorakit's, so both combine the very same adapters
        for path, layer in lora_layers(lk):
            for name in WEIGHTS:
                modules[path].lora_A[name].weight.copy_(layer.adapters[name].A)
                modules[path].lora_B[name].weight.copy_(layer.adapters[name].B)
    return lk, pf, sum(1 for _ in lora_layers(lk))


def _calls(lk, pf, method: str, peft_type: str) -> dict:
    from lorakit.combination import combine
    from lorakit.model import delete_adapter

    density = None if method in ("cat", "svd") else DENSITY
    rank = None if method == "cat" else RANK

    def ours():
        seconds = harness.timed(lambda: combine(lk, WEIGHTS, method=method, name="c", rank=rank, density=density))
        delete_adapter(lk, "c")
        return seconds

    def theirs():
        seconds = harness.timed(lambda: pf.add_weighted_adapter(list(WEIGHTS), list(WEIGHTS.values()), "c",
                                                                combination_type=peft_type, svd_rank=rank,
                                                                density=density))
        pf.delete_adapter("c")
        return seconds

    return {"lorakit": ours, "peft": theirs}


def run(quick: bool = False) -> dict:
    reps = 1 if quick else 3
    base = harness.causal_lm(quick).to(harness.device())
    lk, pf, layers = _models(base)
    ms = {}
    for method, peft_type in METHODS.items():
        calls = _calls(lk, pf, method, peft_type)
        calls["lorakit"](), calls["peft"]()  # warm-up
        samples = {"lorakit": [], "peft": []}
        for rep in range(reps):
            for lib in ("lorakit", "peft")[rep % 2:] + ("lorakit", "peft")[:rep % 2]:
                samples[lib].append(calls[lib]())
        ms[method] = {lib: harness.median_ms(s) for lib, s in samples.items()}
        ms[method]["vs_peft"] = harness.ratio(ms[method]["lorakit"], ms[method]["peft"])
    return {"machine": harness.machine(), "model": "tiny Llama" if quick else "SmolLM2-135M (fp32)",
            "targets": "all-linear", "layers": layers, "rank": RANK, "density": DENSITY, "reps": reps, "ms": ms}


def markdown(result: dict) -> str:
    """The ``## Combining adapters`` section of BENCHMARKS.md."""
    rows = [[method, r["lorakit"], r["peft"], r["vs_peft"]] for method, r in result["ms"].items()]
    return f"""## Combining adapters

`python -m benchmarks combine`. Machine: {harness.describe(result['machine'])}

{result['model']}, two rank-{result['rank']} adapters on {result['targets']} ({result['layers']} layers), weights
0.6 / 0.4, density {result['density']}, result at rank {result['rank']} (cat: 16). Time to add the combined adapter:
lorakit `combine` against PEFT `add_weighted_adapter` (the `*_svd` forms, which compute the same ΔW); median of
{result['reps']} after a warm-up, the two alternating.

{harness.table(["method", "lorakit ms", "PEFT ms", "lorakit / PEFT"], rows)}"""


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(run(quick="--quick" in sys.argv[1:]), indent=2))
