"""Tiny random-weight transformers for fast tests: same module names as the real
architectures (Llama, GPT-2 with its Conv1D, BERT, Mixtral's and GPT-OSS's fused experts),
seeded so every run is the same."""

import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    GptOssConfig,
    GptOssForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
)


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0,
    )
    return GPT2LMHeadModel(config).eval()


def tiny_bert_classifier(seed: int = 0, num_labels: int = 2) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=64, num_labels=num_labels,
    )
    return BertForSequenceClassification(config).eval()


def token_batch(batch: int = 3, length: int = 10, vocab: int = 128, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=generator)


def tiny_mixtral():
    torch.manual_seed(0)
    return MixtralForCausalLM(MixtralConfig(vocab_size=50, hidden_size=16, intermediate_size=8, num_hidden_layers=2,
                                            num_attention_heads=2, num_key_value_heads=1, num_local_experts=3,
                                            num_experts_per_tok=2)).eval()


def tiny_gpt_oss():
    torch.manual_seed(0)
    return GptOssForCausalLM(GptOssConfig(vocab_size=50, hidden_size=16, intermediate_size=8, num_hidden_layers=1,
                                          num_attention_heads=2, num_key_value_heads=1, num_local_experts=3,
                                          num_experts_per_tok=2, head_dim=8)).eval()
