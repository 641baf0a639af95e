"""QLoRA on a whole model: quantize_base, merging into a quantized base, adapters that move
between quantized and full-precision bases, and bitsandbytes models shared with PEFT."""

import copy
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from lorakit import LoraConfig, attach, load_adapter, save_adapter
from lorakit.layers import LoraLinear
from lorakit.layers.quantized import QuantizedLinear, dense_weight
from lorakit.merging import QuantizedMergeWarning, merge_and_unload, unload
from lorakit.model import disable_adapters
from lorakit.quantize import dequantize_base, quantize_base
from tiny_models import token_batch

Q0 = "model.layers.0.self_attn.q_proj"


def small_llama(seed=0):
    """A tiny Llama whose layers are wide enough for bitsandbytes' CPU kernels (64-value blocks)."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def moved(model, seed=1, scale=0.05):
    """Every trainable tensor moved off its init (so B != 0 and the adapter does something)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=generator) * scale)
    return model


def logits(model, x):
    with torch.no_grad():
        return model(x).logits


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_quantize_base_keeps_names_and_reports_what_it_left_dense(kind):
    model = small_llama()
    keys = set(model.state_dict())
    report = quantize_base(model, kind)
    assert set(model.state_dict()) == keys
    assert len(report.layers) == 14 and isinstance(model.get_submodule(Q0), QuantizedLinear)
    assert report.kept == {"lm_head": "the output head"}
    assert report.quantized_bytes < (0.3 if kind == "nf4" else 0.6) * report.dense_bytes
    assert not any(p.requires_grad for p in model.parameters() if isinstance(p, type(model.get_submodule(Q0).weight)))


def test_adapter_trained_on_nf4_is_an_ordinary_adapter_file(tmp_path):
    base = small_llama()
    quantized = copy.deepcopy(base)
    quantize_base(quantized, "nf4")
    attach(quantized, LoraConfig(r=4, target_modules="all-linear"))
    moved(quantized)
    save_adapter(quantized, tmp_path / "ad")
    x = token_batch(2, 8)

    # onto the original full-precision base
    full = load_adapter(copy.deepcopy(base), tmp_path / "ad")
    layer, q_layer = full.get_submodule(Q0), quantized.get_submodule(Q0)
    assert isinstance(layer, LoraLinear) and not layer.base_is_quantized and q_layer.base_is_quantized
    torch.testing.assert_close(layer.adapters["default"].B, q_layer.adapters["default"].B)
    # onto a plain model holding the dequantized weights: the very outputs of the quantized model
    plain = unload(dequantize_base_copy(quantized))
    assert not any(isinstance(m, QuantizedLinear) for m in plain.modules())
    torch.testing.assert_close(logits(load_adapter(plain, tmp_path / "ad"), x), logits(quantized, x),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_dora_on_a_quantized_base_computes_as_on_its_dequantized_weights(kind, tmp_path):
    """QDoRA: a DoRA adapter over a quantized base (alone, beside a LoRA one, per row) computes what it
    computes over the dequantized weights, its norm taken from them; its gradients reach A, B and m."""
    from lorakit.model import add_adapter, set_active
    from lorakit.per_row import per_row_adapters

    quantized = small_llama()
    quantize_base(quantized, kind)
    attach(quantized, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=True), "dora")
    add_adapter(quantized, LoraConfig(r=4, target_modules=["q_proj", "k_proj"]), "plain")
    moved(quantized)
    x = token_batch(2, 8)
    quantized.train()
    loss = quantized(x, labels=x).loss
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().max() > 0 for n, p in quantized.named_parameters()
               if p.requires_grad and ".dora." in n)
    quantized.eval()
    for name in ("dora", "plain"):
        save_adapter(quantized, tmp_path / name, name)
    plain = unload(dequantize_base_copy(quantized))
    for name in ("dora", "plain"):
        set_active(quantized, name)
        expected = logits(load_adapter(copy.deepcopy(plain), tmp_path / name), x)
        torch.testing.assert_close(logits(quantized, x), expected, atol=1e-5, rtol=1e-5)
    with per_row_adapters(quantized, ["plain", "dora"]):
        rows = logits(quantized, x)
    for row, name in enumerate(["plain", "dora"]):
        set_active(quantized, name)
        torch.testing.assert_close(rows[row], logits(quantized, x)[row], atol=1e-5, rtol=1e-5)


def dequantize_base_copy(model, layers=14):
    model = copy.deepcopy(model)
    assert len(dequantize_base(model)) == layers
    return model


def test_a_gpt2_conv1d_base_is_quantized_and_its_adapter_stays_an_ordinary_gpt2_adapter(tmp_path):
    """GPT-2's Conv1D layers (weight (in, out)) are quantized as (out, in) linear layers, as
    bitsandbytes does for transformers; LoRA attached before (as lorakit train does) follows."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=128, n_layer=2, n_head=4, n_positions=64)).eval()
    quantized = attach(copy.deepcopy(base), LoraConfig(r=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True))
    report = quantize_base(quantized, "nf4")
    assert len(report.layers) == 8 and report.kept == {"lm_head": "the output head"}
    moved(quantized)
    save_adapter(quantized, tmp_path / "ad")
    x = token_batch(2, 8)
    # the very outputs of the quantized model, from its dequantized weights in plain linear layers
    plain = unload(dequantize_base_copy(quantized, 8))
    torch.testing.assert_close(logits(load_adapter(plain, tmp_path / "ad"), x), logits(quantized, x),
                               atol=1e-5, rtol=1e-5)
    # the file is an ordinary GPT-2 adapter: on the full-precision base lorakit and PEFT agree
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ad")).eval()
    torch.testing.assert_close(logits(theirs, x), logits(load_adapter(copy.deepcopy(base), tmp_path / "ad"), x),
                               atol=1e-5, rtol=0)
    with pytest.warns(QuantizedMergeWarning):
        merged = merge_and_unload(copy.deepcopy(quantized))
    torch.testing.assert_close(logits(merged, x), logits(quantized, x), atol=1e-4, rtol=0)
    # dequantized (after a merge too), the model is GPT-2 again: Conv1D layers, a state dict GPT-2 loads
    shapes = {k: v.shape for k, v in base.state_dict().items()}
    assert type(merged.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
    dequantize_base(merged)
    for model in (unload(plain), merged):
        assert "QuantizedLinear" not in {type(m).__name__ for m in model.modules()}
        assert {k: v.shape for k, v in model.state_dict().items()} == shapes
        fresh = GPT2LMHeadModel(base.config).eval()
        fresh.load_state_dict(model.state_dict())
        torch.testing.assert_close(logits(fresh, x), logits(model, x), atol=1e-6, rtol=0)


def test_merge_into_a_quantized_base_keeps_the_compute_dtype_or_requantizes():
    model = small_llama().to(torch.bfloat16)
    attach(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    moved(model)
    quantize_base(model, "nf4")
    x = token_batch(2, 8)
    before = logits(model, x).float()

    kept = copy.deepcopy(model)
    with pytest.warns(QuantizedMergeWarning, match=r"merged 4 LoRA layers into a quantized base, kept in bfloat16"):
        kept = merge_and_unload(kept)
    assert type(kept.get_submodule(Q0)) is torch.nn.Linear and kept.get_submodule(Q0).weight.dtype == torch.bfloat16
    assert isinstance(kept.get_submodule("model.layers.0.self_attn.k_proj"), QuantizedLinear)  # untargeted: as it was
    torch.testing.assert_close(logits(kept, x).float(), before, atol=0.05, rtol=0)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        requantized = merge_and_unload(copy.deepcopy(model), requantize=True)
    message = str(next(w.message for w in caught if w.category is QuantizedMergeWarning))
    assert "kept in nf4" in message and "rounding" in message
    assert isinstance(requantized.get_submodule(Q0), QuantizedLinear)
    # re-quantizing rounds the merged weight once more: a few percent of its norm, not more
    percent = float(message.split("rounding ")[1].split("%")[0])
    assert 1 < percent < 15


def test_merge_into_a_quantized_base_carries_a_bias_on_b():
    """lora_bias on a quantized base: merge_and_unload adds s·b into each layer's bias (B zeroed, so the
    biases alone carry the adapter and a bias left out would show)."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, attention_bias=True)
    model = LlamaForCausalLM(config).eval()
    attach(model, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"], lora_bias=True, init="kaiming"))
    moved(model, scale=0.5)
    layer = model.get_submodule(Q0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoraLinear):
                module.adapters["default"].B.zero_()
    expected_bias = layer.bias.detach() + 2.0 * layer.adapters["default"].bias.detach()
    quantize_base(model, "nf4")
    x = token_batch(2, 8)
    before = logits(model, x)
    with disable_adapters(model):
        assert not torch.allclose(logits(model, x), before, atol=1e-2)  # the biases matter
    with pytest.warns(QuantizedMergeWarning):
        merged = merge_and_unload(model)
    assert type(merged.get_submodule(Q0)) is torch.nn.Linear
    torch.testing.assert_close(merged.get_submodule(Q0).bias, expected_bias, atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(merged, x), before, atol=1e-4, rtol=0)


# ---------------------------------------------------------------- bitsandbytes and PEFT


@pytest.fixture(scope="module")
def saved_base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("base")
    small_llama().save_pretrained(folder)
    return folder


def bnb_model(folder, bits):
    config = (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=torch.float32) if bits == 4
              else BitsAndBytesConfig(load_in_8bit=True))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(folder, quantization_config=config, device_map="cpu").eval()


@pytest.mark.parametrize("bits", [4, 8])
def test_lorakit_adapter_on_a_bitsandbytes_model_loads_in_peft(saved_base, tmp_path, bits):
    from peft import PeftModel

    model = bnb_model(saved_base, bits)
    attach(model, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    layer = model.get_submodule(Q0)
    assert layer.base_is_quantized and (layer.in_features, layer.out_features) == (128, 128)
    moved(model)
    x = token_batch(2, 8)
    # it trains: gradients reach A and B only
    model.train()
    model(x).logits.square().mean().backward()
    assert {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.grad is not None} == {"A", "B"}
    model.eval()
    want = logits(model, x)
    save_adapter(model, tmp_path / "ad")

    peft_model = PeftModel.from_pretrained(bnb_model(saved_base, bits), str(tmp_path / "ad")).eval()
    torch.testing.assert_close(logits(peft_model, x), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("bits", [4, 8])
def test_peft_adapter_on_a_bitsandbytes_model_loads_in_lorakit(saved_base, tmp_path, bits):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_model = get_peft_model(bnb_model(saved_base, bits), PeftLoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)).eval()
    x = token_batch(2, 8)
    want = logits(peft_model, x)
    peft_model.save_pretrained(tmp_path / "ad")

    model = load_adapter(bnb_model(saved_base, bits), tmp_path / "ad")
    torch.testing.assert_close(logits(model, x), want, atol=1e-4, rtol=1e-4)


def test_merge_into_a_bitsandbytes_base_matches_the_unmerged_model(saved_base):
    model = bnb_model(saved_base, 4)
    attach(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    moved(model)
    x = token_batch(2, 8)
    want = logits(model, x)
    layer = model.get_submodule(Q0)
    with torch.no_grad():
        expected = dense_weight(layer.base_layer()) + layer.delta_weight("default")
    with pytest.warns(QuantizedMergeWarning, match="kept in float32"):
        merged = merge_and_unload(model)
    merged_layer = merged.get_submodule(Q0)
    assert type(merged_layer) is torch.nn.Linear
    torch.testing.assert_close(merged_layer.weight.detach(), expected, atol=1e-6, rtol=1e-6)
    # bitsandbytes' CPU 4-bit matmul rounds more than fp32 does (~3e-3 here): close, not equal
    torch.testing.assert_close(logits(merged, x), want, atol=2e-2, rtol=0)


def test_lorakit_train_on_an_nf4_base_saves_an_adapter_for_the_full_precision_base(tmp_path):
    from lorakit.inference import evaluate_trained, load_trained
    from lorakit.train import TrainConfig, train
    from tiny_training import chat_records, save_tiny_llama, write_jsonl

    model = str(save_tiny_llama(tmp_path / "llm"))
    data = str(write_jsonl(tmp_path / "chat.jsonl", chat_records(60)))
    report = train(TrainConfig(task="chat", model=model, data=data, steps=30, batch_size=8, lr=2e-2,
                               targets="all-linear", bf16=False, out=str(tmp_path / "run"), progress=False,
                               quantize="nf4"))
    assert report["settings"]["quantize"] == "nf4"
    before, after = report["validation_before"]["loss"], report["validation_after"]["loss"]
    assert after < before - 0.2
    trained = load_trained([tmp_path / "run" / "adapter"])  # onto the base as saved: full precision
    assert not any(isinstance(m, QuantizedLinear) for m in trained.model.modules())
    on_full = evaluate_trained(trained)[trained.names[0]]["loss"]
    assert on_full < before - 0.2  # it helps there as much


def test_serving_on_an_nf4_base_gives_each_row_its_adapter(tmp_path):
    from lorakit.per_row import per_row_adapters
    from lorakit.serve.service import build_service
    from tiny_training import save_tiny_llama

    folder = save_tiny_llama(tmp_path / "llm")
    donor = AutoModelForCausalLM.from_pretrained(folder)
    attach(donor, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init="random"))
    save_adapter(donor, tmp_path / "ad")
    service = build_service(str(folder), adapters={"ad": str(tmp_path / "ad")}, quantize="nf4", task="generate")
    model = service.model
    assert isinstance(model.get_submodule("model.layers.0.mlp.up_proj"), QuantizedLinear)
    slot = service.registry.acquire("ad").slot
    x = token_batch(2, 6)
    with torch.no_grad(), per_row_adapters(model, [slot, None]):
        rows = model(x).logits
    from lorakit.model import disable_adapters, set_active

    set_active(model, slot)
    with torch.no_grad():
        with_adapter = model(x).logits
        with disable_adapters(model):
            base = model(x).logits
    torch.testing.assert_close(rows[0], with_adapter[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rows[1], base[1], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(with_adapter[0], base[0])
