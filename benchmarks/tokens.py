"""Trainable tokens (PEFT's ``trainable_token_indices``): lorakit's token rows beside PEFT's.

SmolLM2-135M (fp32; its output head shares the 49,152 × 576 embedding, so the head follows the
rows), LoRA rank 8 on q_proj and v_proj plus the rows of :data:`TOKENS` (16 tokens), AdamW,
dropout 0. *lorakit*: the rows looked up where those ids occur and the head's logits of those
ids computed from them (:mod:`lorakit.layers.tokens`); *PEFT*: the weight with the rows
written in, made afresh for the embedding and for the tied head at every forward; *LoRA
alone*: lorakit's LoRA without the rows (what the rows add). Training step at 4×128 and
inference forward at 1×128, the contenders alternating, reading the very same frozen
weights; peak memory of 3 steps of each in a fresh process. ``python -m benchmarks tokens``.
"""

from __future__ import annotations

import torch

from benchmarks import harness

CONTENDERS = ("lorakit", "peft", "lora-alone")
TOKENS = list(range(16))  # SmolLM2's special tokens (<|im_start|>, <|im_end|>, ...): what a chat fine-tune trains
RANK, TARGETS = 8, ["q_proj", "v_proj"]
TRAIN, INFER = (4, 128), (1, 128)
QUICK = dict(train=(2, 16), infer=(1, 16), reps=1)


def wrap(model, contender: str):
    if contender == "peft":
        import peft

        return peft.get_peft_model(model, peft.LoraConfig(r=RANK, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS,
                                                          trainable_token_indices=TOKENS, task_type="CAUSAL_LM"))
    from lorakit import LoraConfig
    from lorakit.model import attach

    tokens = TOKENS if contender == "lorakit" else None
    return attach(model, LoraConfig(r=RANK, alpha=16, target_modules=TARGETS, trainable_token_indices=tokens))


def _batch(model, shape) -> dict:
    batch = harness.token_batch(model, *shape)
    batch["input_ids"][:, ::8] = 1  # the trained tokens occur (every 8th position), as chat markers do
    batch["labels"] = batch["input_ids"].clone()
    return {k: v.to(harness.device()) for k, v in batch.items()}


def setup(contender: str, quick: bool, model=None):
    """One contender's training step (no arguments, returns the loss)."""
    model = harness.shared_copy(model) if model is not None else harness.causal_lm(quick)
    model = wrap(model.to(harness.device()), contender).train()
    batch = _batch(model, QUICK["train"] if quick else TRAIN)
    return harness.adamw_step(model, batch)


def run(quick: bool = False) -> dict:
    reps = QUICK["reps"] if quick else harness.reps(5)
    base = harness.causal_lm(quick)
    steps = {c: setup(c, quick, model=base) for c in CONTENDERS}
    train = harness.interleaved(steps, reps=reps, warmup=0 if quick else 1)
    inputs = {k: v for k, v in _batch(base, QUICK["infer"] if quick else INFER).items() if k != "labels"}

    def forward(model):
        def call():
            with torch.inference_mode():
                return model(**inputs)
        return call

    for step in steps.values():
        step.model.eval()
    infer = harness.interleaved({c: forward(s.model) for c, s in steps.items()}, reps=reps * 3,
                                warmup=0 if quick else 2)
    memory = {c: harness.peak_memory("benchmarks.tokens:setup", steps=1 if quick else 3, contender=c, quick=quick)
              for c in CONTENDERS}
    step_ms = {c: harness.median_ms(train[c]) for c in CONTENDERS}
    forward_ms = {c: harness.median_ms(infer[c]) for c in CONTENDERS}
    return {
        "machine": harness.machine(), "model": "tiny Llama" if quick else "SmolLM2-135M", "tokens": len(TOKENS),
        "train_batch": "x".join(map(str, QUICK["train"] if quick else TRAIN)),
        "infer_batch": "x".join(map(str, QUICK["infer"] if quick else INFER)), "reps": reps,
        "trainable_params": {c: s.trainable for c, s in steps.items()},
        "step_ms": step_ms, "forward_ms": forward_ms, "memory": memory,
        "step_vs_peft": harness.ratio(step_ms["lorakit"], step_ms["peft"]),
        "forward_vs_peft": harness.ratio(forward_ms["lorakit"], forward_ms["peft"]),
        "added_mb_vs_peft": harness.ratio(memory["lorakit"]["added_mb"], memory["peft"]["added_mb"]),
    }


def markdown(result: dict) -> str:
    """The ``## Trainable tokens`` section of BENCHMARKS.md."""
    names = {"lorakit": "lorakit", "peft": "PEFT", "lora-alone": "LoRA alone (lorakit, no rows)"}
    rows = [[names[c], f"{result['trainable_params'][c]:,}", result["step_ms"][c], result["forward_ms"][c],
             result["memory"][c]["peak_mb"], result["memory"][c]["added_mb"]] for c in CONTENDERS]
    return f"""## Trainable tokens

`python -m benchmarks tokens`. Machine: {harness.describe(result['machine'])}

{result['model']} (fp32, the output head tied to the embedding), LoRA rank {RANK} on q_proj and v_proj plus
PEFT's `trainable_token_indices` for {result['tokens']} tokens (the rows of the embedding and, through the tie,
of the head), AdamW; training step at {result['train_batch']} and inference forward at {result['infer_batch']}
(medians of {result['reps']} and {result['reps'] * 3}, the contenders alternating); memory: the
{result['memory']['lorakit']['method']} of 3 steps, each contender alone in a fresh process ("added": the steps'
peak minus the memory before the first). lorakit looks the rows up where their ids occur and computes only those
ids' logits from them; PEFT writes the rows into a fresh copy of the whole weight at every forward, for the
embedding and again for the tied head.

{harness.table(["contender", "trainable", "step ms", "forward ms", "peak MiB", "added MiB"], rows)}

lorakit / PEFT: step {result['step_vs_peft']}, forward {result['forward_vs_peft']}, memory the steps add
{result['added_mb_vs_peft']}. What the rows add to lorakit's LoRA: step
{harness.ratio(result['step_ms']['lorakit'], result['step_ms']['lora-alone'])}×, forward
{harness.ratio(result['forward_ms']['lorakit'], result['forward_ms']['lora-alone'])}×."""


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(run(quick="--quick" in sys.argv[1:]), indent=2))
