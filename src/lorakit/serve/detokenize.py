"""Turning one request's generated token ids into text, piece by piece, with stop strings.

Streaming and non-streaming answers come from the same :class:`TextStream`, so the
pieces a client receives always add up to the full answer. Two things are held back
until they are certain: a trailing "\ufffd" (a multi-byte character cut in the middle by
byte-level BPE) and a tail that could still grow into one of the stop strings.
"""

from __future__ import annotations

_REPLACEMENT = "\ufffd"


class TextStream:
    """Accumulates token ids and says which new text is final.

    Args:
        tokenizer: anything with ``decode(ids, skip_special_tokens=True) -> str``.
        stop: strings that end the answer; the answer stops before the first one found.
    """

    def __init__(self, tokenizer, stop: list[str] | None = None):
        self.tokenizer = tokenizer
        self.stop = [s for s in (stop or []) if s]
        self.token_ids: list[int] = []
        self.text = ""
        self.emitted = 0  # characters of `text` already handed out
        self.stopped = False  # a stop string was found

    def add(self, token_id: int, stops: bool = True) -> str:
        """Append one token; return the text that became final (often ""). With ``stops`` false
        (before a request's ``min_tokens``) the stop strings are not looked for."""
        self.token_ids.append(token_id)
        self.text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        for stop in self.stop if stops else ():
            at = self.text.find(stop, max(0, self.emitted - len(stop)))
            if at != -1:
                self.text = self.text[:at]
                self.stopped = True
        if self.stopped:
            return self.finish()
        safe = len(self.text) - self._held_back(stops)
        return self._emit_until(safe)

    def finish(self) -> str:
        """The rest of the text, once no more tokens will come."""
        return self._emit_until(len(self.text))

    def _emit_until(self, end: int) -> str:
        if end <= self.emitted:
            return ""
        piece = self.text[self.emitted:end]
        self.emitted = end
        return piece

    def _held_back(self, stops: bool = True) -> int:
        """How many trailing characters might still change: a cut character or a stop prefix."""
        text = self.text
        held = len(text) - len(text.rstrip(_REPLACEMENT))
        for stop in self.stop if stops else ():
            for n in range(min(len(stop) - 1, len(text)), 0, -1):
                if text.endswith(stop[:n]):
                    held = max(held, n)
                    break
        return held
