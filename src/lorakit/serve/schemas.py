"""Request and response bodies of the HTTP API, as pydantic models.

The generation routes follow OpenAI's wire format (``/v1/completions``,
``/v1/chat/completions`` and their server-sent-event chunks), so the official ``openai``
client talks to the server unchanged. Fields a client may send that lorakit does not use
(``user``, ``metadata``, ...) are accepted and ignored; fields it uses are
checked here, and a bad one answers 422 naming it. Sampling takes OpenAI's parameters and
vLLM's extensions (``top_k``, ``min_p``, ``repetition_penalty``, ``min_tokens``,
``stop_token_ids``, ``ignore_eos``); what changes an answer but is not done here (JSON
``response_format``, tool calling, ``best_of``, ``suffix``) is refused rather than ignored.
Numbers must be JSON numbers (not
``"2"`` or ``true``), a seed fits in 64 bits, and text holds no lone UTF-16 surrogate
(``"\ud800"``, which no tokenizer can encode).
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Literal

from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, field_validator,
                      model_validator)

MAX_N = 16  # choices per request


def _no_surrogates(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(f"the text holds a lone UTF-16 surrogate at character {err.start}; "
                         "send valid Unicode") from None
    return text


Text = Annotated[str, AfterValidator(_no_surrogates)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class _Sampling(_Request):
    model: Text = Field(min_length=1, description="'base' or an adapter name")
    max_tokens: StrictInt | None = Field(default=None, ge=1, description="tokens to generate at most")
    temperature: StrictFloat = Field(default=1.0, ge=0.0, le=2.0, description="below 1e-5 is greedy")
    top_p: StrictFloat = Field(default=1.0, gt=0.0, le=1.0)
    stop: Text | list[Text] | None = None
    seed: StrictInt | None = Field(default=None, ge=-(2**63), le=2**63 - 1, description="a 64-bit integer")
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    n: StrictInt = Field(default=1, ge=1, le=MAX_N, description="choices to generate for the prompt")
    ignore_eos: StrictBool = Field(default=False, description="vLLM's extension: generate max_tokens whatever comes")
    frequency_penalty: StrictFloat = Field(default=0.0, ge=-2.0, le=2.0, description="times a token's count, subtracted")
    presence_penalty: StrictFloat = Field(default=0.0, ge=-2.0, le=2.0, description="subtracted once a token was said")
    logit_bias: dict[str, StrictFloat] | None = Field(default=None, description="token id (as a string) -> bias")
    # vLLM's sampling extensions
    top_k: StrictInt = Field(default=0, ge=-1, description="keep the k most likely tokens (0 or -1: all)")
    min_p: StrictFloat = Field(default=0.0, ge=0.0, le=1.0, description="drop tokens under min_p x the likeliest's "
                                                                        "probability")
    repetition_penalty: StrictFloat = Field(default=1.0, gt=0.0, description="divides the logits of tokens seen")
    min_tokens: StrictInt = Field(default=0, ge=0, description="tokens generated before an end token or stop string")
    stop_token_ids: list[Annotated[StrictInt, Field(ge=0)]] | None = Field(default=None,
                                                                          description="tokens that end the answer")

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value):
        if value is None:
            return []
        stops = [value] if isinstance(value, str) else value
        if len(stops) > 4:
            raise ValueError(f"at most 4 stop strings, got {len(stops)}")
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _bias_by_token(cls, value):
        """``{"50256": -100}`` -> ``{50256: -100.0}``; keys are token ids, biases within ±100."""
        if not value:
            return {}
        bias = {}
        for key, number in value.items():
            if not key.strip().isdigit():
                raise ValueError(f"the key {key!r} is not a token id; logit_bias maps token ids (as strings, "
                                 "e.g. \"50256\") to a bias")
            if not -100 <= number <= 100:
                raise ValueError(f"the bias {number:g} of token {key.strip()} is outside -100 to 100")
            bias[int(key)] = float(number)
        return bias

    @field_validator("min_tokens")
    @classmethod
    def _min_within_max(cls, value, info):
        most = info.data.get("max_tokens")
        if most is not None and value > most:
            raise ValueError(f"min_tokens {value} is more than max_tokens {most}; ask for at most as many")
        return value

    def token_ids(self) -> dict[str, list[int]]:
        """The token ids the request names outside its prompt, by field (checked against the vocabulary)."""
        return {"logit_bias": list(self.logit_bias or ()), "stop_token_ids": list(self.stop_token_ids or ())}


    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def logprobs_k(self) -> int | None:
        """None: no logprobs; k >= 0: each token's logprob and the k most likely tokens'."""
        return None


MAX_PROMPTS = 64  # prompts in one /v1/completions request
_PROMPT_KINDS = "a text, a list of texts, a list of token ids (integers from 0), or a list of such lists"


def _token_ids(value) -> bool:
    return isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)


def _one_prompt(value, where: str) -> str | list[int]:
    if isinstance(value, str):
        return _no_surrogates(value)
    if _token_ids(value):
        if not value:
            raise ValueError(f"{where} is an empty list of token ids")
        if min(value) < 0:
            raise ValueError(f"{where} holds token id {min(value)}; token ids start at 0")
        return value
    raise ValueError(f"{where} is {type(value).__name__}; a prompt is {_PROMPT_KINDS}")


class CompletionRequest(_Sampling):
    """POST /v1/completions. ``prompt`` is a text, a list of texts, a list of token ids, or a
    list of such lists, as OpenAI takes it; choice ``i * n + j`` is prompt ``i``'s ``j``-th."""

    prompt: str | list
    logprobs: StrictInt | None = Field(default=None, ge=0, le=5, description="top alternatives per token")
    max_tokens: StrictInt | None = Field(default=None, ge=0, description="tokens to generate at most (0: echo alone)")
    echo: StrictBool = Field(default=False, description="the prompt first, with its tokens' logprobs when asked")
    best_of: StrictInt | None = Field(default=None, ge=1, description="accepted when equal to n")
    suffix: Text | None = None

    @model_validator(mode="after")
    def _what_is_not_done(self):
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens 0 generates nothing; it is allowed only with echo (for the prompt's "
                             "logprobs); ask for 1 or more")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError(f"best_of {self.best_of} is not supported (it must equal n, {self.n}); ask for n "
                             "choices with logprobs and pick among them")
        if self.suffix:
            raise ValueError("suffix (text after the completion) is not supported; send the prompt alone")
        return self

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_kinds(cls, value):
        if isinstance(value, str) or (_token_ids(value) and value):
            return _one_prompt(value, "the prompt")
        if not isinstance(value, list) or not value:
            raise ValueError(f"the prompt must be {_PROMPT_KINDS}" + (", not an empty list" if value == [] else ""))
        if len(value) > MAX_PROMPTS:
            raise ValueError(f"{len(value)} prompts in one request; at most {MAX_PROMPTS}")
        return [_one_prompt(item, f"prompt {i}") for i, item in enumerate(value)]

    def logprobs_k(self) -> int | None:
        return self.logprobs

    def prompts(self) -> list[str | list[int]]:
        """The prompts, each a text or token ids."""
        if isinstance(self.prompt, str) or _token_ids(self.prompt):
            return [self.prompt]
        return list(self.prompt)


class TextPart(BaseModel):
    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Text | list[TextPart]

    def as_dict(self) -> dict:
        """``{"role", "content"}`` with content as one string (text parts joined)."""
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": self.role, "content": content}


def _one_ending(add_generation_prompt: bool, continue_final_message: bool) -> None:
    """A chat's prompt ends one way: a new turn opened, or the last message continued."""
    if continue_final_message and add_generation_prompt:
        raise ValueError("continue_final_message goes on with the last message, add_generation_prompt opens a "
                         "new turn after it; set add_generation_prompt to false with continue_final_message")


class ChatRequest(_Sampling):
    """POST /v1/chat/completions, with vLLM's extensions for ending the prompt: without
    ``add_generation_prompt`` the template does not open the assistant's turn (the answer takes
    the last message's role), with ``continue_final_message`` the answer goes on with the last
    message itself, and ``echo`` starts the answer with the last message's content when that
    message has the answer's role."""

    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = Field(default=None, ge=0, le=20)
    echo: StrictBool = Field(default=False, description="the answer starts with the last message's content "
                                                         "when that message has the answer's role")
    add_generation_prompt: StrictBool = Field(default=True, description="open the assistant's turn after the messages")
    continue_final_message: StrictBool = Field(default=False, description="continue the last message itself")

    response_format: dict | None = None
    tool_choice: str | dict | None = None
    function_call: str | dict | None = None  # the legacy tool_choice, for functions
    tools: list | None = None
    functions: list | None = None

    @model_validator(mode="before")
    @classmethod
    def _completion_tokens(cls, data):
        """OpenAI's ``max_completion_tokens`` (its current name for ``max_tokens`` in a chat) is the length
        limit where it is given, over ``max_tokens``, as vLLM takes it."""
        if isinstance(data, dict) and data.get("max_completion_tokens") is not None:
            value = data["max_completion_tokens"]
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"max_completion_tokens must be an integer of at least 1, got {value!r}")
            data = {**data, "max_tokens": value}
        return data

    @model_validator(mode="after")
    def _one_ending(self):
        _one_ending(self.add_generation_prompt, self.continue_final_message)
        return self

    @field_validator("top_logprobs")
    @classmethod
    def _with_logprobs(cls, value, info):
        if value and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs set to true")
        return value

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, value):
        kind = (value or {}).get("type", "text")
        if kind != "text":
            raise ValueError(f"{kind!r} is not supported (this server does not constrain decoding to JSON); ask "
                             "for the format in the messages, or leave response_format out")
        return value

    @field_validator("tools", "functions")
    @classmethod
    def _no_tool_calls(cls, value, info):
        choice = "tool_choice" if info.field_name == "tools" else "function_call"
        if value and info.data.get(choice) != "none":
            raise ValueError(f"tool calling is not supported (this server does not parse tool calls); describe the "
                             f"{info.field_name} in the messages, or send {choice} \"none\"")
        return value

    def answer_role(self) -> str:
        """The role of the answer: the assistant's, or the last message's when no new turn is opened."""
        return "assistant" if self.add_generation_prompt else self.messages[-1].role

    def echoed(self) -> str | None:
        """What the answer starts with under ``echo``: the last message's content, when it has the answer's role."""
        last = self.messages[-1]
        return last.as_dict()["content"] if self.echo and last.role == self.answer_role() else None

    def logprobs_k(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class ClassifyRequest(_Request):
    """POST /v1/classify: one text or a list of texts; to an adapter trained on pairs of texts, each
    a ``[first, second]`` list (or ``"first<TAB>second"``)."""

    model: Text = Field(default="base", min_length=1)
    input: Text | list[Text | Annotated[list[Text], Field(min_length=2, max_length=2)]]

    @field_validator("input")
    @classmethod
    def _non_empty(cls, value):
        texts = [value] if isinstance(value, str) else value
        if not texts:
            raise ValueError("give at least one text")
        for i, text in enumerate(texts):  # an empty text has nothing to classify (lorakit predict refuses it too)
            if any(not part.strip() for part in ([text] if isinstance(text, str) else text)):
                raise ValueError(f"text {i} is empty; give some words to classify")
        return texts


class TokenizeRequest(_Request):
    """vLLM's POST /tokenize: a ``prompt`` (as ``/v1/completions`` reads it) or ``messages`` (as
    ``/v1/chat/completions`` renders them), to the token ids the model would be given."""

    model: Text | None = None
    prompt: Text | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    add_generation_prompt: StrictBool = True
    continue_final_message: StrictBool = False
    return_token_strs: StrictBool = False

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give either prompt (a text) or messages (a chat), not both or neither")
        if self.messages is not None:
            _one_ending(self.add_generation_prompt, self.continue_final_message)
        return self


class DetokenizeRequest(_Request):
    """vLLM's POST /detokenize: token ids to their text."""

    model: Text | None = None
    tokens: list[Annotated[StrictInt, Field(ge=0)]]


class AdapterLoadRequest(_Request):
    """POST /v1/adapters: load the adapter in folder ``path`` (under --adapter-root) as ``name``."""

    name: str = Field(pattern=r"^[A-Za-z0-9_][A-Za-z0-9._:/@+-]{0,127}$")
    path: Text = Field(min_length=1, max_length=4096)


class LoadLoraAdapterRequest(_Request):
    """vLLM's POST /v1/load_lora_adapter."""

    lora_name: str = ""
    lora_path: str = ""
    load_inplace: bool = False


class UnloadLoraAdapterRequest(_Request):
    """vLLM's POST /v1/unload_lora_adapter."""

    lora_name: str = ""
    lora_int_id: int | None = None


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def error_body(message: str, type_: str, param: str | None = None, code: str | int | None = None) -> dict:
    """OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}``; a client's text echoed
    in ``message`` that UTF-8 cannot carry (a lone surrogate such as ``"\\ud800"``) is written escaped."""
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
