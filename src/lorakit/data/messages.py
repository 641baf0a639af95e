"""A chat record's messages: what lorakit trains on, and the ShareGPT layout read as the same.

A chat is a non-empty list of ``{"role": "system" | "user" | "assistant", "content": str}`` with at
least one assistant turn (the turns the loss is computed on). Files in the ShareGPT layout, which
many chat datasets use, hold ``{"from": "human" | "gpt" | "system", "value": str}`` under
``conversations``; they are read as the same messages (``human`` → ``user``, ``gpt`` →
``assistant``), so such a file trains with no column flags.

An assistant message may carry ``"weight": 0`` (OpenAI's chat fine-tuning format): the turn stays in
the prompt the later turns see, and is not trained on (``weight`` 1, the default, trains it).
"""

from __future__ import annotations

import json

from lorakit.errors import LorakitError

CHAT_ROLES = ("system", "user", "assistant")
SHAREGPT_KEY = "conversations"  # where a ShareGPT record keeps its messages
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def check_messages(messages, where: str) -> list[dict]:
    """``messages`` as ``[{"role", "content"}, ...]``, or a :class:`LorakitError` naming ``where`` and
    what is wrong. A string is read as JSON (a CSV cell holding the list)."""
    if isinstance(messages, str):  # a CSV cell holding JSON
        try:
            messages = json.loads(messages)
        except json.JSONDecodeError:
            raise LorakitError(f"{where}: 'messages' is a string that is not JSON; give a list of "
                               '{"role": ..., "content": ...}') from None
    if not isinstance(messages, list) or not messages:
        raise LorakitError(f"{where}: 'messages' must be a non-empty list of "
                           '{"role": "user"|"assistant"|"system", "content": "..."}')
    out = []
    for i, message in enumerate(messages):
        if isinstance(message, dict) and "role" not in message and "from" in message:  # ShareGPT's layout
            message = {"role": SHAREGPT_ROLES.get(message["from"], message["from"]), "content": message.get("value")}
        if not isinstance(message, dict) or message.get("role") not in CHAT_ROLES \
                or not isinstance(message.get("content"), str):
            raise LorakitError(f"{where}: messages[{i}] is {message!r}; each message needs a 'role' in "
                               f"{list(CHAT_ROLES)} and a string 'content' (or ShareGPT's 'from' in "
                               f"{list(SHAREGPT_ROLES)} and 'value')")
        checked = {"role": message["role"], "content": message["content"]}
        if message.get("weight") is not None:
            if message["role"] != "assistant" or message["weight"] not in (0, 1) or isinstance(message["weight"], bool):
                raise LorakitError(f"{where}: messages[{i}] has weight {message['weight']!r}; a weight is 0 (not "
                                   "trained) or 1 (trained), on an assistant message")
            checked["weight"] = int(message["weight"])
        out.append(checked)
    if not any(trained(m) for m in out):
        raise LorakitError(f"{where}: 'messages' has no assistant turn to train on (none, or every one has weight 0)")
    return out


def trained(message: dict) -> bool:
    """Whether the loss is computed on ``message``: an assistant turn whose weight is not 0."""
    return message["role"] == "assistant" and message.get("weight", 1) != 0
