"""What the engine keeps between decode steps besides the cache: the per-row adapter context
of the running rows (:class:`HeldRows`)."""

from __future__ import annotations


class HeldRows:
    """One ``per_row_adapters`` context kept open across decode steps while the rows
    stay the same, so a step does not pay for entering it again. It must be closed
    before adapters are loaded or unloaded, and before a prefill (which has its own rows)."""

    def __init__(self, model):
        self.model = model
        self.slots: tuple | None = None
        self.context = None

    def use(self, slots: list[str | None], invoked: list[bool | None] | None = None) -> None:
        """Rows ``slots`` (and, for activated adapters, whether each row's prompt ``invoked`` it)."""
        key = (tuple(slots), None if invoked is None else tuple(invoked))
        if key == self.slots:
            return
        from lorakit.per_row import per_row_adapters

        self.close()
        context = per_row_adapters(self.model, slots, invoked)
        context.__enter__()
        self.context, self.slots = context, key

    def close(self) -> None:
        if self.context is not None:
            context, self.context, self.slots = self.context, None, None
            context.__exit__(None, None, None)

