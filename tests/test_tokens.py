"""Trainable tokens (PEFT's ``trainable_token_indices``), against the real ``peft``: which
embeddings a config selects (a list: the input embedding; a dict: by name; a tied output head
follows), files loading both ways to PEFT's outputs on tied and untied causal LMs, a scaled
embedding and a classifier, and files that do not fit refused with the embedding named."""

import warnings

import pytest
import torch
import transformers

from lorakit import LoraConfig, LorakitError, attach, load_adapter, read_adapter, save_adapter, write_adapter
from lorakit.model import add_adapter
from lorakit.layers import TokenRows
from lorakit.targets import walk
from lorakit.tokens import token_targets
from tiny_models import tiny_bert_classifier, tiny_llama, token_batch

peft = pytest.importorskip("peft")

IDS = token_batch(batch=3, length=12, vocab=64)


def tied_llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return transformers.LlamaForCausalLM(config).eval()


def untied_llama():
    model = tiny_llama()
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    return model


def gemma3():  # a scaled word embedding (its forward multiplies by √hidden), tied to the head
    torch.manual_seed(0)
    config = transformers.Gemma3TextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    return transformers.Gemma3ForCausalLM(config).eval()


def bert():
    return tiny_bert_classifier(num_labels=3)


def _perturb(model, names=("trainable_tokens_delta", "lora_B", ".rows", ".B")):
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and any(n in name for n in names):
                p.add_(torch.randn(p.shape, generator=generator) * 0.5)


def _logits(model):
    with torch.no_grad():
        return model(IDS)[0]


CASES = {  # model, target_modules, trainable_token_indices, task_type
    "tied list": (tied_llama, ["q_proj", "v_proj"], [0, 5, 7], "CAUSAL_LM"),
    "untied dict with the head": (untied_llama, ["q_proj"], {"embed_tokens": [1, 2], "lm_head": [5, 7, 9]}, "CAUSAL_LM"),
    "tied dict, same tokens": (tied_llama, ["q_proj"], {"embed_tokens": [1, 7], "lm_head": [1, 7]}, "CAUSAL_LM"),
    "scaled embedding": (gemma3, ["q_proj"], [1, 7, 30], "CAUSAL_LM"),
    "classifier": (bert, ["query", "value"], [3, 5, 11], "SEQ_CLS"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_files_with_trainable_tokens_load_both_ways_to_the_same_outputs(case, tmp_path):
    make, targets, tokens, task = CASES[case]
    base = _logits(make())
    theirs = peft.get_peft_model(make(), peft.LoraConfig(r=4, target_modules=targets, task_type=task,
                                                         trainable_token_indices=tokens))
    _perturb(theirs)
    expected = _logits(theirs.eval())
    theirs.save_pretrained(tmp_path / "peft")
    ours = load_adapter(make(), tmp_path / "peft")
    torch.testing.assert_close(_logits(ours), expected, atol=1e-5, rtol=0)
    assert (expected - base).abs().max() > 1e-2  # the rows matter

    model = attach(make(), LoraConfig(r=4, target_modules=targets, trainable_token_indices=tokens, init="random"))
    _perturb(model)
    expected = _logits(model)
    save_adapter(model, tmp_path / "ours")
    _, written = read_adapter(tmp_path / "ours")
    _, peft_keys = read_adapter(tmp_path / "peft")
    assert set(written) == set(peft_keys)  # the same keys as PEFT writes (a tied head's rows: none)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(make(), tmp_path / "ours").eval()
    torch.testing.assert_close(_logits(loaded), expected, atol=1e-5, rtol=0)
    assert (expected - base).abs().max() > 1e-2


def test_a_config_selects_the_embeddings_peft_selects():
    model = tied_llama()
    modules = walk(model)
    assert token_targets(model, LoraConfig(trainable_token_indices=[1, 2]), modules) == {"model.embed_tokens": [1, 2]}
    same = LoraConfig(trainable_token_indices={"embed_tokens": [1, 2], "lm_head": [1, 2]})
    assert token_targets(model, same, modules) == {"model.embed_tokens": [1, 2]}  # the tied head follows
    attach(model, LoraConfig(target_modules=["q_proj"], trainable_token_indices=[1, 2]))
    assert isinstance(model.lm_head, TokenRows) and model.lm_head.tied
    assert isinstance(model.model.embed_tokens, TokenRows) and not model.model.embed_tokens.tied
    add_adapter(model, same, "second")  # a second adapter naming the tied head too: it follows again
    assert model.lm_head.tied and sorted(model.lm_head.copies) == ["default", "second"]
    bert_model = tiny_bert_classifier()
    assert token_targets(bert_model, LoraConfig(trainable_token_indices=[4]), walk(bert_model)) == \
        {"bert.embeddings.word_embeddings": [4]}


@pytest.mark.parametrize("config, message", [
    (LoraConfig(target_modules=["q_proj"], trainable_token_indices={"wte": [1]}), "names 'wte', which matches no module"),
    (LoraConfig(target_modules=["q_proj"], trainable_token_indices={"norm": [1]}), "a LlamaRMSNorm; name an embedding"),
    (LoraConfig(target_modules=["q_proj", "embed_tokens"], trainable_token_indices=[1]), "is a LoRA target"),
    (LoraConfig(target_modules=["q_proj"], modules_to_save=["embed_tokens"], trainable_token_indices=[1]),
     "is in modules_to_save"),
    (LoraConfig(target_modules=["q_proj"], trainable_token_indices=[1, 128]), r"token ids must lie in 0\.\.127"),
])
def test_a_config_peft_would_refuse_is_refused_in_one_line(config, message):
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(LorakitError, match=message):
        attach(model, config)
    assert not any(isinstance(m, TokenRows) for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_file_whose_rows_do_not_fit_is_refused_naming_the_embedding(tmp_path):
    model = attach(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], trainable_token_indices=[1, 2, 3]))
    save_adapter(model, tmp_path / "good")
    config, tensors = read_adapter(tmp_path / "good")
    key = next(k for k in tensors if k.endswith(".token_adapter.trainable_tokens_delta"))
    short = {**tensors, key: tensors[key][:2]}
    write_adapter(tmp_path / "short", config, short)
    with pytest.raises(LorakitError, match=r"model\.embed_tokens: the file holds trainable_tokens_delta \(2, 32\)"):
        load_adapter(tiny_llama(), tmp_path / "short")
    write_adapter(tmp_path / "missing", config, {k: v for k, v in tensors.items() if k != key})
    with pytest.raises(LorakitError, match="missing trainable_tokens_delta for model.embed_tokens"):
        load_adapter(tiny_llama(), tmp_path / "missing")
    write_adapter(tmp_path / "extra", config.replace(trainable_token_indices=None), tensors)
    with pytest.raises(LorakitError, match="unexpected trainable_tokens_delta for model.embed_tokens"):
        load_adapter(tiny_llama(), tmp_path / "extra")
    target = tiny_llama()
    load_adapter(target, tmp_path / "good")
    torch.testing.assert_close(_logits(target), _logits(model), atol=0, rtol=0)
