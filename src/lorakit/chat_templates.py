"""Chat templates: the one place that knows how a chat becomes text and which tokens end a turn.

A chat model's tokenizer ships a Jinja template that renders ``messages`` as the text the
model was trained on. A base model has none, so ``lorakit train --task chat --chat-template
chatml`` gives it one: ChatML (``<|im_start|>role\\ncontent<|im_end|>\\n`` per message), whose
end of turn is ``<|im_end|>`` where the tokenizer holds it as one token and the tokenizer's
end-of-sequence token otherwise (so that the end the model learns is one token an answer
stops at). The template trained with is saved beside the adapter as ``chat_template.jinja``
(the file name a Hugging Face tokenizer folder uses) and applied again wherever the adapter
is loaded (``lorakit eval``, ``generate``, ``export``); ``lorakit serve --chat-template``
takes a name or such a file.

This module imports nothing of lorakit but its errors and the atomic writer.
"""

from __future__ import annotations

from pathlib import Path

from jinja2 import TemplateError

from lorakit.atomic import write_text
from lorakit.errors import LorakitError

FILE = "chat_template.jinja"  # beside an adapter: the template it was trained with
NAMES = ("chatml",)
# ChatML's end of a turn: where a template writes it and the vocabulary holds it as one token, an
# answer ends there even when the model's end-of-sequence token is another (a base model's)
TURN_END = "<|im_end|>"

_CHATML = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + 'END' + '\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


def single_token(tokenizer, text: str) -> int | None:
    """The id of ``text`` where the tokenizer holds it as one token (not the unknown token), else None."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) != 1 or ids[0] == getattr(tokenizer, "unk_token_id", None):
        return None
    return ids[0]


def chatml(tokenizer) -> str:
    """ChatML for ``tokenizer``: turns end with ``<|im_end|>`` where it is one token of the
    vocabulary, else with the tokenizer's end-of-sequence token.

    Raises:
        LorakitError: the tokenizer has neither.
    """
    end = TURN_END if single_token(tokenizer, TURN_END) is not None else tokenizer.eos_token
    if not end:
        raise LorakitError("--chat-template chatml needs a tokenizer with an end-of-sequence token or "
                           "<|im_end|>; this one has neither, so an answer could not end")
    return _CHATML.replace("END", end.replace("\\", "\\\\").replace("'", "\\'"))


def resolve(value: str, tokenizer) -> str:
    """The template text ``value`` names: ``chatml``, or a file holding a Jinja template
    (e.g. an adapter's ``chat_template.jinja``).

    Raises:
        LorakitError: neither a known name nor a readable, non-empty file.
    """
    if value == "chatml":
        return chatml(tokenizer)
    path = Path(value)
    if path.is_dir() and (path / FILE).is_file():  # an adapter's folder stands for its template
        path = path / FILE
    if not path.is_file():
        raise LorakitError(f"--chat-template {value!r} is neither a template name ({', '.join(NAMES)}) nor a "
                           "file; give chatml or a Jinja template file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise LorakitError(f"--chat-template {value!r} cannot be read as UTF-8 text: {err}") from None
    if "messages" not in text:
        raise LorakitError(f"--chat-template {value!r} does not read 'messages', so it renders no chat; give a "
                           "Jinja chat template (as a tokenizer's chat_template.jinja)")
    failure = render_error(text)
    if failure:
        raise LorakitError(f"--chat-template {value!r} does not render a chat (a user's message, an answer, a "
                           f"user's again): {failure}; mend the template")
    return text


#: what a template that breaks raises while it renders: jinja's own errors (its syntax, an unknown filter, a
#: template's raise_exception) and the Python errors of what it computes
RENDER_ERRORS = (TemplateError, TypeError, ValueError, KeyError, IndexError, AttributeError)


def render_error(template: str) -> str | None:
    """Why ``template`` cannot render a plain chat (jinja's message, one line), or None when it can."""
    from transformers.utils.chat_template_utils import render_jinja_template

    chat = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi."},
            {"role": "user", "content": "Bye"}]
    try:
        render_jinja_template([chat], chat_template=template, add_generation_prompt=True, bos_token="<s>",
                              eos_token="</s>")
    except RENDER_ERRORS as err:
        return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}".rstrip(": ")
    return None


def check(value: str | None) -> None:
    """Refuse a ``--chat-template`` value that cannot name a template, before any model loads
    (a file is read now; a name needs the tokenizer, so it is resolved on :func:`apply`).

    Raises:
        LorakitError: as :func:`resolve`.
    """
    if value is not None and value not in NAMES:
        resolve(value, None)


def apply(tokenizer, value: str | None):
    """``tokenizer`` with the template ``value`` names (None: left as it is); returns it."""
    if value is not None:
        tokenizer.chat_template = resolve(value, tokenizer)
    return tokenizer


def save(folder: str | Path, tokenizer) -> None:
    """Write the tokenizer's template into ``folder`` as ``chat_template.jinja`` (atomically)."""
    write_text(Path(folder) / FILE, tokenizer.chat_template)


def saved(folder: str | Path) -> str | None:
    """The template saved in ``folder`` (``chat_template.jinja``), or None."""
    path = Path(folder) / FILE
    return path.read_text(encoding="utf-8") if path.is_file() else None


def end_ids(model, tokenizer) -> set[int]:
    """Token ids that end an answer: the tokenizer's end-of-sequence token, the generation
    config's, and ChatML's end of turn (:data:`TURN_END`) where the chat template writes it."""
    ids: set[int] = set()
    for value in (getattr(tokenizer, "eos_token_id", None),
                  getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    turn_end = turn_end_id(tokenizer, getattr(tokenizer, "chat_template", None))
    return ids | ({turn_end} if turn_end is not None else set())


def turn_end_id(tokenizer, template: str | None) -> int | None:
    """The id of ChatML's end of turn (:data:`TURN_END`) where ``template`` writes it and the
    vocabulary holds it as one token, else None."""
    return single_token(tokenizer, TURN_END) if isinstance(template, str) and TURN_END in template else None
