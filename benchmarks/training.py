"""One training step, lorakit beside PEFT and full fine-tuning: median time and peak memory.

Two cases (issue 7, items 1 and 2), AdamW (lr 1e-4), LoRA rank 8, LoRA dropout 0, the
model in train mode (its own dropout stays as it is for all contenders):

- ``minilm``: the embedded MiniLM-L6 classifier (2 labels), LoRA on query/value, the
  classifier head trained in full (PEFT's ``task_type="SEQ_CLS"`` does the same), batch
  32×64, cross-entropy on random labels.
- ``smollm2``: the embedded SmolLM2-135M, LoRA on every linear layer of the blocks,
  batch 4×128, the causal-LM loss on the input itself.

A step is ``zero_grad; loss; loss.backward(); optimizer.step()``, the loss computed as each
library's users get it: on SmolLM2, lorakit's contenders, full fine-tuning and the floor compute
the causal-LM loss as ``lorakit train`` does (:func:`lorakit.chunked_loss.causal_lm_loss`: the
output head applied a chunk of tokens at a time, its gradient made in the forward, the whole
logits never held), PEFT transformers' own (``model(**batch).loss``, over the whole
``(tokens, vocabulary)`` logits, as the Hugging Face Trainer computes it); the two losses are
equal (the first step's are returned). On MiniLM every contender takes ``model(**batch).loss``
(a classifier's loss is the same code in both).
Contenders: ``lorakit`` (layers reading one input computed together, the default),
``lorakit_unfused`` (every layer on its own, :func:`lorakit.layers.fused.ungroup`), ``peft``,
``full`` (every weight trains), ``floor`` (the frozen base model whose embedding output
requires grad: forward and the backward to the inputs, no weight gradient at all: what any
LoRA step must cost at least, plus the adapters' own small matmuls), and, unless
``LORAKIT_BENCH_COMPILE=0``, ``lorakit_compiled`` (the lorakit model under ``torch.compile``;
its compilation is in the warm-up, not in the times).
Time: the contenders live in one process and alternate step by step; the median
after warm-up counts. They share the frozen weights' tensors (:func:`benchmarks.harness.shared_copy`;
full fine-tuning, which writes them, has its own copy). Memory: each contender alone in a fresh process (see
:func:`benchmarks.harness.peak_memory`), ``added_mb`` being what the steps add to the
loaded model (activations kept for backward, gradients, AdamW state).
``python -m benchmarks training [--quick]``.
"""

from __future__ import annotations

import copy

import torch

from benchmarks import harness
from lorakit.chunked_loss import causal_lm_loss

CONTENDERS = ("lorakit", "lorakit_unfused", "peft", "full", "floor")
COMPILED = ("lorakit_compiled",)  # timed, not measured for memory (a fresh process would compile again)
CASES = {
    "minilm": dict(batch=32, length=64, targets=["query", "value"], head=["classifier"], reps=7),
    "smollm2": dict(batch=4, length=128, targets="all-linear", head=None, reps=5),  # a step: seconds
}
QUICK = dict(batch=4, length=16, reps=1)
RANK = 8


def _model(case: str, quick: bool):
    return harness.classifier(quick) if case == "minilm" else harness.causal_lm(quick)


def _batch(case: str, model, quick: bool) -> dict:
    spec = {**CASES[case], **(QUICK if quick else {})}
    batch = harness.token_batch(model, spec["batch"], spec["length"])
    if case == "minilm":
        batch["labels"] = torch.randint(0, 2, (spec["batch"],), generator=torch.Generator().manual_seed(1))
    else:
        batch["labels"] = batch["input_ids"].clone()
    return {k: v.to(harness.device()) for k, v in batch.items()}


def wrap(model, case: str, contender: str):
    """``model`` ready to train as ``contender``: lorakit- or PEFT-wrapped, or all trainable."""
    spec = CASES[case]
    if contender == "floor":
        for p in model.parameters():
            p.requires_grad_(False)
        model.get_input_embeddings().register_forward_hook(lambda module, args, out: out.requires_grad_())
        return model
    if contender == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if contender.startswith("lorakit"):
        from lorakit import LoraConfig
        from lorakit.layers.fused import ungroup
        from lorakit.model import attach

        model = attach(model, LoraConfig(r=RANK, alpha=16, dropout=0.0, target_modules=spec["targets"],
                                         modules_to_save=spec["head"]))
        if contender == "lorakit_unfused":
            ungroup(model)
        if contender == "lorakit_compiled":
            model.compile(backend=harness.compile_backend())
        return model
    if contender == "peft":
        import peft

        config = peft.LoraConfig(r=RANK, lora_alpha=16, lora_dropout=0.0, target_modules=spec["targets"],
                                 task_type="SEQ_CLS" if case == "minilm" else "CAUSAL_LM")
        return peft.get_peft_model(model, config)
    raise ValueError(f"unknown contender {contender!r}; choose from {CONTENDERS + COMPILED}")


def setup(case: str, contender: str, quick: bool, model=None):
    """Build one contender; return its step function (no arguments, returns the loss)."""
    if model is not None:  # every contender but full fine-tuning reads the very same frozen weights
        model = copy.deepcopy(model) if contender == "full" else harness.shared_copy(model)
    else:
        model = _model(case, quick)
    model = wrap(model.to(harness.device()), case, contender).train()
    batch = _batch(case, model, quick)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4) if params else None

    cast = harness.autocast_dtype()
    chunked = case == "smollm2" and contender != "peft"  # what lorakit train computes; PEFT's users, transformers'

    def step():
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
        with torch.autocast(harness.device(), dtype=cast or torch.bfloat16, enabled=cast is not None):
            if chunked:
                total, count = causal_lm_loss(model, batch)
                loss = total / count
            else:
                loss = model(**batch).loss
        loss.backward()
        if optimizer is not None:
            optimizer.step()
        return loss

    step.trainable = sum(p.numel() for p in params)
    step.optimizer = optimizer
    return step


def _first_loss_kept(step):
    """``step`` that keeps the loss of its first call in ``.first_loss``."""
    def call():
        loss = step()
        if call.first_loss is None:
            call.first_loss = round(float(loss.detach()), 5)
        return loss

    call.first_loss, call.trainable, call.optimizer = None, step.trainable, step.optimizer
    return call


def run_case(case: str, quick: bool) -> dict:
    reps = 1 if quick else harness.reps(CASES[case]["reps"])
    base = _model(case, quick)
    timed = CONTENDERS + (COMPILED if harness.compile_enabled() else ())
    steps = {c: _first_loss_kept(setup(case, c, quick, model=base)) for c in timed}
    del base
    # the first step allocates gradients and AdamW state (and compiles); the second runs warm
    samples = harness.interleaved(steps, reps=reps, warmup=1 if quick else (2 if case == "minilm" else 1))
    if quick or harness.device() == "cuda":
        # the smoke run, and a GPU (whose allocated bytes are exact in one process): in this process,
        # where the peak counts every contender's weights and only "added" compares them
        memory = {c: harness.measure_here(lambda: steps[c], steps=1 if quick else 3) for c in CONTENDERS}
    else:
        memory = {c: harness.peak_memory("benchmarks.training:setup", steps=3, case=case, contender=c,
                                         quick=quick) for c in CONTENDERS}
    kernels = {c: harness.kernel_ops(steps[c], steps[c].optimizer) for c in CONTENDERS}
    ms = {c: harness.median_ms(samples[c]) for c in timed}
    spec = {**CASES[case], **(QUICK if quick else {})}
    return {
        "model": harness.model_name("MiniLM-L6 classifier" if case == "minilm" else "SmolLM2-135M", quick,
                                    "tiny BERT" if case == "minilm" else "tiny Llama"),
        "targets": spec["targets"], "rank": RANK, "batch": f"{spec['batch']}x{spec['length']}",
        "reps": reps, "precision": "bf16 autocast" if harness.autocast_dtype() else "fp32",
        "trainable_params": {c: steps[c].trainable for c in timed},
        "step_ms": ms,
        "first_loss": {c: steps[c].first_loss for c in timed},  # the same weights: the same loss, however computed
        "step_all_ms": {c: [round(t * 1000, 2) for t in samples[c]] for c in timed},
        "memory": memory,
        "kernel_ops": kernels,  # per step, the optimizer's left out (benchmarks.harness.kernel_ops)
        "extra_kernel_ops_vs_peft": harness.ratio(kernels["lorakit"] - kernels["floor"],
                                                  kernels["peft"] - kernels["floor"]),
        "fused_vs_unfused": harness.ratio(ms["lorakit"], ms["lorakit_unfused"]),
        "unfused_vs_floor": harness.ratio(ms["lorakit_unfused"], ms["floor"]),
        "compiled_vs_eager": harness.ratio(ms["lorakit_compiled"], ms["lorakit"]) if "lorakit_compiled" in ms else None,
        "time_vs_peft": harness.ratio(ms["lorakit"], ms["peft"]),
        "peft_vs_full": harness.ratio(ms["peft"], ms["full"]),
        "floor_vs_full": harness.ratio(ms["floor"], ms["full"]),
        "lorakit_vs_floor": harness.ratio(ms["lorakit"], ms["floor"]),
        "peft_vs_floor": harness.ratio(ms["peft"], ms["floor"]),
        "lorakit_vs_full": harness.ratio(ms["lorakit"], ms["full"]),
        "peak_vs_peft": harness.ratio(memory["lorakit"]["peak_mb"], memory["peft"]["peak_mb"]),
        "added_vs_peft": harness.ratio(memory["lorakit"]["added_mb"], memory["peft"]["added_mb"]),
    }


def run(quick: bool = False) -> dict:
    """Both cases; returns ``{"machine": ..., "minilm": {...}, "smollm2": {...}}``."""
    return {"machine": harness.machine(), **{case: run_case(case, quick) for case in CASES}}


# issue 15: lorakit's step / the floor's and / PEFT's, per case; on a GPU / PEFT's
GOALS_CPU = {"minilm": {"floor": 1.02}, "smollm2": {"floor": 1.05, "peft": 0.9}}
GOALS_GPU = {"minilm": {"peft": 0.8}, "smollm2": {"peft": 0.8}}
GOAL_MEMORY = 0.85  # lorakit's peak memory / PEFT's (issue 7)


def _first_losses(result: dict) -> str:
    """The first step's loss of each contender on SmolLM2, or a dash for results without them."""
    first = result.get("smollm2", {}).get("first_loss")
    return ", ".join(f"{name} {loss}" for name, loss in first.items()) if first else "–"


def _goals(result: dict, case: str) -> tuple[str, str]:
    """``(goal text, met)`` of one case's step time, judged on each round's own ratio
    (:func:`harness.paired_ratio`) where the rounds were kept, else on the ratio of medians."""
    r = result[case]
    goals = (GOALS_GPU if result["machine"].get("gpu") else GOALS_CPU)[case]
    values = {"floor": r["lorakit_vs_floor"], "peft": r["time_vs_peft"]}
    if r.get("step_all_ms"):
        values = {k: harness.paired_ratio(r["step_all_ms"], "lorakit", k) for k in values}
    text = ", ".join(f"≤ {goal}× {'the floor' if k == 'floor' else 'PEFT'}" for k, goal in goals.items())
    met = all(harness.verdict(values[k], goal) == "yes" for k, goal in goals.items())
    return text, "yes" if met else "**no**"


def _kernels_note(result: dict) -> str:
    """The operators each contender's step dispatches (a GPU launches a kernel for each)."""
    parts = []
    for case in CASES:
        r = result[case]
        k = r.get("kernel_ops")
        if not k:
            continue
        parts.append(f"{r['model']}: lorakit {k['lorakit']}, unfused {k['lorakit_unfused']}, PEFT {k['peft']}, "
                     f"floor {k['floor']}, full FT {k['full']}; beyond the floor lorakit launches "
                     f"{r['extra_kernel_ops_vs_peft']}× what PEFT launches")
    if not parts:
        return ""
    return ("\nOperators that compute, dispatched by one step (views and allocations left out, the optimizer's step "
            "too; on a GPU each launches a kernel, and at these sizes the launches are what a step waits on): "
            + "; ".join(parts) + ".\n")


def _one_process(memory: dict) -> bool:
    """Whether the contenders' memory was measured in the benchmark's one process (on a GPU)."""
    return memory["lorakit"]["method"] == "torch.cuda.max_memory_allocated"


def _memory_note(memory: dict) -> str:
    if _one_process(memory):
        return ("Memory: `torch.cuda.max_memory_allocated` during 3 steps after the warm-up, in the benchmark's one "
                "process: the peak holds every contender's weights, so only \"add\" compares them (what a step "
                "allocates beyond the memory it keeps: activations, the loss, transients; gradients and AdamW state "
                "already exist).")
    return ("Memory: each contender alone in a fresh process, peak during 3 steps; \"add\" is the peak minus the "
            "memory of the loaded, wrapped model before the first step (activations, gradients, AdamW state).")


def markdown(result: dict) -> str:
    """The ``## Training step`` section of BENCHMARKS.md: step times side by side, then memory."""
    times, memory = [], []
    for case in CASES:
        r = result[case]
        ms, mem = r["step_ms"], r["memory"]
        label = f"{r['model']}, {r['targets'] if isinstance(r['targets'], str) else '/'.join(r['targets'])}, {r['batch']}"
        goal, met = _goals(result, case)
        times.append([label, ms["lorakit"], ms["lorakit_unfused"], ms.get("lorakit_compiled"), ms["peft"], ms["floor"],
                      ms["full"], r["lorakit_vs_floor"], r["unfused_vs_floor"], r["time_vs_peft"],
                      r["compiled_vs_eager"], goal, met])
        unit = "peak RSS MiB" if "RSS" in mem["lorakit"]["method"] else "peak MiB"
        shared = _one_process(mem)  # the peak holds every contender's weights: not a comparison
        memory.append([f"{label}: {unit}", mem["lorakit"]["peak_mb"], mem["peft"]["peak_mb"], r["peak_vs_peft"],
                       "" if shared else f"≤ {GOAL_MEMORY}",
                       "" if shared else harness.verdict(r["peak_vs_peft"], GOAL_MEMORY), mem["full"]["peak_mb"],
                       mem["floor"]["peak_mb"]])
        memory.append([f"{label}: MiB the steps add", mem["lorakit"]["added_mb"], mem["peft"]["added_mb"],
                       r["added_vs_peft"], f"≤ {GOAL_MEMORY}", harness.verdict(r["added_vs_peft"], GOAL_MEMORY),
                       mem["full"]["added_mb"], mem["floor"]["added_mb"]])
    paired = []
    for case in CASES:
        samples, r = result[case]["step_all_ms"], result[case]
        pairs = [("lorakit", "floor"), ("lorakit", "peft"), ("lorakit", "lorakit_unfused")]
        paired.append(f"{r['model']}: " + ", ".join(
            f"{a.replace('lorakit_', '')} / {b.replace('lorakit_', '').replace('peft', 'PEFT')} "
            f"{harness.paired_ratio(samples, a, b)}" for a, b in pairs))
    first = result[next(iter(CASES))]
    return f"""{harness.title("Training step", result["machine"])}

`python -m benchmarks training`. Machine: {harness.describe(result['machine'])}

AdamW, LoRA rank {first['rank']}, LoRA dropout 0, model in train mode, {first.get('precision', 'fp32')}. Step time: median of
{' / '.join(f"{result[c]['reps']} ({result[c]['model']})" for c in CASES)} steps after warm-up, all
contenders alternating step by step in one process. *lorakit*: layers reading one input (q/k/v, gate/up)
computed together; *unfused*: every layer on its own; *compiled*: lorakit under `torch.compile` (compilation
not counted). *floor*: the frozen model, backward to the inputs only, no weight gradient: the least any LoRA
step can cost. The loss as each library's users get it: on SmolLM2 lorakit's contenders, the floor and full
fine-tuning compute the causal-LM loss as `lorakit train` does (the head a chunk of tokens at a time, the
whole logits never held), PEFT transformers' own over the whole logits
(first losses: {_first_losses(result)}). {_memory_note(first["memory"])}

{harness.table(["step ms", "lorakit", "unfused", "compiled", "PEFT", "floor", "full FT", "lorakit / floor",
                "unfused / floor", "lorakit / PEFT", "compiled / lorakit", "goal", "met"], times)}
{harness.paired_note(paired)} The goal column is judged on these.
{_kernels_note(result)}

{harness.table(["memory", "lorakit", "PEFT", "lorakit / PEFT", "goal", "met", "full FT", "floor"], memory)}"""


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(run(quick="--quick" in sys.argv[1:]), indent=2))
