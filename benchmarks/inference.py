"""Inference forward: the base model, lorakit merged and unmerged, PEFT unmerged (and merged).

The embedded SmolLM2-135M in fp32 (and bf16 with ``LORAKIT_BENCH_INFER_DTYPES=fp32,bf16``, as
``benchmarks/gpu.sh`` runs it), LoRA rank 8 on every linear layer of the blocks
(210 layers; B non-zero so nothing is skipped), one forward of ``batch × 128`` tokens
under ``torch.inference_mode``, batch 1 and 16 (issue 7, item 3). Contenders alternate and
the median after warm-up counts; the unmerged ones read the base's very weight tensors
(:func:`benchmarks.harness.shared_copy`), the merged ones, which write them, copies of their own.

The unmerged overhead is set beside its FLOP floor: the adapter path adds ``r(d+k)``
multiply-adds per token to the ``d·k`` of each adapted ``W`` (LoRA §4.1), so
``Σ r(d+k) / Σ d·k`` over the adapted layers (2.3% here) is what an unmerged forward
must cost at least, were the adapted layers all of the forward's time. Merged, the
adapter costs nothing: ``W' = W + s·B·A`` (LoRA §4.1, "no additional inference latency").
lorakit unmerged runs q/k/v and gate/up together (one read of x for their A's,
:mod:`lorakit.layers.fused`); ``lorakit_unfused`` runs every layer on its own, and
``lorakit_compiled`` is the unmerged model under ``torch.compile`` (unless ``LORAKIT_BENCH_COMPILE=0``).
``python -m benchmarks inference [--quick]``.
"""

from __future__ import annotations

import copy


from benchmarks import harness

RANK = 8
BATCHES = {"1x128": (1, 128, 9), "16x128": (16, 128, 5)}  # batch, tokens, repetitions
QUICK_BATCHES = {"1x16": (1, 16, 1), "4x16": (4, 16, 1)}


LORAKIT = ("lorakit_merged", "lorakit_unmerged", "lorakit_unfused")


def contenders(base, targets="all-linear") -> dict:
    """Model copies: ``base``, ``lorakit_merged``, ``lorakit_unmerged``, ``lorakit_unfused``,
    (``lorakit_compiled``), ``peft_unmerged``, ``peft_merged``."""
    import peft

    from lorakit import LoraConfig
    from lorakit.layers.fused import ungroup
    from lorakit.model import attach, merge

    models = {"base": base}
    names = LORAKIT + (("lorakit_compiled",) if harness.compile_enabled() else ())
    for name in names:
        own = copy.deepcopy(base) if name == "lorakit_merged" else harness.shared_copy(base)  # merging writes W
        model = attach(own, LoraConfig(r=RANK, alpha=16, target_modules=targets, init="random"))
        if name == "lorakit_merged":
            merge(model)
        if name == "lorakit_unfused":
            ungroup(model)
        if name == "lorakit_compiled":
            model.compile(backend=harness.compile_backend())
        models[name] = model
    for name in ("peft_unmerged", "peft_merged"):
        config = peft.LoraConfig(r=RANK, lora_alpha=16, target_modules=targets, init_lora_weights=False)
        model = peft.get_peft_model(copy.deepcopy(base) if name == "peft_merged" else harness.shared_copy(base), config)
        if name == "peft_merged":
            model.merge_adapter()
        models[name] = model
    return {name: model.eval() for name, model in models.items()}


def run(quick: bool = False) -> dict:
    """Median forward ms per contender and batch, ratios to the base, overheads beside the floor.

    One pass per dtype of :func:`benchmarks.harness.inference_dtypes` (the model's weights cast
    to it, each library's adapters as it makes them for such a model); a pass other than fp32
    labels its batches ``"1x128 bf16"`` and so on."""
    loaded = harness.causal_lm(quick)
    results, floor = {}, None
    for dtype in harness.inference_dtypes():
        # every contender a copy, the base too: weights loaded from a file can sit in other
        # pages (file-backed, no huge pages) than a copy's, which shows in the timings
        base = copy.deepcopy(loaded).to(harness.device(), harness.INFERENCE_DTYPES[dtype])
        models = contenders(base)
        if floor is None:
            floor = harness.linear_flops_floor(models["lorakit_unmerged"], RANK)
            floor["peft_adapted_layers"] = sum(1 for m in models["peft_unmerged"].modules() if hasattr(m, "lora_A"))
        suffix = "" if dtype == "fp32" else f" {dtype}"
        results.update({label + suffix: result for label, result in _batches(models, floor, quick).items()})
        del models, base
    dtypes = ", ".join(harness.inference_dtypes())
    return {"machine": harness.machine(), "model": harness.model_name(f"SmolLM2-135M ({dtypes})", quick, "tiny Llama"),
            "targets": "all-linear", "rank": RANK, **floor, "batches": results}


def _batches(models: dict, floor: dict, quick: bool) -> dict:
    """One dtype's pass: each batch size's timings and ratios."""
    base = models["base"]
    results = {}
    for label, (batch, length, reps) in (QUICK_BATCHES if quick else BATCHES).items():
        inputs = harness.token_batch(base, batch, length)
        reps = reps if quick else harness.reps(reps)
        samples, ms = harness.time_forwards(models, inputs, reps=reps, warmup=1 if quick else 2)
        overhead = {name: round(ms[name] / ms["base"] - 1, 4) for name in ms if name != "base"}
        paired = {name: round(harness.paired_overhead(samples, name, "base") / ms["base"], 4)
                  for name in ms if name != "base"}
        results[label] = {
            "reps": reps, "forward_ms": ms,
            "all_ms": {name: [round(t * 1000, 2) for t in s] for name, s in samples.items()},
            "overhead_vs_base": overhead, "paired_overhead_vs_base": paired,
            "merged_vs_base": harness.ratio(ms["lorakit_merged"], ms["base"]),
            "unmerged_overhead_minus_floor": round(overhead["lorakit_unmerged"] - floor["floor_adapted"], 4),
            "unfused_overhead_minus_floor": round(overhead["lorakit_unfused"] - floor["floor_adapted"], 4),
            "peft_unmerged_overhead_minus_floor": round(overhead["peft_unmerged"] - floor["floor_adapted"], 4),
        }
    return results


GOAL_MERGED = 1.01  # lorakit merged forward / base forward
GOAL_ABOVE_FLOOR = 0.02  # unmerged overhead minus the FLOP floor, as a fraction of the base forward


def markdown(result: dict) -> str:
    """The ``## Inference forward`` section of BENCHMARKS.md."""
    floor = result["floor_adapted"]
    rows = []
    for label, r in result["batches"].items():
        ms, over = r["forward_ms"], r["overhead_vs_base"]
        compiled = f"+{over['lorakit_compiled']:.1%}" if "lorakit_compiled" in over else ""
        rows.append([label, ms["base"], ms["lorakit_merged"], ms["lorakit_unmerged"], ms["lorakit_unfused"],
                     ms.get("lorakit_compiled"), ms["peft_unmerged"], ms["peft_merged"]])
        rows.append([f"{label}: / base", 1.0, r["merged_vs_base"], harness.ratio(ms["lorakit_unmerged"], ms["base"]),
                     harness.ratio(ms["lorakit_unfused"], ms["base"]),
                     harness.ratio(ms["lorakit_compiled"], ms["base"]) if "lorakit_compiled" in ms else None,
                     harness.ratio(ms["peft_unmerged"], ms["base"]), harness.ratio(ms["peft_merged"], ms["base"])])
        rows.append([f"{label}: goals", "", f"≤ {GOAL_MERGED}: {harness.verdict(r['merged_vs_base'], GOAL_MERGED)}",
                     f"≤ +{floor + GOAL_ABOVE_FLOOR:.1%}: {harness.verdict(r['unmerged_overhead_minus_floor'], GOAL_ABOVE_FLOOR)}",
                     f"+{over['lorakit_unfused']:.1%}", compiled, f"+{over['peft_unmerged']:.1%}", ""])
    paired = []
    for label, r in result["batches"].items():
        names = [n for n in ("lorakit_merged", "lorakit_unmerged", "lorakit_unfused", "lorakit_compiled",
                             "peft_unmerged", "peft_merged") if n in r["all_ms"]]
        paired.append(f"{label}: " + ", ".join(
            f"{n.replace('_', ' ').replace('peft', 'PEFT')} / base {harness.paired_ratio(r['all_ms'], n, 'base')}"
            for n in names))
    first = next(iter(result["batches"].values()))
    return f"""{harness.title("Inference forward", result["machine"])}

`python -m benchmarks inference`. Machine: {harness.describe(result['machine'])}

{result['model']}, LoRA rank {result['rank']} on {result['adapted_layers']} linear layers (all-linear), B non-zero,
one forward under `torch.inference_mode`, median of {first['reps']}+ runs after warm-up, all contenders
alternating. FLOP floor of the unmerged adapters: Σ r(d+k) / Σ dk over the adapted layers =
{floor:.2%} ({result['floor_all_linear']:.2%} of all linear layers' multiply-adds, head included).
*unmerged*: q/k/v and gate/up computed together (one read of x for their A's); *unfused*: every layer on its
own; *compiled*: unmerged under `torch.compile`. Goals: merged ≤ {GOAL_MERGED}× the base; unmerged overhead at
most {GOAL_ABOVE_FLOOR:.0%} points above the floor.

{harness.table(["forward ms", "base", "lorakit merged", "lorakit unmerged", "lorakit unfused", "lorakit compiled",
                "PEFT unmerged", "PEFT merged"], rows)}
{harness.paired_note(paired)}
"""


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(run(quick="--quick" in sys.argv[1:]), indent=2))
