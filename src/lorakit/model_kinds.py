"""What a model is: its kind (a bare body, a sequence classifier, a causal LM, other),
its architecture's name, and a fingerprint of its weights' shapes.

Part of the model-structure authority: :mod:`lorakit.targets` re-exports every name
here, and the rest of lorakit asks ``targets``.
"""

from __future__ import annotations

import hashlib
import sys
from functools import lru_cache

from torch import nn

#: what a model is, by its head: a body alone (``BertModel``), a sequence classifier,
#: a causal language model, or anything else (masked LM, seq2seq, a plain torch model)
BARE, CLASSIFIER, CAUSAL_LM, OTHER = "bare", "classifier", "causal-lm", "other"
MODEL_KINDS = (BARE, CLASSIFIER, CAUSAL_LM, OTHER)


@lru_cache(maxsize=None)
def architecture_kind(name: str | None) -> str:
    """The kind (:data:`MODEL_KINDS`) of the transformers class called ``name``
    (``"BertModel"`` -> ``"bare"``, ``"GPT2LMHeadModel"`` -> ``"causal-lm"``), by
    transformers' own auto-class tables, else by the class name's ending."""
    if not name:
        return OTHER
    from transformers.models.auto import modeling_auto as auto

    def names(table) -> set[str]:
        return {n for v in table.values() for n in ((v,) if isinstance(v, str) else v)}

    if name in names(auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES) or name.endswith("ForSequenceClassification"):
        return CLASSIFIER
    if name in names(auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES) or name.endswith("ForCausalLM"):
        return CAUSAL_LM
    if name in names(auto.MODEL_MAPPING_NAMES):
        return BARE
    return OTHER


def architecture_name(model: nn.Module) -> str:
    """The name of ``model``'s class (``"LlamaForCausalLM"``), also after FSDP sharded it
    (``fully_shard`` swaps the class for a subclass named ``FSDPLlamaForCausalLM``)."""
    fsdp = sys.modules.get("torch.distributed.fsdp")  # not imported: nothing was sharded
    cls = type(model)
    if fsdp is not None and issubclass(cls, fsdp.FSDPModule):
        cls = next(c for c in cls.__mro__ if not issubclass(c, fsdp.FSDPModule))
    return cls.__name__


def model_kind(model: nn.Module) -> str:
    """The kind (:data:`MODEL_KINDS`) of ``model``: by its class (:func:`architecture_kind`);
    a transformers model whose ``base_model`` is itself is bare whatever its class name."""
    kind = architecture_kind(architecture_name(model))
    if kind == OTHER and getattr(model, "base_model_prefix", None) is not None and \
            getattr(model, "base_model", None) is model:
        return BARE
    return kind


#: the names a learned table of positions goes by (BERT and RoBERTa, GPT-2, OPT)
POSITION_TABLES = ("position_embeddings", "wpe", "embed_positions")


def position_limit(model: nn.Module) -> int | None:
    """The most tokens ``model`` can take when it looks positions up in a learned table
    (BERT's ``position_embeddings``, GPT-2's ``wpe``): the table's rows less those a padding
    offset uses, and at most the config's ``max_position_embeddings``; None for a model that
    computes its positions (rotary, ALiBi), which has no hard limit."""
    table = next((m for name, m in model.named_modules()
                  if isinstance(m, nn.Embedding) and name.rsplit(".", 1)[-1] in POSITION_TABLES), None)
    if table is None:
        return None
    rows = table.num_embeddings - (table.padding_idx + 1 if table.padding_idx is not None else 0)
    configured = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return min(rows, configured) if isinstance(configured, int) and configured > 0 else rows


def model_fingerprint(model: nn.Module) -> str:
    """``"<ClassName>:<hash>"``: the architecture and the shapes of its base weights.

    Two models with the same class and the same parameter names and shapes share a
    fingerprint whatever their values; lorakit's adapters (``.adapters.`` keys) and
    per-adapter copies of modules_to_save (``.copies.``) are left out, so the
    fingerprint is the same before and after :func:`lorakit.model.attach`.
    """
    digest = hashlib.sha1()
    for name, tensor in model.state_dict().items():
        if ".adapters." in name or ".copies." in name:
            continue
        digest.update(f"{name}:{tuple(tensor.shape)};".encode())
    return f"{architecture_name(model)}:{digest.hexdigest()[:16]}"
