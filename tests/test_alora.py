"""Activated LoRA (lorakit.alora, PEFT's ``alora_invocation_tokens``): the adapter applies from the
last occurrence of its invocation tokens in each row on, in a forward pass and in cached generation,
as the real PEFT computes it; files travel both ways; what it refuses."""

import pytest
import torch

from lorakit import LoraConfig, LorakitError, attach, load_adapter, save_adapter
from lorakit.alora import activations, invocation_starts
from lorakit.merging import merge, merge_and_unload
from lorakit.model import delete_adapter
from lorakit.per_row import per_row_adapters
from tiny_models import tiny_llama

peft = pytest.importorskip("peft")

INVOCATION = [7, 9]
IDS = torch.tensor([[3, 4, 5, 7, 9, 11, 12, 13],   # invoked at 3
                    [3, 7, 9, 4, 7, 9, 5, 6],      # twice: the last counts (4)
                    [3, 4, 5, 6, 8, 10, 11, 12]])  # never: the base alone


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def peft_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("alora")
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(
        r=4, target_modules=["q_proj", "v_proj", "down_proj"], alora_invocation_tokens=INVOCATION,
        task_type="CAUSAL_LM", init_lora_weights=False))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=generator) * 0.3)
    model.save_pretrained(folder)
    return folder, model.eval()


def test_the_last_occurrence_of_the_invocation_starts_each_row():
    assert invocation_starts(IDS, tuple(INVOCATION)).tolist() == [3, 4, -1]
    assert invocation_starts(torch.tensor([[7]]), (7, 9)).tolist() == [-1]  # shorter than the invocation


def test_a_peft_alora_file_computes_as_peft_from_the_invocation_on(peft_file, tmp_path):
    folder, theirs = peft_file
    ours = load_adapter(tiny_llama(), folder).eval()
    base, expected = logits(tiny_llama()), logits(theirs)
    got = logits(ours)
    assert (expected - base).abs().max() > 1e-2
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert torch.equal(got[2], base[2]) and torch.equal(got[0, :3], base[0, :3]) and torch.equal(got[1, :4], base[1, :4])
    assert (got[0, 3:] - base[0, 3:]).abs().max() > 1e-2
    save_adapter(ours, tmp_path)
    again = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    assert again.peft_config["default"].alora_invocation_tokens == INVOCATION
    torch.testing.assert_close(logits(again), expected, atol=1e-5, rtol=0)


def test_cached_generation_goes_on_applying_it_after_the_invocation_as_peft_generates(peft_file):
    folder, theirs = peft_file
    ours = load_adapter(tiny_llama(), folder).eval()
    prompt = torch.tensor([[3, 4, 7, 9, 5], [3, 4, 5, 6, 8]])

    def generate(model):
        with torch.no_grad():
            return model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6,
                                  do_sample=False).tolist()

    expected = generate(theirs)
    assert generate(ours) == expected
    assert expected[0] != generate(tiny_llama())[0] and expected[1] == generate(tiny_llama())[1]


def test_no_input_ids_means_the_base_alone_and_rows_without_it_get_no_gradient():
    model = attach(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], alora_invocation_tokens=INVOCATION,
                                            init="random"))
    embeds = model.get_input_embeddings()(IDS)
    with pytest.warns(UserWarning, match="has none, so the adapter is off"), torch.no_grad():
        torch.testing.assert_close(model(inputs_embeds=embeds).logits, logits(tiny_llama()), atol=1e-6, rtol=0)
    model.train()
    model(input_ids=IDS[2:]).logits.sum().backward()
    grads = [p.grad for n, p in model.named_parameters() if p.requires_grad]
    assert grads and all(g is None or not g.any() for g in grads)
    model(input_ids=IDS[:1]).logits.sum().backward()
    assert all(p.grad is not None and p.grad.any() for n, p in model.named_parameters() if ".A" in n)


def test_what_an_activated_adapter_refuses(peft_file, tmp_path):
    for bad in (dict(use_dora=True), dict(lora_bias=True, init="kaiming"), dict(task_type="SEQ_CLS")):
        with pytest.raises(LorakitError, match="alora_invocation_tokens .* is for a causal LM's dense layers"):
            LoraConfig(target_modules=["q_proj"], alora_invocation_tokens=INVOCATION, **bad)
    with pytest.raises(LorakitError, match="must be the token ids of the invocation"):
        LoraConfig(alora_invocation_tokens=[])
    with pytest.raises(LorakitError, match="dense layers only, as in PEFT; model.embed_tokens is a Embedding"):
        attach(tiny_llama(), LoraConfig(target_modules=["embed_tokens"], alora_invocation_tokens=INVOCATION))
    folder, _ = peft_file
    model = load_adapter(tiny_llama(), folder)
    with pytest.raises(LorakitError, match="'default' is an activated LoRA .* keep it unmerged"):
        merge(model)
    with pytest.raises(LorakitError, match="activated LoRA"):
        merge_and_unload(model)
    delete_adapter(model, "default")
    assert activations(model) == {} and not model._forward_pre_hooks  # the hook went with the adapter
    torch.testing.assert_close(logits(model), logits(tiny_llama()), atol=0, rtol=0)


def test_per_row_batches_gate_each_activated_row_by_its_own_invocation(peft_file):
    """Rows of the activated adapter, of a plain one and of the base in one batch give what each
    gives alone; in steps that extend a cache, ``invoked`` says which rows' prompts held it."""
    from lorakit.model import add_adapter, disable_adapters, set_active

    folder, _ = peft_file
    model = load_adapter(tiny_llama(), folder).eval()
    add_adapter(model, LoraConfig(r=4, target_modules=["q_proj", "k_proj"], init="random"), "plain")
    rows = ["default", "plain", "default", None]
    ids = torch.cat([IDS, IDS[:1]])
    alone = []
    for b, name in enumerate(rows):
        if name is None:
            with disable_adapters(model):
                alone.append(logits(model, ids[b:b + 1]))
        else:
            set_active(model, name)
            alone.append(logits(model, ids[b:b + 1]))
    with per_row_adapters(model, rows):
        torch.testing.assert_close(logits(model, ids), torch.cat(alone), atol=1e-5, rtol=0)
    assert not torch.equal(alone[0], alone[3])  # row 0 is invoked: the adapter acts
    set_active(model, "default")
    step = torch.tensor([[20], [21], [22], [23]])
    with torch.no_grad():
        cached = model(input_ids=ids, use_cache=True).past_key_values
        wanted = [model(input_ids=step[b:b + 1], past_key_values=_row_cache(model, ids[b:b + 1])).logits
                  for b in range(3)]
        with per_row_adapters(model, rows[:3] + ["default"], invoked=[True, None, False, True]):
            got = model(input_ids=step, past_key_values=cached).logits
    for b in (0, 2):  # an invoked row adapts the new token, a row without the invocation does not
        torch.testing.assert_close(got[b], wanted[b][0], atol=1e-5, rtol=0)


def _row_cache(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=True).past_key_values
