"""Tiny random-weight models saved as folders with a tokenizer, for the training tests.

`lorakit train --model DIR` loads a model folder like any user's, so the tests build
small ones: a BERT classifier with a WordPiece vocabulary of letters, and a Llama
language model with a character tokenizer and a chat template. Dropout is 0 unless
asked for, so runs compare exactly.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch

BERT_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *string.ascii_lowercase,
              *(f"##{c}" for c in string.ascii_lowercase), *string.digits, *".,!?'-:;()\"",
              "the", "a", "and", "of", "film", "movie", "good", "bad", "great", "dull", "fine", "awful"]
CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


def save_tiny_classifier(folder, seed: int = 0, dropout: float = 0.0, num_labels: int = 2) -> Path:
    """A 2-layer BERT sequence classifier (hidden 32) and its tokenizer in ``folder``."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = BertTokenizer(vocab={token: i for i, token in enumerate(BERT_VOCAB)}, model_max_length=64)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(BERT_VOCAB), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=64, num_labels=num_labels,
                        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def char_tokenizer():
    """A character-level fast tokenizer: ``<pad> <s> </s> <unk>`` then printable ASCII."""
    from tokenizers import Tokenizer, decoders
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {token: i for i, token in enumerate(specials + [chr(c) for c in range(32, 127)])}
    backend = Tokenizer(BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()  # characters back together, no spaces between them
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", unk_token="<unk>", model_max_length=64)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def save_tiny_llama(folder, seed: int = 0, chat_template: bool = True) -> Path:
    """A 2-layer Llama causal LM (hidden 32, vocab 128) with a chat-template tokenizer
    (``chat_template=False``: a base model's, with none)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = Path(folder)
    tokenizer = char_tokenizer()
    if not chat_template:
        tokenizer.chat_template = None
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_jsonl(path, records) -> Path:
    path = Path(path)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def chat_records(n: int = 40) -> list[dict]:
    """Short question/answer chats with a learnable pattern (the answer repeats a word)."""
    words = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree"]
    return [{"messages": [{"role": "user", "content": f"say {words[i % 8]}"},
                          {"role": "assistant", "content": f"{words[i % 8]}!"}]} for i in range(n)]
