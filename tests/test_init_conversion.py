"""Adapters trained from an init that rewrites W (pissa, olora) are saved to apply to the original W:
``[A; A0]``, ``[B, −B0]`` at rank 2r with the same scaling, loading onto an unmodified base in lorakit
and in PEFT with the trained model's outputs."""

import json

import pytest
import torch

from lorakit import LoraConfig, attach, load_adapter, lora_configs, lora_layers, save_adapter
from lorakit.io import read_adapter
from lorakit.train import TrainConfig, train
from tiny_models import tiny_gpt2, tiny_llama, token_batch

peft = pytest.importorskip("peft")

TOL = 1e-5


def train_steps(model, steps: int = 5, lr: float = 0.05) -> None:
    """A few AdamW steps of next-token loss on random tokens: A and B move well away from A0, B0."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    x = token_batch(batch=4, length=12, seed=3)
    model.train()
    for _ in range(steps):
        loss = model(x, labels=x).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def logits(model, x):
    with torch.no_grad():
        return model(x).logits


@pytest.mark.parametrize("init", ["pissa", "olora"])
@pytest.mark.parametrize("make, config", [
    (tiny_llama, dict(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])),
    (tiny_llama, dict(r=4, alpha=8, target_modules=["q_proj", "v_proj"], use_rslora=True,
                      rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 3.0})),
    (tiny_gpt2, dict(r=4, alpha=4, target_modules=["c_attn", "c_fc"])),  # Conv1D: weight stored (in, out)
], ids=["llama", "llama-rslora-patterns", "gpt2"])
def test_trained_adapter_applies_to_the_original_base(make, config, init, tmp_path):
    x = token_batch()
    original = logits(make(), x)
    model = attach(make(), LoraConfig(init=init, **config))
    torch.testing.assert_close(logits(model, x), original, rtol=1e-4, atol=1e-4)  # the init keeps the output
    train_steps(model)
    trained = logits(model, x)
    assert (trained - original).abs().max() > 1e-2  # training changed the model
    assert not any(k.endswith((".A0", ".B0")) for k in model.state_dict())  # the initial factors are not weights
    save_adapter(model, tmp_path)

    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["init_lora_weights"] is True and saved["r"] == 2 * config["r"]
    assert {k: 2 * v for k, v in config.get("rank_pattern", {}).items()} == saved["rank_pattern"]
    file_config, _ = read_adapter(tmp_path)
    for path, layer in lora_layers(model):  # every scaling unchanged at twice the rank
        assert file_config.rank_for(path) == 2 * layer.adapters["default"].r
        assert file_config.scaling_for(path) == pytest.approx(layer.adapters["default"].scaling)

    ours = load_adapter(make(), tmp_path).eval()
    assert lora_configs(ours)["default"].init == "kaiming"
    torch.testing.assert_close(logits(ours, x), trained, rtol=TOL, atol=TOL)
    theirs = peft.PeftModel.from_pretrained(make(), tmp_path).eval()
    torch.testing.assert_close(logits(theirs, x), trained, rtol=TOL, atol=TOL)


def test_without_conversion_the_factors_are_saved_as_trained(tmp_path):
    model = attach(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"], init="olora"))
    train_steps(model, steps=2)
    save_adapter(model, tmp_path, original_base=False)
    config, tensors = read_adapter(tmp_path)
    assert config.init == "olora" and config.r == 2
    layer = next(layer for _, layer in lora_layers(model))
    A = next(t for k, t in tensors.items() if "lora_A" in k)
    assert torch.equal(A, layer.adapters["default"].A.detach())
    loaded = load_adapter(tiny_llama(), tmp_path).eval()  # the init runs again on the original base, as PEFT's does
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model.eval()(input_ids=ids).logits, atol=1e-5, rtol=0)


def test_adapters_that_did_not_rewrite_w_are_saved_as_they_are(tmp_path):
    model = attach(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"], init="random"))
    save_adapter(model, tmp_path / "plain")
    assert read_adapter(tmp_path / "plain")[0].r == 2
    # loaded from a converted file: no initial factors, saved again unchanged (rank 2r stays 2r)
    pissa = attach(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"], init="pissa"))
    save_adapter(pissa, tmp_path / "converted")
    again = load_adapter(tiny_llama(), tmp_path / "converted")
    save_adapter(again, tmp_path / "again")
    assert read_adapter(tmp_path / "again")[0].r == 4


def test_train_with_pissa_saves_an_adapter_for_the_original_model(tmp_path):
    """``lorakit train --init pissa``: the saved adapter, loaded onto the unmodified base by ``lorakit eval``,
    scores exactly what the trained model scored on the test split."""
    from lorakit.inference import evaluate_trained, load_trained
    from tiny_training import save_tiny_classifier, write_jsonl

    words = ["great", "good", "fine", "bad", "dull", "awful"]
    records = [{"text": f"{'the film ' * (i % 3)}{words[i % 6]} movie", "label": "pos" if i % 6 < 3 else "neg"}
               for i in range(120)]
    data = write_jsonl(tmp_path / "data.jsonl", records)
    model = save_tiny_classifier(tmp_path / "model")
    report = train(TrainConfig(model=str(model), data=str(data), init="pissa", rank=4, steps=6, batch_size=8,
                               eval_every=3, lr=1e-2, bf16=False, out=str(tmp_path / "run"), progress=False))
    config = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["init_lora_weights"] is True
    scores = evaluate_trained(load_trained([tmp_path / "run" / "adapter"]))
    (score,) = scores.values()
    assert score["loss"] == pytest.approx(report["test"]["loss"], abs=1e-5)
    assert score["accuracy"] == report["test"]["accuracy"]
