"""Many adapters on one base model: per-row batches, cold load, hot switch, merge/unmerge.

Per-row (issue 7, item 5): the embedded MiniLM-L6, 32 rank-8 adapters on query/value
(B non-zero), a batch of 32×64 whose rows use 1, 2, 8, 16 or 32 distinct adapters
(row ``i`` takes adapter ``i mod k``). lorakit's ``per_row_adapters`` (one gather and
two batched matmuls per layer) against PEFT's ``adapter_names=`` (a loop over the
distinct adapters in every layer), each reported as the time it adds over the base
model's forward, all contenders interleaved in one round. Also the plain forward with
one active adapter, the reference for "32 distinct cost at most 1.05× one adapter".

Load, switch, merge (item 6): the embedded SmolLM2-135M, rank 8 on all 210 linear
layers of its blocks. Cold load: the library's own load call from a saved folder (PEFT
format for both; the file is in the page cache after the first read) onto a model that
has adapters already, then the adapter is deleted again. Hot switch: make the other
of two loaded adapters the active one. Merge / unmerge: the active adapter into W and out.
``python -m benchmarks adapters [--quick]``.
"""

from __future__ import annotations

import copy
import statistics
import tempfile
from pathlib import Path

import torch

from benchmarks import harness

RANK = 8
DISTINCT = (1, 2, 8, 16, 32)
PER_ROW = dict(batch=32, length=64, reps=7)
QUICK_PER_ROW = dict(batch=32, length=8, reps=1)


# ---------------------------------------------------------------------- per-row


def _per_row_models(base, n: int, targets=("query", "value")):
    import peft

    from lorakit import LoraConfig
    from lorakit.model import add_adapter, set_active

    lk = harness.shared_copy(base)  # every contender reads the same frozen weights (none writes them)
    for i in range(n):
        # modules_to_save=[]: no per-adapter classifier head, as PEFT's config without task_type
        add_adapter(lk, LoraConfig(r=RANK, alpha=16, target_modules=list(targets), init="random", modules_to_save=[]),
                    f"a{i}")
    set_active(lk, "a0")
    config = peft.LoraConfig(r=RANK, lora_alpha=16, target_modules=list(targets), init_lora_weights=False)
    pf = peft.get_peft_model(harness.shared_copy(base), config, adapter_name="a0")
    for i in range(1, n):
        pf.add_adapter(f"a{i}", config)
    pf.set_adapter("a0")
    return lk.eval(), pf.eval()


def per_row(quick: bool) -> dict:
    from lorakit.per_row import per_row_adapters

    from lorakit.layers.fused import ungroup

    spec = QUICK_PER_ROW if quick else PER_ROW
    reps = spec["reps"] if quick else harness.reps(spec["reps"])
    base = harness.classifier(quick).to(harness.device())
    lk, pf = _per_row_models(base, max(DISTINCT))
    unfused = harness.shared_copy(lk)  # query and value on their own (lk computes them together)
    ungroup(unfused)
    inputs = harness.token_batch(base, spec["batch"], spec["length"])
    calls = {"base": lambda: base(**inputs), "lorakit_one": lambda: lk(**inputs), "peft_one": lambda: pf(**inputs)}
    for k in DISTINCT:
        rows = [f"a{i % k}" for i in range(spec["batch"])]

        def lorakit_rows(model, rows=rows):
            with per_row_adapters(model, rows):
                return model(**inputs)

        calls[f"lorakit_{k}"] = lambda rows=rows: lorakit_rows(lk, rows)
        calls[f"lorakit_unfused_{k}"] = lambda rows=rows: lorakit_rows(unfused, rows)
        calls[f"peft_{k}"] = lambda rows=rows: pf(**inputs, adapter_names=rows)
    with torch.inference_mode():
        samples = harness.interleaved(calls, reps=reps, warmup=1)
    ms = {name: harness.median_ms(s) for name, s in samples.items()}
    added = {name: harness.paired_overhead(samples, name, "base") for name in samples if name != "base"}
    by_k = {}
    for k in DISTINCT:
        lk_added, pf_added = added[f"lorakit_{k}"], added[f"peft_{k}"]
        by_k[str(k)] = {
            "lorakit_ms": ms[f"lorakit_{k}"], "peft_ms": ms[f"peft_{k}"],
            "lorakit_added_ms": lk_added, "peft_added_ms": pf_added,
            "added_vs_peft": round(lk_added / pf_added, 3) if pf_added > 0 else None,
            "lorakit_vs_one_adapter": harness.ratio(ms[f"lorakit_{k}"], ms["lorakit_one"]),
            "lorakit_unfused_ms": ms[f"lorakit_unfused_{k}"],
            "fused_vs_unfused": harness.ratio(ms[f"lorakit_{k}"], ms[f"lorakit_unfused_{k}"]),
        }
    return {
        "model": harness.model_name("MiniLM-L6", quick, "tiny BERT"), "targets": "query, value", "rank": RANK,
        "adapters_loaded": max(DISTINCT), "batch": f"{spec['batch']}x{spec['length']}", "reps": reps,
        "base_ms": ms["base"], "lorakit_one_ms": ms["lorakit_one"], "peft_one_ms": ms["peft_one"],
        "lorakit_one_added_ms": added["lorakit_one"], "peft_one_added_ms": added["peft_one"],
        "distinct": by_k,
        "all_ms": {name: [round(t * 1000, 2) for t in s] for name, s in samples.items()},
    }


# ---------------------------------------------------------------------- load, switch, merge


def _library_ops(base, folder: Path) -> dict:
    """Per library: ``load()`` (load then delete, returns the load's seconds), ``switch``,
    ``merge``, ``unmerge`` callables on a model holding adapters ``default`` and ``b``."""
    import peft

    from lorakit import LoraConfig
    from lorakit.io import load_adapter, save_adapter
    from lorakit.model import add_adapter, attach, delete_adapter, merge, set_active, unmerge

    lk = attach(copy.deepcopy(base), LoraConfig(r=RANK, alpha=16, target_modules="all-linear", init="random"))
    add_adapter(lk, LoraConfig(r=RANK, alpha=16, target_modules="all-linear", init="random"), "b")
    save_adapter(lk, folder / "lorakit", "default")
    config = peft.LoraConfig(r=RANK, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)
    pf = peft.get_peft_model(copy.deepcopy(base), config)
    pf.add_adapter("b", config)
    pf.save_pretrained(folder / "peft", selected_adapters=["default"])
    state = {"lk": "default", "pf": "default"}

    def lk_load():
        seconds = harness.timed(lambda: load_adapter(lk, folder / "lorakit", "cold", activate=False))
        delete_adapter(lk, "cold")
        return seconds

    def pf_load():
        seconds = harness.timed(lambda: pf.load_adapter(folder / "peft", adapter_name="cold"))
        pf.delete_adapter("cold")
        return seconds

    def lk_switch():
        state["lk"] = "b" if state["lk"] == "default" else "default"
        set_active(lk, state["lk"])

    def pf_switch():
        state["pf"] = "b" if state["pf"] == "default" else "default"
        pf.set_adapter(state["pf"])

    return {"lorakit": dict(load=lk_load, switch=lk_switch, merge=lambda: merge(lk), unmerge=lambda: unmerge(lk)),
            "peft": dict(load=pf_load, switch=pf_switch, merge=pf.merge_adapter, unmerge=pf.unmerge_adapter)}


def load_switch_merge(quick: bool) -> dict:
    reps = 1 if quick else harness.reps(7)
    base = harness.causal_lm(quick).to(harness.device())
    with tempfile.TemporaryDirectory(prefix="lorakit-bench-adapters-") as tmp:
        ops = _library_ops(base, Path(tmp))
        names = list(ops)
        for lib in names:  # warm-up: first load reads the file into the page cache
            ops[lib]["load"]()
            ops[lib]["merge"]()
            ops[lib]["unmerge"]()
        samples = {lib: {op: [] for op in ("load", "switch", "merge", "unmerge")} for lib in names}
        for rep in range(reps):
            for lib in names[rep % 2:] + names[:rep % 2]:
                samples[lib]["load"].append(ops[lib]["load"]())
                # a switch takes microseconds: time 20 and take the mean
                samples[lib]["switch"].append(harness.timed(lambda: [ops[lib]["switch"]() for _ in range(20)]) / 20)
                samples[lib]["merge"].append(harness.timed(ops[lib]["merge"]))
                samples[lib]["unmerge"].append(harness.timed(ops[lib]["unmerge"]))
    ms = {lib: {op: round(statistics.median(s) * 1000, 3) for op, s in by_op.items()} for lib, by_op in samples.items()}
    return {
        "model": harness.model_name("SmolLM2-135M (fp32)", quick, "tiny Llama"), "targets": "all-linear", "rank": RANK,
        "reps": reps, "ms": ms,
        "vs_peft": {op: harness.ratio(ms["lorakit"][op], ms["peft"][op]) for op in ms["lorakit"]},
    }


def bf16_round_trip(quick: bool) -> dict:
    """How many targeted weight tensors (and what fraction of their elements) a merge then
    unmerge in bf16 leaves changed, lorakit against PEFT (MiniLM, query/value, rank 8)."""
    import peft

    from lorakit import LoraConfig
    from lorakit.model import attach, lora_layers, merge, unmerge

    base = harness.classifier(quick).to(torch.bfloat16)
    lk = attach(copy.deepcopy(base), LoraConfig(r=RANK, alpha=16, target_modules=["query", "value"], init="random",
                                                modules_to_save=[]))
    pf = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=RANK, lora_alpha=16, target_modules=["query", "value"],
                                                                  init_lora_weights=False))
    before = {"lorakit": [layer.weight.detach().clone() for _, layer in lora_layers(lk)],
              "peft": [m.weight.detach().clone() for m in pf.modules() if hasattr(m, "lora_A") and hasattr(m, "weight")]}
    merge(lk)
    unmerge(lk)
    pf.merge_adapter()
    pf.unmerge_adapter()
    after = {"lorakit": [layer.weight for _, layer in lora_layers(lk)],
             "peft": [m.weight for m in pf.modules() if hasattr(m, "lora_A") and hasattr(m, "weight")]}
    out = {}
    for lib in before:
        changed = [int((a != b).sum()) for a, b in zip(before[lib], after[lib])]
        total = sum(w.numel() for w in before[lib])
        out[lib] = {"tensors": len(changed), "tensors_changed": sum(c > 0 for c in changed),
                    "elements_changed": round(sum(changed) / total, 4)}
    return out


def run(quick: bool = False) -> dict:
    return {"machine": harness.machine(), "per_row": per_row(quick), "load_switch_merge": load_switch_merge(quick),
            "bf16_merge_unmerge": bf16_round_trip(quick)}


GOAL_ADDED_16 = 0.5  # time per-row adapters add over the base, lorakit / PEFT, 16 distinct
GOAL_32_VS_ONE = 1.05  # lorakit's forward with 32 distinct adapters / with one adapter


def markdown(result: dict) -> str:
    """The ``## Many adapters`` section of BENCHMARKS.md: per-row batches, load, switch, merge."""
    pr, lsm = result["per_row"], result["load_switch_merge"]
    rows = [["1 adapter, plain forward", pr["lorakit_one_ms"], "", pr["peft_one_ms"], f"+{pr['lorakit_one_added_ms']:.1f}",
             f"+{pr['peft_one_added_ms']:.1f}", "", 1.0, "", ""]]
    for k, r in pr["distinct"].items():
        goal = f"added ≤ {GOAL_ADDED_16}× PEFT's" if k == "16" else (f"≤ {GOAL_32_VS_ONE}× one adapter" if k == "32" else "")
        met = (harness.verdict(r["added_vs_peft"], GOAL_ADDED_16) if k == "16" else
               harness.verdict(r["lorakit_vs_one_adapter"], GOAL_32_VS_ONE) if k == "32" else "")
        rows.append([f"{k} distinct, per-row", r["lorakit_ms"], r.get("lorakit_unfused_ms"), r["peft_ms"],
                     f"+{r['lorakit_added_ms']:.1f}", f"+{r['peft_added_ms']:.1f}", r["added_vs_peft"],
                     r["lorakit_vs_one_adapter"], goal, met])
    ops = [[op, lsm["ms"]["lorakit"][op], lsm["ms"]["peft"][op], lsm["vs_peft"][op]]
           for op in ("load", "switch", "merge", "unmerge")]
    return f"""{harness.title("Many adapters", result["machine"])}

`python -m benchmarks adapters`. Machine: {harness.describe(result['machine'])}

**Per-row adapters**: {pr['model']}, {pr['adapters_loaded']} adapters of rank {pr['rank']} on {pr['targets']}, batch
{pr['batch']}, row i using adapter i mod k; lorakit `per_row_adapters` (query and value computed together; *unfused*:
each on its own) against PEFT `adapter_names=`; time added over
the base forward ({pr['base_ms']:.1f} ms) is the median over rounds of (contender − base of the same round); median of
{pr['reps']} rounds after warm-up, all contenders alternating. Goals: with 16 distinct adapters, lorakit adds at most
half of what PEFT adds; with 32 distinct, lorakit's forward ≤ {GOAL_32_VS_ONE}× its plain one-adapter forward.

{harness.table(["adapters in the batch", "lorakit ms", "lorakit unfused ms", "PEFT ms", "lorakit adds ms",
                "PEFT adds ms", "lorakit / PEFT added", "lorakit / its one-adapter forward", "goal", "met"], rows)}
**Load, switch, merge**: {lsm['model']}, rank {lsm['rank']}, {lsm['targets']}; median of {lsm['reps']}, alternating.
Load: the library's own call on a folder in PEFT's format (page cache warm) onto a model already holding two
adapters; switch: make the other of two adapters active (mean of 20); merge / unmerge: the active adapter.

{harness.table(["operation", "lorakit ms", "PEFT ms", "lorakit / PEFT"], ops)}{_round_trip_md(result)}"""


def _round_trip_md(result: dict) -> str:
    rt = result.get("bf16_merge_unmerge")
    if not rt:
        return ""
    lk, pf = rt["lorakit"], rt["peft"]
    return (f"\nA merge → unmerge cycle in bf16 (MiniLM, query/value) left {lk['tensors_changed']} of {lk['tensors']} "
            f"targeted weight tensors changed with lorakit ({lk['elements_changed']:.0%} of their elements), "
            f"{pf['tensors_changed']} of {pf['tensors']} with PEFT ({pf['elements_changed']:.0%}).\n")


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(run(quick="--quick" in sys.argv[1:]), indent=2))
