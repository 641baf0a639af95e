"""Smoke test of the side-by-side benchmarks: each runs once with quick=True on tiny
random models (seconds, not the embedded models), so the scripts cannot rot.

The figures are not checked (timings on a shared machine mean nothing at this size);
what is checked is that every contender ran, produced positive times and memory, the
ratios are computed and the Markdown section renders.
"""

import importlib
import sys
from pathlib import Path

import pytest

pytest.importorskip("peft")

# benchmarks/ sits beside src/; plain `pytest` needs the repository root on the path.
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import harness  # noqa: E402
from benchmarks.__main__ import BENCHMARKS, write_section  # noqa: E402

MINE = ["training", "inference", "bottleneck", "adapters", "products"]


@pytest.fixture(scope="module")
def results():
    # the compiled contenders through aot_eager: graphs captured, no code generated (seconds, not minutes)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LORAKIT_BENCH_COMPILE", "aot_eager")
        return {name: importlib.import_module(f"benchmarks.{name}").run(quick=True) for name in MINE}


def test_registered():
    assert set(MINE) <= set(BENCHMARKS)


def test_training(results):
    r = results["training"]
    for case in ("minilm", "smollm2"):
        assert set(r[case]["step_ms"]) == {"lorakit", "lorakit_unfused", "lorakit_compiled", "peft", "full", "floor"}
        assert all(ms > 0 for ms in r[case]["step_ms"].values())
        assert all(m["peak_mb"] > 0 for m in r[case]["memory"].values())
        # lorakit and PEFT train the same parameters; full fine-tuning trains everything
        trainable = r[case]["trainable_params"]
        assert trainable["lorakit"] == trainable["lorakit_unfused"] == trainable["lorakit_compiled"] == \
            trainable["peft"] < trainable["full"]
        assert trainable["floor"] == 0
        # every contender starts from the same weights (LoRA's B = 0), so the first losses agree, lorakit's
        # chunked causal-LM loss on SmolLM2 included
        first = r[case]["first_loss"]
        assert max(first.values()) - min(first.values()) < 0.02 * first["peft"], first
        assert r[case]["time_vs_peft"] > 0 and r[case]["fused_vs_unfused"] > 0 and r[case]["compiled_vs_eager"] > 0
        # the operators one step dispatches (a kernel launch each on a GPU): the floor's fewest, and lorakit's
        # adapters fewer than PEFT's, the group's fewer than every layer on its own
        ops = r[case]["kernel_ops"]
        assert ops["floor"] < ops["lorakit"] < ops["lorakit_unfused"] <= ops["peft"], ops


def test_inference(results):
    r = results["inference"]
    assert r["adapted_layers"] == 14  # 2 blocks × 7 linear layers, the head left out
    for batch in r["batches"].values():
        assert set(batch["forward_ms"]) == {"base", "lorakit_merged", "lorakit_unmerged", "lorakit_unfused",
                                            "lorakit_compiled", "peft_unmerged", "peft_merged"}
        assert batch["merged_vs_base"] > 0


def test_inference_runs_one_pass_per_dtype_asked_for(monkeypatch):
    import torch

    from benchmarks import inference

    monkeypatch.setenv("LORAKIT_BENCH_COMPILE", "0")
    monkeypatch.setenv("LORAKIT_BENCH_INFER_DTYPES", "fp32,bf16")
    seen = []
    contenders = inference.contenders
    monkeypatch.setattr(inference, "contenders", lambda base: seen.append(base.dtype) or contenders(base))
    r = inference.run(quick=True)
    assert seen == [torch.float32, torch.bfloat16]
    assert list(r["batches"]) == ["1x16", "4x16", "1x16 bf16", "4x16 bf16"]
    assert all(b["merged_vs_base"] > 0 for b in r["batches"].values())
    assert "| 1x16 bf16 |" in inference.markdown(r)
    monkeypatch.setenv("LORAKIT_BENCH_INFER_DTYPES", "fp16")
    with pytest.raises(ValueError, match="LORAKIT_BENCH_INFER_DTYPES"):
        inference.run(quick=True)


def test_bottleneck(results):
    r = results["bottleneck"]
    assert r["adapter_layers"] == 4  # after attention and after the MLP, 2 blocks
    for inp in r["inputs"].values():
        assert set(inp["forward_ms"]) == {"base", "lora_merged", "lora_unmerged", "bottleneck"}


def test_products(results):
    r = results["products"]
    assert set(r["shapes"]) == {"576->576", "576->1536", "1536->576"}
    for products in r["shapes"].values():
        assert set(products) == {"z = x·Aᵀ", "g_z = g·B", "∂B = gᵀ·z"}
        assert all(p["plain_us"] > 0 and p["transposed_us"] > 0 and p["transposed_vs_plain"] > 0
                   for p in products.values())


def test_adapters(results):
    r = results["adapters"]
    assert set(r["per_row"]["distinct"]) == {"1", "2", "8", "16", "32"}
    assert all(d["lorakit_unfused_ms"] > 0 for d in r["per_row"]["distinct"].values())
    ms = r["load_switch_merge"]["ms"]
    for lib in ("lorakit", "peft"):
        assert set(ms[lib]) == {"load", "switch", "merge", "unmerge"}
        assert all(v > 0 for v in ms[lib].values())
    round_trip = r["bf16_merge_unmerge"]
    assert round_trip["lorakit"]["tensors"] == round_trip["peft"]["tensors"] == 4
    assert round_trip["lorakit"]["tensors_changed"] == 0  # bf16 unmerge restores W bit for bit


@pytest.mark.parametrize("name", MINE)
def test_markdown(results, name, tmp_path):
    section = importlib.import_module(f"benchmarks.{name}").markdown(results[name])
    assert section.startswith("## ")
    assert "| lorakit" in section or "LoRA merged" in section or "as its transpose" in section
    doc = tmp_path / "BENCHMARKS.md"
    doc.write_text("# Benchmarks\n\n## Serving\n\nkept\n")
    write_section(section, doc)
    write_section(section, doc)  # replacing, not appending, the second time
    text = doc.read_text()
    assert text.count(section.splitlines()[0]) == 1
    assert "## Serving\n\nkept" in text


def test_peak_memory_in_a_fresh_process():
    memory = harness.peak_memory("benchmarks.training:setup", steps=1, case="minilm", contender="lorakit",
                                 quick=True)
    assert memory["peak_mb"] >= memory["before_mb"] > 0


def test_machine_name():
    name = harness.machine_name()
    assert name and "/" not in name and " " not in name


def test_section_titles_name_threads_and_clock_except_for_the_default_figures():
    info = {"threads": 1, "clock": "cpu"}
    assert harness.title("Training step", info) == "## Training step"
    assert harness.title("Training step", {"threads": 2, "clock": "wall"}) == "## Training step (2 threads, wall clock)"
    assert harness.title("Training step", {**info, "gpu": "NVIDIA H200"}) == "## Training step (GPU)"


def test_runs_section_gives_each_pass_and_the_total():
    from benchmarks.__main__ import runs_section

    text = runs_section([{"pass": "1 thread, CPU seconds", "names": ["training"], "results": "a.json", "total_s": 600},
                         {"pass": "2 threads, wall clock", "names": ["training"], "results": "b.json", "total_s": 300}])
    assert text.startswith("## Benchmark runs") and "total 15.0 min" in text and "| 2 threads, wall clock |" in text


def test_sections_import_only_the_benchmarks_that_ran():
    # gpu.sh runs a few benchmarks where the server's packages are absent: the others must not be imported
    import subprocess

    code = ("import sys; from benchmarks.__main__ import sections; sections({}); "
            "print(sorted(m for m in sys.modules if m.startswith(('benchmarks.', 'lorakit.serve'))))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['benchmarks.__main__', 'benchmarks.harness']"


def test_random_weight_models_have_the_real_architectures(monkeypatch):
    monkeypatch.setenv("LORAKIT_BENCH_RANDOM_WEIGHTS", "1")
    minilm = harness.from_config("minilm-l6")
    assert type(minilm).__name__ == "BertForSequenceClassification" and minilm.config.num_hidden_layers == 6
    assert sum(p.numel() for p in minilm.parameters()) == 22_713_986  # the embedded MiniLM-L6 with a 2-label head
    assert harness.model_name("MiniLM-L6", False, "tiny BERT") == "MiniLM-L6 (random weights)"


def test_reps_are_multiplied_by_the_environment(monkeypatch):
    monkeypatch.delenv("LORAKIT_BENCH_REPS", raising=False)
    assert harness.reps(5) == 5
    monkeypatch.setenv("LORAKIT_BENCH_REPS", "3")
    assert harness.reps(5) == 15
    monkeypatch.setenv("LORAKIT_BENCH_REPS", "0")
    with pytest.raises(ValueError, match="LORAKIT_BENCH_REPS"):
        harness.reps(5)


def test_paired_ratio_is_the_median_of_each_rounds_ratio():
    samples = {"a": [1.0, 2.2, 3.0], "b": [1.0, 2.0, 2.0]}
    assert harness.paired_ratio(samples, "a", "b") == 1.1  # ratios 1.0, 1.1, 1.5
    assert harness.paired_ratio(samples, "b", "b") == 1.0


def test_training_goals_are_judged_on_each_rounds_ratio():
    from benchmarks import training

    # lorakit's median over the floor's is 1.2 (the rounds drifted), but every round's own ratio is 1.01
    rounds = {"lorakit": [101.0, 202.0, 303.0], "floor": [100.0, 200.0, 300.0], "peft": [200.0, 400.0, 600.0]}
    case = {"lorakit_vs_floor": 1.2, "time_vs_peft": 0.6, "step_all_ms": rounds}
    result = {"machine": {}, "smollm2": case}
    assert training._goals(result, "smollm2")[1] == "yes"
    rounds["lorakit"] = [110.0, 220.0, 330.0]  # 1.10 in every round: over the 1.05 goal
    assert training._goals(result, "smollm2")[1] == "**no**"
    del case["step_all_ms"]  # an older result without its rounds: the ratio of medians
    assert training._goals(result, "smollm2")[1] == "**no**"


def test_contenders_that_only_read_the_weights_share_them_and_merging_writes_a_copy_of_its_own():
    import re

    import torch

    from benchmarks.inference import contenders

    base = harness.tiny_causal_lm()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    models = contenders(harness.shared_copy(base))
    pointer = base.state_dict()["model.layers.0.self_attn.q_proj.weight"].data_ptr()
    pattern = re.compile(r".*layers\.0\.self_attn\.q_proj\.(base_layer\.)?weight")  # PEFT keeps W in base_layer
    weights = {name: next(p for n, p in m.named_parameters() if pattern.fullmatch(n)) for name, m in models.items()}
    shared = {name for name, w in weights.items() if w.data_ptr() == pointer}
    assert shared == {"base", "lorakit_unmerged", "lorakit_unfused", "peft_unmerged"} | (
        {"lorakit_compiled"} if "lorakit_compiled" in models else set())
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())  # merging wrote only its copies
    assert not torch.equal(weights["lorakit_merged"], weights["base"])
