"""Memory levers side by side (issue 12): a quantized base, activation checkpointing, the
chunked loss, each alone and together; PEFT + bitsandbytes QLoRA beside lorakit's; and
``lorakit inspect --memory`` against the measured peaks.

Cases (``quick=True`` runs every one on tiny random models, to keep the script working):

- ``levers``: SmolLM2-135M, LoRA r=8 on every linear layer of the blocks, AdamW, batch
  8×256, fp32 (a CPU without bf16): ``plain`` (no lever, the whole logits), ``nf4``,
  ``checkpointing``, ``chunked`` and ``all`` three. Memory: each alone in a fresh process,
  the peak resident set during 3 steps and what the steps add over the loaded, wrapped
  model (:func:`benchmarks.harness.peak_memory`); time: the five alternating step by step
  in one process.
- ``bytes``: the frozen linear weights' bytes in nf4 against bf16; the embedding (tied to
  the output head in SmolLM2, kept dense) on its own line.
- ``qlora``: lorakit nf4 (chunked loss) against PEFT + bitsandbytes 4-bit (nf4, double
  quantization, fp32 compute, PEFT's LoRA on all linear layers, the model's own loss) at
  8×128 and 4×12: step time and peak memory.
- ``quality``: ``lorakit train --task chat`` 100 steps at 8×128, fp32, all-linear, plain
  against nf4: the validation loss after.
- ``defaults``: ``lorakit train --task chat --no-bf16`` at its defaults (5 steps) and with the
  levers (micro-batches of 8 with gradient accumulation 4: the same global batch;
  checkpointing; nf4): peak RSS of the steps and the validation loss after.
- ``predicted``: :func:`lorakit.memory.predict_peak` against the same step run on real
  tensors in a fresh process (:func:`lorakit.memory.training_step`): MiniLM, SmolLM2 and a
  random-initialised Llama of ~1B parameters (Llama-3.2-1B's shape), LoRA with and without
  nf4; full fine-tuning of the 1B model predicted only (it does not fit 24 GiB).

``python -m benchmarks memory [--quick]``.
"""

from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path

import torch

from benchmarks import harness

RANK = 8
LEVERS = {"plain": {}, "nf4": {"quantize": "nf4"}, "checkpointing": {"checkpointing": True},
          "chunked": {"chunked": True}, "all": {"quantize": "nf4", "checkpointing": True, "chunked": True}}
LEVER_CASE = dict(batch=8, length=256, reps=3)
QLORA_SHAPES = ((8, 128), (4, 12))
QUICK = dict(batch=2, length=16, reps=1)
BUDGET_GIB = 24
LLAMA_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True, max_position_embeddings=2048)
GOALS = {"nf4_bytes_vs_bf16": 0.3, "all_added_vs_plain": 0.5, "nf4_time": 1.5, "checkpointing_time": 1.4,
         "chunked_time": 1.05, "peft_bnb_time_vs_lorakit": 10.0, "quality_gap": 0.02, "prediction_error": 0.15,
         "defaults_peak_gb": 2.0}


# ---------------------------------------------------------------- levers


def _lm(quick: bool, wide: bool = False):
    """SmolLM2 in fp32, or a tiny Llama (``wide``: 128 hidden, as bitsandbytes' CPU kernels need)."""
    if quick and wide:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256,
                                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                            tie_word_embeddings=True)).eval()
    return harness.causal_lm(quick)


def setup_lever(lever: str, quick: bool, batch: int | None = None, length: int | None = None, model=None):
    """SmolLM2 with LoRA and ``lever``; returns its step function (AdamW, the LM loss)."""
    from lorakit import LoraConfig, attach
    from lorakit.checkpointing import enable_checkpointing
    from lorakit.chunked_loss import CHUNK_BYTES, causal_lm_loss
    from lorakit.quantize import quantize_base

    spec = {**LEVER_CASE, **(QUICK if quick else {})}
    batch, length = batch or spec["batch"], length or spec["length"]
    levers = LEVERS[lever]
    model = copy.deepcopy(model) if model is not None else _lm(quick)
    attach(model, LoraConfig(r=RANK, alpha=16, target_modules="all-linear")).train()
    if levers.get("quantize"):
        quantize_base(model, levers["quantize"])
    if levers.get("checkpointing"):
        enable_checkpointing(model)
    data = harness.token_batch(model, batch, length)
    data["labels"] = data["input_ids"].clone()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    chunk = CHUNK_BYTES if levers.get("chunked") else None

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss, count = causal_lm_loss(model, data, chunk_bytes=chunk)
        (loss / count).backward()
        optimizer.step()
        return loss

    return step


def run_levers(quick: bool) -> dict:
    spec = {**LEVER_CASE, **(QUICK if quick else {})}
    base = _lm(quick)
    steps = {lever: setup_lever(lever, quick, model=base) for lever in LEVERS}
    del base
    samples = harness.interleaved(steps, reps=spec["reps"], warmup=0 if quick else 1)
    ms = {lever: harness.median_ms(s) for lever, s in samples.items()}
    memory = {lever: _memory("benchmarks.memory:setup_lever", quick, steps[lever], lever=lever, quick=quick)
              for lever in LEVERS}
    plain = memory["plain"]
    return {
        "model": "tiny Llama" if quick else "SmolLM2-135M", "batch": f"{spec['batch']}x{spec['length']}",
        "rank": RANK, "reps": spec["reps"], "step_ms": ms, "memory": memory,
        "time_vs_plain": {lever: harness.ratio(ms[lever], ms["plain"]) for lever in LEVERS},
        "added_vs_plain": {lever: harness.ratio(memory[lever]["added_mb"], plain["added_mb"]) for lever in LEVERS},
        "saved_mb": {lever: round(plain["added_mb"] - memory[lever]["added_mb"], 1) for lever in LEVERS},
    }


def _memory(target: str, here: bool, step=None, **kwargs) -> dict:
    """Peak memory of one contender: in a fresh process, or (``here``: the quick run) in this one."""
    if here:
        return harness.measure_here(lambda: step, steps=1)
    return harness.peak_memory(target, steps=3, **kwargs)


# ---------------------------------------------------------------- bytes


def run_bytes(quick: bool) -> dict:
    from lorakit.quantize import quantize_base

    model = _lm(quick)
    embedding = model.get_input_embeddings().weight
    report = quantize_base(model, "nf4")
    linear_values = report.dense_bytes // 4  # the fp32 weights quantize_base read
    bf16 = 2 * linear_values
    return {"linear_layers": len(report.layers), "linear_bf16_bytes": bf16, "linear_nf4_bytes": report.quantized_bytes,
            "nf4_vs_bf16": harness.ratio(report.quantized_bytes, bf16),
            "embedding_bf16_bytes": 2 * embedding.numel(), "kept_dense": report.kept}


# ---------------------------------------------------------------- PEFT + bitsandbytes


def _saved_lm(quick: bool) -> str:
    """A model folder for bitsandbytes to load: SmolLM2's converted one, or a tiny saved one."""
    if not quick:
        from lorakit.models import DEFAULT_CHAT_GGUF, converted_gguf_dir, embedded_path, load_causal_lm

        load_causal_lm("default-chat", tokenizer=False)  # converts once if needed
        return str(converted_gguf_dir(embedded_path(*DEFAULT_CHAT_GGUF)))
    folder = Path(tempfile.mkdtemp(prefix="lorakit-bench-"))
    _lm(True, wide=True).save_pretrained(folder)
    return str(folder)


def setup_qlora(contender: str, folder: str, batch: int, length: int):
    """``lorakit-nf4`` or ``peft-bnb`` on the model in ``folder``; returns the step function."""
    from transformers import AutoModelForCausalLM

    if contender == "lorakit-nf4":
        from lorakit import LoraConfig, attach
        from lorakit.chunked_loss import causal_lm_loss
        from lorakit.quantize import quantize_base

        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        attach(model, LoraConfig(r=RANK, alpha=16, target_modules="all-linear")).train()
        quantize_base(model, "nf4")

        def loss_of(data):
            loss, count = causal_lm_loss(model, data)
            return loss / count
    else:
        import peft
        from transformers import BitsAndBytesConfig

        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                          bnb_4bit_compute_dtype=torch.float32)
        model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=quantization, device_map="cpu",
                                                     dtype=torch.float32)
        model = peft.get_peft_model(model, peft.LoraConfig(r=RANK, lora_alpha=16, target_modules="all-linear",
                                                           task_type="CAUSAL_LM")).train()

        def loss_of(data):
            return model(**data).loss
    data = harness.token_batch(model, batch, length)
    data["labels"] = data["input_ids"].clone()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = loss_of(data)
        loss.backward()
        optimizer.step()
        return loss

    return step


def run_qlora(quick: bool) -> dict:
    folder = _saved_lm(quick)
    out = {}
    for batch, length in ((2, 8),) if quick else QLORA_SHAPES:
        steps = {c: setup_qlora(c, folder, batch, length) for c in ("lorakit-nf4", "peft-bnb")}
        samples = harness.interleaved(steps, reps=1 if quick else 3, warmup=0 if quick else 1)
        ms = {c: harness.median_ms(s) for c, s in samples.items()}
        memory = {c: _memory("benchmarks.memory:setup_qlora", quick, steps[c], contender=c, folder=folder,
                             batch=batch, length=length) for c in steps}
        out[f"{batch}x{length}"] = {"step_ms": ms, "memory": memory,
                                    "peft_vs_lorakit_time": harness.ratio(ms["peft-bnb"], ms["lorakit-nf4"]),
                                    "lorakit_vs_peft_peak": harness.ratio(memory["lorakit-nf4"]["peak_mb"],
                                                                          memory["peft-bnb"]["peak_mb"])}
    return out


# ---------------------------------------------------------------- training runs


def _train(quick: bool, folder: str | None, **settings) -> dict:
    from lorakit.train import TrainConfig, train

    if quick:
        settings.update(model=folder, data_limit=40, steps=2, eval_every=2, max_length=128)
    with tempfile.TemporaryDirectory() as out:
        report = train(TrainConfig(task="chat", bf16=False, progress=False, out=out, **settings))
    return {"validation_loss": round(report["validation_after"]["loss"], 4),
            "train_steps_peak_mb": round(report["memory"]["train_steps_peak_rss_bytes"] / 2**20, 1),
            "steps": report["steps"], "global_batch": report["global_batch"]}


def _tiny_chat_folder() -> str:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from tiny_training import save_tiny_llama

    return str(save_tiny_llama(Path(tempfile.mkdtemp(prefix="lorakit-bench-")) / "llm"))


def run_quality(quick: bool) -> dict:
    folder = _tiny_chat_folder() if quick else None
    common = dict(steps=100, batch_size=8, max_length=128, targets="all-linear", eval_every=100)
    runs = {name: _train(quick, folder, **common, quantize=q) for name, q in (("plain", None), ("nf4", "nf4"))}
    gap = abs(runs["nf4"]["validation_loss"] - runs["plain"]["validation_loss"]) / max(runs["plain"]["validation_loss"], 1e-9)
    return {**runs, "relative_gap": round(gap, 4)}


DEFAULT_RUNS = {"defaults": {}, "micro-batches": {"batch_size": 8, "grad_accum": 4},
                "micro-batches + checkpointing": {"batch_size": 8, "grad_accum": 4, "gradient_checkpointing": True},
                "micro-batches + checkpointing + nf4": {"batch_size": 8, "grad_accum": 4,
                                                        "gradient_checkpointing": True, "quantize": "nf4"}}


def train_run(quick: bool, folder: str | None, settings: dict) -> dict:
    """One ``lorakit train --task chat --no-bf16 --steps 5`` run (the child of a fresh process)."""
    return _train(quick, folder, steps=5, **settings)


def run_defaults(quick: bool) -> dict:
    folder = _tiny_chat_folder() if quick else None
    if quick:  # the first and the last: every flag runs once
        names = list(DEFAULT_RUNS)[::len(DEFAULT_RUNS) - 1]
        return {name: train_run(True, folder, DEFAULT_RUNS[name]) for name in names}
    return {name: _in_fresh_process("train_run", quick=False, folder=None, settings=settings)
            for name, settings in DEFAULT_RUNS.items()}


def _in_fresh_process(function: str, **kwargs) -> dict:
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    code = (f"import json; from benchmarks.memory import {function} as f; "
            f"print(json.dumps(f(**json.loads({json.dumps(json.dumps(kwargs))}))))")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root)
    if proc.returncode != 0:
        raise RuntimeError(f"{function}({kwargs}) failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- predictions


def _llama_folder(quick: bool) -> str:
    from transformers import LlamaConfig

    shape = dict(LLAMA_1B, vocab_size=4096, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2) if quick else LLAMA_1B
    folder = Path(tempfile.mkdtemp(prefix="lorakit-bench-llama-"))
    LlamaConfig(**shape, architectures=["LlamaForCausalLM"]).save_pretrained(folder)
    return str(folder)


def setup_predicted(settings: dict):
    """The step :func:`lorakit.memory.predict_peak` predicts, on real tensors."""
    from lorakit.memory import training_step
    from lorakit.train import TrainConfig

    return training_step(TrainConfig(bf16=False, **settings))[0]


def prediction_cases(quick: bool) -> dict:
    llama = _llama_folder(quick)
    chat = _tiny_chat_folder() if quick else "default"
    small = dict(batch_size=2, max_length=16) if quick else {}
    lm = {**dict(task="chat", batch_size=8, max_length=256, targets="all-linear"), **small}
    cases = {
        "MiniLM LoRA": dict(task="classify", model="default", **(small or dict(batch_size=32, max_length=64))),
        "SmolLM2 LoRA": dict(model=chat, **lm),
        "SmolLM2 LoRA nf4": dict(model=chat, quantize="nf4", **lm),
        "Llama-1B LoRA": dict(model=llama, **lm),
        "Llama-1B LoRA nf4": dict(model=llama, quantize="nf4", **lm),
    }
    return {k: cases[k] for k in ("MiniLM LoRA", "Llama-1B LoRA nf4")} if quick else cases  # quick: each path once


def run_predicted(quick: bool) -> dict:
    from lorakit.memory import GiB, predict_peak
    from lorakit.train import TrainConfig

    out = {}
    for name, settings in prediction_cases(quick).items():
        predicted = predict_peak(TrainConfig(bf16=False, **settings))
        if quick:
            measured = harness.measure_here(lambda s=settings: setup_predicted(s), steps=2)
        else:
            measured = harness.peak_memory("benchmarks.memory:setup_predicted", steps=2, settings=settings)
        predicted_mb = predicted.peak / 2**20
        out[name] = {"predicted_mb": round(predicted_mb, 1), "measured_mb": measured["peak_mb"],
                     "error": round(predicted_mb / measured["peak_mb"] - 1, 3),
                     "parts_mb": {k: round(v / 2**20, 1) for k, v in predicted.rows()}}
    llama = _llama_folder(quick)
    for batch in (8, 32):
        full = predict_peak(TrainConfig(task="chat", model=llama, method="full", batch_size=batch, max_length=256,
                                        bf16=False))
        out[f"Llama-1B full {batch}x256"] = {"predicted_mb": round(full.peak / 2**20, 1),
                                             "fits_24_gib": full.fits(BUDGET_GIB * GiB)}
    return out


# ---------------------------------------------------------------- all


def run(quick: bool = False) -> dict:
    return {"machine": harness.machine(), "levers": run_levers(quick), "bytes": run_bytes(quick),
            "qlora": run_qlora(quick), "quality": run_quality(quick), "defaults": run_defaults(quick),
            "predicted": run_predicted(quick)}


def markdown(result: dict) -> str:
    """The ``## Memory levers`` section of BENCHMARKS.md."""
    lv = result["levers"]
    rows = [[lever, lv["step_ms"][lever], lv["time_vs_plain"][lever], lv["memory"][lever]["peak_mb"],
             lv["memory"][lever]["added_mb"], lv["added_vs_plain"][lever], lv["saved_mb"][lever]] for lever in LEVERS]
    b = result["bytes"]
    byte_rows = [["frozen linear weights", b["linear_bf16_bytes"] / 2**20, b["linear_nf4_bytes"] / 2**20,
                  b["nf4_vs_bf16"], f"≤ {GOALS['nf4_bytes_vs_bf16']}",
                  harness.verdict(b["nf4_vs_bf16"], GOALS["nf4_bytes_vs_bf16"])],
                 ["embedding (tied to the head; kept dense)", b["embedding_bf16_bytes"] / 2**20,
                  b["embedding_bf16_bytes"] / 2**20, 1.0, "", ""]]
    q_rows = [[shape, r["step_ms"]["lorakit-nf4"], r["step_ms"]["peft-bnb"], r["peft_vs_lorakit_time"],
               r["memory"]["lorakit-nf4"]["peak_mb"], r["memory"]["peft-bnb"]["peak_mb"], r["lorakit_vs_peft_peak"]]
              for shape, r in result["qlora"].items()]
    d_rows = [[name, r["global_batch"], r["train_steps_peak_mb"], r["validation_loss"]]
              for name, r in result["defaults"].items()]
    p_rows = [[name, r["predicted_mb"], r.get("measured_mb", ""), r.get("error", ""),
               "" if "fits_24_gib" not in r else ("yes" if r["fits_24_gib"] else "no")]
              for name, r in result["predicted"].items()]
    quality = result["quality"]
    return f"""## Memory levers

`python -m benchmarks memory`. Machine: {harness.describe(result['machine'])}

{lv['model']}, LoRA r={lv['rank']} on every linear layer of the blocks, AdamW, batch {lv['batch']}, fp32.
Time: median of {lv['reps']} steps, the five alternating in one process. Memory: each alone in a fresh
process, peak resident set during 3 steps; "added" is that peak minus the resident set of the loaded,
wrapped model before the first step. Goals: nf4 ≤ {GOALS['nf4_time']}x, checkpointing ≤
{GOALS['checkpointing_time']}x, chunked ≤ {GOALS['chunked_time']}x the plain step time; all three together
add ≤ {GOALS['all_added_vs_plain']}x plain's memory.

{harness.table(["lever", "step ms", "time / plain", "peak MiB", "added MiB", "added / plain", "saved MiB"], rows)}
{harness.table(["weights", "bf16 MiB", "nf4 MiB", "nf4 / bf16", "goal", "met"], byte_rows)}
lorakit nf4 (chunked loss) against PEFT + bitsandbytes 4-bit (nf4, double quantization, fp32 compute).

{harness.table(["batch", "lorakit ms", "PEFT+bnb ms", "PEFT / lorakit", "lorakit peak MiB", "PEFT peak MiB",
                "lorakit / PEFT"], q_rows)}
Quality: validation loss after 100 steps at 8×128, plain {quality['plain']['validation_loss']}, nf4
{quality['nf4']['validation_loss']} (gap {100 * quality['relative_gap']:.1f}%, goal ≤ {100 * GOALS['quality_gap']:.0f}%).

`lorakit train --task chat --no-bf16 --steps 5`: peak resident set of the training steps.

{harness.table(["run", "global batch", "steps peak MiB", "validation loss"], d_rows)}
`lorakit inspect --memory` against the same step measured (peak resident set, fresh process).

{harness.table(["case", "predicted MiB", "measured MiB", "error", "fits 24 GiB"], p_rows)}"""


if __name__ == "__main__":
    import sys

    print(json.dumps(run(quick="--quick" in sys.argv[1:]), indent=2))
