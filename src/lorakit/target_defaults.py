"""The modules LoRA adapts when a config names none: by model family, as PEFT's defaults.

:data:`DEFAULT_TARGETS` holds PEFT's defaults for every family PEFT names (so an adapter
trained with defaults has the same modules either way), and query/value under their own
names for a few more; :func:`default_targets` answers for any model, a family without an
entry taking the first of those name sets the model has. Asked through :mod:`lorakit.targets`.
"""

from __future__ import annotations

_QV_PROJ = ["q_proj", "v_proj"]
_QUERY_VALUE = ["query", "value"]

#: target_modules used when a config gives None, by ``model.config.model_type``: PEFT's
#: defaults for the families it names (so an adapter trained with defaults has the same
#: modules either way), and query/value under their own names for a few more
DEFAULT_TARGETS: dict[str, list[str]] = {
    **dict.fromkeys(["llama", "llama4", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma",
                     "gemma2", "gemma3_text", "olmo", "olmo2", "granite", "stablelm", "starcoder2", "opt", "bart",
                     "gptj", "gpt_neo"], _QV_PROJ),
    **dict.fromkeys(["bert", "roberta", "xlm-roberta", "camembert", "electra", "layoutlm", "albert"], _QUERY_VALUE),
    "phi": ["q_proj", "v_proj", "fc1", "fc2"], "phi3": ["qkv_proj"], "codegen": ["qkv_proj"],
    "gpt2": ["c_attn"], "gpt_bigcode": ["c_attn"], "gpt_neox": ["query_key_value"], "bloom": ["query_key_value"],
    "falcon": ["query_key_value"], "mpt": ["Wqkv"], "modernbert": ["Wqkv"],
    "distilbert": ["q_lin", "v_lin"], "deberta-v2": ["query_proj", "value_proj"], "deberta": ["in_proj"],
    "mpnet": ["q", "v"], "t5": ["q", "v"], "mt5": ["q", "v"],
}


def default_targets(model_type: str | None, linear_names: set[str]) -> list[str] | None:
    """The targets LoRA takes when none are named: the family's (:data:`DEFAULT_TARGETS`), or for
    a family without one the first of those name sets whose every name is among ``linear_names``
    (the leaf names of the model's linear layers: a BigBird or any BERT-like model has
    ``query``/``value``, most decoders ``q_proj``/``v_proj``); None where no set fits."""
    if model_type in DEFAULT_TARGETS:
        return DEFAULT_TARGETS[model_type]
    conventions = dict.fromkeys(tuple(names) for names in DEFAULT_TARGETS.values())
    return next((list(names) for names in conventions if set(linear_names).issuperset(names)), None)
