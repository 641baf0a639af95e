"""attach / freeze / train / switch / merge / unload on tiny real transformers."""


import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lorakit import (
    LoraConfig, LorakitError, active_adapters, add_adapter, attach, count_parameters, delete_adapter,
    disable_adapters, lora_configs, lora_layers, merge, merge_and_unload, saved_modules, set_active,
    targetable_modules, trainable_report, unload, unmerge,
)
from lorakit.model import base_parameters, saved_paths, target_paths, walk
from lorakit.layers import LoraLayer, SavedModule
from tiny_models import tiny_bert_classifier, tiny_gpt2, tiny_llama, token_batch


def _randomize_b(model, name="default", seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            if name in layer.adapters:
                B = layer.adapters[name].B
                B.copy_(torch.randn(B.shape, generator=g) * 0.2)


@pytest.mark.parametrize("make, targets", [
    (tiny_llama, ["q_proj", "v_proj"]), (tiny_gpt2, ["c_attn", "wte"]), (tiny_bert_classifier, "all-linear"),
])
def test_output_equals_base_right_after_attach(make, targets):
    model, x = make(), token_batch()
    before = model(x).logits
    keys = set(model.state_dict())
    assert attach(model, LoraConfig(r=4, target_modules=targets)) is model
    assert torch.equal(model(x).logits, before)
    assert keys <= set(model.state_dict())  # the user's keys keep their names


@pytest.mark.parametrize("make, targets", [(tiny_llama, ["q_proj", "v_proj"]), (tiny_gpt2, ["c_attn", "c_proj"])])
def test_one_training_step_changes_only_a_and_b(make, targets):
    model, x = make(), token_batch()
    attach(model, LoraConfig(r=4, alpha=8, target_modules=targets, init="kaiming"))
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith((".adapters.default.A", ".adapters.default.B")) for n in trainable)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    loss = model(x, labels=x).loss
    loss.backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == (n in trainable), n
    opt.step()
    after = model.state_dict()
    for k, v in before.items():
        if k in trainable:
            assert not torch.equal(after[k], v), f"{k} did not train"
        else:
            assert torch.equal(after[k], v), f"{k} changed"


def test_trainable_report_counts_and_format():
    model = tiny_llama()
    _, total0 = count_parameters(model)
    attach(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    # q_proj 32->32, v_proj 32->16 (2 kv heads of 8), 2 layers: r(in+out) each
    expected = 2 * (4 * (32 + 32) + 4 * (32 + 16))
    assert count_parameters(model) == (expected, total0 + expected)
    pct = 100 * expected / (total0 + expected)
    assert trainable_report(model) == (
        f"trainable params: {expected:,} || all params: {total0 + expected:,} || trainable%: {pct:.4f}")
    assert "trainable params: 896 || all params: 27,680 || trainable%: 3.2370" == trainable_report(model)


def test_all_linear_leaves_out_heads():
    llama = attach(tiny_llama(), LoraConfig(target_modules="all-linear"))
    paths = [p for p, _ in lora_layers(llama)]
    assert len(paths) == 14 and "lm_head" not in paths and not any("embed" in p for p in paths)
    bert = attach(tiny_bert_classifier(), LoraConfig(target_modules="all-linear"))
    assert "classifier" not in [p for p, _ in lora_layers(bert)]


def test_no_match_error_lists_targetable_names():
    with pytest.raises(LorakitError) as err:
        attach(tiny_llama(), LoraConfig(target_modules=["query"]))
    msg = str(err.value)
    assert "['query'] matched no module of LlamaForCausalLM" in msg
    for name in ("q_proj (×2)", "down_proj (×2)", "embed_tokens", "lm_head", "model.embed_tokens"):
        assert name in msg
    table = targetable_modules(tiny_gpt2())
    assert ("transformer.h.0.attn.c_attn", "Conv1D", (32, 96)) in table


def test_exclude_and_rank_pattern():
    model = attach(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                            exclude_modules=["layers.1.self_attn.v_proj"], rank_pattern={"v_proj": 2}))
    layers = dict(lora_layers(model))
    assert "model.layers.1.self_attn.v_proj" not in layers
    assert layers["model.layers.0.self_attn.v_proj"].adapters["default"].A.shape == (2, 32)
    assert layers["model.layers.0.self_attn.q_proj"].adapters["default"].r == 4


def test_default_targets_by_model_type():
    assert {p.rsplit(".", 1)[-1] for p, _ in lora_layers(attach(tiny_gpt2(), LoraConfig()))} == {"c_attn"}
    with pytest.raises(LorakitError, match="no default for model type"):
        attach(nn.Sequential(nn.Linear(2, 2)), LoraConfig())


def test_modules_to_save_copy_trains_and_keys_keep_names():
    model, x = tiny_bert_classifier(), token_batch()
    keys = set(model.state_dict())
    head = model.classifier.weight.detach().clone()
    attach(model, LoraConfig(r=2, target_modules=["query", "value"], modules_to_save=["classifier"]))
    assert isinstance(model.classifier, SavedModule)
    assert (model.classifier.in_features, model.classifier.out_features) == (32, 2)  # the wrapped module's
    with pytest.raises(AttributeError):
        model.classifier.no_such_attribute
    assert keys <= set(model.state_dict())
    assert "classifier.copies.default.weight" in model.state_dict()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"classifier.copies.default.weight", "classifier.copies.default.bias"} <= trainable
    assert "classifier.weight" not in trainable
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    model(x, labels=torch.tensor([0, 1, 1])).loss.backward()
    opt.step()
    assert torch.equal(model.classifier.weight, head)
    assert not torch.equal(model.classifier.copies["default"].weight, head)
    model.eval()
    y = model(x).logits
    with disable_adapters(model):
        assert not torch.allclose(model(x).logits, y)
    merged = merge_and_unload(model)
    assert type(merged.classifier) is nn.Linear and torch.allclose(merged(x).logits, y, atol=1e-5)
    assert not list(saved_modules(merged))


@pytest.mark.parametrize("mode, expect", [("none", set()), ("lora_only", {"q", "v"}), ("all", {"q", "v", "k"})])
def test_bias_modes(mode, expect):
    model = tiny_bert_classifier()
    attach(model, LoraConfig(target_modules=["query", "value"], bias=mode, modules_to_save=["classifier"]))
    trainable = {n for n, p in model.named_parameters()
                 if p.requires_grad and n.endswith("bias") and ".copies." not in n}  # the head's copy always trains
    kinds = {"q" if ".query." in n else "v" if ".value." in n else "k" if ".key." in n else "other" for n in trainable}
    assert expect <= kinds and (mode == "all" or kinds == expect)


def test_switch_disable_delete():
    model, x = tiny_llama(), token_batch()
    base = model(x).logits
    attach(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), "a")
    add_adapter(model, LoraConfig(r=2, target_modules=["o_proj"]), "b")
    assert active_adapters(model) == ("a",) and set(lora_configs(model)) == {"a", "b"}
    _randomize_b(model, "a", 1)
    _randomize_b(model, "b", 2)
    ya = model(x).logits
    set_active(model, "b")
    yb = model(x).logits
    set_active(model, "a", "b")
    yab = model(x).logits
    assert not torch.allclose(ya, yb) and not torch.allclose(yab, ya) and not torch.allclose(yab, yb)
    with disable_adapters(model):
        assert torch.equal(model(x).logits, base)
    assert torch.equal(model(x).logits, yab)
    with pytest.raises(LorakitError, match="unknown adapter"):
        set_active(model, "c")
    delete_adapter(model, "b")
    assert active_adapters(model) == ("a",) and torch.equal(model(x).logits, ya)
    assert type(model.model.layers[0].self_attn.o_proj) is nn.Linear  # no adapter left: unwrapped
    assert torch.equal(unload(model)(x).logits, base)
    assert not list(lora_layers(model))


def test_merge_unmerge_merge_and_unload_agree():
    model, x = tiny_gpt2(), token_batch()
    attach(model, LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    _randomize_b(model)
    y = model(x).logits
    merge(model)
    torch.testing.assert_close(model(x).logits, y, rtol=1e-5, atol=1e-5)
    with pytest.warns(UserWarning, match="already merged"):
        merge(model)
    unmerge(model)
    torch.testing.assert_close(model(x).logits, y, rtol=1e-5, atol=1e-5)
    plain = merge_and_unload(model)
    assert all(not isinstance(m, (LoraLayer, SavedModule)) for m in plain.modules())
    assert type(plain.transformer.h[0].attn.c_attn) is Conv1D
    assert (plain(x).logits - y).abs().max() <= 1e-5


def test_bf16_merge_unmerge_restores_every_weight_bit_for_bit():
    model = tiny_llama().to(torch.bfloat16)
    attach(model, LoraConfig(r=4, alpha=16, target_modules="all-linear"))
    _randomize_b(model)
    before = {p: layer.weight.detach().clone() for p, layer in lora_layers(model)}
    merge(model)
    assert sum(not torch.equal(layer.weight, before[p]) for p, layer in lora_layers(model)) == len(before)
    unmerge(model)
    for p, layer in lora_layers(model):
        assert torch.equal(layer.weight, before[p]), p


def test_pissa_model_output_unchanged():
    model, x = tiny_llama(), token_batch()
    y = model(x).logits
    attach(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], init="pissa"))
    assert (model(x).logits - y).abs().max() <= 1e-5


def test_add_adapter_errors_leave_model_unchanged():
    model = attach(tiny_llama(), LoraConfig(target_modules=["q_proj"]), "a")
    with pytest.raises(LorakitError, match="already has an adapter 'a'"):
        attach(model, LoraConfig(target_modules=["q_proj"]), "a")
    with pytest.raises(LorakitError, match="modules_to_save"):
        add_adapter(model, LoraConfig(target_modules=["v_proj"], modules_to_save=["nothere"]), "b")
    assert [p for p, _ in lora_layers(model)] == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    with pytest.raises(LorakitError, match="must be a lorakit LoraConfig"):
        attach(model, {"r": 8}, "c")


def test_tied_weights_warn_on_merge_and_refuse_pissa():
    model = tiny_gpt2()  # wte and lm_head share one weight
    assert model.transformer.wte.weight is model.lm_head.weight
    with pytest.raises(LorakitError, match="tied embeddings"):
        attach(model, LoraConfig(target_modules=["wte"], init="pissa"))
    assert not list(lora_layers(model))
    attach(model, LoraConfig(target_modules=["wte", "c_attn"]))
    with pytest.warns(UserWarning, match=r"\['transformer.wte'\].*tied"):
        merge(model)


def test_merge_and_unload_unties_an_adapted_embedding_so_the_head_answers_as_unmerged():
    """LoRA on a tied input embedding leaves the output head's weight as it was: the plain model a merge
    makes (what lorakit export saves) gets an embedding of its own, and answers as the adapter did."""
    import warnings

    model = tiny_gpt2()
    attach(model, LoraConfig(r=4, target_modules=["wte", "c_attn"], init="random"))
    x = token_batch()
    with torch.no_grad():
        expected = model(x).logits
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # nothing tied is left to warn about
            plain = merge_and_unload(model)
        torch.testing.assert_close(plain(x).logits, expected, rtol=1e-5, atol=1e-5)
    assert plain.transformer.wte.weight is not plain.lm_head.weight
    assert plain.config.tie_word_embeddings is False
    assert torch.equal(plain.lm_head.weight, tiny_gpt2().lm_head.weight)  # the head as the base had it


def test_add_adapter_without_init_leaves_weights_for_a_loader():
    model = tiny_llama()
    w = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    add_adapter(model, LoraConfig(r=2, target_modules=["q_proj"], init="pissa"), "file", init_weights=False)
    layer = model.model.layers[0].self_attn.q_proj
    assert torch.equal(layer.weight, w)
    assert torch.count_nonzero(layer.adapters["file"].A) == 0 and lora_configs(model)["file"].init == "pissa"


# ---------------------------------------------------------------------- target_paths / saved_paths


def test_target_paths_are_what_attach_wraps_in_module_order():
    model = tiny_llama()
    config = LoraConfig(r=2, target_modules=["v_proj", "q_proj"], exclude_modules=["layers.1.self_attn.q_proj"])
    paths = target_paths(model, config)
    assert paths == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
                     "model.layers.1.self_attn.v_proj"]
    attach(model, config)
    assert [p for p, _ in lora_layers(model)] == paths
    assert target_paths(model, config) == paths  # wrapped layers are still selected
    linear = target_paths(model, LoraConfig(target_modules="all-linear"))
    assert len(linear) == 14 and "lm_head" not in linear
    with pytest.raises(LorakitError, match="matched no module"):
        target_paths(model, LoraConfig(target_modules=["query"]))


def test_saved_paths_outermost_match_and_refuses_modules_holding_targets():
    model = tiny_bert_classifier()
    assert saved_paths(model, LoraConfig(target_modules=["query"])) == []
    assert saved_paths(model, LoraConfig(target_modules=["query"], modules_to_save=["classifier"])) == ["classifier"]
    assert saved_paths(model, LoraConfig(modules_to_save=["bert.encoder", "layer"])) == ["bert.encoder"]
    with pytest.raises(LorakitError, match="matched no module.*top-level modules are: bert"):
        saved_paths(model, LoraConfig(modules_to_save=["head"]))
    before = [(p, type(m)) for p, m in model.named_modules()]
    with pytest.raises(LorakitError, match="left out 2 in modules_to_save .*bert.encoder.layer.0.attention.self.query"):
        attach(model, LoraConfig(target_modules=["query"], modules_to_save=["attention"]))  # PEFT leaves them out too
    assert [(p, type(m)) for p, m in model.named_modules()] == before and not lora_configs(model)
    attach(model, LoraConfig(target_modules=["query"]))
    with pytest.raises(LorakitError, match="selects bert.encoder.layer.0.attention, which holds LoRA layers"):
        saved_paths(model, LoraConfig(modules_to_save=["attention"]))


def test_public_names_import_from_lorakit_model_and_lorakit():
    import lorakit
    import lorakit.merging
    import lorakit.model

    for name, module in lorakit._EXPORTS.items():
        if module == "lorakit.model":
            assert getattr(lorakit.model, name) is getattr(lorakit, name), name
    for name in ("merge", "unmerge", "merge_and_unload", "unload"):
        assert getattr(lorakit.model, name) is getattr(lorakit.merging, name)
    assert lorakit.model.target_paths is lorakit.targets.target_paths
    with pytest.raises(AttributeError):
        lorakit.model.no_such_name


def test_one_walk_per_add_and_walk_size_does_not_grow_with_adapters(monkeypatch):
    import lorakit.model
    import lorakit.targets

    model = tiny_llama()
    attach(model, LoraConfig(r=2, target_modules="all-linear"), "a")
    size = len(walk(model))
    calls = []
    real_walk = lorakit.targets.walk
    monkeypatch.setattr(lorakit.model, "walk", lambda m: calls.append(1) or real_walk(m))
    for name in ("b", "c", "d"):
        add_adapter(model, LoraConfig(r=2, target_modules="all-linear"), name)
    assert len(calls) == 3
    assert len(walk(model)) == size
    assert sum(1 for _ in model.named_modules()) > size + 3 * 14  # named_modules grows with every adapter


# ---------------------------------------------------------------------- layers whose parent never calls them


class _Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        return self.proj(self.attn(x, x, x, need_weights=False)[0])


def test_bypassed_children_really_are_bypassed_by_torch():
    """The premise of the guard: a LoRA layer put there by hand changes nothing."""
    from lorakit.layers import LoraLinear

    x = torch.randn(2, 5, 8)
    model = _Attention().eval()
    encoder = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=True).eval()
    with torch.no_grad():
        before = model(x), encoder(x)
        for parent, child in ((model.attn, "out_proj"), (encoder, "linear1"), (encoder, "linear2")):
            layer = LoraLinear(getattr(parent, child))
            layer.add_adapter("a", r=2, alpha=2, scaling=1.0, init=None)
            layer.adapters["a"].A.fill_(1.0)
            layer.adapters["a"].B.fill_(1.0)
            layer.set_active(["a"])
            setattr(parent, child, layer)
        assert torch.equal(model(x), before[0]) and torch.equal(encoder(x), before[1])


def test_target_whose_parent_never_calls_it_is_refused():
    model = _Attention()
    before = [(p, type(m)) for p, m in model.named_modules()]
    with pytest.raises(LorakitError, match=r"cannot target attn\.out_proj: nn\.MultiheadAttention .*"
                                           r"F\.multi_head_attention_forward.*never run"):
        attach(model, LoraConfig(target_modules=["out_proj", "proj"]))
    assert [(p, type(m)) for p, m in model.named_modules()] == before and not lora_configs(model)
    encoder = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=True)
    with pytest.raises(LorakitError, match=r"cannot target linear1: .*fast path.*\(1 more like it\)"):
        attach(encoder, LoraConfig(target_modules=["linear1", "linear2"]))


def test_all_linear_leaves_bypassed_children_out():
    model = attach(_Attention(), LoraConfig(target_modules="all-linear"))
    assert [p for p, _ in lora_layers(model)] == ["proj"]
    with pytest.raises(LorakitError, match=r"left out 3 whose parent never calls them, e\.g\. self_attn\.out_proj"):
        attach(nn.TransformerEncoderLayer(8, 2, dim_feedforward=16), LoraConfig(target_modules="all-linear"))


def test_subclass_with_its_own_forward_may_be_targeted():
    class CallsOutProj(nn.MultiheadAttention):
        def forward(self, x):
            return self.out_proj(x)

    model = nn.Sequential(CallsOutProj(8, 2))
    x = torch.randn(3, 8)
    attach(model, LoraConfig(target_modules=["out_proj"]))
    _randomize_b(model)
    with disable_adapters(model):
        base = model(x)
    assert not torch.allclose(model(x), base)


def test_base_parameters_are_the_models_own_whatever_is_attached():
    model = tiny_bert_classifier()
    own = {id(p) for p in model.parameters()}
    attach(model, LoraConfig(r=2, target_modules="all-linear", modules_to_save=["classifier"]), "a")
    add_adapter(model, LoraConfig(r=2, target_modules=["query"]), "b")
    base = base_parameters(model)
    assert {id(p) for p in base} == own and len(base) == len(own)
    assert not any(p.requires_grad for p in base)


def test_what_an_adapter_adds_follows_the_model_s_mode():
    """Wrappers, adapters (their dropout) and saved copies added to a model in eval mode are in eval
    mode, so a server that loads adapters into its model answers with the model's function; added to
    a model in train mode, they train."""
    from tiny_models import tiny_mixtral

    for training in (False, True):
        model = tiny_bert_classifier().train(training)
        attach(model, LoraConfig(r=2, target_modules=["query", "value"], dropout=0.5, modules_to_save=["classifier"]))
        add_adapter(model, LoraConfig(r=2, target_modules=["query", "key"], use_dora=True, dropout=0.5), "dora")
        moe = tiny_mixtral().train(training)
        attach(moe, LoraConfig(r=2, target_modules=["q_proj"], target_parameters=["experts.gate_up_proj"],
                               trainable_token_indices=[1, 2]))
        for net in (model, moe):
            assert {m.training for m in net.modules()} == {training}, [n for n, m in net.named_modules()
                                                                       if m.training != training][:5]
    model.eval()
    x = token_batch()
    torch.testing.assert_close(model(x).logits, model(x).logits, atol=0, rtol=0)
