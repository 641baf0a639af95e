"""Will it fit? The prediction made on fake tensors counts the very tensors a real step makes,
each lever moves the part it should, and a model too large is said not to fit."""

import re

import pytest
from transformers import LlamaConfig

from lorakit.cli import main
from lorakit.memory import FIXED_SLACK, GiB, LiveBytes, predict_peak, training_step
from lorakit.train import TrainConfig
from tiny_training import save_tiny_llama

LLAMA_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True)


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    return str(save_tiny_llama(tmp_path_factory.mktemp("m") / "llm"))


@pytest.fixture(scope="module")
def llama_1b(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama1b")
    LlamaConfig(**LLAMA_1B, architectures=["LlamaForCausalLM"]).save_pretrained(folder)
    return str(folder)


def settings(llm, **changes):
    return TrainConfig(**{**dict(task="chat", model=llm, batch_size=4, max_length=64, targets="all-linear",
                                 bf16=False), **changes})


@pytest.mark.parametrize("changes", [{}, {"quantize": "nf4"}, {"gradient_checkpointing": True}, {"method": "full"}])
def test_the_fake_step_counts_the_tensors_of_the_real_step(llm, changes):
    predicted = predict_peak(settings(llm, **changes))
    step, model = training_step(settings(llm, **changes))
    with LiveBytes() as live:
        for tensor in [*model.parameters(), *model.buffers()]:
            live.add(tensor)
        weights = live.now
        step()
        step()
    assert predicted.weights == weights
    # transformers skips an all-ones attention mask by looking at its values; fake tensors have
    # none, so the prediction builds the (batch, 1, tokens, tokens) mask: a little more, never less
    assert live.peak <= predicted.tensors <= 1.15 * live.peak
    assert predicted.tensors <= predicted.weights + predicted.gradients + predicted.optimizer + predicted.activations
    assert predicted.allocator >= FIXED_SLACK and predicted.runtime > 100 * 2**20


def test_each_lever_moves_its_own_part(llm):
    plain = predict_peak(settings(llm, batch_size=8, max_length=128))
    nf4 = predict_peak(settings(llm, batch_size=8, max_length=128, quantize="nf4"))
    checkpointed = predict_peak(settings(llm, batch_size=8, max_length=128, gradient_checkpointing=True))
    full = predict_peak(settings(llm, batch_size=8, max_length=128, method="full"))
    assert nf4.weights < plain.weights and nf4.optimizer == plain.optimizer
    assert checkpointed.activations < 0.7 * plain.activations and checkpointed.weights == plain.weights
    weight_bytes = 4 * full.trainable  # fp32: every parameter trains
    assert full.gradients == weight_bytes and full.optimizer >= 2 * weight_bytes
    assert plain.trainable < full.trainable and plain.gradients < full.gradients


def test_full_fine_tuning_of_a_1b_llama_does_not_fit_24_gib(llama_1b):
    # at the most the recipe chooses for the chat task (32 x 512 tokens), in fp32
    from lorakit.recipe import with_shape

    full = predict_peak(with_shape(TrainConfig(task="chat", model=llama_1b, method="full", bf16=False)))
    assert not full.fits(24 * GiB)
    assert full.weights > 4.5 * GiB and full.optimizer > 9 * GiB  # 1.24 B fp32 values, and AdamW's two moments
    assert full.gradients == pytest.approx(full.weights, rel=1e-6)  # every weight trains (buffers aside)


def test_inspect_memory_predicts_a_classifier_from_its_config_and_says_whether_it_fits(tmp_path, capsys):
    from tiny_training import save_tiny_classifier

    folder = save_tiny_classifier(tmp_path / "cls")
    assert main(["inspect", str(folder), "--memory", "--batch-size", "4", "--max-length", "16"]) == 0
    out = capsys.readouterr().out
    assert "(classify; lora r=8, 4x16 tokens" in out and "fits in" in out and "(this machine)" in out
    for part in ("weights", "gradients", "optimizer state", "activations", "allocator slack", "runtime", "peak"):
        assert part in out
    assert main(["inspect", str(folder), "--memory", "--budget", "0.1"]) == 0  # 100 MiB: less than the runtime
    assert "does NOT fit in 0.1 GiB" in capsys.readouterr().out

    def trainable(*flags):
        assert main(["inspect", str(folder), "--memory", "--batch-size", "4", "--max-length", "16", *flags]) == 0
        return int(re.search(r"([\d,]+) trainable parameters", capsys.readouterr().out).group(1).replace(",", ""))

    every, one_block = trainable(), trainable("--layers-to-transform", "1")
    assert one_block < every  # the adapters of one block of two, beside the same head
