"""Checks of :class:`lorakit.config.LoraConfig`'s token fields, each value as PEFT's file holds it:
``trainable_token_indices`` (:func:`token_indices`) and ``alora_invocation_tokens`` (:func:`invocation_tokens`)."""

from __future__ import annotations

from lorakit.errors import LorakitError


def _is_id(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def token_indices(spec):
    """``trainable_token_indices`` checked: None, a list of distinct token ids, or name -> such a list."""
    if spec in (None, [], {}):
        return None

    def ids(value, where):
        if not isinstance(value, (list, tuple)) or not value or len(set(value)) != len(value) \
                or not all(map(_is_id, value)):
            raise LorakitError(f"trainable_token_indices{where} must be a list of distinct token ids (integers "
                               f"from 0), got {value!r}")
        return list(value)

    if isinstance(spec, dict):
        if not all(isinstance(k, str) and k for k in spec):
            raise LorakitError(f"trainable_token_indices keys must be embedding names such as 'embed_tokens', "
                               f"got {list(spec)!r}")
        return {k: ids(v, f"[{k!r}]") for k, v in spec.items()}
    return ids(spec, "")


def invocation_tokens(spec):
    """``alora_invocation_tokens`` checked: None, or the invocation's token ids (a non-empty list)."""
    if spec is None:
        return None
    if not isinstance(spec, (list, tuple)) or not spec or not all(map(_is_id, spec)):
        raise LorakitError(f"alora_invocation_tokens must be the token ids of the invocation (a non-empty list of "
                           f"integers from 0), got {spec!r}")
    return list(spec)
