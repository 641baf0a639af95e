"""Chat templates: ChatML for a tokenizer without a template, template files, and the tokens
that end an answer (src/lorakit/chat_templates.py)."""

from __future__ import annotations

import pytest
from tiny_training import char_tokenizer

from lorakit import chat_templates
from lorakit.errors import LorakitError

CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"}]


def _base_tokenizer(im_tokens: bool = False):
    tokenizer = char_tokenizer()
    tokenizer.chat_template = None
    if im_tokens:  # a tokenizer that holds ChatML's markers as tokens of their own (Qwen's, SmolLM2's)
        tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    return tokenizer


def test_chatml_ends_turns_with_the_end_of_sequence_token_where_im_end_is_no_token():
    tokenizer = chat_templates.apply(_base_tokenizer(), "chatml")
    text = tokenizer.apply_chat_template(CHAT, tokenize=False)
    assert text == "<|im_start|>system\nbe brief</s>\n<|im_start|>user\nhi</s>\n<|im_start|>assistant\nyo</s>\n"
    prompt = tokenizer.apply_chat_template(CHAT[:2], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>system\nbe brief</s>\n<|im_start|>user\nhi</s>\n<|im_start|>assistant\n"
    assert chat_templates.end_ids(None, tokenizer) == {tokenizer.eos_token_id}


def test_chatml_uses_im_end_where_it_is_one_token_and_an_answer_ends_there():
    tokenizer = chat_templates.apply(_base_tokenizer(im_tokens=True), "chatml")
    text = tokenizer.apply_chat_template(CHAT[1:], tokenize=False)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n"
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.encode("<|im_end|>", add_special_tokens=False) == [im_end]
    assert chat_templates.end_ids(None, tokenizer) == {tokenizer.eos_token_id, im_end}


def test_end_ids_read_the_generation_config_and_only_markers_the_template_writes():
    from types import SimpleNamespace

    tokenizer = _base_tokenizer(im_tokens=True)  # <|im_end|> is a token, but no template writes it
    model = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=[7, 9]))
    assert chat_templates.end_ids(model, tokenizer) == {tokenizer.eos_token_id, 7, 9}


def test_a_template_file_or_an_adapter_folder_is_read_and_bad_values_are_one_line(tmp_path):
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    (tmp_path / "t.jinja").write_text(template)
    assert chat_templates.resolve(str(tmp_path / "t.jinja"), None) == template
    (tmp_path / "adapter").mkdir()
    chat_templates.save(tmp_path / "adapter", chat_templates.apply(_base_tokenizer(), str(tmp_path / "t.jinja")))
    assert chat_templates.saved(tmp_path / "adapter") == template
    assert chat_templates.resolve(str(tmp_path / "adapter"), None) == template
    assert chat_templates.saved(tmp_path) is None
    with pytest.raises(LorakitError, match=r"'chatlm' is neither a template name \(chatml\) nor a file"):
        chat_templates.resolve("chatlm", None)
    (tmp_path / "plain.txt").write_text("hello {{ name }}")
    with pytest.raises(LorakitError, match="does not read 'messages'"):
        chat_templates.resolve(str(tmp_path / "plain.txt"), None)
    (tmp_path / "latin.jinja").write_bytes("{{ messages }} caf\xe9".encode("latin-1"))
    with pytest.raises(LorakitError, match="cannot be read as UTF-8"):
        chat_templates.resolve(str(tmp_path / "latin.jinja"), None)


@pytest.mark.parametrize("template, words", [
    ("{% for m in messages %}{{ m['content'] }{% endfor %}", "TemplateSyntaxError: unexpected '}'"),
    ("{% for m in messages %}{{ raise_exception('bad role') }}{% endfor %}", "TemplateError: bad role"),
    ("{% for m in messages %}{{ m['content'] | nosuchfilter }}{% endfor %}", "No filter named 'nosuchfilter'"),
    ("{% for m in messages %}{{ m['content'] + 1 }}{% endfor %}", "TypeError: can only concatenate str"),
])
def test_a_template_that_cannot_render_a_chat_is_refused_when_given(tmp_path, template, words):
    (tmp_path / "t.jinja").write_text(template)
    with pytest.raises(LorakitError, match="does not render a chat") as caught:
        chat_templates.resolve(str(tmp_path / "t.jinja"), None)
    assert words in str(caught.value) and "\n" not in str(caught.value)


def test_a_chat_the_template_refuses_is_named_in_one_line_when_training_reads_it():
    from lorakit.data.encode import _encode_chat

    tokenizer = _base_tokenizer()
    # a template that takes user and assistant turns but no system message, as some models' do
    tokenizer.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system "
                               "role') }}{% endif %}{{ m['content'] }}\n{% endfor %}")
    assert chat_templates.render_error(tokenizer.chat_template) is None
    with pytest.raises(LorakitError, match=r"chat 3: the chat template cannot render this chat \(TemplateError: "
                                           r"no system role\)"):
        _encode_chat({"messages": CHAT, "_where": "chat 3"}, tokenizer)
