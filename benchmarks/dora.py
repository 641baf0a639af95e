"""DoRA: lorakit's DoRA training step beside lorakit's LoRA step and PEFT's DoRA step, and
DoRA per-row forwards with 16 distinct adapters beside one adapter (issue 13, item 1).

Training: the two cases of :mod:`benchmarks.training` (MiniLM classifier, query/value,
32×64; SmolLM2-135M, every linear layer of the blocks, 4×128), rank 8, AdamW, dropout 0,
the three contenders alternating step by step in one process, reading the very same frozen
weights (:func:`benchmarks.harness.shared_copy`); the median after warm-up counts. Goals:
DoRA's step at most 1.3× lorakit LoRA's, and faster than PEFT's DoRA.

Per-row: the MiniLM encoder (query/value), 16 rows of 64 tokens, inference mode. ``16``:
each row its own DoRA adapter (one gather, two ``bmm`` and one multiply by each row's
``m / ‖W + s·B·A‖`` per layer); ``1``: every row the same adapter through the same
per-row path; ``active``: that one adapter set active (no per-row machinery).
``python -m benchmarks dora [--quick]``.
"""

from __future__ import annotations

import torch

from benchmarks import harness
from benchmarks.training import CASES, QUICK, RANK, _batch, _model

CONTENDERS = ("lorakit-dora", "lorakit-lora", "peft-dora")
ROWS, ROW_LENGTH = 16, 64
GOAL_VS_LORA = 1.3  # lorakit DoRA step / lorakit LoRA step
GOAL_VS_PEFT = 1.0  # lorakit DoRA step / PEFT DoRA step (below: faster)


def wrap(model, case: str, contender: str):
    """``model`` with rank-8 LoRA or DoRA on the case's targets (the head trained in full)."""
    spec = CASES[case]
    dora = contender.endswith("dora")
    if contender.startswith("lorakit"):
        from lorakit import LoraConfig
        from lorakit.model import attach

        return attach(model, LoraConfig(r=RANK, alpha=16, target_modules=spec["targets"], use_dora=dora,
                                        modules_to_save=spec["head"]))
    import peft

    config = peft.LoraConfig(r=RANK, lora_alpha=16, lora_dropout=0.0, target_modules=spec["targets"], use_dora=True,
                             task_type="SEQ_CLS" if case == "minilm" else "CAUSAL_LM")
    return peft.get_peft_model(model, config)


def setup(case: str, contender: str, quick: bool, model=None):
    """One contender's training step (no arguments, returns the loss)."""
    # the contenders read the very same frozen weights (none writes them: DoRA's magnitude is its own)
    model = harness.shared_copy(model) if model is not None else _model(case, quick)
    model = wrap(model.to(harness.device()), case, contender).train()
    batch = _batch(case, model, quick)
    return harness.adamw_step(model, batch)


def run_steps(case: str, quick: bool) -> dict:
    reps = 1 if quick else CASES[case]["reps"]
    base = _model(case, quick)
    steps = {c: setup(case, c, quick, model=base) for c in CONTENDERS}
    samples = harness.interleaved(steps, reps=reps, warmup=0 if quick else 2)
    ms = {c: harness.median_ms(samples[c]) for c in CONTENDERS}
    spec = {**CASES[case], **(QUICK if quick else {})}
    return {
        "model": ("tiny BERT" if case == "minilm" else "tiny Llama") if quick else
                 ("MiniLM-L6 classifier" if case == "minilm" else "SmolLM2-135M"),
        "targets": spec["targets"], "batch": f"{spec['batch']}x{spec['length']}", "reps": reps,
        "trainable_params": {c: steps[c].trainable for c in CONTENDERS},
        "step_ms": ms,
        "dora_vs_lora": harness.ratio(ms["lorakit-dora"], ms["lorakit-lora"]),
        "dora_vs_peft": harness.ratio(ms["lorakit-dora"], ms["peft-dora"]),
        "peft_dora_vs_lora": harness.ratio(ms["peft-dora"], ms["lorakit-lora"]),
    }


def run_per_row(quick: bool) -> dict:
    """DoRA per-row forwards: 16 distinct adapters, one adapter in every row, one active adapter."""
    from lorakit import LoraConfig
    from lorakit.model import add_adapter, set_active
    from lorakit.per_row import per_row_adapters

    model = _model("minilm", quick).to(harness.device())
    rows, length = (4, 16) if quick else (ROWS, ROW_LENGTH)
    generator = torch.Generator().manual_seed(0)
    for i in range(rows):
        add_adapter(model, LoraConfig(r=RANK, alpha=16, target_modules=CASES["minilm"]["targets"], use_dora=True,
                                      modules_to_save=[]), f"a{i}")
    with torch.no_grad():  # trained-looking adapters: B off zero, m off the norm
        for name, p in model.named_parameters():
            if ".adapters." in name:
                p.add_(torch.randn(p.shape, generator=generator).to(p.device) * 0.02)
    inputs = harness.token_batch(model, rows, length)
    distinct, same = [f"a{i}" for i in range(rows)], ["a0"] * rows

    def per_row(names):
        def forward():
            with per_row_adapters(model, names):
                return model(**inputs)
        return forward

    def active():
        return model(**inputs)

    set_active(model, "a0")
    with torch.inference_mode():
        samples = harness.interleaved({"16": per_row(distinct), "1": per_row(same), "active": active},
                                      reps=1 if quick else 15, warmup=0 if quick else 3)
    ms = {k: harness.median_ms(v) for k, v in samples.items()}
    return {"rows": rows, "length": length, "adapters": rows, "forward_ms": ms,
            "distinct_vs_one": harness.ratio(ms["16"], ms["1"]), "one_vs_active": harness.ratio(ms["1"], ms["active"])}


def run(quick: bool = False) -> dict:
    return {"machine": harness.machine(), **{case: run_steps(case, quick) for case in CASES},
            "per_row": run_per_row(quick)}


def markdown(result: dict) -> str:
    """The ``## DoRA`` section of BENCHMARKS.md."""
    rows = []
    for case in CASES:
        r = result[case]
        ms = r["step_ms"]
        label = f"{r['model']}, {r['targets'] if isinstance(r['targets'], str) else '/'.join(r['targets'])}, {r['batch']}"
        rows.append([label, ms["lorakit-dora"], ms["lorakit-lora"], ms["peft-dora"],
                     f"{r['dora_vs_lora']} (≤ {GOAL_VS_LORA}: {harness.verdict(r['dora_vs_lora'], GOAL_VS_LORA)})",
                     f"{r['dora_vs_peft']} (< {GOAL_VS_PEFT}: {harness.verdict(r['dora_vs_peft'], GOAL_VS_PEFT)})"])
    p = result["per_row"]
    per_row = [[f"{p['rows']} rows x {p['length']} tokens", p["forward_ms"]["16"], p["forward_ms"]["1"],
                p["forward_ms"]["active"], p["distinct_vs_one"]]]
    first = result[next(iter(CASES))]
    return f"""## DoRA

`python -m benchmarks dora`. Machine: {harness.describe(result['machine'])}

Training step, rank {RANK}, AdamW, dropout 0, model in train mode; median of
{' / '.join(f"{result[c]['reps']} ({result[c]['model']})" for c in CASES)} steps after warm-up, the three
contenders alternating step by step in one process.

{harness.table(["case", "lorakit DoRA ms", "lorakit LoRA ms", "PEFT DoRA ms", "DoRA / LoRA", "lorakit / PEFT DoRA"],
               rows)}

Per-row DoRA forwards ({first['model'] if 'tiny' in first['model'] else 'MiniLM-L6'}, query/value, inference mode):
*{p['adapters']} adapters*: every row its own; *1 adapter*: every row the same one, through the same per-row path;
*active*: that adapter set active, no per-row machinery (PEFT refuses DoRA with `adapter_names`).

{harness.table(["batch", f"{p['adapters']} adapters ms", "1 adapter ms", "active ms", f"{p['adapters']} / 1"], per_row)}"""


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(run(quick="--quick" in sys.argv[1:]), indent=2))
