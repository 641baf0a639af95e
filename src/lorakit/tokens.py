"""Which embeddings an adapter's ``trainable_token_indices`` select, and putting their
:class:`~lorakit.layers.tokens.TokenRows` on a model (PEFT's rules, so a config written for
PEFT trains and loads the same rows here).

- A list of token ids selects the model's input embedding (``get_input_embeddings()``, else
  the module whose path ends in ``embed_tokens``).
- A dict maps a name to its ids: each name selects the embedding whose path ends in it
  (as ``modules_to_save`` names match).
- An output head that shares a selected embedding's weight (tied embeddings) follows it, unless
  the config names it with tokens of its own; a linear head named in the dict has rows (its
  tokens' logits) of its own.

>>> attach(model, LoraConfig(target_modules=["q_proj"], trainable_token_indices=[49152, 49153]))
"""

from __future__ import annotations

from torch import nn

from lorakit.config import LoraConfig
from lorakit.errors import LorakitError
from lorakit.layers import LoraLayer, SavedModule
from lorakit.layers.tokens import TokenRows
from lorakit.targets import replace_module


def _plain(module: nn.Module) -> nn.Module:
    return module.original() if isinstance(module, SavedModule) else module


def input_embedding_path(model: nn.Module, modules: dict[str, nn.Module]) -> str | None:
    """The path of the model's input token embedding, or None when it has none lorakit can find."""
    get = getattr(model, "get_input_embeddings", None)
    try:
        found = get() if callable(get) else None
    except (AttributeError, NotImplementedError):
        found = None
    for path, module in modules.items():
        if path and found is not None and module is found:
            return path
    return next((p for p in modules if p.endswith("embed_tokens")), None)


def token_targets(model: nn.Module, config: LoraConfig, modules: dict[str, nn.Module]) -> dict[str, list[int]]:
    """Embedding path -> the token ids ``config.trainable_token_indices`` train there ({} without them).

    Raises:
        LorakitError: a name matches no module, or one that is no ``nn.Embedding`` or ``nn.Linear``, or a selected
            embedding is a LoRA target or in ``modules_to_save`` (PEFT refuses both).
    """
    spec = config.trainable_token_indices
    if not spec:
        return {}
    embeddings = [p for p, m in modules.items() if p and isinstance(_plain(m), nn.Embedding)]
    if isinstance(spec, list):
        path = input_embedding_path(model, modules)
        if path is None:
            raise LorakitError("trainable_token_indices is a list, which names the model's input embedding, but "
                               f"{type(model).__name__} has none lorakit can find; give a dict such as "
                               f"{{'{embeddings[0] if embeddings else 'embed_tokens'}': [...]}}")
        chosen = {path: spec}
    else:
        chosen = {}
        for name, ids in spec.items():
            paths = [p for p in modules if p and p.endswith(name) and not isinstance(modules[p], LoraLayer)]
            if not paths:
                raise LorakitError(f"trainable_token_indices names {name!r}, which matches no module of "
                                   f"{type(model).__name__}; its embeddings: {embeddings}")
            chosen.update({p: ids for p in paths})
    for path in chosen:
        module = modules[path]
        if isinstance(module, LoraLayer) or config.targets(path):
            raise LorakitError(f"{path} is a LoRA target and has trainable tokens; train it one way: leave it out of "
                               "target_modules or of trainable_token_indices")
        if config.within_saved(path):
            raise LorakitError(f"{path} is in modules_to_save (trained whole) and has trainable tokens; name it in "
                               "one of them, as in PEFT")
        if not isinstance(_plain(module), (nn.Embedding, nn.Linear)):
            raise LorakitError(f"trainable_token_indices selects {path}, a {type(_plain(module)).__name__}; "
                               f"name an embedding: {embeddings}")
        rows = _plain(module).weight.shape[0]
        if bad := [i for i in chosen[path] if i >= rows]:
            raise LorakitError(f"trainable_token_indices {bad[:5]} for {path}: token ids must lie in 0..{rows - 1} "
                               f"(it has {rows} rows); resize the model's token embeddings first for new tokens")
    for path in [p for p in chosen if isinstance(_plain(modules[p]), nn.Embedding)]:
        for head in _tied_heads(modules, path):  # the same tokens on a tied head: it follows the embedding
            if chosen.get(head) == chosen[path]:
                del chosen[head]
    return chosen


def _tied_heads(modules: dict[str, nn.Module], path: str) -> list[str]:
    """The linear modules (an output head) whose weight is the embedding at ``path``'s own tensor."""
    weight = _plain(modules[path]).weight
    return [p for p, m in modules.items() if p != path and (isinstance(m, nn.Linear) or isinstance(m, TokenRows)
                                                           and m.tied) and m.weight is weight]


def attach_tokens(model: nn.Module, config: LoraConfig, name: str, modules: dict[str, nn.Module],
                  chosen: dict[str, list[int]]) -> None:
    """Give adapter ``name`` its token rows at each of ``chosen`` (from :func:`token_targets`), the
    embedding's tied output heads following them."""
    for path, ids in chosen.items():
        module = modules[path]
        if not isinstance(module, TokenRows):
            module = TokenRows(module)
            replace_module(model, modules, path, module)
            for head in (h for h in _tied_heads(modules, path) if h not in chosen):
                replace_module(model, modules, head, TokenRows(modules[head], tied_to=module))
        module.add_copy(name, ids)


def token_ids(tokenizer, tokens: list[str | int]) -> list[int]:
    """The ids of ``tokens`` (a token of ``tokenizer``'s vocabulary, or an id), for ``trainable_token_indices``.

    Raises:
        LorakitError: an entry is not one token of the vocabulary.
    """
    ids = []
    for token in tokens:
        if isinstance(token, int):
            ids.append(token)
            continue
        found = tokenizer.convert_tokens_to_ids(token)
        if found is None or (found == tokenizer.unk_token_id and token != tokenizer.unk_token):
            encoded = tokenizer.encode(token, add_special_tokens=False)
            if len(encoded) != 1:
                raise LorakitError(f"--trainable-tokens {token!r} is not a token of the model's vocabulary (it "
                                   f"encodes as {len(encoded)} tokens); give tokens it has, or their ids")
            found = encoded[0]
        ids.append(int(found))
    return list(dict.fromkeys(ids))
