"""Per-row adapters: each batch row through its own adapter, equal to running it alone."""

import pytest
import torch

from lorakit import (
    LoraConfig, LorakitError, add_adapter, attach, delete_adapter, lora_layers, merge, per_row_adapters, set_active,
)
from tiny_models import tiny_bert_classifier, tiny_gpt2, tiny_llama, token_batch


def _with_three_adapters(model, targets):
    attach(model, LoraConfig(r=4, alpha=8, target_modules=targets, init="random"), "sql")
    add_adapter(model, LoraConfig(r=2, alpha=2, target_modules=targets, init="random"), "chat")
    add_adapter(model, LoraConfig(r=6, alpha=3, use_rslora=True, target_modules=targets[:1], init="random"), "math")
    return model


def _alone(model, x, rows):
    outs = []
    for b, name in enumerate(rows):
        set_active(model, *([name] if name else []))
        outs.append(model(x[b:b + 1]).logits)
    return torch.cat(outs)


def _largest_gap_to_alone(model, x, rows) -> float:
    """How far the per-row batch is from running each row alone (no grad)."""
    with torch.no_grad():
        with per_row_adapters(model, rows):
            mixed = model(x).logits
        return float((mixed - _alone(model, x, rows)).abs().max())


@pytest.mark.parametrize("make, targets", [
    (tiny_llama, ["q_proj", "v_proj", "embed_tokens"]),
    (tiny_gpt2, ["c_attn", "c_fc", "wte"]),  # Conv1D and an embedding
])
def test_rows_equal_running_each_row_alone(make, targets):
    model = _with_three_adapters(make(), targets)
    rows = ["sql", "chat", None, "math", "sql"]
    x = token_batch(batch=len(rows), length=7)
    with torch.no_grad():
        with per_row_adapters(model, rows):
            mixed = model(x).logits
        expected = _alone(model, x, rows)
        set_active(model)
        base = model(x).logits
    assert (mixed - expected).abs().max() <= 1e-5
    assert torch.allclose(mixed[2], base[2], atol=1e-6)  # None: the base model
    for b in (0, 1, 3, 4):
        assert (mixed[b] - base[b]).abs().max() > 1e-3  # each adapter row really changed


def test_adapters_on_different_blocks_share_a_per_row_batch():
    model = attach(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], layers_to_transform=[0],
                                            init="random"), "first")
    add_adapter(model, LoraConfig(r=2, target_modules=["q_proj", "down_proj"], layers_to_transform=1, init="random"),
                "second")
    rows = ["second", "first", None, "second"]
    assert _largest_gap_to_alone(model, token_batch(batch=len(rows), length=7), rows) <= 1e-5


@pytest.mark.parametrize("make, targets", [(tiny_gpt2, ["c_attn", "c_fc"]), (tiny_bert_classifier, ["query", "value"])])
def test_adapters_with_a_bias_on_b_share_a_per_row_batch_with_those_without(make, targets):
    model = _with_three_adapters(make(), targets)
    add_adapter(model, LoraConfig(r=4, alpha=8, target_modules=targets, lora_bias=True, init="kaiming"), "biased")
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.adapters["biased"].B.normal_()
            layer.adapters["biased"].bias.normal_()
    rows = ["biased", "sql", None, "biased", "chat"]
    x = token_batch(batch=len(rows), length=7)
    assert _largest_gap_to_alone(model, x, rows) <= 1e-5
    delete_adapter(model, "biased")  # its slot's biases are zeroed: rows of the others are unchanged
    assert _largest_gap_to_alone(model, x[:3], ["sql", None, "chat"]) <= 1e-5


def test_stacks_are_cached_and_updated_when_adapters_change():
    model = _with_three_adapters(tiny_llama(), ["q_proj", "v_proj"])
    x = token_batch(batch=2)
    layer = dict(lora_layers(model))["model.layers.0.self_attn.q_proj"]
    with per_row_adapters(model, ["sql", "chat"]):
        first = layer.row_stacks()
    with per_row_adapters(model, ["chat", None]):
        assert layer.row_stacks()[1] is first[1]  # no rebuild on re-entry
    slots, A_stack, B_stack = first
    assert sorted(slots) == ["chat", "math", "sql"] and sorted(slots.values()) == [1, 2, 3]
    assert A_stack.shape == (4, 32, 6) and B_stack.shape == (4, 6, 32)
    assert torch.count_nonzero(A_stack[0]) == 0 and torch.count_nonzero(B_stack[0]) == 0
    assert torch.count_nonzero(A_stack[slots["chat"], :, 2:]) == 0  # 'chat' has rank 2: zero-padded to 6
    with torch.no_grad():
        layer.adapters["sql"].B.mul_(2)  # e.g. an optimizer step
    sql = layer.adapters["sql"]
    torch.testing.assert_close(layer.row_stacks()[2][slots["sql"], :4], (sql.B * sql.scaling).T)
    with torch.no_grad(), per_row_adapters(model, ["sql", "sql"]):
        mixed = model(x).logits
    set_active(model, "sql")
    torch.testing.assert_close(mixed, model(x).logits, rtol=1e-5, atol=1e-5)


def test_a_swapped_adapter_takes_the_freed_slot_and_nothing_else_moves():
    """A server evicting one adapter and loading another rewrites one slot, not the stack."""
    model = _with_three_adapters(tiny_llama(), ["q_proj", "v_proj"])
    layer = dict(lora_layers(model))["model.layers.0.self_attn.q_proj"]
    slots, A_stack, _ = layer.row_stacks()
    before = {name: A_stack[slot].clone() for name, slot in slots.items()}
    freed = slots["chat"]
    delete_adapter(model, "chat")
    add_adapter(model, LoraConfig(r=3, target_modules=["q_proj", "v_proj"], init="random"), "new")
    slots_after, A_after, B_after = layer.row_stacks()
    assert A_after is A_stack and layer._stack_cache.rebuilds == 1  # updated in place
    assert slots_after["new"] == freed and "chat" not in slots_after
    for name in ("sql", "math"):
        assert slots_after[name] == slots[name] and torch.equal(A_after[slots[name]], before[name])
    assert torch.count_nonzero(A_after[freed, :, 3:]) == 0  # the old rank-2 'chat' left nothing behind
    x = token_batch(batch=3)
    rows = ["new", "sql", None]
    with torch.no_grad():
        with per_row_adapters(model, rows):
            mixed = model(x).logits
        expected = _alone(model, x, rows)
    assert (mixed - expected).abs().max() <= 1e-5
    for extra in ("e1", "e2"):  # more adapters than slots: the stack doubles, old slots kept
        add_adapter(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init="random"), extra)
    slots_grown, A_grown, _ = layer.row_stacks()
    assert A_grown.shape[0] == 8 and layer._stack_cache.rebuilds == 1
    assert all(slots_grown[n] == slots_after[n] for n in slots_after)


def test_modules_to_save_follow_the_rows():
    model = tiny_bert_classifier()
    attach(model, LoraConfig(r=2, target_modules=["query"], modules_to_save=["classifier"], init="random"), "a")
    with torch.no_grad():
        model.classifier.copies["a"].weight.mul_(3)
    rows = ["a", None, "a"]
    x = token_batch(batch=3)
    with torch.no_grad():
        with per_row_adapters(model, rows):
            mixed = model(x).logits
        expected = _alone(model, x, rows)
    assert (mixed - expected).abs().max() <= 1e-5


def test_heads_of_other_label_sets_are_refused_in_one_per_row_batch(tmp_path):
    from lorakit import load_adapter, save_adapter

    three = attach(tiny_bert_classifier(num_labels=3), LoraConfig(r=2, target_modules=["query"],
                                                                  modules_to_save=["classifier"]), "three")
    save_adapter(three, tmp_path / "three", "three")
    model = attach(tiny_bert_classifier(), LoraConfig(r=2, target_modules=["query"], modules_to_save=["classifier"]),
                   "two")
    load_adapter(model, tmp_path / "three", "three")
    with torch.no_grad(), per_row_adapters(model, ["two", "three"]):
        with pytest.raises(LorakitError, match=r"heads of different sizes \(2 and 3 outputs"):
            model(token_batch(batch=2))


def test_per_row_errors():
    model = _with_three_adapters(tiny_llama(), ["q_proj"])
    with pytest.raises(LorakitError, match=r"unknown adapter\(s\) \['nope'\]"):
        with per_row_adapters(model, ["nope"]):
            pass
    with pytest.raises(LorakitError, match="given for 2 rows but the batch has 3"):
        with per_row_adapters(model, ["sql", "chat"]):
            model(token_batch(batch=3))
    assert all(layer._rows is None for _, layer in lora_layers(model))  # the context cleaned up
    merge(model, ["sql"])
    with pytest.raises(LorakitError, match="unmerge"):
        with per_row_adapters(model, ["sql"]):
            pass


def test_stacks_built_under_inference_mode_are_updated_outside_it():
    """A server builds the stacks inside inference_mode and loads adapters outside it."""
    model = _with_three_adapters(tiny_llama(), ["q_proj", "v_proj"])
    x = token_batch(batch=2)
    with torch.inference_mode(), per_row_adapters(model, ["sql", "chat"]):
        model(x)
    delete_adapter(model, "chat")
    add_adapter(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init="random"), "new")
    with torch.no_grad():
        with per_row_adapters(model, ["new", "sql"]):
            mixed = model(x).logits
        expected = _alone(model, x, ["new", "sql"])
    assert (mixed - expected).abs().max() <= 1e-5
