"""Unit tests of the server's parts that need no model: text streaming with stop
strings, nucleus sampling, the per-row KV cache bookkeeping, adapter names and paths."""

import os

import pytest
import torch
from transformers import DynamicCache

from lorakit.cli.serve import parse_adapters
from lorakit.errors import LorakitError
from lorakit.serve.detokenize import TextStream
from lorakit.serve.kv import BatchCache, cache_tensors
from lorakit.serve.registry import AdapterConflict, AdapterForbidden, AdapterRegistry, check_name
from lorakit.serve.sampling import NonFiniteLogits, Sampler, nucleus, pick_tokens, token_logprob


class CharTokenizer:
    """Token id i decodes to chr(i); 0 is a special token that decodes to nothing."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids if i != 0)


def feed(stream: TextStream, text: str) -> list[str]:
    return [stream.add(ord(c)) for c in text]


def test_stream_pieces_add_up_and_stop_before_the_stop_string():
    stream = TextStream(CharTokenizer(), stop=["END", "##"])
    pieces = feed(stream, "hello EN")
    assert "".join(pieces) == "hello "  # "EN" might become "END": held back
    pieces += feed(stream, "D more")
    assert stream.stopped
    assert "".join(pieces) + stream.finish() == "hello " == stream.text


def test_stream_releases_a_held_prefix_that_did_not_become_a_stop():
    stream = TextStream(CharTokenizer(), stop=["END"])
    pieces = feed(stream, "ENx")
    assert pieces == ["", "", "ENx"] and not stream.stopped


def test_stream_holds_back_a_cut_multibyte_character():
    class Cut(CharTokenizer):
        def decode(self, ids, skip_special_tokens=True):
            return super().decode(ids) + ("\ufffd" if len(ids) == 2 else "")

    stream = TextStream(Cut())
    assert stream.add(ord("a")) == "a"
    assert stream.add(ord("b")) == "b"  # the trailing replacement char is not emitted
    assert stream.add(ord("c")) == "c"


def test_nucleus_keeps_the_smallest_set_reaching_top_p():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    kept = nucleus(probs.clone(), 0.8)
    assert torch.allclose(kept, torch.tensor([0.625, 0.375, 0.0, 0.0]))
    assert torch.allclose(nucleus(probs.clone(), 0.81), torch.tensor([0.5, 0.3, 0.15, 0.0]) / 0.95)


def test_sampler_with_a_seed_repeats_and_greedy_takes_the_argmax():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(0))
    draws = [Sampler(temperature=1.0, seed=7).sample(logits) for _ in range(3)]
    assert draws[0] == draws[1] == draws[2]
    sampler = Sampler(temperature=1.0, seed=7)
    assert len({sampler.sample(logits) for _ in range(30)}) > 1  # it does sample
    assert Sampler(temperature=0.0).sample(logits) == int(logits.argmax())


def test_sampling_is_safe_for_every_accepted_temperature():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(1)) * 30
    for temperature in (9e-38, 1e-40, 5e-324, 1e-6):
        assert Sampler(temperature=temperature).greedy
        assert Sampler(temperature=temperature).sample(logits) == int(logits.argmax())
    for temperature in (1e-5, 1e-4, 0.01, 2.0):  # sampled: (logits - max) / t never overflows
        token = Sampler(temperature=temperature, top_p=0.5, seed=3).sample(logits * 1e30)
        assert 0 <= token < 50
    assert Sampler(temperature=1e-5, seed=3).sample(logits) == int(logits.argmax())  # all mass on the max


def test_a_row_with_non_finite_logits_fails_alone():
    logits = torch.randn(4, 20, generator=torch.Generator().manual_seed(2))
    logits[1, 3] = float("nan")
    logits[2, 0] = float("inf")
    picked = pick_tokens(logits, [Sampler(temperature=0.0), Sampler(temperature=0.0), Sampler(temperature=0.7),
                                  Sampler(temperature=0.7, seed=1)])
    assert picked[0] == int(logits[0].argmax()) and isinstance(picked[3], int)
    assert isinstance(picked[1], NonFiniteLogits) and isinstance(picked[2], NonFiniteLogits)


def test_token_logprobs_are_the_raw_log_softmax_and_its_top_k():
    logits = torch.tensor([1.0, 3.0, 2.0, -1.0])
    entry = token_logprob(logits, 2, 2)
    expected = torch.log_softmax(logits, -1)
    assert entry.token == 2 and abs(entry.logprob - float(expected[2])) < 1e-6
    assert [t for t, _ in entry.top] == [1, 2] and abs(entry.top[0][1] - float(expected[1])) < 1e-6
    assert token_logprob(logits, 0, 0).top == []


def _row_cache(length: int, fill: float) -> DynamicCache:
    kv = torch.full((1, 2, length, 3), fill)
    return DynamicCache(ddp_cache_data=[(kv, kv + 100)])


def test_batch_cache_left_pads_joins_and_trims_after_leaves():
    batch = BatchCache()
    batch.add_rows([_row_cache(3, 1.0)], [3])
    batch.add_rows([_row_cache(5, 2.0), _row_cache(2, 3.0)], [5, 2])
    keys, values = cache_tensors(batch.cache)[0]
    assert keys.shape == (3, 2, 5, 3) and batch.width == 5
    assert keys[0, 0, :, 0].tolist() == [0, 0, 1, 1, 1]  # row 0 padded by 2 on the left
    assert keys[2, 0, :, 0].tolist() == [0, 0, 0, 3, 3]
    assert values[1, 0, :, 0].tolist() == [102] * 5
    mask, positions = batch.step_inputs()
    assert mask.tolist() == [[0, 0, 1, 1, 1, 1], [1] * 6, [0, 0, 0, 1, 1, 1]]
    assert positions.flatten().tolist() == [3, 5, 2]
    batch.keep_rows([0, 2])  # the longest row leaves: two padding columns go
    keys, _ = cache_tensors(batch.cache)[0]
    assert keys.shape == (2, 2, 3, 3) and batch.lengths == [3, 2]
    assert keys[1, 0, :, 0].tolist() == [0, 3, 3]
    batch.keep_rows([])
    assert batch.cache is None and len(batch) == 0


def test_adapter_names_are_checked():
    assert check_name("sql-v1.2_x") == "sql-v1.2_x"
    assert check_name("org/name:v2") == "org/name:v2"  # names vLLM's clients use
    for bad in ["", "a b", "x" * 129, "../etc", "é", "/abs", "-x"]:
        with pytest.raises(LorakitError, match="invalid"):
            check_name(bad)
    with pytest.raises(AdapterConflict, match="reserved"):
        check_name("base")


def _adapter_dir(path):
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text("{}")
    return path


def test_adapter_paths_must_lie_under_the_root_even_through_symlinks(tmp_path):
    root = tmp_path / "root"
    inside = _adapter_dir(root / "sql")
    outside = _adapter_dir(tmp_path / "elsewhere")
    os.symlink(outside, root / "sneaky")
    registry = AdapterRegistry(model=None, adapter_root=root, max_loaded=2)
    assert registry.resolve_path("sql") == inside.resolve()
    assert registry.resolve_path(str(inside)) == inside.resolve()
    for bad in ["../elsewhere", str(outside), "sneaky", "/etc"]:
        with pytest.raises(AdapterForbidden, match="outside the adapter root"):
            registry.resolve_path(bad)
    with pytest.raises(LorakitError, match="not a folder"):
        registry.resolve_path("missing")
    (root / "empty").mkdir()
    with pytest.raises(LorakitError, match="no adapter_config.json"):
        registry.resolve_path("empty")


def test_without_a_root_only_command_line_paths_are_allowed(tmp_path):
    folder = _adapter_dir(tmp_path / "a")
    registry = AdapterRegistry(model=None, adapter_root=None, max_loaded=1)
    assert registry.resolve_path(folder, trusted=True) == folder.resolve()
    with pytest.raises(AdapterForbidden, match="--adapter-root"):
        registry.resolve_path(folder)


def test_parse_adapter_flags():
    assert parse_adapters(["sql=a/b", "chat=c=d"]) == {"sql": "a/b", "chat": "c=d"}
    with pytest.raises(LorakitError, match="NAME=DIR"):
        parse_adapters(["nodir"])
    with pytest.raises(LorakitError, match="twice"):
        parse_adapters(["a=x", "a=y"])
