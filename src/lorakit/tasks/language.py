"""Language modelling: a causal LM learns to continue text, chats or completions.

Records are prompt/completion pairs, chats (``messages``: only the assistant turns are
trained) or plain text. Loss: cross-entropy per trained token; metric: that loss
(perplexity is reported beside it).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import ClassVar

import torch

from lorakit import data as lkdata
from lorakit.chat_templates import end_ids
from lorakit.chunked_loss import causal_lm_loss
from lorakit.data.encode import Encoded
from lorakit.data.readers import language_model_records, lm_checker
from lorakit.data.stream import RecordStream
from lorakit.errors import LorakitError
from lorakit.model_kinds import position_limit
from lorakit.tasks.base import Task

NO_CUT = 1 << 30  # a max length that cuts nothing


@dataclass(frozen=True, kw_only=True)
class LanguageModelTask(Task):
    """A task whose model predicts the next token.

    Attributes:
        chat: prompts given to :meth:`generate` are a user's turn, rendered with the
            tokenizer's chat template (when it has one); otherwise plain text to continue.
    """

    metric: str = "loss"
    higher_is_better: bool = False
    chat: bool = False

    def read_records(self, path, columns=None) -> list[dict]:
        return lkdata.readers.read_language_modeling(path, columns)

    def check_records(self, raw, source, columns=None) -> list[dict]:
        return language_model_records(raw, columns)

    def stream_records(self, path, columns, buffer, limit) -> RecordStream:
        return RecordStream(path, lambda first: lm_checker(first, columns), buffer, limit, group_keys=self.group_keys)

    def token_lengths(self, records, tokenizer) -> list[int]:
        return [len(e.input_ids) for e in lkdata.encode_language_modeling(records, tokenizer, NO_CUT).examples]

    def encode(self, records, tokenizer, max_length, labels) -> Encoded:
        return lkdata.encode_language_modeling(records, tokenizer, max_length)

    def batch_stats(self, model, batch, label_smoothing=0.0) -> dict:
        # the output head applied chunk by chunk: the (tokens × vocabulary) logits never exist at once
        loss, count = causal_lm_loss(model, batch, label_smoothing)
        return {"loss_sum": loss, "count": count}

    default_model: ClassVar[str] = "default-chat"
    auto_class: ClassVar[str] = "AutoModelForCausalLM"
    group_keys: ClassVar[tuple[str, ...]] = ("prompt", "text")  # one prompt's answers together

    def fake_batch(self, batch_size, length) -> dict:
        ids = torch.zeros(batch_size, length, dtype=torch.long)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    def fake_loss(self, model, batch):
        # every position trained: selecting the trained ones would need the (fake) values
        return causal_lm_loss(model, batch, skip_ignored=False)[0]

    def metrics(self, sums, examples, outputs=None, labels=None, detail=False) -> dict:
        loss = sums["loss_sum"] / max(sums["count"], 1)
        return {"loss": loss, "examples": examples, "perplexity": math.exp(min(loss, 50.0))}

    @torch.no_grad()
    def generate(self, model, tokenizer, prompts, max_new_tokens) -> list[str]:
        """Greedy answers; a chat task's prompt is a user turn through the chat template,
        and the answer is the text generated after it, special tokens removed."""
        device = next(model.parameters()).device
        chat = self.chat and getattr(tokenizer, "chat_template", None)
        answers = []
        for prompt in prompts:
            text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                 add_generation_prompt=True) if chat else prompt
            ids = tokenizer(text, add_special_tokens=not chat, return_tensors="pt")["input_ids"].to(device)
            if ids.shape[1] == 0:  # nothing to continue (a tokenizer that adds no start token)
                raise LorakitError(f"prompt {len(answers) + 1} is empty; give some words to continue")
            new_tokens = _room(model, ids.shape[1], max_new_tokens)
            output = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                    max_new_tokens=new_tokens, pad_token_id=tokenizer.pad_token_id,
                                    eos_token_id=sorted(end_ids(model, tokenizer)) or None)
            answers.append(tokenizer.decode(output[0, ids.shape[1]:], skip_special_tokens=True).strip())
        return answers


def _room(model, prompt_tokens: int, max_new_tokens: int) -> int:
    """``max_new_tokens``, or fewer where a model with learned positions (GPT-2's 1,024) has no
    room for them after the prompt (a warning says so); a prompt that fills it is refused."""
    limit = position_limit(model)
    if limit is None or prompt_tokens + max_new_tokens <= limit:
        return max_new_tokens
    if prompt_tokens >= limit:
        raise LorakitError(f"the prompt has {prompt_tokens} tokens and this model takes at most {limit}; "
                           "shorten the prompt")
    warnings.warn(f"--max-new-tokens {max_new_tokens} does not fit this model's {limit} positions after a "
                  f"{prompt_tokens}-token prompt; generating at most {limit - prompt_tokens}", stacklevel=2)
    return limit - prompt_tokens


def load_causal_lm(spec: str, labels):
    from lorakit.models import load_causal_lm

    model, tokenizer = load_causal_lm("default-chat" if spec == "default" else spec)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def reviews_as_text():
    """The embedded review snippets as plain-text records (the ``text`` task's default data)."""
    splits = lkdata.rotten_tomatoes(validation=200, test=200)

    def as_text(part):
        return [{"text": r["text"], "_where": r["_where"]} for r in part]

    return lkdata.DatasetSplits(as_text(splits.train), as_text(splits.validation), as_text(splits.test),
                                f"{splits.source} as plain text")
