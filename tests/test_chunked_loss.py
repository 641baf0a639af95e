"""The chunked language-modelling loss: the same loss and gradients as the plain one, and no
tensor as large as the full (tokens × vocabulary) logits made on the way."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from lorakit import LoraConfig, attach
from lorakit.chunked_loss import causal_lm_loss, output_head
from tiny_models import tiny_gpt2, tiny_llama, token_batch

VOCAB = 128


def lm_batch(batch=3, length=12, seed=1):
    ids = token_batch(batch, length, VOCAB, seed)
    labels = ids.clone()
    labels[:, :4] = -100  # a prompt that is not trained
    labels[0, 9:] = -100  # and padding
    mask = torch.ones_like(ids)
    mask[0, 9:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def loss_and_grads(model, batch, chunk_bytes, label_smoothing=0.0):
    model.zero_grad(set_to_none=True)
    loss, count = causal_lm_loss(model, batch, label_smoothing, chunk_bytes)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), int(count), grads


def assert_same(model, batch, label_smoothing=0.0):
    small = 4 * VOCAB * 5  # five tokens a chunk: seven chunks here
    plain = loss_and_grads(model, batch, None, label_smoothing)
    chunked = loss_and_grads(model, batch, small, label_smoothing)
    assert chunked[1] == plain[1] == int((batch["labels"][:, 1:] != -100).sum())
    torch.testing.assert_close(chunked[0], plain[0], atol=1e-5, rtol=1e-5)
    assert chunked[2].keys() == plain[2].keys() and plain[2]
    for name in plain[2]:
        torch.testing.assert_close(chunked[2][name], plain[2][name], atol=1e-5, rtol=1e-5, msg=name)
    return plain[2]


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_lora_loss_and_gradients_equal_the_unchunked(label_smoothing):
    model = attach(tiny_llama(), LoraConfig(r=4, target_modules="all-linear", init="random")).train()
    grads = assert_same(model, lm_batch(), label_smoothing)
    assert all(name.endswith((".A", ".B")) for name in grads)


def test_full_fine_tuning_gradients_reach_the_head_as_unchunked():
    model = tiny_llama().train()
    grads = assert_same(model, lm_batch(), 0.1)
    assert "lm_head.weight" in grads and "model.embed_tokens.weight" in grads


def test_a_head_that_is_not_a_plain_linear_is_recomputed_per_chunk():
    model = attach(tiny_llama(), LoraConfig(r=4, target_modules=["lm_head", "q_proj"], init="random")).train()
    grads = assert_same(model, lm_batch())
    assert "lm_head.adapters.default.A" in grads


def test_tied_head_and_conv1d_body():
    model = tiny_gpt2()  # eval: no dropout, so both runs see the same network
    assert output_head(model)[0] == "lm_head"
    grads = assert_same(model, lm_batch())
    assert "transformer.wte.weight" in grads  # the embedding, tied to the head: both paths add up


def test_keeping_the_ignored_positions_gives_the_same_loss_and_gradients():
    for model in (attach(tiny_llama(), LoraConfig(r=4, target_modules="all-linear", init="random")),
                  attach(tiny_llama(), LoraConfig(r=4, target_modules=["lm_head"], init="random"))):
        results = []
        for skip in (True, False):
            model.zero_grad(set_to_none=True)
            loss, _ = causal_lm_loss(model, lm_batch(), 0.1, 4 * VOCAB * 5, skip_ignored=skip)
            loss.backward()
            results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
        torch.testing.assert_close(results[1][0], results[0][0], atol=1e-5, rtol=1e-5)
        for name, grad in results[0][1].items():
            torch.testing.assert_close(results[1][1][name], grad, atol=1e-5, rtol=1e-5, msg=name)


def test_evaluation_without_gradients_equals_the_unchunked():
    model = tiny_llama().eval()
    with torch.no_grad():
        plain, _ = causal_lm_loss(model, lm_batch(), chunk_bytes=None)
        chunked, _ = causal_lm_loss(model, lm_batch(), chunk_bytes=4 * VOCAB * 5)
    torch.testing.assert_close(chunked, plain, atol=1e-5, rtol=1e-5)


class LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        sizes = [t.numel() for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        self.largest = max([self.largest, *sizes])
        return out


def test_no_tensor_as_large_as_the_full_logits_is_made():
    model = attach(tiny_llama(), LoraConfig(r=4, target_modules="all-linear")).train()
    batch = lm_batch(batch=4, length=40)
    full_logits = 4 * 40 * VOCAB
    for chunk_bytes, expect_full in ((None, True), (4 * VOCAB * 16, False)):
        with LargestTensor() as seen:
            loss, _ = causal_lm_loss(model, batch, chunk_bytes=chunk_bytes)
            loss.backward()
        assert (seen.largest >= full_logits) == expect_full, seen.largest


def test_models_that_change_their_logits_after_the_head_are_not_chunked():
    model = tiny_llama()
    model.config.final_logit_softcapping = 30.0
    assert output_head(model) is None
