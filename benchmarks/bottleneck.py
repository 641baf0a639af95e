"""Adapter layers against LoRA merged, at batch 1: the LoRA paper's Table 1 comparison.

Houlsby et al. (2019) insert a bottleneck adapter ``h + W_up·act(W_down·h)`` after the
attention block's output projection and after the MLP, in every block. Those are extra
layers that run one after another, so they add latency however they are trained; the
LoRA paper (§3, Table 1) measures +20–30% at batch 1, sequence 128 on GPT-2 medium on a
GPU. LoRA merged into W adds no layer at all.

Here: the embedded SmolLM2-135M in fp32, bottleneck 64 with GELU on ``o_proj`` and
``down_proj`` of every block (LoRA §3's "AdapterH" placement), against lorakit rank 8
all-linear merged (and unmerged), batch 1 at 128 and 16 tokens, contenders interleaved.
``python -m benchmarks bottleneck [--quick]``.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks import harness

BOTTLENECK = 64
RANK = 8
INPUTS = {"1x128": (1, 128, 9), "1x16": (1, 16, 15)}  # batch, tokens, repetitions
QUICK_INPUTS = {"1x16": (1, 16, 1)}
PLACES = ("o_proj", "down_proj")  # after attention, after the MLP


class HoulsbyAdapter(nn.Module):
    """``proj`` followed by a residual bottleneck: ``y = proj(x); y + up(gelu(down(y)))``.

    Shapes: ``x: (..., proj.in_features)``, ``down: (size, d)``, ``up: (d, size)`` with
    ``d = proj.out_features``. ``up`` starts at zero (near-identity, as Houlsby et al.).
    """

    def __init__(self, proj: nn.Linear, size: int):
        super().__init__()
        self.proj = proj
        d = proj.out_features
        self.down = nn.Linear(d, size, dtype=proj.weight.dtype, device=proj.weight.device)
        self.up = nn.Linear(size, d, dtype=proj.weight.dtype, device=proj.weight.device)
        nn.init.normal_(self.up.weight, std=1e-3)  # non-zero so that no kernel could skip it
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.proj(x)
        return y + self.up(F.gelu(self.down(y)))


def add_bottlenecks(model: nn.Module, size: int = BOTTLENECK) -> int:
    """Wrap every module named in :data:`PLACES` of ``model`` in place; returns how many."""
    places = [(path, module) for path, module in model.named_modules() if path.rsplit(".", 1)[-1] in PLACES]
    for path, module in places:
        parent, _, attr = path.rpartition(".")
        setattr(model.get_submodule(parent), attr, HoulsbyAdapter(module, size))
    return len(places)


def run(quick: bool = False) -> dict:
    """Median batch-1 forward ms of base, LoRA merged/unmerged and the bottleneck adapter."""
    from lorakit import LoraConfig
    from lorakit.model import attach, merge

    # the unmerged LoRA and the bottleneck read the base's very frozen weights (harness.shared_copy);
    # merging writes them, so the merged model has a copy of its own
    base = harness.causal_lm(quick).to(harness.device())
    models = {"base": base}
    for name in ("lora_merged", "lora_unmerged"):
        own = copy.deepcopy(base) if name == "lora_merged" else harness.shared_copy(base)
        model = attach(own, LoraConfig(r=RANK, alpha=16, target_modules="all-linear", init="random"))
        if name == "lora_merged":
            merge(model)
        models[name] = model
    models["bottleneck"] = harness.shared_copy(base)
    wrapped = add_bottlenecks(models["bottleneck"])
    results = {}
    for label, (batch, length, reps) in (QUICK_INPUTS if quick else INPUTS).items():
        inputs = harness.token_batch(base, batch, length)
        reps = reps if quick else harness.reps(reps)
        samples, ms = harness.time_forwards(models, inputs, reps=reps, warmup=0 if quick else 2)
        results[label] = {
            "reps": reps, "forward_ms": ms,
            "all_ms": {name: [round(t * 1000, 2) for t in s] for name, s in samples.items()},
            "vs_base": {name: harness.ratio(ms[name], ms["base"]) for name in ms},
            "bottleneck_vs_lora_merged": harness.ratio(ms["bottleneck"], ms["lora_merged"]),
        }
    return {"machine": harness.machine(), "model": harness.model_name("SmolLM2-135M (fp32)", quick, "tiny Llama"),
            "bottleneck": BOTTLENECK, "adapter_layers": wrapped, "lora": f"rank {RANK}, all-linear",
            "inputs": results}


def markdown(result: dict) -> str:
    """The ``## Adapter layers against LoRA`` section of BENCHMARKS.md."""
    rows = []
    for label, r in result["inputs"].items():
        ms, vs = r["forward_ms"], r["vs_base"]
        rows.append([f"batch {label}", ms["base"], f"{ms['lora_merged']:.1f} ({vs['lora_merged']:.3f}×)",
                     f"{ms['lora_unmerged']:.1f} ({vs['lora_unmerged']:.3f}×)",
                     f"{ms['bottleneck']:.1f} ({vs['bottleneck']:.3f}×)", r["bottleneck_vs_lora_merged"]])
    return f"""{harness.title("Adapter layers against LoRA", result["machine"])}

`python -m benchmarks bottleneck`. Machine: {harness.describe(result['machine'])}

{result['model']}: a Houlsby bottleneck adapter (size {result['bottleneck']}, GELU, residual) after the
attention output projection and after the MLP of every block ({result['adapter_layers']} adapter layers),
against lorakit LoRA ({result['lora']}) merged and unmerged; forward ms, median after warm-up,
contenders alternating. The LoRA paper's Table 1 (GPT-2 medium, GPU, batch 1) has adapters at +20–30%.

{harness.table(["input", "base ms", "LoRA merged", "LoRA unmerged", "bottleneck adapter", "adapter / LoRA merged"],
                rows)}"""


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(run(quick="--quick" in sys.argv[1:]), indent=2))
