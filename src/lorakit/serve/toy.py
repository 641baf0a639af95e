"""A tiny random-weight chat model and random adapters, built offline in a second.

For the server's tests, its benchmark's quick mode and for trying ``lorakit serve``
without the embedded model: :func:`write_toy_model` saves a small Llama with a
byte-level BPE tokenizer (trained here on a few sentences, with a chat template) to a
folder that ``lorakit serve --model DIR`` loads; :func:`write_random_adapter` writes a
LoRA adapter for it in PEFT's file format with random non-zero A and B, so every
adapter visibly changes the answers.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

_SENTENCES = [
    "Low-rank adaptation freezes the pretrained weights and trains two small matrices.",
    "Customers can select their desired task during inference.",
    "One foundational model can exchange matrices for every task.",
    "The quick brown fox jumps over the lazy dog.",
    "Write a SQL query that counts the rows of a table.",
    "Hello! How are you today? I am fine, thank you.",
    "Summarise this paragraph in one sentence, please.",
]
_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def write_toy_tokenizer(folder: str | Path):
    """Train a byte-level BPE tokenizer (~320 tokens) and save it with ``save_pretrained``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    core.train_from_iterator(_SENTENCES, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                        additional_special_tokens=specials[1:])
    tokenizer.chat_template = _CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    return tokenizer


def write_toy_model(folder: str | Path, seed: int = 0, layers: int = 2, hidden: int = 64) -> Path:
    """Save a random-weight Llama (``layers`` x ``hidden``) and its tokenizer to ``folder``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = Path(folder)
    tokenizer = write_toy_tokenizer(folder)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.2,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(folder)
    return folder


def write_random_adapter(model, folder: str | Path, seed: int, r: int = 8, alpha: float = 16.0,
                         targets: tuple[str, ...] = TARGETS, scale: float = 0.5) -> Path:
    """Write a LoRA adapter for ``model`` in PEFT's format with random A and B.

    ``A: (r, in_features)`` and ``B: (out_features, r)`` are Gaussian (B is not zero, as
    it would be before training) with standard deviation ``scale / sqrt(fan_in)``.
    """
    from safetensors.torch import save_file

    from lorakit.peft_format import factor_tensors

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for path, module in model.named_modules():
        weight = getattr(module, "weight", None)  # nn.Linear, or lorakit's wrapper of one
        if path.rsplit(".", 1)[-1] in targets and isinstance(weight, torch.Tensor) and weight.ndim == 2:
            out_features, in_features = weight.shape
            a = torch.randn(r, in_features, generator=generator) * (scale / in_features**0.5)
            b = torch.randn(out_features, r, generator=generator) * (scale / r**0.5)
            tensors.update(factor_tensors({path: (a, b)}))
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha, "lora_dropout": 0.0,
        "target_modules": sorted(targets), "bias": "none", "use_rslora": False, "fan_in_fan_out": False,
        "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {}, "init_lora_weights": True,
        "base_model_name_or_path": getattr(model.config, "_name_or_path", None),
    }
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return folder
