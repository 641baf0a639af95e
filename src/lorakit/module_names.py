"""How module paths are named and matched, as Hugging Face PEFT matches them: the one rule
for target names, regexes, block indices and per-path patterns (:class:`lorakit.config.LoraConfig`
applies them; :mod:`lorakit.targets` resolves them on a model).

- a list of names: a path matches ``name`` when it equals it or ends in ``"." + name``;
- a string: a regular expression the whole path must match (``re.fullmatch``);
- ``"all-linear"``: every ``nn.Linear`` / ``Conv1D`` except the output head (resolved by
  :mod:`lorakit.targets`, which knows the model);
- a block's index (PEFT's ``layers_to_transform``): the number in the first
  ``<name>.<index>.`` of the path, or of ``<layers_pattern>.<index>.``: :func:`block_index`;
- ``rank_pattern`` / ``alpha_pattern`` keys: regexes matched against the end of the path on a
  ``.`` boundary, first key in order wins: :func:`pattern_key`.

Targets and blocks typed as one string (``--targets``, ``--layers-to-transform``) are read by
:func:`parse_targets` and :func:`parse_layers`.
"""

from __future__ import annotations

import re

from lorakit.errors import LorakitError

ALL_LINEAR = "all-linear"


def as_name_list(value, what: str):
    """None, a regex string, or a list of names (tuples and sets become sorted lists)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (set, frozenset)):
        value = sorted(value)
    try:
        names = list(value)
    except TypeError:
        raise LorakitError(f"{what} must be a list of module names or a regex string, got {value!r}") from None
    bad = [n for n in names if not isinstance(n, str) or not n]
    if bad:
        raise LorakitError(f"{what} holds {bad!r}; give non-empty module names such as 'q_proj'")
    return names


def name_matches(spec, path: str) -> bool:
    """True when module ``path`` is named by ``spec`` (a list of names or a regex string).

    >>> name_matches(["q_proj"], "model.layers.0.self_attn.q_proj")
    True
    >>> name_matches(r".*\\.(q|v)_proj", "model.layers.0.self_attn.v_proj")
    True
    """
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, path) is not None
    return any(path == name or path.endswith("." + name) for name in spec)


#: characters that make a ``--targets`` value a regular expression rather than a list of names
TARGET_REGEX_CHARS = frozenset("|*()[]{}^$\\")
_ANY_PREFIX = r"(?:.*\.)?"  # a module path's start, up to a dot


def parse_targets(value):
    """Targets written as one string -> a value for :attr:`LoraConfig.target_modules`.

    - ``None`` stays None (the model family's default); ``"all-linear"`` stays as it is;
    - a value holding any of ``| * ( ) [ ] { } ^ $ \\`` is one regular expression that must
      match a module's whole path or the whole of its end after a dot (``"query|value"``
      selects ``bert.encoder.layer.0.attention.self.query``); it is returned as the PEFT
      string (full match of the path) ``(?:.*\\.)?(?:query|value)``;
    - anything else is a comma-separated list of names (``"query, value"`` ->
      ``["query", "value"]``: PEFT's list form). A list or tuple is taken as names.

    Parsing the result again gives it back unchanged.

    Raises:
        LorakitError: the value names nothing, or its regular expression does not compile.
    """
    if value is None:
        return None
    if not isinstance(value, str):
        return as_name_list(value, "targets")
    text = value.strip()
    if text == ALL_LINEAR:
        return ALL_LINEAR
    if any(ch in TARGET_REGEX_CHARS for ch in text):
        try:
            re.compile(text)
        except re.error as err:
            raise LorakitError(f"targets {value!r} is not a valid regular expression ({err}); "
                               "give names separated by commas, or a valid regex such as 'query|value'") from None
        return text if text.startswith(_ANY_PREFIX + "(?:") and text.endswith(")") else f"{_ANY_PREFIX}(?:{text})"
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise LorakitError(f"targets {value!r} names no module; give names such as query,value, "
                           "a regex such as 'query|value', or all-linear")
    return names


def parameter_matches(entry: str, key: str) -> bool:
    """PEFT's rule for ``target_parameters``: the parameter ``key`` (``<module path>.<name>``)
    is selected by ``entry`` when it equals it or ends in ``"." + entry``."""
    return key == entry or key.endswith("." + entry)


def parse_parameters(value):
    """Parameter targets written as one string -> a value for :attr:`LoraConfig.target_parameters`:
    comma-separated names (``"experts.gate_up_proj, experts.down_proj"``), each a parameter's
    ``<module path>.<name>`` or its end, as PEFT takes them; None stays None, a list is kept.

    Raises:
        LorakitError: the value names nothing.
    """
    return _names(value, "target parameters", "experts.gate_up_proj,experts.down_proj")


def parse_modules(value):
    """Modules written as one string -> a value for :attr:`LoraConfig.modules_to_save`:
    comma-separated names (``"lm_head, embed_tokens"``), each a module's path or its end, as
    PEFT takes them; None stays None, a list is kept.

    Raises:
        LorakitError: the value names nothing.
    """
    return _names(value, "modules to save", "lm_head,embed_tokens")


def _names(value, what: str, example: str):
    if not isinstance(value, str):
        return value
    names = [name.strip() for name in value.split(",") if name.strip()]
    if not names:
        raise LorakitError(f"{what} {value!r} name none; give names such as {example}")
    return names


def parse_layers(value):
    """Block indices written as one string -> a value for :attr:`LoraConfig.layers_to_transform`.

    ``"10,11"`` -> ``[10, 11]``; ``"8-11"`` -> ``[8, 9, 10, 11]`` (ranges include both ends,
    and mix with single indices); None stays None; an int or a list is checked by
    :class:`LoraConfig` itself.

    >>> parse_layers("0, 4-6")
    [0, 4, 5, 6]

    Raises:
        LorakitError: a part is not an index or a range of them.
    """
    if not isinstance(value, str):
        return value
    out: list[int] = []
    for part in (p.strip() for p in value.split(",")):
        low, dash, high = part.partition("-")
        if not (low.strip().isdigit() and (not dash or high.strip().isdigit())) \
                or (dash and int(high) < int(low)):
            raise LorakitError(f"layers {value!r}: {part!r} is not a block index or a range such as 8-11; "
                               "give indices from 0, e.g. 10,11 or 8-11")
        out.extend(range(int(low), int(high if dash else low) + 1))
    return sorted(set(out))


def pattern_key(patterns: dict, path: str):
    """The first key of ``patterns`` that matches the end of ``path`` on a dot boundary, or None."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", path):
            return key
    return None


def narrows_a_regex(targets, layers) -> bool:
    """Whether block indices are given beside a regex of targets, which PEFT refuses (the regex
    itself says which blocks); ``"all-linear"`` is names, not a regex."""
    return layers is not None and isinstance(targets, str) and targets != ALL_LINEAR


def block_index(path: str, layers_pattern=None) -> int | None:
    """The index of the block module ``path`` lies in, by PEFT's rule, or None.

    The first ``<name>.<index>.`` of the path counts (so ``model.layers.1.experts.0.w1`` is in
    block 1, not 0); with ``layers_pattern`` (a name or a list of names), the first
    ``<pattern>.<index>.``.

    >>> block_index("model.layers.3.self_attn.q_proj"), block_index("h.0.attn.c_attn", "h")
    (3, 0)
    """
    if not layers_pattern:
        found = re.match(r".*?\.[^.]*\.(\d+)\.", path)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        found = next((m for p in patterns if (m := re.match(rf"(?:^|.*?\.){p}\.(\d+)\.", path))), None)
    return None if found is None else int(found.group(1))

