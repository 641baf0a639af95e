"""Token rows in a model (:class:`lorakit.layers.TokenRows`): the rows replace the weight's for
the active adapter only, on the embedding and on a tied output head; per-row batches give each
row its adapter's rows; merge_and_unload writes them into the weight; training moves the rows
and nothing of the frozen weight; deleting the adapter gives the plain modules back."""

import pytest
import torch
import torch.nn.functional as F
import transformers

from lorakit import LoraConfig, LorakitError
from lorakit.layers import TokenRows
from lorakit.merging import merge_and_unload
from lorakit.model import add_adapter, attach, delete_adapter, disable_adapters, set_active
from lorakit.per_row import per_row_adapters


def tied_llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return transformers.LlamaForCausalLM(config).eval()


IDS = torch.tensor([[1, 5, 7, 3, 0, 9, 2], [7, 7, 2, 5, 1, 1, 4], [8, 9, 10, 11, 12, 13, 14]])


def _with_rows(model, name, tokens, seed):
    add_adapter(model, LoraConfig(r=4, target_modules=["q_proj"], trainable_token_indices=tokens, init="random"), name)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.model.embed_tokens.copies[name].rows.normal_(generator=generator)
    return model


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def test_the_rows_replace_the_weights_on_the_embedding_and_the_tied_head():
    model = _with_rows(tied_llama(), "a", [5, 7], seed=1)
    set_active(model, "a")
    rows = model.model.embed_tokens.copies["a"].rows
    with torch.no_grad():
        embedded = model.model.embed_tokens(IDS)
        hidden = torch.randn(2, 32)
        logits = model.lm_head(hidden)
    weight = model.model.embed_tokens.weight
    expected = weight.index_copy(0, torch.tensor([5, 7]), rows)
    torch.testing.assert_close(embedded, F.embedding(IDS, expected), atol=0, rtol=0)
    torch.testing.assert_close(logits, hidden @ expected.T, atol=1e-6, rtol=0)
    with disable_adapters(model):
        torch.testing.assert_close(model.model.embed_tokens(IDS), F.embedding(IDS, weight), atol=0, rtol=0)


def test_a_per_row_batch_gives_each_row_its_adapters_rows():
    model = _with_rows(_with_rows(tied_llama(), "a", [5, 7], seed=1), "b", [1, 2, 9, 13], seed=2)
    alone = {}
    for name in ("a", "b"):
        set_active(model, name)
        alone[name] = _logits(model)
    set_active(model)
    alone[None] = _logits(model)
    rows = ["b", None, "a"]
    with per_row_adapters(model, rows):
        mixed = _logits(model)
    for i, name in enumerate(rows):
        torch.testing.assert_close(mixed[i], alone[name][i], atol=1e-5, rtol=0)
    assert (alone["a"] - alone[None]).abs().max() > 1e-2 and (alone["b"] - alone["a"]).abs().max() > 1e-2


def test_active_adapters_with_the_same_tokens_are_refused_and_disjoint_ones_both_apply():
    model = _with_rows(_with_rows(tied_llama(), "a", [5, 7], seed=1), "b", [7, 9], seed=2)
    set_active(model, "a", "b")
    with pytest.raises(LorakitError, match=r"train the same tokens \(\[7\]\)"):
        model(IDS)
    model = _with_rows(_with_rows(tied_llama(), "a", [5, 7], seed=1), "b", [1, 9], seed=2)
    set_active(model, "a", "b")
    embed = model.model.embed_tokens
    with torch.no_grad():
        got = embed(torch.tensor([[5, 9, 3]]))[0]
    torch.testing.assert_close(got[0], embed.copies["a"].rows[0], atol=0, rtol=0)
    torch.testing.assert_close(got[1], embed.copies["b"].rows[1], atol=0, rtol=0)
    torch.testing.assert_close(got[2], embed.weight[3], atol=0, rtol=0)


def test_merge_and_unload_writes_the_rows_into_the_shared_weight():
    model = _with_rows(tied_llama(), "a", [5, 7], seed=1)
    set_active(model, "a")
    expected = _logits(model)
    merged = merge_and_unload(model)
    assert type(merged.model.embed_tokens) is torch.nn.Embedding and type(merged.lm_head) is torch.nn.Linear
    assert merged.lm_head.weight is merged.model.embed_tokens.weight  # still tied
    torch.testing.assert_close(_logits(merged), expected, atol=1e-5, rtol=0)


def test_training_moves_the_rows_of_the_tokens_seen_and_nothing_frozen():
    model = attach(tied_llama(), LoraConfig(r=4, target_modules=["q_proj"], trainable_token_indices=[5, 7, 60]))
    model.train()
    weight = model.model.embed_tokens.weight.detach().clone()
    out = model(IDS, labels=IDS)
    out.loss.backward()
    grad = model.model.embed_tokens.copies["default"].rows.grad
    assert grad is not None and grad[0].abs().sum() > 0 and grad[1].abs().sum() > 0
    # token 60 is never an input, but it is an output the head scores: its row gets a gradient too
    assert grad[2].abs().sum() > 0
    assert model.model.embed_tokens.weight.grad is None and torch.equal(model.model.embed_tokens.weight, weight)


def test_deleting_the_last_adapter_gives_back_the_plain_modules():
    model = _with_rows(_with_rows(tied_llama(), "a", [5, 7], seed=1), "b", [1], seed=2)
    base = _logits(tied_llama())
    delete_adapter(model, "a")
    assert isinstance(model.model.embed_tokens, TokenRows) and list(model.lm_head.copies) == ["b"]
    delete_adapter(model, "b")
    assert type(model.model.embed_tokens) is torch.nn.Embedding and type(model.lm_head) is torch.nn.Linear
    assert model.lm_head.weight is model.model.embed_tokens.weight
    torch.testing.assert_close(_logits(model), base, atol=0, rtol=0)


def test_the_head_columns_give_the_gradients_of_the_patched_weight():
    """The tied head's fast path (logits written in place, the head's gradient passed on whole and x's
    corrected) gives the values and gradients of x·W'ᵀ + b, W' the weight with the rows written in."""
    from lorakit.layers.tokens import TokenPatch, _head_logits

    torch.manual_seed(0)
    head = torch.nn.Linear(8, 20).requires_grad_(False)
    patch = TokenPatch([3, 7, 11], torch.randn(3, 8))
    x = torch.randn(2, 5, 8, requires_grad=True)
    x_ref, rows_ref = x.detach().clone().requires_grad_(True), patch.rows.detach().clone().requires_grad_(True)
    out = _head_logits(head(x), x, patch, head)
    expected = F.linear(x_ref, head.weight.index_copy(0, patch.indices, rows_ref), head.bias)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    g = torch.randn_like(out)
    (out * g).sum().backward()
    (expected * g).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-5, rtol=0)
    torch.testing.assert_close(patch.rows.grad, rows_ref.grad, atol=1e-5, rtol=0)


def test_a_tied_head_before_its_embedding_in_module_order_is_unwrapped_with_it():
    """delete_adapter takes the embedding's rows first wherever the tied head sits, so no empty
    wrapper is left on the head."""
    class HeadFirst(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Linear(8, 20, bias=False)
            self.embed = torch.nn.Embedding(20, 8)
            self.body = torch.nn.Linear(8, 8)
            self.head.weight = self.embed.weight

        def get_input_embeddings(self):
            return self.embed

        def get_output_embeddings(self):
            return self.head

        def forward(self, ids):
            return self.head(self.body(self.embed(ids)))

    model = attach(HeadFirst(), LoraConfig(r=2, target_modules=["body"], trainable_token_indices=[1, 2]))
    assert isinstance(model.head, TokenRows) and model.head.tied
    delete_adapter(model, "default")
    assert type(model.head) is torch.nn.Linear and type(model.embed) is torch.nn.Embedding
    assert model.head.weight is model.embed.weight
