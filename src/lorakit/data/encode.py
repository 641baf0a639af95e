"""Records -> token ids, with the loss mask; and the collate function that pads a batch.

Language-model labels follow the transformers convention: ``labels[t]`` is the token at
position ``t`` (the model shifts them), and ``-100`` marks a position left out of the
loss: prompt tokens, the user and system turns of a chat, and padding.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lorakit.data.labels import find_label
from lorakit.data.messages import trained
from lorakit.errors import LorakitError

IGNORE_INDEX = -100


@dataclass
class EncodedExample:
    """One example as token ids.

    Attributes:
        input_ids: ``(T,)`` token ids, ``T <= max_length``.
        label: the class index (classification), the number to fit (regression), or ``(T,)``
            target ids with ``IGNORE_INDEX`` where the loss is not taken (language modelling).
        segments: ``(T,)`` which text of a pair each token belongs to (the tokenizer's
            ``token_type_ids``), for a pair of texts where the tokenizer gives them; else None.
    """

    input_ids: list[int]
    label: int | float | list[int]
    segments: list[int] | None = None

    def target_count(self) -> int:
        """How many positions count in the loss: 1 for a class or a number, else the unmasked tokens."""
        if not isinstance(self.label, list):
            return 1
        return sum(1 for t in self.label[1:] if t != IGNORE_INDEX)  # the first token predicts nothing


@dataclass
class Encoded:
    """Encoded examples and what truncation did to them (for one warning per task)."""

    examples: list[EncodedExample] = field(default_factory=list)
    truncated: int = 0  # examples cut to max_length
    dropped: int = 0  # examples with no trained token left after the cut
    longest: int = 0  # tokens in the longest example before the cut


def text_inputs(records: list[dict]) -> tuple[list[str]] | tuple[list[str], list[str]]:
    """The tokenizer's text arguments for classification records: ``(texts,)``, or ``(texts, second
    texts)`` for pairs (a tokenizer joins each pair with its separator: ``[CLS] a [SEP] b [SEP]``)."""
    texts = [r["text"] for r in records]
    return (texts, [r["text_pair"] for r in records]) if records and "text_pair" in records[0] else (texts,)


def encode_classification(records: list[dict], tokenizer, max_length: int, label2id: dict) -> Encoded:
    """``{"text", "label"}`` records (and ``text_pair``) -> examples with the class index as label (a label
    spelling a number finds the class of that number: ``"1.0"`` is class ``"1"``).

    Raises:
        LorakitError: a record's label is not in ``label2id`` (its line is named).
    """
    ids = [find_label(label2id, r["label"]) for r in records]
    unknown = [r for r, i in zip(records, ids) if i is None]
    if unknown:
        first = unknown[0]
        alike = sum(r["label"] == first["label"] for r in unknown)
        others = f", and {len(unknown) - alike} with other unknown labels" if len(unknown) > alike else ""
        known = sorted(label2id)
        shown = f"{known[:20]} and {len(known) - 20} more" if len(known) > 20 else f"{known}"
        raise LorakitError(f"{first['_where']} has label {first['label']!r}, which the model does not know "
                           f"({alike} records like it{others}); known labels: {shown}; the classes are those "
                           "of the training examples: give this one examples to train on, or remove its lines")
    return encode_texts(records, tokenizer, max_length, ids)


def encode_texts(records: list[dict], tokenizer, max_length: int, targets: list) -> Encoded:
    """``{"text"}`` records (and ``text_pair``) -> examples with ``targets[i]`` (a class index, or a
    number to fit) as the label of record ``i``."""
    texts = text_inputs(records)
    full = tokenizer(*texts, truncation=False, verbose=False)["input_ids"] if records else []
    cut = tokenizer(*texts, truncation=True, max_length=max_length) if records else {"input_ids": []}
    segments = cut.get("token_type_ids") if len(texts) == 2 else None
    encoded = Encoded()
    for i, (label, tokens, whole) in enumerate(zip(targets, cut["input_ids"], full)):
        encoded.longest = max(encoded.longest, len(whole))
        encoded.truncated += len(whole) > len(tokens)
        encoded.examples.append(EncodedExample(list(tokens), label, None if segments is None else list(segments[i])))
    return encoded


def encode_language_modeling(records: list[dict], tokenizer, max_length: int) -> Encoded:
    """Prompt/completion, chat (``messages``) or plain ``text`` records -> examples.

    The completion (or each assistant turn, chat template included) is followed by the
    end-of-sequence token when the template does not already end with one, so the model
    learns to stop.

    Raises:
        LorakitError: chat records with a tokenizer that has no chat template.
    """
    encoded = Encoded()
    for record in records:
        if "messages" in record:
            ids, labels = _encode_chat(record, tokenizer)
        elif "prompt" in record:
            prompt = tokenizer(record["prompt"])["input_ids"] if record["prompt"] else []
            completion = _with_eos(tokenizer(record["completion"], add_special_tokens=False)["input_ids"], tokenizer)
            ids, labels = prompt + completion, [IGNORE_INDEX] * len(prompt) + completion
        else:
            ids = _with_eos(tokenizer(record["text"])["input_ids"], tokenizer)
            labels = list(ids)
        encoded.longest = max(encoded.longest, len(ids))
        if len(ids) > max_length:
            encoded.truncated += 1
            ids, labels = ids[:max_length], labels[:max_length]
        example = EncodedExample(list(ids), list(labels))
        if example.target_count() == 0:
            encoded.dropped += 1
            continue
        encoded.examples.append(example)
    return encoded


def _with_eos(ids: list[int], tokenizer) -> list[int]:
    eos = tokenizer.eos_token_id
    return ids + [eos] if eos is not None and (not ids or ids[-1] != eos) else list(ids)


def _encode_chat(record: dict, tokenizer) -> tuple[list[int], list[int]]:
    """Token ids of a rendered chat, with only the assistant turns kept in the labels.

    Each assistant turn spans the characters between the rendering of the chat up to
    it (with the generation prompt) and the rendering that includes it; tokens whose
    first character falls inside a span are trained.
    """
    messages = [{"role": m["role"], "content": m["content"]} for m in record["messages"]]  # rendered as given
    if not getattr(tokenizer, "chat_template", None):
        raise LorakitError(f"{record['_where']} is a chat ('messages') but the tokenizer has no chat template; "
                           "give --chat-template chatml (or a template file), use prompt/completion records, "
                           "or a chat model")

    def render(upto, generation_prompt=False):
        from lorakit.chat_templates import RENDER_ERRORS

        try:
            return tokenizer.apply_chat_template(messages[:upto], tokenize=False,
                                                 add_generation_prompt=generation_prompt)
        except RENDER_ERRORS as err:  # a template that refuses this chat (its raise_exception) or breaks on it
            raise LorakitError(f"{record['_where']}: the chat template cannot render this chat "
                               f"({type(err).__name__}: {err}); mend the record or the template") from None

    full = render(len(messages))
    spans = []
    for i, message in enumerate(record["messages"]):
        if not trained(message):  # a user's turn, or an assistant's with weight 0
            continue
        start, end = len(render(i, generation_prompt=True)), len(render(i + 1))
        if not full.startswith(render(i + 1)):
            raise LorakitError(f"{record['_where']}: the tokenizer's chat template does not render a chat turn by "
                               "turn, so the prompt cannot be masked; use prompt/completion records")
        spans.append((start, end))
    tokens = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(tokens["input_ids"])
    labels = [token if any(start <= offset[0] < end for start, end in spans) else IGNORE_INDEX
              for token, offset in zip(ids, tokens["offset_mapping"])]
    return ids, labels


def collate(examples: list[EncodedExample], pad_id: int) -> dict:
    """Pad a list of examples on the right into a batch.

    Returns:
        ``input_ids: (B, T)``, ``attention_mask: (B, T)`` (1 = real token), and
        ``labels``: ``(B,)`` class indices, ``(B,)`` numbers (float32) or ``(B, T)`` targets padded
        with -100; for pairs of
        texts, ``token_type_ids: (B, T)`` (padded with 0).
    """
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    segments = torch.zeros((len(examples), width), dtype=torch.long) if examples[0].segments is not None else None
    for row, example in enumerate(examples):
        input_ids[row, :len(example.input_ids)] = torch.tensor(example.input_ids)
        attention_mask[row, :len(example.input_ids)] = 1
        if segments is not None:
            segments[row, :len(example.segments)] = torch.tensor(example.segments)
    if isinstance(examples[0].label, int):
        labels = torch.tensor([e.label for e in examples], dtype=torch.long)
    elif isinstance(examples[0].label, float):
        labels = torch.tensor([e.label for e in examples], dtype=torch.float32)
    else:
        labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
        for row, example in enumerate(examples):
            labels[row, :len(example.label)] = torch.tensor(example.label)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    return batch if segments is None else {**batch, "token_type_ids": segments}
